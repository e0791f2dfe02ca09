//! The operator's side of the sqlx store: purging expired records and
//! reading the store's gauges, as
//! [`PostgresStore::purge_expired`](crate::PostgresStore::purge_expired) and
//! [`PostgresStore::gauges`](crate::PostgresStore::gauges) do, with the same
//! statements and metrics. Inspecting and deleting single records is
//! `PostgresStore`'s and `idempotency-admin`'s, on the same table.

use std::time::Duration;

use ::sqlx::{AssertSqlSafe, Row};
use tokio::task::JoinHandle;

use super::error::connect_error;
use super::SqlxStore;
use crate::store::postgres::sql::OperationsSql;
use crate::store::tasks;
use crate::store::{StoreError, StoreGauges};

impl SqlxStore {
    /// The store's gauges (open claims, claims past their lease, expired
    /// records awaiting purge, the table's size), read through the two
    /// indexes as [`PostgresStore::gauges`](crate::PostgresStore::gauges)
    /// does.
    pub async fn gauges(&self) -> Result<StoreGauges, StoreError> {
        let mut connection = self.inner.settings.pool.acquire().await.map_err(connect_error)?;
        let statement = OperationsSql::gauges(&self.table_name().quoted());
        // No parameters: a simple query, whatever the pool mode.
        let row = ::sqlx::raw_sql(AssertSqlSafe(statement))
            .fetch_one(&mut *connection)
            .await?;
        let age = |seconds: Option<f64>| seconds.map(|seconds| Duration::from_secs_f64(seconds.max(0.0)));
        Ok(StoreGauges {
            oldest_open_claim_age: age(row.try_get(0)?),
            claims_past_lease: row.try_get(1)?,
            expired_awaiting_purge: row.try_get(2)?,
            oldest_expired_age: age(row.try_get(3)?),
            table_bytes: row.try_get(4)?,
        })
    }

    /// Reads the gauges every `every` and exports them through the
    /// `metrics` facade with `idempotency_store_up`, as
    /// [`PostgresStore::spawn_metrics_task`](crate::PostgresStore::spawn_metrics_task)
    /// does, until the returned task is aborted.
    ///
    /// ```no_run
    /// # fn run(store: tower_idempotency::SqlxStore) {
    /// use std::time::Duration;
    /// let metrics_task = store.spawn_metrics_task(Duration::from_secs(15));
    /// // ... on shutdown:
    /// metrics_task.abort();
    /// # }
    /// ```
    pub fn spawn_metrics_task(&self, every: Duration) -> JoinHandle<()> {
        let store = self.clone();
        let table = self.table_name().display.clone();
        tasks::spawn_gauges(table, every, move || {
            let store = store.clone();
            async move { store.gauges().await }
        })
    }

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
        let table = self.table_name().display.clone();
        tasks::spawn_purge(table, every, move || {
            let store = store.clone();
            async move { store.purge_expired(batch).await }
        })
    }
}
