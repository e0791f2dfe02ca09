//! What the layer and the Postgres store report through the `metrics`
//! facade and `tracing`.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `idempotency_requests_total` | counter | `source`, `outcome` |
//! | `idempotency_store_duration_seconds` | histogram | `operation` (`lookup`, `claim`, `renew`, `complete`, `release`) |
//! | `idempotency_wait_duration_seconds` | histogram | `source`: time a duplicate waited for an in-flight first |
//! | `idempotency_responses_unretained_total` | counter | `source`, `reason` (`too_large`, `too_slow`): responses recorded or released without their body |
//! | `idempotency_in_flight` | gauge | `source`: requests of this instance running their handler under a claim |
//! | `idempotency_waiting` | gauge | `source`: duplicates on this instance waiting for an in-flight first |
//!
//! and, from the Postgres store's tasks (`table` is the records table as
//! configured):
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `idempotency_store_up` | gauge | `table`: 1 when the last read of the gauges below succeeded, 0 when it failed |
//! | `idempotency_oldest_open_claim_age_seconds` | gauge | `table`: age of the oldest open claim with a running lease (lease mode), 0 when none |
//! | `idempotency_claims_past_lease` | gauge | `table`: open claims whose lease ran out (their claimant died; the next delivery takes them over) |
//! | `idempotency_expired_awaiting_purge` | gauge | `table`: records a purge would delete now, counted up to 10,000 |
//! | `idempotency_oldest_expired_age_seconds` | gauge | `table`: how long ago the oldest record awaiting purge expired, 0 when none |
//! | `idempotency_table_bytes` | gauge | `table`: the table's size on disk, with its indexes and TOAST |
//! | `idempotency_purge_runs_total` | counter | `table`, `result` (`ok`, `failed`) |
//! | `idempotency_purged_records_total` | counter | `table` |
//! | `idempotency_purge_duration_seconds` | histogram | `table` |
//!
//! `source` is the route's metrics label (its configured source, or the
//! label set with `IdempotencyLayer::metrics_label`), never a per-request
//! value, so the number of series stays bounded.
//!
//! Outcomes: `first`, `replayed`, `conflict`, `waited`, `mismatch`,
//! `missing_key`, `rejected`, `released`, `store_error`, `commit_failed`,
//! `fenced_out`, `completed_elsewhere`, `signature_rejected`, `streamed`. Install any `metrics` exporter (for
//! example `metrics-exporter-prometheus`) to collect them.

use std::time::Duration;

/// How a protected request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The handler ran and its response was recorded.
    First,
    /// A stored response was replayed.
    Replayed,
    /// Refused because the key was in flight.
    Conflict,
    /// Waited for an in-flight duplicate (then replayed or ran).
    Waited,
    /// The key came with another request.
    Mismatch,
    /// No key; refused or passed through.
    MissingKey,
    /// Bad input refused before the claim.
    Rejected,
    /// The handler ran and its claim was released.
    Released,
    /// The store failed.
    StoreError,
    /// The handler's transaction did not commit.
    CommitFailed,
    /// The claim was taken over before completion.
    FencedOut,
    /// Another request's record of the key came first, past the advisory
    /// lock; that record answered and this run's writes were rolled back.
    CompletedElsewhere,
    /// The signature was refused.
    SignatureRejected,
    /// A streaming response passed through without a record.
    Streamed,
}

impl Outcome {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Outcome::First => "first",
            Outcome::Replayed => "replayed",
            Outcome::Conflict => "conflict",
            Outcome::Waited => "waited",
            Outcome::Mismatch => "mismatch",
            Outcome::MissingKey => "missing_key",
            Outcome::Rejected => "rejected",
            Outcome::Released => "released",
            Outcome::StoreError => "store_error",
            Outcome::CommitFailed => "commit_failed",
            Outcome::FencedOut => "fenced_out",
            Outcome::CompletedElsewhere => "completed_elsewhere",
            Outcome::SignatureRejected => "signature_rejected",
            Outcome::Streamed => "streamed",
        }
    }
}

/// Counts one request's outcome and notes it on the current span.
pub(crate) fn count(source: &str, outcome: Outcome) {
    metrics::counter!("idempotency_requests_total", "source" => source.to_owned(), "outcome" => outcome.as_str())
        .increment(1);
    tracing::Span::current().record("outcome", outcome.as_str());
}

/// Counts a recorded response whose body was not kept: `too_large` or
/// `too_slow`.
pub(crate) fn unretained(source: &str, reason: &'static str) {
    metrics::counter!("idempotency_responses_unretained_total", "source" => source.to_owned(), "reason" => reason)
        .increment(1);
}

/// Records how long one store step took.
pub(crate) fn store_duration(operation: &'static str, elapsed: Duration) {
    metrics::histogram!("idempotency_store_duration_seconds", "operation" => operation).record(elapsed.as_secs_f64());
}

/// Records how long a duplicate waited for the first request with its key.
pub(crate) fn wait_duration(source: &str, elapsed: Duration) {
    metrics::histogram!("idempotency_wait_duration_seconds", "source" => source.to_owned())
        .record(elapsed.as_secs_f64());
}

/// One request counted in a per-source gauge (`idempotency_in_flight`,
/// `idempotency_waiting`) for as long as the guard lives: dropped when the
/// request moves on, or when its future is dropped.
pub(crate) struct Occupancy {
    gauge: metrics::Gauge,
}

impl Occupancy {
    /// A request of `source` running its handler under a claim.
    pub(crate) fn in_flight(source: &str) -> Self {
        Self::enter(metrics::gauge!("idempotency_in_flight", "source" => source.to_owned()))
    }

    /// A duplicate of `source` waiting for its in-flight first.
    pub(crate) fn waiting(source: &str) -> Self {
        Self::enter(metrics::gauge!("idempotency_waiting", "source" => source.to_owned()))
    }

    fn enter(gauge: metrics::Gauge) -> Self {
        gauge.increment(1.0);
        Self { gauge }
    }
}

impl Drop for Occupancy {
    fn drop(&mut self) {
        self.gauge.decrement(1.0);
    }
}

/// The figures the store's metrics task reads, as gauges.
pub(crate) fn store_gauges(table: &str, gauges: &crate::store::StoreGauges) {
    let table = table.to_owned();
    let seconds = |age: Option<Duration>| age.map_or(0.0, |age| age.as_secs_f64());
    metrics::gauge!("idempotency_store_up", "table" => table.clone()).set(1.0);
    metrics::gauge!("idempotency_oldest_open_claim_age_seconds", "table" => table.clone())
        .set(seconds(gauges.oldest_open_claim_age));
    metrics::gauge!("idempotency_claims_past_lease", "table" => table.clone()).set(gauges.claims_past_lease as f64);
    metrics::gauge!("idempotency_expired_awaiting_purge", "table" => table.clone())
        .set(gauges.expired_awaiting_purge as f64);
    metrics::gauge!("idempotency_oldest_expired_age_seconds", "table" => table.clone())
        .set(seconds(gauges.oldest_expired_age));
    metrics::gauge!("idempotency_table_bytes", "table" => table).set(gauges.table_bytes as f64);
}

/// The store did not answer the metrics task's read: the other gauges keep
/// their last values.
pub(crate) fn store_down(table: &str) {
    metrics::gauge!("idempotency_store_up", "table" => table.to_owned()).set(0.0);
}

/// One run of the purge task: how many records it deleted, or that it
/// failed, and how long it took.
pub(crate) fn purge_run(table: &str, deleted: Option<u64>, elapsed: Duration) {
    let table = table.to_owned();
    let result = if deleted.is_some() { "ok" } else { "failed" };
    metrics::counter!("idempotency_purge_runs_total", "table" => table.clone(), "result" => result).increment(1);
    if let Some(deleted) = deleted {
        metrics::counter!("idempotency_purged_records_total", "table" => table.clone()).increment(deleted);
    }
    metrics::histogram!("idempotency_purge_duration_seconds", "table" => table).record(elapsed.as_secs_f64());
}
