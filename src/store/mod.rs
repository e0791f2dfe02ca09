//! Where records live: [`PostgresStore`] for production, [`MemoryStore`] for
//! tests and single-process use. A layer takes either through [`Store`].

mod cache;
mod memory;
mod operations;
mod postgres;
mod recent;

use std::error::Error as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use memory::MemoryStore;
pub use operations::{RecordView, Released, StoreStats};
pub use postgres::{InvalidTableName, PostgresStore, DEFAULT_TABLE};

use crate::key::RecordKey;
use crate::layer::DEFAULT_STORE_TIMEOUT;
use crate::policy::Mode;
use crate::record::StoredResponse;
use crate::shutdown::{self, Tracker};
use crate::tx::IdempotencyTx;

/// The store a layer keeps its records in: a [`PostgresStore`] or a
/// [`MemoryStore`], converted with `into()`.
///
/// ```
/// use tower_idempotency::{MemoryStore, Store};
///
/// let store: Store = MemoryStore::new(10_000).into();
/// # let _ = store;
/// ```
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Postgres(PostgresStore),
    Memory(MemoryStore),
}

impl From<PostgresStore> for Store {
    fn from(store: PostgresStore) -> Self {
        Self {
            backend: Backend::Postgres(store),
        }
    }
}

impl From<MemoryStore> for Store {
    fn from(store: MemoryStore) -> Self {
        Self {
            backend: Backend::Memory(store),
        }
    }
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
    InProgress {
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
    pub(crate) fingerprint: [u8; 32],
    pub(crate) mode: Mode,
    pub(crate) retention: Duration,
}

/// How completing a claim went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Completion {
    Recorded,
    /// The claim had been taken over (its lease ran out); nothing was written.
    FencedOut,
}

impl Store {
    /// The fast path: one plain read, no lock.
    pub(crate) async fn lookup(&self, key: &RecordKey) -> Result<Lookup, StoreError> {
        match &self.backend {
            Backend::Postgres(store) => store.lookup(key).await,
            Backend::Memory(store) => Ok(store.lookup(key)),
        }
    }

    /// The completed record in the in-process cache, if the store has one
    /// and holds `key`: no round trip.
    pub(crate) fn cached(&self, key: &RecordKey) -> Option<Completed> {
        match &self.backend {
            Backend::Postgres(store) => store.cached(key),
            Backend::Memory(_) => None,
        }
    }

    /// Whether `key` is probably a duplicate of a completed record, so that
    /// a plain read should go first; otherwise the claim goes first and its
    /// own read answers a duplicate. A hint that only chooses the order.
    pub(crate) fn likely_completed(&self, key: &RecordKey) -> bool {
        match &self.backend {
            Backend::Postgres(store) => store.likely_completed(key),
            // Reading memory costs no round trip.
            Backend::Memory(_) => true,
        }
    }

    /// Closes the pool's idle connections, after one turned out dead.
    pub(crate) fn forget_idle_connections(&self) {
        if let Backend::Postgres(store) = &self.backend {
            store.pool().retain(|_, _| false);
        }
    }

    /// Takes the key for this request, or says who has it.
    pub(crate) async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        match &self.backend {
            Backend::Postgres(store) => store.claim(request).await,
            Backend::Memory(store) => store.claim(request),
        }
    }
}

/// A held claim. Dropped without [`Claim::complete`] or [`Claim::release`]
/// (a cancelled future), it releases itself in the background: a
/// transaction rolls back, a lease row is deleted (or left to its lease when
/// no runtime is left), an in-memory claim is removed.
#[derive(Debug)]
pub(crate) struct Claim {
    request: ClaimRequest,
    held: Option<Held>,
    release: ReleaseBound,
}

/// How long releasing a claim may hold its caller up, and who tracks the
/// part of a release that outlives it.
#[derive(Clone, Debug)]
struct ReleaseBound {
    timeout: Duration,
    tracker: Option<Arc<Tracker>>,
}

#[derive(Debug)]
enum Held {
    PostgresTx { store: PostgresStore, tx: IdempotencyTx },
    PostgresLease { store: PostgresStore, token: uuid::Uuid },
    Memory { store: MemoryStore, token: u64 },
}

impl Claim {
    fn new(request: ClaimRequest, held: Held) -> Self {
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

    /// The transaction to hand to the handler, in transaction mode on
    /// Postgres.
    pub(crate) fn transaction(&self) -> Option<IdempotencyTx> {
        match &self.held {
            Some(Held::PostgresTx { tx, .. }) => Some(tx.clone()),
            _ => None,
        }
    }

    /// Extends the lease; `Ok(false)` when the claim was taken over.
    pub(crate) async fn renew(&self, lease: Duration) -> Result<bool, StoreError> {
        match &self.held {
            Some(Held::PostgresLease { store, token }) => store.renew(&self.request.key, *token, lease).await,
            Some(Held::Memory { store, token }) => Ok(store.renew(&self.request.key, *token, lease)),
            Some(Held::PostgresTx { .. }) | None => Ok(true),
        }
    }

    /// Writes the response into the record (and commits, in transaction
    /// mode).
    pub(crate) async fn complete(mut self, response: &StoredResponse) -> Result<Completion, StoreError> {
        let Some(held) = self.held.take() else {
            return Err(StoreError::ConnectionGone);
        };
        match held {
            Held::PostgresTx { store, tx } => {
                let connection = tx.take().map_err(|_| StoreError::TransactionInUse)?;
                let connection = connection.ok_or(StoreError::ConnectionGone)?;
                store.complete_transaction(connection, &self.request, response).await?;
                Ok(Completion::Recorded)
            }
            Held::PostgresLease { store, token } => store.complete_lease(&self.request, token, response).await,
            Held::Memory { store, token } => Ok(store.complete(&self.request, token, response)),
        }
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
        let bound = self.release.timeout;
        match held {
            Held::PostgresTx { tx, .. } => match tx.take() {
                Ok(Some(connection)) => match tokio::time::timeout(bound, connection.rollback()).await {
                    Ok(rolled_back) => rolled_back.map_err(StoreError::from),
                    Err(_) => Err(StoreError::Timeout(bound)),
                },
                // The slot's own guard rolls back once the handler lets go.
                Ok(None) | Err(_) => Ok(()),
            },
            Held::PostgresLease { store, token } => {
                let mut release = Box::pin(release_lease(store, self.request.key.clone(), token));
                match tokio::time::timeout(bound, &mut release).await {
                    Ok(released) => released,
                    Err(_) => {
                        self.finish_in_background(release);
                        Err(StoreError::Timeout(bound))
                    }
                }
            }
            Held::Memory { store, token } => {
                store.release(&self.request.key, token);
                Ok(())
            }
        }
    }

    /// Lets a lease release go on in the background, tracked, until the
    /// lease would have run out anyway or a shutdown cuts it off.
    fn finish_in_background<F>(&self, release: F)
    where
        F: Future<Output = Result<(), StoreError>> + Send + 'static,
    {
        let Mode::Lease { lease, .. } = self.request.mode else {
            return;
        };
        let key = self.request.key.clone();
        let tracker = self.release.tracker.clone();
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

async fn release_lease(store: PostgresStore, key: RecordKey, token: uuid::Uuid) -> Result<(), StoreError> {
    store.release_lease(&key, token).await
}

impl Drop for Claim {
    fn drop(&mut self) {
        match self.held.take() {
            None => {}
            Some(Held::PostgresTx { tx, .. }) => {
                // A handler that still holds a `Tx` lets go later; the
                // connection's own guard rolls back then.
                if let Ok(Some(connection)) = tx.take() {
                    let bound = self.release.timeout;
                    shutdown::spawn(self.release.tracker.as_ref(), async move {
                        // Past the bound the connection is closed, not reused.
                        let _ = tokio::time::timeout(bound, connection.rollback()).await;
                    });
                }
            }
            Some(Held::PostgresLease { store, token }) => {
                let release = release_lease(store, self.request.key.clone(), token);
                self.finish_in_background(release);
            }
            Some(Held::Memory { store, token }) => store.release(&self.request.key, token),
        }
    }
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No pooled connection could be had (pool timeout, connect failure).
    #[error("could not get a database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    /// The store did not answer within the route's store timeout.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The in-memory store is full of live records.
    #[error("the in-memory store is full of live records; raise its capacity")]
    Full,
    /// A stored record could not be decoded.
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
    /// The records table does not exist.
    #[error("the records table `{0}` does not exist: run PostgresStore::migrate() first")]
    TableMissing(String),
    /// The claim's connection was already gone.
    #[error("the claim's connection is no longer available")]
    ConnectionGone,
    /// The handler kept its transaction past its response.
    #[error("the handler still holds the request's transaction after answering")]
    TransactionInUse,
}

/// tokio-postgres' own message is terse ("db error"); the server's message
/// or the I/O cause says what happened.
fn describe(error: &tokio_postgres::Error) -> String {
    match (error.as_db_error(), error.source()) {
        (Some(db), _) => format!("{}: {}", db.code().code(), db.message()),
        (None, Some(source)) => format!("{error}: {source}"),
        (None, None) => error.to_string(),
    }
}

impl StoreError {
    /// Whether the store could not be reached or did not answer in time, as
    /// opposed to answering with something wrong (a full memory store, a
    /// corrupt record, a missing table). Only the former fails open.
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Pool(_) | StoreError::Database(_) | StoreError::Timeout(_) | StoreError::ConnectionGone
        )
    }

    /// Whether the error came from a connection that died (a restarted
    /// server, a terminated backend), so a fresh connection may succeed.
    pub(crate) fn is_connection_lost(&self) -> bool {
        let database_error = match self {
            StoreError::Database(error) => error,
            StoreError::Pool(deadpool_postgres::PoolError::Backend(error)) => error,
            _ => return false,
        };
        if database_error.is_closed() {
            return true;
        }
        if let Some(code) = database_error.code() {
            // admin_shutdown, crash_shutdown, cannot_connect_now
            return ["57P01", "57P02", "57P03"].contains(&code.code());
        }
        database_error
            .source()
            .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some())
    }
}
