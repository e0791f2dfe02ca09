//! Per-route policies: the mode, what happens to in-flight duplicates and to
//! requests without a key, and which responses commit.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;

/// How a claim is held while the handler runs.
///
/// ```
/// use std::time::Duration;
/// use tower_idempotency::Mode;
///
/// let atomic = Mode::Transaction;
/// let leased = Mode::lease(Duration::from_secs(60));
/// # let _ = (atomic, leased);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// The claim is a Postgres transaction holding the key's advisory lock;
    /// the handler writes in the same transaction (see
    /// [`IdempotencyTx`](crate::IdempotencyTx)), and the record commits with
    /// those writes or not at all. Effects in the same database happen
    /// exactly once.
    #[default]
    Transaction,
    /// The claim is a committed row with a lease and a fencing token; the
    /// handler holds no connection. Effects outside the database are
    /// at-least-once: a claimant that crashes or outlives its lease may be
    /// followed by a second run.
    Lease {
        /// How long a claim stays valid without renewal.
        lease: Duration,
        /// How often the lease is renewed while the handler runs; zero
        /// never renews.
        renew_every: Duration,
    },
}

impl Mode {
    /// Lease mode with the given lease, renewed every third of it.
    pub fn lease(lease: Duration) -> Self {
        Mode::Lease {
            lease,
            renew_every: lease / 3,
        }
    }
}

/// What a duplicate gets while the first request with its key is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InFlight {
    /// `409 Conflict` with `Retry-After` at once (the IETF draft, Stripe).
    Conflict,
    /// Wait up to the bound for the first to finish, then replay its
    /// response, or run if it failed; past the bound, `409`.
    Wait(Duration),
}

/// What a request without a key gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum MissingKey {
    /// `400` problem+json; nothing runs (the default).
    #[default]
    Reject,
    /// Fall back to the SHA-256 of the body as the key.
    BodyHash,
    /// Run the handler unprotected; logged.
    PassThrough,
}

/// A handler's override of the commit decision for one response, set as a
/// response extension.
///
/// ```
/// use axum::response::IntoResponse;
/// use http::StatusCode;
/// use tower_idempotency::ResponseDecision;
///
/// // A gateway timeout after the charge may have gone through: record it,
/// // so that a retry replays this answer instead of charging again.
/// async fn handler() -> impl IntoResponse {
///     let mut response = StatusCode::BAD_GATEWAY.into_response();
///     response.extensions_mut().insert(ResponseDecision::Commit);
///     response
/// }
/// # let _ = handler;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseDecision {
    /// Record this response and replay it to later duplicates.
    Commit,
    /// Release the claim so the next delivery runs again (in transaction
    /// mode, the handler's writes roll back).
    Release,
}

/// Which response statuses commit the record.
#[derive(Clone)]
pub(crate) struct CommitWhen(Arc<dyn Fn(StatusCode) -> bool + Send + Sync>);

impl CommitWhen {
    pub(crate) fn new<F>(predicate: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        Self(Arc::new(predicate))
    }

    pub(crate) fn commits(&self, status: StatusCode) -> bool {
        (self.0)(status)
    }
}

impl Default for CommitWhen {
    fn default() -> Self {
        Self::new(|status| status.is_success())
    }
}

impl fmt::Debug for CommitWhen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CommitWhen(..)")
    }
}
