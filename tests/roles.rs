//! Roles without DDL rights: after a privileged first start, a role holding
//! only `USAGE` on the schema and DML grants on the tables migrates, runs
//! the layer, starts the example receiver and runs `idempotency-admin`;
//! where something is missing that it may not create, `migrate()` names the
//! object and the privilege.
//!
//! Roles are cluster-wide: each test's role carries the process id and is
//! dropped by its guard, even when the test fails.

mod process;
mod support;

use std::time::Duration;

use deadpool_postgres::Pool;
use process::{Receiver, Schema};
use support::{connect, request, send, Probe, TestDb};
use tower_idempotency::{IdempotencyLayer, OrderingGuard, PostgresStore, StoreError};

const PASSWORD: &str = "roles-test";

/// A login role of the test's own, with no privilege until granted one.
struct Role {
    name: String,
}

impl Role {
    async fn create(label: &str) -> Self {
        let name = format!("r_{label}_{}", std::process::id());
        // A role left by an earlier run that died goes first.
        let sql = format!(
            "DO $$ BEGIN
                 IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{name}') THEN
                     EXECUTE 'DROP OWNED BY {name}'; EXECUTE 'DROP ROLE {name}';
                 END IF;
             END $$;
             CREATE ROLE {name} LOGIN PASSWORD '{PASSWORD}'"
        );
        connect()
            .await
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|error| panic!("cannot create the role {name}: {error}"));
        Self { name }
    }

    /// What an application role holds in production: `USAGE` on the
    /// schema, DML on its tables, `USAGE` on their sequences; no `CREATE`.
    async fn grant_dml(&self, schema: &str) {
        let name = &self.name;
        connect()
            .await
            .batch_execute(&format!(
                "GRANT USAGE ON SCHEMA {schema} TO {name};
                 GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {name};
                 GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO {name};"
            ))
            .await
            .expect("grant DML");
    }

    async fn grant(&self, sql: &str) {
        connect()
            .await
            .batch_execute(&sql.replace("{role}", &self.name))
            .await
            .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }

    /// The role's connection settings: DATABASE_URL's server and database,
    /// this role, `schema` first in the search_path, and `schema` as the
    /// `application_name`.
    fn config(&self, schema: &str) -> tokio_postgres::Config {
        let mut config = support::database_config();
        config.user(&self.name).password(PASSWORD);
        support::on_schema(config, schema, schema)
    }

    /// The same as a URL, for the child processes.
    fn url(&self, schema: &str) -> String {
        let config = self.config(schema);
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => panic!("these tests need DATABASE_URL to name a TCP host"),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let database = config.get_dbname().unwrap_or("postgres");
        format!(
            "postgres://{}:{PASSWORD}@{host}:{port}/{database}?options=-csearch_path%3D{schema}&application_name={schema}",
            self.name
        )
    }

    fn pool(&self, schema: &str) -> Pool {
        support::pool(self.config(schema), 4, Some(Duration::from_secs(10)))
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let name = &self.name;
        support::execute_detached(
            format!("DROP OWNED BY {name}; DROP ROLE IF EXISTS {name}"),
            Duration::from_secs(30),
        );
    }
}

#[tokio::test]
async fn migrate_as_a_role_with_dml_grants_only_passes_once_the_table_exists_and_the_layer_works() {
    let db = TestDb::new("roles_dml_migrate").await;
    db.store().await;
    let role = Role::create("dml_migrate").await;
    role.grant_dml(&db.schema).await;

    let store = PostgresStore::new(role.pool(&db.schema));
    store.migrate().await.expect("migrate as a role without CREATE");
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store.clone()));
    let first = send(&app, request(Some("k"), "{}", &[])).await;
    let replay = send(&app, request(Some("k"), "{}", &[])).await;

    assert!(first.status.is_success(), "{first:?}");
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(probe.runs(), 1);
    assert_eq!(db.records().await, 1);
    store.pool().close();
    db.drop_schema().await;
}

#[tokio::test]
async fn migrate_without_the_table_names_it_and_the_create_privilege_the_role_lacks() {
    let db = TestDb::new("roles_no_table").await;
    let role = Role::create("no_table").await;
    role.grant_dml(&db.schema).await;

    let error = PostgresStore::new(role.pool(&db.schema))
        .migrate()
        .await
        .expect_err("the role may not create the table");

    let schema = &db.schema;
    assert!(
        matches!(&error, StoreError::CannotCreate { object, role: who, privilege }
            if *object == format!("table {schema}.idempotency_records")
                && *who == role.name
                && *privilege == format!("CREATE on schema {schema}")),
        "{error:?}"
    );
    let message = error.to_string();
    assert!(
        message.starts_with(&format!(
            "cannot create table {schema}.idempotency_records: the role `{}` lacks CREATE on schema {schema}",
            role.name
        )),
        "{message}"
    );
    assert!(message.contains("migrations/0001_idempotency_records.sql"), "{message}");
    db.drop_schema().await;
}

#[tokio::test]
async fn migrate_without_the_expiry_index_names_it_and_the_table_ownership_it_takes() {
    let db = TestDb::new("roles_no_index").await;
    db.store().await;
    db.client()
        .await
        .batch_execute("DROP INDEX idempotency_records_expires_at")
        .await
        .unwrap();
    let role = Role::create("no_index").await;
    role.grant_dml(&db.schema).await;
    // CREATE on the schema is not enough: only the owner may index a table.
    role.grant(&format!("GRANT CREATE ON SCHEMA {} TO {{role}}", db.schema))
        .await;

    let error = PostgresStore::new(role.pool(&db.schema))
        .migrate()
        .await
        .expect_err("the role may not index the table");

    let schema = &db.schema;
    assert!(
        error.to_string().starts_with(&format!(
            "cannot create index {schema}.idempotency_records_expires_at: the role `{}` lacks ownership of \
             table {schema}.idempotency_records",
            role.name
        )),
        "{error}"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_role_with_only_dml_starts_on_a_table_published_before_the_open_claims_index() {
    let db = TestDb::new("roles_no_open_claims_index").await;
    db.store().await;
    let drop_index = "DROP INDEX idempotency_records_open_claims";
    db.client().await.batch_execute(drop_index).await.unwrap();
    let role = Role::create("no_claims_index").await;
    role.grant_dml(&db.schema).await;

    PostgresStore::new(role.pool(&db.schema))
        .migrate()
        .await
        .expect("the index is optional: the role is warned, not refused");

    let open_claims_index = format!(
        "SELECT count(*) FROM pg_indexes WHERE schemaname = '{}' AND indexname = 'idempotency_records_open_claims'",
        db.schema
    );
    let indexes = db.count(&open_claims_index).await;
    assert_eq!(
        indexes, 0,
        "the role could not create it, and the migration went on without it"
    );
    // The owner's migrate creates it.
    db.store().await;
    let indexes = db.count(&open_claims_index).await;
    assert_eq!(indexes, 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn migrate_into_a_missing_schema_names_it_and_the_database_privilege_the_role_lacks() {
    let db = TestDb::new("roles_no_schema").await;
    let role = Role::create("no_schema").await;
    let missing = format!("{}_absent", db.schema);

    let error = PostgresStore::new(role.pool(&db.schema))
        .with_table(&format!("{missing}.records"))
        .unwrap()
        .migrate()
        .await
        .expect_err("the role may not create a schema");

    let database = support::database_config().get_dbname().unwrap_or("postgres").to_owned();
    assert!(
        error.to_string().starts_with(&format!(
            "cannot create schema {missing}: the role `{}` lacks CREATE on database {database}",
            role.name
        )),
        "{error}"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn migrate_names_the_table_privileges_the_layer_needs_and_the_role_lacks() {
    let db = TestDb::new("roles_missing_grants").await;
    db.store().await;
    let role = Role::create("missing_grants").await;
    role.grant(&format!(
        "GRANT USAGE ON SCHEMA {schema} TO {{role}}; GRANT SELECT, INSERT ON {schema}.idempotency_records TO {{role}}",
        schema = db.schema
    ))
    .await;

    let error = PostgresStore::new(role.pool(&db.schema))
        .migrate()
        .await
        .expect_err("the role lacks UPDATE and DELETE");

    assert_eq!(
        error.to_string(),
        format!(
            "the role `{role}` lacks UPDATE, DELETE on table {schema}.idempotency_records, which the layer needs: \
             as the owner, run GRANT UPDATE, DELETE ON table {schema}.idempotency_records TO {role}",
            role = role.name,
            schema = db.schema
        )
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn an_ordering_guard_table_that_exists_is_not_created_again_by_a_role_without_create() {
    let db = TestDb::new("roles_ordering_guard").await;
    let guard = OrderingGuard::new("payment_states", "payment_id")
        .unwrap()
        .then(["created"])
        .terminal(["succeeded"]);
    let mut owner = db.client().await;
    guard.create_table(&mut owner).await.expect("as the owner");
    drop(owner);
    let role = Role::create("ordering_guard").await;
    role.grant_dml(&db.schema).await;
    let pool = role.pool(&db.schema);

    let mut client = pool.get().await.unwrap();
    guard
        .create_table(&mut client)
        .await
        .expect("create_table as a role without CREATE");
    let applied = guard.advance(&client, "pi_1", "created").await.expect("advance");

    assert!(applied.changed());
    drop(client);
    pool.close();
    db.drop_schema().await;
}

#[tokio::test]
async fn the_example_receiver_starts_as_a_role_with_dml_grants_only_and_serves_a_delivery_and_its_replay() {
    let schema = Schema::new("roles_receiver").await;
    // The privileged first start creates the tables.
    Receiver::start(&schema, &[]).await.kill().await;
    let role = Role::create("receiver").await;
    role.grant_dml(&schema.name).await;
    let role_url = role.url(&schema.name);

    let receiver = Receiver::start(&schema, &[("DATABASE_URL", &role_url)]).await;
    let first = receiver.deliver("evt_role").await;
    let replay = receiver.deliver("evt_role").await;

    assert_eq!(first.status, http::StatusCode::OK, "{first:?}");
    assert_eq!(replay.status, http::StatusCode::OK, "{replay:?}");
    assert!(!first.replayed() && replay.replayed());
    assert_eq!(first.body, replay.body);
    assert_eq!(schema.ledger_rows_for("stripe", "evt_role").await, 1);
    let sessions_as_the_role: i64 = schema
        .db
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND usename = $2",
            &[&schema.name, &role.name],
        )
        .await
        .expect("pg_stat_activity")
        .get(0);
    assert!(sessions_as_the_role > 0, "the receiver connects as the role");
    receiver.kill().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn idempotency_admin_stats_runs_as_a_role_with_dml_grants_only() {
    let db = TestDb::new("roles_admin_stats").await;
    db.store().await;
    let role = Role::create("admin_stats").await;
    role.grant_dml(&db.schema).await;

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_idempotency-admin"))
        .args(["stats", "--json"])
        .env("DATABASE_URL", role.url(&db.schema))
        .output()
        .expect("run idempotency-admin");

    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let figures: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stats as JSON");
    assert_eq!(figures["completed"], 0);
    db.drop_schema().await;
}
