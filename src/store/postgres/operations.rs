//! Operating the Postgres store: figures, purging expired records, the
//! gauges a metrics task exports, and inspecting or releasing one record.
//! The admin command `idempotency-admin` is built on these; applications can
//! report the same figures.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::task::JoinHandle;

use super::sql::{OperationsSql, COMPLETED};
use super::{PostgresStore, StoreError};
use crate::key::RecordKey;
use crate::record::decode_headers;
use crate::store::tasks;

/// Figures about the records table. Each record counts in exactly one of
/// the four counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreStats {
    /// Open claims with a running lease (lease mode), past their retention
    /// or not: a lease still being renewed outlives retention.
    pub in_flight: i64,
    /// Unexpired completed records.
    pub completed: i64,
    /// Records a purge would delete now: past `expires_at`, and not an open
    /// claim with a running lease.
    pub expired_awaiting_purge: i64,
    /// Open claims whose lease has run out before their retention did (their
    /// claimant died or stalled; the next delivery takes them over).
    pub leases_past_expiry: i64,
    /// When the oldest open claim with a running lease was taken.
    pub oldest_in_flight: Option<SystemTime>,
}

/// Figures about the records table cheap enough to read every few seconds
/// from every instance: [`PostgresStore::gauges`] reads them through the
/// table's indexes, never the whole table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreGauges {
    /// How long ago the oldest open claim with a running lease was taken
    /// (lease mode; a transaction-mode claim is an open transaction, not a
    /// row); `None` when there is none.
    pub oldest_open_claim_age: Option<Duration>,
    /// Open claims whose lease has run out: their claimant died or stalled
    /// and no delivery has taken them over yet.
    pub claims_past_lease: i64,
    /// Records a purge would delete now, counted up to 10,000 (one default
    /// purge batch): past it, [`StoreGauges::oldest_expired_age`] tells how
    /// far behind the purge is.
    pub expired_awaiting_purge: i64,
    /// How long ago the oldest record a purge would delete expired; `None`
    /// when there is none.
    pub oldest_expired_age: Option<Duration>,
    /// The table's size on disk, with its indexes and TOAST.
    pub table_bytes: i64,
}

/// One record as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordView {
    /// `"in_flight"` or `"completed"`.
    pub state: &'static str,
    /// Hex SHA-256 fingerprint of the first request.
    pub fingerprint: String,
    /// When the claim was taken.
    pub created_at: SystemTime,
    /// When the record completed.
    pub completed_at: Option<SystemTime>,
    /// When the record stops counting and may be purged.
    pub expires_at: SystemTime,
    /// Until when an open claim's lease runs.
    pub locked_until: Option<SystemTime>,
    /// The stored response status.
    pub response_status: Option<u16>,
    /// The stored response headers, in order.
    pub response_headers: Vec<(String, Vec<u8>)>,
    /// The stored response trailers, if any.
    pub response_trailers: Option<Vec<(String, Vec<u8>)>>,
    /// The stored response body; `None` when it was over the storage limit
    /// or the record is not completed.
    pub response_body: Option<Bytes>,
}

/// What [`PostgresStore::delete_record`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deletion {
    /// The record was deleted; the next delivery runs the handler.
    Deleted,
    /// No such record.
    NotFound,
    /// The record is an open claim with a live lease (in flight); delete
    /// it with `force` to let a second delivery run beside the first.
    InFlight,
}

impl PostgresStore {
    /// Counts records by state, expired records awaiting purge and leases
    /// past their expiry. It reads the whole table: an operator's query, not
    /// one for every request.
    pub async fn stats(&self) -> Result<StoreStats, StoreError> {
        let client = self.connection().await?;
        let statement = OperationsSql::stats(&self.quoted_table());
        let row = self.pool_mode().unprepared(&statement).query_one(&client, &[]).await?;
        Ok(StoreStats {
            in_flight: row.try_get(0)?,
            completed: row.try_get(1)?,
            expired_awaiting_purge: row.try_get(2)?,
            leases_past_expiry: row.try_get(3)?,
            oldest_in_flight: row.try_get(4)?,
        })
    }

    /// The gauges of [`StoreGauges`], in one statement that reads the open
    /// claims' index, at most 10,000 entries of the expiry index, and the
    /// table's size from its files, whatever the size of the table: under a
    /// millisecond while the purge keeps up, some milliseconds when 10,000
    /// records or more await it (the README's "Operating it" has its plan
    /// and measurements).
    pub async fn gauges(&self) -> Result<StoreGauges, StoreError> {
        let client = self.connection().await?;
        let row = client
            .query_one(&OperationsSql::gauges(&self.quoted_table()), &[])
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

    /// Reads the [`StoreGauges`] every `every` and exports them through the
    /// `metrics` facade, with `idempotency_store_up` (1 when the read
    /// succeeded, 0 when it failed or took longer than `every`, bounded to
    /// between 1 and 10 seconds), until the returned task is aborted. Each
    /// gauge is labelled with the table's name as configured. Every
    /// instance may run one; see [`PostgresStore::gauges`] for what each
    /// read costs.
    ///
    /// ```no_run
    /// # fn run(store: tower_idempotency::PostgresStore) {
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
        let client = self.connection().await?;
        let statement = OperationsSql::count_expired(&self.quoted_table());
        let row = self.pool_mode().unprepared(&statement).query_one(&client, &[]).await?;
        Ok(row.try_get(0)?)
    }

    /// Deletes expired records in batches of `batch` until none are left,
    /// each batch its own short transaction; returns how many it deleted.
    /// Safe to run from every instance at once.
    pub async fn purge_expired(&self, batch: u32) -> Result<u64, StoreError> {
        let client = self.connection().await?;
        let purge_batch = OperationsSql::purge_batch(&self.quoted_table());
        let statement = self.pool_mode().ready(&client, &purge_batch).await?;
        let limit = i64::from(batch.max(1));
        let mut deleted = 0;
        loop {
            let batch_deleted = statement.execute(&client, &[&limit]).await?;
            deleted += batch_deleted;
            if batch_deleted < limit as u64 {
                return Ok(deleted);
            }
        }
    }

    /// Purges expired records every `every`, in batches of `batch`, until the
    /// returned task is aborted; a failed purge is logged and retried at the
    /// next tick. Every instance may run one. Each run is counted in
    /// `idempotency_purge_runs_total` (`result` `ok` or `failed`), its
    /// records in `idempotency_purged_records_total` and its time in
    /// `idempotency_purge_duration_seconds`, labelled with the table.
    ///
    /// ```no_run
    /// # fn run(store: tower_idempotency::PostgresStore) {
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

    /// The record of (source, event type, key), with its stored response.
    pub async fn record(&self, source: &str, event_type: &str, key: &str) -> Result<Option<RecordView>, StoreError> {
        let client = self.connection().await?;
        let statement = OperationsSql::show(&self.quoted_table());
        let Some(row) = self
            .pool_mode()
            .unprepared(&statement)
            .query_opt(&client, &[&source, &event_type, &key])
            .await?
        else {
            return Ok(None);
        };
        let state: i16 = row.try_get(0)?;
        let headers: Option<&[u8]> = row.try_get(7)?;
        let (response_headers, response_trailers) = match headers {
            Some(bytes) => {
                let (headers, trailers) =
                    decode_headers(bytes).map_err(|error| StoreError::Corrupt(error.to_string()))?;
                let plain = |list: Vec<(http::HeaderName, http::HeaderValue)>| {
                    list.into_iter()
                        .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                        .collect()
                };
                (plain(headers), trailers.map(plain))
            }
            None => (Vec::new(), None),
        };
        let status: Option<i16> = row.try_get(6)?;
        Ok(Some(RecordView {
            state: if state == COMPLETED { "completed" } else { "in_flight" },
            fingerprint: crate::key::hex(row.try_get::<_, &[u8]>(1)?),
            created_at: row.try_get(2)?,
            completed_at: row.try_get(3)?,
            expires_at: row.try_get(4)?,
            locked_until: row.try_get(5)?,
            response_status: status.and_then(|status| u16::try_from(status).ok()),
            response_headers,
            response_trailers,
            response_body: row.try_get::<_, Option<&[u8]>>(8)?.map(Bytes::copy_from_slice),
        }))
    }

    /// Deletes a record so that the next delivery runs the handler again. An
    /// open claim with a live lease is kept unless `force` is set. An
    /// uncommitted transaction-mode claim is invisible here and unaffected.
    /// This instance's cache forgets the record at once; other instances'
    /// caches may replay it for up to their time-to-live.
    pub async fn delete_record(
        &self,
        source: &str,
        event_type: &str,
        key: &str,
        force: bool,
    ) -> Result<Deletion, StoreError> {
        let client = self.connection().await?;
        let statement = OperationsSql::release(&self.quoted_table());
        let row = self
            .pool_mode()
            .unprepared(&statement)
            .query_one(&client, &[&source, &event_type, &key, &force])
            .await?;
        let (found, deleted): (bool, bool) = (row.try_get(0)?, row.try_get(1)?);
        self.forget(&RecordKey {
            source: source.into(),
            event_type: event_type.into(),
            key: key.into(),
        });
        Ok(match (found, deleted) {
            (_, true) => Deletion::Deleted,
            (false, false) => Deletion::NotFound,
            (true, false) => Deletion::InFlight,
        })
    }
}
