//! The open transaction of a request in transaction mode on an sqlx pool,
//! handed to the handler as sqlx's own [`PgConnection`].
//!
//! As with the tokio-postgres store, the layer begins the transaction on a
//! pooled connection, takes the key's advisory lock, runs the handler, and
//! commits the record together with whatever the handler wrote through
//! [`SqlxTx`], or rolls everything back. The handler must not `COMMIT` or
//! `ROLLBACK` itself, nor `begin()` on the connection.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use ::sqlx::pool::PoolConnection;
use ::sqlx::postgres::PgConnection;
use ::sqlx::{AssertSqlSafe, Postgres};
use tokio::sync::{Mutex, OwnedMappedMutexGuard, OwnedMutexGuard};

use crate::layer::DEFAULT_STORE_TIMEOUT;
use crate::store::postgres::sql;
use crate::store::TxError;

/// A pooled sqlx connection inside an open transaction.
///
/// Dropped while still open, it rolls back before the connection can go
/// back to the pool; where that cannot happen, the connection is taken out
/// of the pool and closed, and the server rolls the transaction back.
pub(crate) struct SqlxTxConnection {
    connection: Option<PoolConnection<Postgres>>,
}

impl SqlxTxConnection {
    pub(crate) fn new(connection: PoolConnection<Postgres>) -> Self {
        Self {
            connection: Some(connection),
        }
    }

    pub(crate) fn connection(&mut self) -> Option<&mut PgConnection> {
        self.connection.as_deref_mut()
    }

    /// Ends the guard after a successful `COMMIT` or `ROLLBACK`: the
    /// connection goes back to the pool.
    pub(crate) fn closed_cleanly(mut self) {
        self.connection.take();
    }

    /// Ends the guard when the transaction's state is unknown: the
    /// connection is closed instead of reused.
    pub(crate) fn discard(mut self) {
        if let Some(connection) = self.connection.take() {
            discard(connection);
        }
    }

    /// Commits and returns the connection to the pool, or discards it if
    /// the commit fails (its outcome is then unknown).
    pub(crate) async fn commit(mut self) -> Result<(), ::sqlx::Error> {
        let Some(connection) = self.connection.take() else {
            return Ok(());
        };
        DiscardUnlessEnded(Some(connection)).end(sql::COMMIT).await
    }

    /// Rolls back and returns the connection to the pool, or discards it if
    /// the rollback fails.
    pub(crate) async fn rollback(mut self) -> Result<(), ::sqlx::Error> {
        let Some(connection) = self.connection.take() else {
            return Ok(());
        };
        DiscardUnlessEnded(Some(connection)).end(sql::ROLLBACK).await
    }
}

impl Drop for SqlxTxConnection {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            let guard = DiscardUnlessEnded(Some(connection));
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(async move {
                        // Past the bound the guard is dropped, which closes
                        // the connection.
                        let _ = tokio::time::timeout(DEFAULT_STORE_TIMEOUT, guard.end(sql::ROLLBACK)).await;
                    });
                }
                Err(_) => drop(guard),
            }
        }
    }
}

/// Holds a connection whose transaction may still be open; unless it ends
/// cleanly, dropping it closes the connection.
struct DiscardUnlessEnded(Option<PoolConnection<Postgres>>);

impl DiscardUnlessEnded {
    /// Ends the transaction with `COMMIT` or `ROLLBACK`; only a clean end
    /// returns the connection to the pool.
    async fn end(mut self, statement: &'static str) -> Result<(), ::sqlx::Error> {
        let Some(connection) = self.0.as_mut() else {
            return Ok(());
        };
        let result = ::sqlx::raw_sql(AssertSqlSafe(statement))
            .execute(&mut **connection)
            .await;
        if result.is_ok() {
            // Back to the pool, clean.
            self.0.take();
        }
        result.map(drop)
    }
}

impl Drop for DiscardUnlessEnded {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            discard(connection);
        }
    }
}

/// Takes a connection out of the pool and closes it: the server sees the
/// socket close and rolls back whatever was open.
pub(crate) fn discard(connection: PoolConnection<Postgres>) {
    drop(connection.detach());
}

/// The request extension that gives a handler the request's sqlx
/// transaction: what a tonic service (or any tower service) reads from the
/// request's extensions.
///
/// Cloneable and cheap; [`SqlxIdempotencyTx::lock`] yields the [`SqlxTx`]
/// guard. With the `axum` feature, a handler can take [`SqlxTx`] directly
/// as an extractor instead.
///
/// ```
/// use tower_idempotency::SqlxIdempotencyTx;
///
/// async fn handler(request: http::Request<String>) -> Result<(), Box<dyn std::error::Error>> {
///     let tx = request.extensions().get::<SqlxIdempotencyTx>().ok_or("not in transaction mode")?;
///     let mut tx = tx.lock().await?;
///     sqlx::query("INSERT INTO ledger (amount) VALUES ($1)")
///         .bind(100_i64)
///         .execute(&mut *tx)
///         .await?;
///     Ok(())
/// }
/// # let _ = handler;
/// ```
#[derive(Clone)]
pub struct SqlxIdempotencyTx {
    slot: Arc<Mutex<Option<SqlxTxConnection>>>,
}

impl SqlxIdempotencyTx {
    pub(crate) fn new(connection: SqlxTxConnection) -> Self {
        Self {
            slot: Arc::new(Mutex::new(Some(connection))),
        }
    }

    /// Waits for the transaction and locks it for this caller.
    pub async fn lock(&self) -> Result<SqlxTx, TxError> {
        let guard = self.slot.clone().lock_owned().await;
        SqlxTx::from_guard(guard)
    }

    /// Locks the transaction if nobody else holds it.
    pub fn try_lock(&self) -> Result<SqlxTx, TxError> {
        let guard = self.slot.clone().try_lock_owned().map_err(|_| TxError::InUse)?;
        SqlxTx::from_guard(guard)
    }

    /// Takes the connection back for commit or rollback once the handler has
    /// answered. `Err` if the handler still holds an [`SqlxTx`].
    pub(crate) fn take(&self) -> Result<Option<SqlxTxConnection>, TxError> {
        let mut guard = self.slot.try_lock().map_err(|_| TxError::InUse)?;
        Ok(guard.take())
    }
}

impl fmt::Debug for SqlxIdempotencyTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxIdempotencyTx").finish_non_exhaustive()
    }
}

/// A handler's hold on the request's open transaction, on an
/// [`SqlxStore`](crate::SqlxStore).
///
/// Dereferences to sqlx's [`PgConnection`], so `&mut *tx` is the executor
/// of `sqlx::query`, `query_as`, `query_scalar` and the `query!` macros,
/// and every statement runs inside the transaction that commits with the
/// idempotency record. Never run `COMMIT` or `ROLLBACK` through it, nor
/// `begin()` on it: the layer ends the transaction by the response. For a
/// unit of work that may fail on its own, use `SAVEPOINT` and
/// `ROLLBACK TO SAVEPOINT`.
///
/// ```
/// use tower_idempotency::SqlxTx;
///
/// async fn handler(mut tx: SqlxTx) -> Result<String, sqlx::Error> {
///     let id: i64 = sqlx::query_scalar("INSERT INTO orders (total) VALUES ($1) RETURNING id")
///         .bind(4200_i64)
///         .fetch_one(&mut *tx)
///         .await?;
///     Ok(format!("order {id}"))
/// }
/// # let _ = handler;
/// ```
pub struct SqlxTx {
    guard: OwnedMappedMutexGuard<Option<SqlxTxConnection>, PoolConnection<Postgres>>,
}

impl SqlxTx {
    fn from_guard(guard: OwnedMutexGuard<Option<SqlxTxConnection>>) -> Result<Self, TxError> {
        OwnedMutexGuard::try_map(guard, |slot| {
            slot.as_mut().and_then(|connection| connection.connection.as_mut())
        })
        .map(|guard| SqlxTx { guard })
        .map_err(|_| TxError::Finished)
    }
}

impl Deref for SqlxTx {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.guard
    }
}

impl DerefMut for SqlxTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.guard
    }
}

impl fmt::Debug for SqlxTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxTx").finish_non_exhaustive()
    }
}

#[cfg(feature = "axum")]
mod axum_extractor {
    use super::{SqlxIdempotencyTx, SqlxTx, TxError};
    use axum_core::extract::FromRequestParts;
    use http::request::Parts;

    /// The request's transaction; a handler that cannot get it answers 500
    /// problem+json (see [`TxError`]).
    impl<S: Send + Sync> FromRequestParts<S> for SqlxTx {
        type Rejection = TxError;

        async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, TxError> {
            let handle = parts
                .extensions
                .get::<SqlxIdempotencyTx>()
                .ok_or(TxError::NotInTransactionMode)?;
            handle.try_lock()
        }
    }
}
