//! The open transaction of a request in transaction mode, handed to the
//! handler through the request's extensions.
//!
//! In transaction mode the layer begins a transaction on a pooled
//! connection, takes the key's advisory lock, runs the handler, and commits
//! the record together with whatever the handler wrote through [`Tx`], or
//! rolls everything back. The handler must not `COMMIT` or `ROLLBACK` itself.

use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

use super::sql;
use deadpool_postgres::{ClientWrapper, Object};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::layer::DEFAULT_STORE_TIMEOUT;

/// A pooled connection inside an open transaction.
///
/// Dropped while still open, it rolls back before the connection can go back
/// to the pool; where that cannot happen, the connection is taken out of the
/// pool and closed, and the server rolls the transaction back.
pub(crate) struct TxConnection {
    object: Option<Object>,
}

impl TxConnection {
    pub(crate) fn new(object: Object) -> Self {
        Self { object: Some(object) }
    }

    pub(crate) fn object(&self) -> Option<&Object> {
        self.object.as_ref()
    }

    /// Ends the guard after a successful `COMMIT` or `ROLLBACK`: the
    /// connection goes back to the pool.
    pub(crate) fn closed_cleanly(mut self) {
        self.object.take();
    }

    /// Ends the guard when the transaction's state is unknown: the
    /// connection is closed instead of reused.
    pub(crate) fn discard(mut self) {
        if let Some(object) = self.object.take() {
            discard(object);
        }
    }

    /// Commits and returns the connection to the pool, or discards it if
    /// the commit fails (its outcome is then unknown).
    pub(crate) async fn commit(mut self) -> Result<(), tokio_postgres::Error> {
        let Some(object) = self.object.take() else {
            return Ok(());
        };
        let guard = DiscardUnlessRolledBack(Some(object));
        guard.end(sql::COMMIT).await
    }

    /// Rolls back and returns the connection to the pool, or discards it if
    /// the rollback fails.
    pub(crate) async fn rollback(mut self) -> Result<(), tokio_postgres::Error> {
        let Some(object) = self.object.take() else {
            return Ok(());
        };
        let guard = DiscardUnlessRolledBack(Some(object));
        guard.rollback().await
    }
}

impl Drop for TxConnection {
    fn drop(&mut self) {
        if let Some(object) = self.object.take() {
            let guard = DiscardUnlessRolledBack(Some(object));
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        // A stalled server must not keep the connection (and
                        // its pool slot) forever: past the bound the guard is
                        // dropped, which closes it.
                        let _ = tokio::time::timeout(DEFAULT_STORE_TIMEOUT, guard.rollback()).await;
                    });
                }
                Err(_) => drop(guard),
            }
        }
    }
}

/// Holds a connection whose transaction may still be open; unless the
/// rollback completes, dropping it closes the connection.
struct DiscardUnlessRolledBack(Option<Object>);

impl DiscardUnlessRolledBack {
    async fn rollback(self) -> Result<(), tokio_postgres::Error> {
        self.end(sql::ROLLBACK).await
    }

    /// Ends the transaction with `COMMIT` or `ROLLBACK`; only a clean end
    /// returns the connection to the pool.
    async fn end(mut self, statement: &str) -> Result<(), tokio_postgres::Error> {
        let Some(object) = self.0.as_ref() else {
            return Ok(());
        };
        let result = object.batch_execute(statement).await;
        if result.is_ok() {
            // Back to the pool, clean.
            self.0.take();
        }
        result
    }
}

impl Drop for DiscardUnlessRolledBack {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            discard(object);
        }
    }
}

/// Takes a connection out of the pool and closes it.
fn discard(object: Object) {
    drop(deadpool_postgres::Object::take(object));
}

/// The request extension that gives a handler the request's transaction.
///
/// Cloneable and cheap; [`IdempotencyTx::lock`] yields the [`Tx`] guard.
/// With the `axum` feature, a handler can take [`Tx`] directly as an
/// extractor instead.
///
/// ```
/// use tower_idempotency::IdempotencyTx;
///
/// async fn handler(request: http::Request<String>) -> Result<(), Box<dyn std::error::Error>> {
///     let tx = request.extensions().get::<IdempotencyTx>().ok_or("not in transaction mode")?;
///     let tx = tx.lock().await?;
///     tx.execute("INSERT INTO ledger (amount) VALUES ($1)", &[&100_i64]).await?;
///     Ok(())
/// }
/// # let _ = handler;
/// ```
#[derive(Clone)]
pub struct IdempotencyTx {
    slot: Arc<Mutex<Option<TxConnection>>>,
}

impl IdempotencyTx {
    pub(crate) fn new(connection: TxConnection) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Some(connection))),
        }
    }

    /// Waits for the transaction and locks it for this caller.
    pub async fn lock(&self) -> Result<Tx, TxError> {
        let guard = self.slot.clone().lock_owned().await;
        Tx::from_guard(guard)
    }

    /// Locks the transaction if nobody else holds it.
    pub fn try_lock(&self) -> Result<Tx, TxError> {
        let guard = self.slot.clone().try_lock_owned().map_err(|_| TxError::InUse)?;
        Tx::from_guard(guard)
    }

    /// Takes the connection back for commit or rollback once the handler has
    /// answered. `Err` if the handler still holds a [`Tx`].
    pub(crate) fn take(&self) -> Result<Option<TxConnection>, TxError> {
        let mut guard = self.slot.try_lock().map_err(|_| TxError::InUse)?;
        Ok(guard.take())
    }
}

impl fmt::Debug for IdempotencyTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyTx").finish_non_exhaustive()
    }
}

/// A handler's hold on the request's open transaction.
///
/// Dereferences to the pooled connection's
/// [`ClientWrapper`](deadpool_postgres::ClientWrapper) (and through it to
/// [`tokio_postgres::Client`]), so `execute`, `query` and `prepare_cached` run
/// inside the transaction. Never run `COMMIT` or `ROLLBACK` through it: the
/// layer ends the transaction by the response.
///
/// Behind a transaction-mode pooler ([`PoolMode::Transaction`](crate::PoolMode)),
/// the transaction keeps one server connection until it ends, but the next
/// request's may get another: leave nothing on the session for later. Use
/// `query_typed` / `execute_typed` (unnamed, one round trip) rather than
/// `prepare_cached`, `SET LOCAL` rather than `SET`, and
/// `pg_advisory_xact_lock` rather than `pg_advisory_lock`:
///
/// ```
/// use tokio_postgres::types::Type;
/// use tower_idempotency::Tx;
///
/// async fn record_payment(tx: &Tx, payment: &str, cents: i64) -> Result<(), tokio_postgres::Error> {
///     tx.batch_execute("SET LOCAL lock_timeout = '2s'").await?;
///     tx.execute_typed(
///         "INSERT INTO payments (id, amount_cents) VALUES ($1, $2)",
///         &[(&payment, Type::TEXT), (&cents, Type::INT8)],
///     )
///     .await?;
///     Ok(())
/// }
/// # let _ = record_payment;
/// ```
pub struct Tx {
    guard: OwnedMappedMutexGuard<Option<TxConnection>, Object>,
}

impl Tx {
    fn from_guard(guard: OwnedMutexGuard<Option<TxConnection>>) -> Result<Self, TxError> {
        OwnedMutexGuard::try_map(guard, |slot| {
            slot.as_mut().and_then(|connection| connection.object.as_mut())
        })
        .map(|guard| Tx { guard })
        .map_err(|_| TxError::Finished)
    }
}

impl Deref for Tx {
    type Target = ClientWrapper;

    fn deref(&self) -> &ClientWrapper {
        &self.guard
    }
}

impl fmt::Debug for Tx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tx").finish_non_exhaustive()
    }
}

/// Why a handler could not get the request's transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TxError {
    /// The request has no transaction: the route is not in transaction
    /// mode, its store is not Postgres, or the layer is not in front of it.
    #[error("this request has no idempotency transaction: use transaction mode with a PostgresStore")]
    NotInTransactionMode,
    /// Another [`Tx`] for the same request is alive.
    #[error("the request's transaction is already held by another Tx")]
    InUse,
    /// The layer has already committed or rolled back the transaction.
    #[error("the request's transaction has already ended")]
    Finished,
}

#[cfg(feature = "axum")]
mod axum_extractor {
    use super::{IdempotencyTx, Tx, TxError};
    use crate::problem::{Problem, Protocol};
    use axum_core::extract::FromRequestParts;
    use axum_core::response::{IntoResponse, Response};
    use http::request::Parts;

    impl<S: Send + Sync> FromRequestParts<S> for Tx {
        type Rejection = TxError;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, TxError> {
            let handle = parts
                .extensions
                .get::<IdempotencyTx>()
                .ok_or(TxError::NotInTransactionMode)?;
            handle.try_lock()
        }
    }

    /// A handler that cannot get its transaction answers 500 problem+json.
    impl IntoResponse for TxError {
        fn into_response(self) -> Response {
            Problem::HandlerFailed
                .response::<axum_core::body::Body>(Protocol::Http, &self.to_string())
                .map(axum_core::body::Body::new)
        }
    }
}
