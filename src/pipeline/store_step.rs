//! One store step under the route's timeout, retried once on a dead
//! connection, timed.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::metrics::{self};
use crate::store::{Store, StoreError};

/// Runs one store step under the route's timeout; a step that failed on a
/// dead connection is tried once more on a fresh one.
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

pub(super) async fn store_step_once_or_twice<T, F, Fut>(
    store: &Store,
    timeout: Duration,
    step: &mut F,
) -> Result<T, StoreError>
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
