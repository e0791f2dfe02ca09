//! Every store step of the request path (lookup, claim, renew, complete,
//! release) runs through here: under a timeout, timed in
//! `idempotency_store_duration_seconds`, and, for the steps taken before
//! the handler runs, retried once on a dead connection.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics;
use crate::store::{Store, StoreError};

/// Runs one store step taken before the handler runs (a lookup, a claim)
/// under `timeout`; a step that failed on a dead connection is tried once
/// more on a fresh one, since nothing of the request has happened yet.
pub(super) async fn store_step<T, F, Fut>(
    store: &Store,
    operation: &'static str,
    timeout: Duration,
    mut step: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let result = store_step_once_or_twice(store, timeout, &mut step).await;
    metrics::store_duration(operation, started.elapsed());
    result
}

/// Runs one store step that is taken once: it consumes its claim, or comes
/// after the handler ran (renew, complete, release). `timeout` of `None`
/// leaves the bound to the step itself (a release bounds its own wait and
/// carries on in the background past it).
pub(super) async fn store_step_once<T, Fut>(
    operation: &'static str,
    timeout: Option<Duration>,
    step: Fut,
) -> Result<T, StoreError>
where
    Fut: Future<Output = Result<T, StoreError>>,
{
    let started = Instant::now();
    let result = match timeout {
        Some(timeout) => tokio::time::timeout(timeout, step)
            .await
            .unwrap_or(Err(StoreError::Timeout(timeout))),
        None => step.await,
    };
    metrics::store_duration(operation, started.elapsed());
    result
}

async fn store_step_once_or_twice<T, F, Fut>(store: &Store, timeout: Duration, step: &mut F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, StoreError>>,
{
    let attempt = tokio::time::timeout(timeout, step())
        .await
        .map_err(|_| StoreError::Timeout(timeout))?;
    match attempt {
        Err(error) if error.is_connection_lost() => {
            tracing::debug!(%error, "store step failed on a dead connection; retrying on a fresh one");
            // One dead connection usually means a restarted server: the idle
            // ones are dead too, and the retry must not pick one of them.
            store.forget_idle_connections();
            tokio::time::timeout(timeout, step())
                .await
                .map_err(|_| StoreError::Timeout(timeout))?
        }
        other => other,
    }
}
