//! The stores' background tasks, whatever the driver: the periodic purge
//! and the periodic read of the store's gauges, each exported through the
//! `metrics` facade.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::metrics;
use crate::store::{StoreError, StoreGauges};

/// Runs `purge` every `every` until the task is aborted, counting each run
/// (rows deleted, duration, failure) against `table`.
pub(crate) fn spawn_purge<F, Fut>(table: String, every: Duration, purge: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<u64, StoreError>> + Send,
{
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let started = tokio::time::Instant::now();
            let purged = purge().await;
            metrics::purge_run(&table, purged.as_ref().ok().copied(), started.elapsed());
            match purged {
                Ok(0) => {}
                Ok(deleted) => tracing::info!(deleted, "purged expired idempotency records"),
                Err(error) => tracing::warn!(%error, "purging expired idempotency records failed"),
            }
        }
    })
}

/// Reads the gauges every `every` until the task is aborted, and exports
/// them against `table` with `idempotency_store_up`: 1 when the read
/// succeeded, 0 when it failed or took longer than `every` (bounded to
/// between 1 and 10 seconds).
pub(crate) fn spawn_gauges<F, Fut>(table: String, every: Duration, read: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = Result<StoreGauges, StoreError>> + Send,
{
    let bound = every.clamp(Duration::from_secs(1), Duration::from_secs(10));
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            match tokio::time::timeout(bound, read()).await {
                Ok(Ok(gauges)) => metrics::store_gauges(&table, &gauges),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "reading the idempotency store's gauges failed");
                    metrics::store_down(&table);
                }
                Err(_) => {
                    tracing::warn!(
                        bound_ms = bound.as_millis() as u64,
                        "reading the idempotency store's gauges timed out"
                    );
                    metrics::store_down(&table);
                }
            }
        }
    })
}
