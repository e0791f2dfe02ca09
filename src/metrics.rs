//! What the layer reports through the `metrics` facade and `tracing`.
//!
//! | metric | kind | labels |
//! | --- | --- | --- |
//! | `idempotency_requests_total` | counter | `source`, `outcome` |
//! | `idempotency_store_duration_seconds` | histogram | `operation` (`lookup`, `claim`, `renew`, `complete`, `release`) |
//! | `idempotency_wait_duration_seconds` | histogram | `source`: time a duplicate waited for an in-flight first |
//! | `idempotency_responses_unretained_total` | counter | `source`, `reason` (`too_large`, `too_slow`): responses recorded or released without their body |
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
