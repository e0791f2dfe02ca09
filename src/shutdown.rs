//! Graceful shutdown: a layer tracks its protected requests (handlers
//! detached from their clients included) and the claim releases that outlive
//! a response, so that a server can let them finish, up to a deadline, and
//! release the claims of those it has to cut off.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A handle on the graceful shutdown of an [`IdempotencyLayer`]'s requests,
/// from [`IdempotencyLayer::shutdown_handle`]. Cloneable and cheap.
///
/// The layer tracks every protected request from its claim to its commit or
/// release, including handlers that keep running after their client went
/// away, and every release of a claim that outlives its response.
/// [`ShutdownHandle::shutdown`] waits for them up to a deadline; what is
/// still running then is cut off and its claim released at once (rolled
/// back in transaction mode, deleted by its claim token in lease mode), so
/// that the next delivery of its key runs immediately, on this instance's
/// successor or on another, instead of waiting for a lease to run out.
///
/// From the moment shutdown begins, a protected request that would need a
/// new claim gets `503` (`urn:tower-idempotency:shutting-down`, with
/// `Retry-After`) and runs nothing, while a duplicate of a completed request
/// is still answered with its replay. Requests the layer does not protect
/// pass through as before: stopping those is the server's business.
///
/// Layers made from one another by the builder methods (and their clones)
/// share one handle; a layer made with [`IdempotencyLayer::new`] has its own.
///
/// The server's own graceful shutdown runs beside it. axum's
/// `with_graceful_shutdown` (and tonic's `serve_with_shutdown`) stop accepting
/// connections but then wait for the open ones without any bound, so give
/// them the same deadline:
///
/// ```no_run
/// use std::time::Duration;
/// use axum::{routing::post, Router};
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let layer = IdempotencyLayer::new(MemoryStore::new(10_000));
/// let shutdown = layer.shutdown_handle();
/// let app: Router = Router::new()
///     .route("/payments", post(|| async { "created" }))
///     .route_layer(layer);
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let server = axum::serve(listener, app).with_graceful_shutdown(async {
///     let _ = stopped.await;
/// });
///
/// let serving = tokio::spawn(std::future::IntoFuture::into_future(server));
/// tokio::signal::ctrl_c().await?;
/// let grace = Duration::from_secs(10);
/// let _ = stop.send(()); // stop accepting connections
/// let (served, report) = tokio::join!(
///     tokio::time::timeout(grace, serving),
///     shutdown.shutdown(grace),
/// );
/// if served.is_err() {
///     eprintln!("connections still open after {grace:?}: closed");
/// }
/// eprintln!("{} request(s) cut off, their claims released", report.cancelled);
/// # Ok(()) }
/// ```
///
/// [`IdempotencyLayer`]: crate::IdempotencyLayer
/// [`IdempotencyLayer::shutdown_handle`]: crate::IdempotencyLayer::shutdown_handle
/// [`IdempotencyLayer::new`]: crate::IdempotencyLayer::new
#[derive(Clone)]
pub struct ShutdownHandle {
    tracker: Arc<Tracker>,
}

impl ShutdownHandle {
    pub(crate) fn new(tracker: Arc<Tracker>) -> Self {
        Self { tracker }
    }

    /// Shuts the layer's requests down: begins at once, when called (not
    /// when the future is first polled), then resolves once every tracked
    /// request and release has finished, or, past `grace`, once the requests
    /// still running have been cut off and their claims released. Each such
    /// release is bounded by its route's
    /// [`store_timeout`](crate::IdempotencyLayer::store_timeout).
    ///
    /// A cut-off request's client, if it is still there, gets `503`
    /// (`urn:tower-idempotency:shutting-down`). Calling it again (or from
    /// another clone) waits for whatever is tracked by then, with its own
    /// `grace`.
    pub fn shutdown(&self, grace: Duration) -> impl Future<Output = ShutdownReport> + Send + 'static {
        let tracker = self.tracker.clone();
        tracker.draining.store(true, Ordering::SeqCst);
        // Past any clock's reach, a grace is as good as forever.
        let deadline = Instant::now() + grace.min(crate::layer::MAX_DURATION);
        let cancelled_before = tracker.cancelled_requests.load(Ordering::SeqCst);
        async move {
            if tokio::time::timeout_at(deadline, tracker.idle()).await.is_err() {
                tracing::warn!(
                    still_running = tracker.active.load(Ordering::SeqCst),
                    "shutdown deadline reached: cutting off the requests still running and releasing their claims"
                );
                tracker.cancelling.store(true, Ordering::SeqCst);
                tracker.cancel.notify_waiters();
                // Every step left to a cut-off request (a release, a commit
                // already under way) is bounded by its store timeout.
                tracker.idle().await;
            }
            ShutdownReport {
                cancelled: tracker.cancelled_requests.load(Ordering::SeqCst) - cancelled_before,
            }
        }
    }

    /// Whether shutdown has begun: a readiness check can report it.
    pub fn is_shutting_down(&self) -> bool {
        self.tracker.is_draining()
    }
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("tracker", &self.tracker)
            .finish()
    }
}

/// What [`ShutdownHandle::shutdown`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Requests cut off at the deadline; their claims were released (or,
    /// where the store could not be reached in time, left to their lease or
    /// connection, as logged).
    pub cancelled: usize,
}

/// The shared state behind a [`ShutdownHandle`].
#[derive(Default)]
pub(crate) struct Tracker {
    /// Tracked requests and background releases still running.
    active: AtomicUsize,
    /// Notified when `active` drops to zero.
    idle: Notify,
    /// Shutdown has begun: no new claims.
    draining: AtomicBool,
    /// The deadline has passed: cut off what is still running.
    cancelling: AtomicBool,
    cancel: Notify,
    cancelled_requests: AtomicUsize,
}

impl fmt::Debug for Tracker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tracker")
            .field("active", &self.active.load(Ordering::Relaxed))
            .field("draining", &self.draining.load(Ordering::Relaxed))
            .field("cancelling", &self.cancelling.load(Ordering::Relaxed))
            .finish()
    }
}

impl Tracker {
    /// Counts `work` as running until it finishes or is dropped; counted
    /// from this call, so that a shutdown beginning before `work` is first
    /// polled (a task not yet scheduled) still waits for it.
    pub(crate) fn track<F: Future>(self: &Arc<Self>, work: F) -> impl Future<Output = F::Output> {
        let running = Running::new(self.clone());
        async move {
            let _running = running;
            work.await
        }
    }

    /// Whether shutdown has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// `work`'s output, or `None` if the shutdown deadline passes first
    /// (then `work` is dropped).
    pub(crate) async fn until_cancelled<F: Future>(&self, work: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            output = work => Some(output),
            () = self.cancelled() => None,
        }
    }

    /// Counts a request cut off at the deadline.
    pub(crate) fn note_cancelled(&self) {
        self.cancelled_requests.fetch_add(1, Ordering::SeqCst);
    }

    /// Resolves once the shutdown deadline has passed.
    async fn cancelled(&self) {
        loop {
            let notified = self.cancel.notified();
            tokio::pin!(notified);
            // Registered before the check, so a notification between the two
            // is not missed.
            notified.as_mut().enable();
            if self.cancelling.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// Resolves once nothing tracked is running.
    async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Runs `task` in the background, tracked when a tracker is given. Without a
/// runtime the task is dropped: there is nothing left to run it.
pub(crate) fn spawn<F>(tracker: Option<&Arc<Tracker>>, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    match tracker {
        Some(tracker) => {
            let running = Running::new(tracker.clone());
            runtime.spawn(async move {
                let _running = running;
                task.await;
            });
        }
        None => {
            runtime.spawn(task);
        }
    }
}

/// One tracked piece of work, counted while it lives.
struct Running {
    tracker: Arc<Tracker>,
}

impl Running {
    fn new(tracker: Arc<Tracker>) -> Self {
        tracker.active.fetch_add(1, Ordering::SeqCst);
        Self { tracker }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only a shutdown waits for idleness, and it sets `draining` before
        // it looks, so no wake-up is lost by skipping it otherwise.
        if self.tracker.active.fetch_sub(1, Ordering::SeqCst) == 1 && self.tracker.draining.load(Ordering::SeqCst) {
            self.tracker.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shutdown_waits_for_tracked_work_within_the_grace() {
        let tracker = Arc::new(Tracker::default());
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let work = tokio::spawn(tracker.track(async move {
            let _ = finished.await;
        }));
        let mut shutdown = Box::pin(ShutdownHandle::new(tracker.clone()).shutdown(Duration::from_secs(60)));

        assert!(tracker.is_draining(), "shutdown begins when called");
        assert!(
            tokio::time::timeout(Duration::ZERO, &mut shutdown).await.is_err(),
            "shutdown waits for the tracked work"
        );
        finish.send(()).unwrap();
        let report = shutdown.await;

        assert_eq!(report.cancelled, 0);
        work.await.unwrap();
    }

    #[tokio::test]
    async fn past_the_grace_tracked_work_is_cut_off_before_shutdown_returns() {
        let tracker = Arc::new(Tracker::default());
        let cut_off = Arc::new(AtomicBool::new(false));
        let work = tokio::spawn(tracker.track({
            let tracker = tracker.clone();
            let cut_off = cut_off.clone();
            async move {
                if tracker.until_cancelled(std::future::pending::<()>()).await.is_none() {
                    tracker.note_cancelled();
                    cut_off.store(true, Ordering::SeqCst);
                }
            }
        }));

        let report = ShutdownHandle::new(tracker.clone())
            .shutdown(Duration::from_millis(10))
            .await;

        assert!(cut_off.load(Ordering::SeqCst), "cut off before shutdown returned");
        assert_eq!(report.cancelled, 1);
        work.await.unwrap();
    }
}
