//! [`SqlxStore::migrate`]: the same check and creation as
//! [`PostgresStore::migrate`](crate::PostgresStore::migrate), over an sqlx
//! connection. The SQL that creates the table is
//! [`PostgresStore::migration_sql`](crate::PostgresStore::migration_sql), the
//! same for both drivers.

use ::sqlx::{AssertSqlSafe, Connection, Row};

use super::error::connect_error;
use super::SqlxStore;
use crate::store::postgres::sql;
use crate::store::postgres::{migration_lock_id, refused_for_privilege, Found, TABLE_PRIVILEGES};
use crate::store::StoreError;

impl SqlxStore {
    /// Makes sure the schema (if named), the table and its expiry index
    /// exist, creating only what is missing, and that the role may use
    /// them; safe to run on every start, from many instances at once. As
    /// [`PostgresStore::migrate`](crate::PostgresStore::migrate), whose
    /// errors ([`StoreError::CannotCreate`], [`StoreError::MissingGrant`])
    /// it shares.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let name = self.table_name();
        let mut connection = self.inner.settings.pool.acquire().await.map_err(connect_error)?;
        let mut transaction = connection.begin().await?;
        // Run once per start: unnamed, whatever the pool mode.
        ::sqlx::query(AssertSqlSafe(sql::take_migration_lock().text))
            .bind(migration_lock_id(name))
            .persistent(false)
            .execute(&mut *transaction)
            .await?;
        let row = ::sqlx::query(AssertSqlSafe(sql::inspect_migration().text))
            .bind(name.schema.as_deref())
            .bind(name.table.as_str())
            .bind(&TABLE_PRIVILEGES[..])
            .persistent(false)
            .fetch_one(&mut *transaction)
            .await?;
        let found = Found {
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
        };
        for step in found.missing_steps(name) {
            if step.optional {
                ::sqlx::raw_sql(sql::SAVEPOINT_OPTIONAL_STEP)
                    .execute(&mut *transaction)
                    .await?;
            }
            let statement = AssertSqlSafe(step.sql.clone());
            match ::sqlx::raw_sql(statement).execute(&mut *transaction).await {
                Ok(_) => {}
                Err(error) => {
                    let error = StoreError::from(error);
                    if !(step.optional && refused_for_privilege(&error)) {
                        return Err(step.refused(error, &found.role));
                    }
                    ::sqlx::raw_sql(sql::ROLLBACK_OPTIONAL_STEP)
                        .execute(&mut *transaction)
                        .await?;
                    step.warn_skipped(&found.role);
                }
            }
        }
        if found.table_exists {
            found.check_grants(name)?;
        }
        transaction.commit().await?;
        Ok(())
    }
}
