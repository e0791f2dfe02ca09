//! The records table's schema: the SQL that creates it, published for
//! migration tools, and [`PostgresStore::migrate`], which runs only the part
//! of it that is missing, so that a role without DDL rights can start once
//! the table exists.

use tokio_postgres::Transaction;

use super::sql;
use super::{InvalidTableName, PoolMode, TableName};
use super::{PostgresStore, StoreError};
use crate::key::RecordKey;

/// The privileges the layer uses on the records table: reads, claims,
/// completions, releases and purges.
pub(in crate::store) const TABLE_PRIVILEGES: [&str; 4] = ["SELECT", "INSERT", "UPDATE", "DELETE"];

/// Postgres' `insufficient_privilege`.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

impl PostgresStore {
    /// The SQL that creates the records table `table` (`table` or
    /// `schema.table`, as for [`PostgresStore::with_table`]), its expiry
    /// index, its open claims' index and, for `schema.table`, the schema:
    /// for the migration tool you already use (sqlx-cli, refinery, Flyway,
    /// dbmate), run by a role allowed to create them. Every statement is `IF NOT EXISTS`.
    /// [`PostgresStore::migrate`] then only checks, and the application's
    /// role needs no more than `USAGE` on the schema and `SELECT`, `INSERT`,
    /// `UPDATE` and `DELETE` on the table.
    ///
    /// The SQL for the default table is also committed, for migration
    /// tools, as `migrations/0001_idempotency_records.sql` (the table and
    /// its expiry index) and `migrations/0002_idempotency_records_open_claims.sql`
    /// (the index of open claims the store gauges read, added later).
    ///
    /// ```
    /// use tower_idempotency::PostgresStore;
    ///
    /// let sql = PostgresStore::migration_sql("billing.idempotency_records")?;
    /// assert!(sql.contains(r#"CREATE TABLE IF NOT EXISTS "billing"."idempotency_records""#));
    /// // Write it where your tool looks, e.g. migrations/20250101000000_idempotency.sql
    /// # Ok::<(), tower_idempotency::InvalidTableName>(())
    /// ```
    pub fn migration_sql(table: &str) -> Result<String, InvalidTableName> {
        let name = TableName::parse(table)?;
        let mut sql = format!(
            "-- tower-idempotency's records table{}, from PostgresStore::migration_sql({:?}).\n\
             -- Once it is applied, PostgresStore::migrate() only checks it.\n",
            if name.schema.is_some() {
                ", its indexes and its schema"
            } else {
                " and its indexes"
            },
            name.display,
        );
        if let Some(schema) = &name.schema {
            sql.push_str(&sql::create_schema(schema));
        }
        sql.push_str(&sql::create_table(&name));
        sql.push_str(&sql::create_index(&name));
        sql.push_str(&sql::create_open_claims_index(&name));
        Ok(sql)
    }

    /// Makes sure the schema (if named), the table and its indexes (expiry,
    /// open claims) exist, creating only what is missing, and that the role
    /// may use them.
    /// Safe to run on every start, from many instances at once: the check
    /// and any creation run in one transaction under an advisory lock.
    ///
    /// Once the table exists (created by a privileged role, or by your
    /// migration tool from [`PostgresStore::migration_sql`]), a role with
    /// only `USAGE` on the schema and `SELECT`, `INSERT`, `UPDATE`, `DELETE`
    /// on the table passes. Something missing that the role may not create
    /// is [`StoreError::CannotCreate`]; a missing grant is
    /// [`StoreError::MissingGrant`]; each names the object and privilege.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let name = self.table_name();
        let mut client = self.connection().await?;
        let transaction = client.transaction().await?;
        let lock_id = migration_lock_id(name);
        let mode = self.pool_mode();
        mode.unprepared(&sql::take_migration_lock())
            .execute_in(&transaction, &[&lock_id])
            .await?;
        let found = Found::inspect(&transaction, mode, name).await?;
        for step in found.missing_steps(name) {
            if step.optional {
                transaction.batch_execute(sql::SAVEPOINT_OPTIONAL_STEP).await?;
            }
            match transaction.batch_execute(&step.sql).await {
                Ok(()) => {}
                Err(error) if step.optional && is_insufficient_privilege(&error) => {
                    transaction.batch_execute(sql::ROLLBACK_OPTIONAL_STEP).await?;
                    step.warn_skipped(&found.role);
                }
                Err(error) => return Err(step.refused(error.into(), &found.role)),
            }
        }
        if found.table_exists {
            found.check_grants(name)?;
        }
        transaction.commit().await?;
        Ok(())
    }
}

/// The advisory lock that makes concurrent migrations of one table take
/// turns, whichever driver runs them.
pub(in crate::store) fn migration_lock_id(name: &TableName) -> i64 {
    RecordKey {
        source: String::new(),
        event_type: String::new(),
        key: String::new(),
    }
    .lock_id(&format!("migrate {}", name.display))
}

/// What [`sql::inspect_migration`] found.
pub(in crate::store) struct Found {
    pub(in crate::store) role: String,
    /// The role as an SQL identifier, for a `GRANT` to suggest.
    pub(in crate::store) grantee: String,
    pub(in crate::store) database: String,
    /// The table's schema, or where it would be created (none when no
    /// schema of the `search_path` exists).
    pub(in crate::store) schema: Option<String>,
    pub(in crate::store) schema_exists: bool,
    pub(in crate::store) schema_usage: bool,
    pub(in crate::store) table_exists: bool,
    pub(in crate::store) index_exists: bool,
    pub(in crate::store) open_claims_index_exists: bool,
    pub(in crate::store) missing_privileges: Vec<String>,
}

impl Found {
    async fn inspect(transaction: &Transaction<'_>, mode: PoolMode, name: &TableName) -> Result<Self, StoreError> {
        let row = mode
            .unprepared(&sql::inspect_migration())
            .query_one_in(transaction, &[&name.schema, &name.table, &&TABLE_PRIVILEGES[..]])
            .await?;
        Ok(Self {
            role: row.try_get("role")?,
            grantee: row.try_get("grantee")?,
            database: row.try_get("database")?,
            schema: row.try_get("schema")?,
            schema_exists: row.try_get("schema_exists")?,
            schema_usage: row.try_get("schema_usage")?,
            table_exists: row.try_get("table_exists")?,
            index_exists: row.try_get("index_exists")?,
            open_claims_index_exists: row.try_get("open_claims_index_exists")?,
            missing_privileges: row.try_get("missing_privileges")?,
        })
    }

    /// The table as the server names it, for messages.
    fn qualified(&self, relation: &str) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{relation}"),
            None => relation.to_owned(),
        }
    }

    /// The statements still to run, in order.
    pub(in crate::store) fn missing_steps(&self, name: &TableName) -> Vec<Step> {
        let table = format!("table {}", self.qualified(&name.table));
        let mut steps = Vec::new();
        if let (Some(schema), false) = (&name.schema, self.schema_exists) {
            steps.push(Step {
                sql: sql::create_schema(schema),
                object: format!("schema {schema}"),
                privilege: format!("CREATE on database {}", self.database),
                optional: false,
            });
        }
        if !self.table_exists {
            steps.push(Step {
                sql: sql::create_table(name),
                object: table.clone(),
                privilege: match &self.schema {
                    Some(schema) => format!("CREATE on schema {schema}"),
                    None => "CREATE on a schema of its search_path".to_owned(),
                },
                optional: false,
            });
        }
        if !self.table_exists || !self.index_exists {
            steps.push(Step {
                sql: sql::create_index(name),
                object: format!("index {}", self.qualified(&sql::index_name(name))),
                // Only a table's owner may index it, whatever the schema's grants.
                privilege: format!("ownership of {table}"),
                optional: false,
            });
        }
        if !self.table_exists || !self.open_claims_index_exists {
            steps.push(Step {
                sql: sql::create_open_claims_index(name),
                object: format!("index {}", self.qualified(&sql::open_claims_index_name(name))),
                privilege: format!("ownership of {table}"),
                // Added after the table was first published: a deployment
                // whose role only has DML still starts without it.
                optional: self.table_exists,
            });
        }
        steps
    }

    /// The grants the layer needs on an existing table.
    pub(in crate::store) fn check_grants(&self, name: &TableName) -> Result<(), StoreError> {
        if let (Some(schema), false) = (&self.schema, self.schema_usage) {
            return Err(StoreError::MissingGrant {
                object: format!("schema {schema}"),
                role: self.role.clone(),
                grantee: self.grantee.clone(),
                privileges: "USAGE".to_owned(),
            });
        }
        if !self.missing_privileges.is_empty() {
            return Err(StoreError::MissingGrant {
                object: format!("table {}", self.qualified(&name.table)),
                role: self.role.clone(),
                grantee: self.grantee.clone(),
                privileges: self.missing_privileges.join(", "),
            });
        }
        Ok(())
    }
}

/// One creation, and what it needs.
pub(in crate::store) struct Step {
    pub(in crate::store) sql: String,
    object: String,
    privilege: String,
    /// Whether the store works without it (more slowly): a role that may
    /// not create it is warned, not refused.
    pub(in crate::store) optional: bool,
}

fn is_insufficient_privilege(error: &tokio_postgres::Error) -> bool {
    error.code().map(|code| code.code()) == Some(INSUFFICIENT_PRIVILEGE)
}

/// Whether `error` is the server refusing for want of a privilege.
pub(in crate::store) fn refused_for_privilege(error: &StoreError) -> bool {
    match error {
        StoreError::Database(database) => database.sqlstate() == Some(INSUFFICIENT_PRIVILEGE),
        _ => false,
    }
}

impl Step {
    /// An optional step the role may not run was left out: says what the
    /// store does without it, and who can add it.
    pub(in crate::store) fn warn_skipped(&self, role: &str) {
        tracing::warn!(
            object = %self.object,
            role = %role,
            "cannot create {} without {}: the store gauges' read of open claims scans the table until \
             the owner creates it (migrations/0002_idempotency_records_open_claims.sql for the default \
             table, or PostgresStore::migration_sql())",
            self.object,
            self.privilege,
        );
    }

    /// The error to report when the step failed with `error`.
    pub(in crate::store) fn refused(self, error: StoreError, role: &str) -> StoreError {
        if !refused_for_privilege(&error) {
            return error;
        }
        StoreError::CannotCreate {
            object: self.object,
            role: role.to_owned(),
            privilege: self.privilege,
        }
    }
}
