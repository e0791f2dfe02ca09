//! The published schema: the committed migration file, and the SQL of
//! `PostgresStore::migration_sql`, which must build the same table as
//! `PostgresStore::migrate()`.

mod support;

use support::{connect, TestDb};
use tower_idempotency::{PostgresStore, DEFAULT_TABLE};

/// The committed migrations, in the order a migration tool applies them.
const COMMITTED_MIGRATIONS: [&str; 2] = [
    "migrations/0001_idempotency_records.sql",
    "migrations/0002_idempotency_records_open_claims.sql",
];

/// The statements of an SQL text, without its comment lines.
fn statements(sql: &str) -> Vec<String> {
    let text: Vec<&str> = sql.lines().filter(|line| !line.starts_with("--")).collect();
    text.join("\n")
        .split_inclusive(';')
        .map(|statement| statement.trim().to_owned())
        .filter(|statement| !statement.is_empty())
        .collect()
}

#[test]
fn the_committed_migrations_are_the_sql_for_the_default_table() {
    let committed: Vec<String> = COMMITTED_MIGRATIONS
        .iter()
        .flat_map(|file| {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
            let sql = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
            statements(&sql)
        })
        .collect();
    let generated = statements(&PostgresStore::migration_sql(DEFAULT_TABLE).unwrap());
    assert_eq!(
        committed, generated,
        "{COMMITTED_MIGRATIONS:?} differ from PostgresStore::migration_sql({DEFAULT_TABLE:?}): regenerate them"
    );
}

#[test]
fn migration_sql_refuses_a_table_name_that_is_not_a_plain_identifier() {
    assert!(PostgresStore::migration_sql("billing.records; DROP TABLE x").is_err());
}

/// The table's shape in `schema`: columns with type, nullability and default,
/// then its constraints and indexes with the schema name taken out.
async fn table_shape(client: &tokio_postgres::Client, schema: &str, table: &str) -> Vec<String> {
    let columns = client
        .query(
            "SELECT a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
                    || CASE WHEN a.attnotnull THEN ' NOT NULL' ELSE '' END
                    || coalesce(' DEFAULT ' || pg_get_expr(d.adbin, d.adrelid), '')
             FROM pg_attribute a
             LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
             WHERE a.attrelid = format('%I.%I', $1::text, $2::text)::regclass AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await
        .unwrap();
    let constraints_and_indexes = client
        .query(
            "SELECT 'constraint ' || conname || ' ' || pg_get_constraintdef(oid)
             FROM pg_constraint WHERE conrelid = format('%I.%I', $1::text, $2::text)::regclass
             UNION ALL
             SELECT 'index ' || pg_get_indexdef(indexrelid)
             FROM pg_index WHERE indrelid = format('%I.%I', $1::text, $2::text)::regclass
             ORDER BY 1",
            &[&schema, &table],
        )
        .await
        .unwrap();
    columns
        .iter()
        .chain(&constraints_and_indexes)
        .map(|row| row.get::<_, String>(0).replace(&format!("{schema}."), "<schema>."))
        .collect()
}

#[tokio::test]
async fn migration_sql_builds_the_same_table_as_migrate() {
    let db = TestDb::new("migration_sql_shape").await;
    let applied = format!("{}_sql", db.schema);
    let migrated = format!("{}_migrate", db.schema);
    let admin = connect().await;

    admin
        .batch_execute(&PostgresStore::migration_sql(&format!("{applied}.records")).unwrap())
        .await
        .expect("the published SQL applies");
    PostgresStore::new(db.pool.clone())
        .with_table(&format!("{migrated}.records"))
        .unwrap()
        .migrate()
        .await
        .expect("migrate");

    let from_sql = table_shape(&admin, &applied, "records").await;
    let from_migrate = table_shape(&admin, &migrated, "records").await;
    admin
        .batch_execute(&format!(
            "DROP SCHEMA {applied} CASCADE; DROP SCHEMA {migrated} CASCADE"
        ))
        .await
        .unwrap();
    assert_eq!(from_sql, from_migrate);
    assert!(
        from_sql
            .iter()
            .any(|line| line.contains("PRIMARY KEY (source, event_type, key)")),
        "{from_sql:#?}"
    );
    assert!(
        from_sql
            .iter()
            .any(|line| line.contains("records_expires_at ON <schema>.records USING btree (expires_at)")),
        "{from_sql:#?}"
    );
    assert!(
        from_sql
            .iter()
            .any(|line| line
                .contains("records_open_claims ON <schema>.records USING btree (created_at) WHERE (state = 1)")),
        "{from_sql:#?}"
    );
    db.drop_schema().await;
}
