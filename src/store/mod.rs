//! Where records live: [`PostgresStore`] for production, [`MemoryStore`] for
//! tests and single-process use. A layer takes either through [`Store`].

mod cache;
mod error;
mod lease;
mod memory;
mod postgres;
mod recent;
#[cfg(feature = "sqlx")]
mod sqlx;
mod tasks;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "sqlx")]
pub use self::sqlx::{SqlxIdempotencyTx, SqlxStore, SqlxTx};
pub use error::{DatabaseError, StoreError};
pub use memory::MemoryStore;
pub use postgres::{
    Deletion, IdempotencyTx, InvalidTableName, PostgresStore, RecordView, StoreGauges, StoreStats, Tx, TxError,
    DEFAULT_TABLE,
};

use crate::key::RecordKey;
use crate::layer::DEFAULT_STORE_TIMEOUT;
use crate::policy::Mode;
use crate::record::StoredResponse;
use crate::shutdown::{self, Tracker};

/// The store a layer keeps its records in: a [`PostgresStore`], an
/// `SqlxStore` (feature `sqlx`) or a [`MemoryStore`], converted with
/// `into()`.
///
/// ```
/// use tower_idempotency::{MemoryStore, Store};
///
/// let store: Store = MemoryStore::new(10_000).into();
/// # let _ = store;
/// ```
#[derive(Clone, Debug)]
pub struct Store {
    backend: Arc<dyn Backend>,
}

impl From<PostgresStore> for Store {
    fn from(store: PostgresStore) -> Self {
        Self {
            backend: Arc::new(store),
        }
    }
}

#[cfg(feature = "sqlx")]
impl From<SqlxStore> for Store {
    fn from(store: SqlxStore) -> Self {
        Self {
            backend: Arc::new(store),
        }
    }
}

impl From<MemoryStore> for Store {
    fn from(store: MemoryStore) -> Self {
        Self {
            backend: Arc::new(store),
        }
    }
}

/// A store step's future: boxed, so that backends are objects.
pub(crate) type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// What the request path needs of a store, and all it may ask: the seam
/// between the layer and each backend, behind which a backend keeps its own
/// optimisations (a record cache, a hint of recent completions, its pool).
pub(crate) trait Backend: fmt::Debug + Send + Sync + 'static {
    /// A plain read of `key`, without any lock.
    fn lookup<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Lookup>;

    /// Takes the key for this request, or says who has it; a claim's handle
    /// ([`HeldClaim`]) renews, completes or releases it.
    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, ClaimOutcome>;

    /// The completed record of `key` kept in process memory, if the backend
    /// keeps one: an answer with no round trip.
    fn cached(&self, _key: &RecordKey) -> Option<Completed> {
        None
    }

    /// Whether `key` is probably a duplicate of a completed record, so that
    /// a plain read should go first; otherwise the claim goes first and its
    /// own read answers a duplicate. A hint that only chooses the order: a
    /// backend whose reads cost no round trip says yes.
    fn likely_completed(&self, _key: &RecordKey) -> bool {
        true
    }

    /// A step failed on a dead connection: forget the idle ones, which are
    /// most likely dead too (a restarted server).
    fn forget_idle_connections(&self) {}

    /// A claim failed with `error`, and may have been taken all the same (it
    /// timed out, or its connection died): give it up in the background,
    /// within `bound` and tracked by `tracker`, so that the next delivery
    /// need not wait out a lease.
    fn release_unknown_claim(
        &self,
        _request: &ClaimRequest,
        _error: &StoreError,
        _bound: Duration,
        _tracker: &Arc<Tracker>,
    ) {
    }
}

/// A backend's side of a held claim. Completing, ending and releasing
/// consume it; a claim dropped without any of them is abandoned.
pub(crate) trait HeldClaim: fmt::Debug + Send + Sync {
    /// Hands the claim's transaction, where the claim is one, to the
    /// handler: puts the backend's handle for it (such as [`IdempotencyTx`])
    /// into the request's extensions.
    fn lend_transaction(&self, _extensions: &mut http::Extensions) {}

    /// Extends the lease; `Ok(false)` when the claim was taken over. A claim
    /// without a lease has nothing to renew.
    fn renew<'a>(&'a self, _request: &'a ClaimRequest, _lease: Duration) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(true)))
    }

    /// Writes the response into the record (and commits, in transaction
    /// mode).
    fn complete<'a>(
        self: Box<Self>,
        request: &'a ClaimRequest,
        response: &'a StoredResponse,
    ) -> StoreFuture<'a, Completion>;

    /// Ends the claim without a record, as if the request had not been
    /// protected: a transaction commits the handler's writes, a claim row is
    /// deleted.
    fn end_unrecorded<'a>(self: Box<Self>, request: &'a ClaimRequest) -> StoreFuture<'a, ()>;

    /// Gives the key up so the next delivery runs (rolls back in transaction
    /// mode), holding the caller up for at most `bound.timeout`; what must
    /// go on past it runs in the background, tracked by `bound.tracker`.
    fn release<'a>(self: Box<Self>, request: &'a ClaimRequest, bound: &'a ReleaseBound) -> StoreFuture<'a, ()>;

    /// The claim was dropped unreleased (its request cancelled): release it
    /// in the background, within `bound`.
    fn abandon(self: Box<Self>, request: &ClaimRequest, bound: &ReleaseBound);
}

/// A completed, unexpired record.
#[derive(Clone, Debug)]
pub(crate) struct Completed {
    pub(crate) fingerprint: [u8; 32],
    pub(crate) response: StoredResponse,
}

/// What a plain read of a key finds.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// No live record: absent, expired, or a claim whose lease ran out.
    Absent,
    Completed(Completed),
    /// A lease-mode claim whose lease is still running.
    InFlight {
        fingerprint: [u8; 32],
    },
}

/// What a claim attempt found.
#[derive(Debug)]
pub(crate) enum ClaimOutcome {
    Claimed(Claim),
    Completed(Completed),
    /// Someone else holds the key. The fingerprint is known where the claim
    /// is a visible row (lease mode).
    InFlight {
        fingerprint: Option<[u8; 32]>,
    },
}

/// What a claim is for.
#[derive(Clone, Debug)]
pub(crate) struct ClaimRequest {
    pub(crate) key: RecordKey,
    /// The body's record (the body-hash guard), claimed, completed and
    /// released with `key`, in the same transaction. Boxed: most routes
    /// have none, and the request travels inside every claim.
    pub(crate) body_record: Option<Box<RecordKey>>,
    pub(crate) fingerprint: [u8; 32],
    pub(crate) mode: Mode,
    pub(crate) retention: Duration,
    /// The lease's fencing token, chosen once per request so that a retry
    /// of a claim whose answer was lost finds its own row and claims it
    /// again, instead of taking it for another request's.
    pub(crate) claim_token: uuid::Uuid,
}

impl ClaimRequest {
    pub(crate) fn new(key: RecordKey, fingerprint: [u8; 32], mode: Mode, retention: Duration) -> Self {
        Self {
            key,
            body_record: None,
            fingerprint,
            mode,
            retention,
            // Only a lease claim is a row that carries its token; a
            // transaction's claim is its open transaction.
            claim_token: match mode {
                Mode::Lease { .. } => uuid::Uuid::new_v4(),
                Mode::Transaction => uuid::Uuid::nil(),
            },
        }
    }

    /// Claims the body's record too (the body-hash guard).
    pub(crate) fn with_body_record(mut self, body_record: Option<RecordKey>) -> Self {
        self.body_record = body_record.map(Box::new);
        self
    }

    /// The records the claim takes: the key's, then the body's if guarded.
    pub(crate) fn records(&self) -> impl Iterator<Item = &RecordKey> {
        std::iter::once(&self.key).chain(self.body_record.as_deref())
    }
}

/// How completing a claim went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    Recorded,
    /// The claim had been taken over (its lease ran out); nothing was written.
    FencedOut,
    /// Another claimant's record of the key came first (the advisory lock
    /// did not exclude it): nothing was written and, in transaction mode,
    /// the handler's writes were rolled back. The key's record is the
    /// other's.
    CompletedElsewhere,
}

impl Store {
    /// The fast path: one plain read, no lock.
    pub(crate) async fn lookup(&self, key: &RecordKey) -> Result<Lookup, StoreError> {
        self.backend.lookup(key).await
    }

    /// The completed record in the in-process cache, if the store has one
    /// and holds `key`: no round trip.
    pub(crate) fn cached(&self, key: &RecordKey) -> Option<Completed> {
        self.backend.cached(key)
    }

    /// Whether a plain read of `key` should go first (see
    /// [`Backend::likely_completed`]).
    pub(crate) fn likely_completed(&self, key: &RecordKey) -> bool {
        self.backend.likely_completed(key)
    }

    /// Closes the pool's idle connections, after one turned out dead.
    pub(crate) fn forget_idle_connections(&self) {
        self.backend.forget_idle_connections();
    }

    /// Takes the key for this request, or says who has it.
    pub(crate) async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        self.backend.claim(request).await
    }

    /// After a claim failed with `error` (see
    /// [`Backend::release_unknown_claim`]).
    pub(crate) fn release_unknown_claim(
        &self,
        request: &ClaimRequest,
        error: &StoreError,
        bound: Duration,
        tracker: &Arc<Tracker>,
    ) {
        self.backend.release_unknown_claim(request, error, bound, tracker);
    }
}

/// A held claim. Dropped without [`Claim::complete`] or [`Claim::release`]
/// (a cancelled future), it releases itself in the background: a
/// transaction rolls back, a lease row is deleted (or left to its lease when
/// no runtime is left), an in-memory claim is removed.
#[derive(Debug)]
pub(crate) struct Claim {
    request: ClaimRequest,
    held: Option<Box<dyn HeldClaim>>,
    release: ReleaseBound,
}

/// How long releasing a claim may hold its caller up, and who tracks the
/// part of a release that outlives it.
#[derive(Clone, Debug)]
pub(crate) struct ReleaseBound {
    pub(crate) timeout: Duration,
    pub(crate) tracker: Option<Arc<Tracker>>,
}

impl ReleaseBound {
    /// Lets a release go on in the background, tracked, until the lease
    /// would have run out anyway (a claim without a lease needs none) or a
    /// shutdown cuts it off.
    pub(crate) fn finish_in_background<F>(&self, request: &ClaimRequest, release: F)
    where
        F: Future<Output = Result<(), StoreError>> + Send + 'static,
    {
        let Mode::Lease { lease, .. } = request.mode else {
            return;
        };
        let key = request.key.clone();
        let tracker = self.tracker.clone();
        let task = {
            let tracker = tracker.clone();
            async move {
                let bounded = tokio::time::timeout(lease, release);
                let outcome = match &tracker {
                    Some(tracker) => tracker.until_cancelled(bounded).await,
                    None => Some(bounded.await),
                };
                match outcome {
                    Some(Ok(Ok(()))) => {
                        tracing::debug!(source = %key.source, key = %key.key, "claim released in the background")
                    }
                    Some(Ok(Err(error))) => {
                        tracing::warn!(%error, source = %key.source, key = %key.key, "could not release a claim; it stays until its lease ends")
                    }
                    Some(Err(_)) | None => {
                        tracing::warn!(source = %key.source, key = %key.key, "gave up releasing a claim; it stays until its lease ends")
                    }
                }
            }
        };
        shutdown::spawn(tracker.as_ref(), task);
    }
}

impl Claim {
    pub(crate) fn new(request: ClaimRequest, held: Box<dyn HeldClaim>) -> Self {
        Self {
            request,
            held: Some(held),
            release: ReleaseBound {
                timeout: DEFAULT_STORE_TIMEOUT,
                tracker: None,
            },
        }
    }

    /// Bounds this claim's release by `timeout`; what must go on after it
    /// (and any release in the background) is tracked by `tracker`, so that
    /// a graceful shutdown waits for it.
    pub(crate) fn released_within(mut self, timeout: Duration, tracker: &Arc<Tracker>) -> Self {
        self.release = ReleaseBound {
            timeout,
            tracker: Some(tracker.clone()),
        };
        self
    }

    pub(crate) fn key(&self) -> &RecordKey {
        &self.request.key
    }

    /// Hands the claim's transaction to the handler through the request's
    /// extensions, in transaction mode on Postgres.
    pub(crate) fn lend_transaction(&self, extensions: &mut http::Extensions) {
        if let Some(held) = &self.held {
            held.lend_transaction(extensions);
        }
    }

    /// Extends the lease; `Ok(false)` when the claim was taken over.
    pub(crate) async fn renew(&self, lease: Duration) -> Result<bool, StoreError> {
        match &self.held {
            Some(held) => held.renew(&self.request, lease).await,
            None => Ok(true),
        }
    }

    /// Writes the response into the record (and commits, in transaction
    /// mode).
    pub(crate) async fn complete(mut self, response: &StoredResponse) -> Result<Completion, StoreError> {
        let Some(held) = self.held.take() else {
            return Err(StoreError::ConnectionGone);
        };
        held.complete(&self.request, response).await
    }

    /// Ends the claim without a record, as if the request had not been
    /// protected: a transaction commits the handler's writes, a lease or
    /// in-memory claim is deleted.
    pub(crate) async fn end_unrecorded(mut self) -> Result<(), StoreError> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        held.end_unrecorded(&self.request).await
    }

    /// Gives the key up so the next delivery runs (rolls back in transaction
    /// mode), holding the caller up for at most the release bound.
    ///
    /// A rollback that does not finish in time drops its connection, which
    /// is then closed rather than returned to the pool (the server rolls
    /// back when it notices). A lease release that does not finish in time
    /// (no free pooled connection, a slow server) goes on in the background
    /// until the lease would have run out anyway, and `Err(Timeout)` says so.
    pub(crate) async fn release(mut self) -> Result<(), StoreError> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        held.release(&self.request, &self.release).await
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            held.abandon(&self.request, &self.release);
        }
    }
}
