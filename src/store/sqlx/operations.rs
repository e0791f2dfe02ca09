//! The operator's side of the sqlx store: purging expired records, as
//! [`PostgresStore::purge_expired`](crate::PostgresStore::purge_expired)
//! does, with the same statement. Inspecting and deleting single records is
//! `PostgresStore`'s and `idempotency-admin`'s, on the same table.

use std::time::Duration;

use ::sqlx::{AssertSqlSafe, Row};
use tokio::task::JoinHandle;

use super::error::connect_error;
use super::SqlxStore;
use crate::store::postgres::sql::OperationsSql;
use crate::store::StoreError;

impl SqlxStore {
    /// How many expired records a purge would delete now.
    pub async fn count_expired(&self) -> Result<i64, StoreError> {
        let mut connection = self.inner.settings.pool.acquire().await.map_err(connect_error)?;
        let statement = OperationsSql::count_expired(&self.table_name().quoted());
        let row = ::sqlx::query(AssertSqlSafe(statement.text))
            .persistent(false)
            .fetch_one(&mut *connection)
            .await?;
        Ok(row.try_get(0)?)
    }

    /// Deletes expired records in batches of `batch` until none are left,
    /// each batch its own short transaction; returns how many it deleted.
    /// Safe to run from every instance at once. A live record (completed
    /// and unexpired, or in flight with a running lease) is never deleted.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let mut connection = self.inner.settings.pool.acquire().await.map_err(connect_error)?;
        let statement = OperationsSql::purge_batch(&self.table_name().quoted());
        let limit = i64::from(batch.max(1));
        let mut deleted = 0;
        loop {
            let done = ::sqlx::query(AssertSqlSafe(statement.text.as_str()))
                .bind(limit)
                .persistent(self.prepares())
                .execute(&mut *connection)
                .await?;
            deleted += done.rows_affected();
            if done.rows_affected() < limit as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Purges expired records every `every`, in batches of `batch`, until the
    /// returned task is aborted; a failed purge is logged and retried at the
    /// next tick. Every instance may run one.
    ///
    /// ```no_run
    /// # fn run(store: tower_idempotency::SqlxStore) {
    /// use std::time::Duration;
    /// let purger = store.spawn_purge_task(Duration::from_secs(60), 10_000);
    /// // ... on shutdown:
    /// purger.abort();
    /// # }
    /// ```
    pub fn spawn_purge_task(&self, every: Duration, batch: u32) -> JoinHandle<()> {
        let store = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                match store.purge_expired(batch).await {
                    Ok(0) => {}
                    Ok(deleted) => tracing::info!(deleted, "purged expired idempotency records"),
                    Err(error) => tracing::warn!(%error, "purging expired idempotency records failed"),
                }
            }
        })
    }
}
