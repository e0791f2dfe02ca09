//! Acquiring a key: the fast-path read, the local in-flight table, the
//! claim, and waiting under the route's in-flight policy.

use std::ops::ControlFlow;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::store_step::store_step;
use super::Identity;
use crate::inflight::{Entry, HolderGuard};
use crate::metrics;
use crate::policy::InFlight;
use crate::service::Shared;
use crate::store::{Claim, ClaimOutcome, ClaimRequest, Completed, Lookup, StoreError};

/// How the search for a claim ended.
pub(super) enum Acquired {
    /// The key is this request's: run the handler under the claim. The
    /// holder's guard, dropped once the record is final, wakes local
    /// duplicates.
    Claim(Claim, Option<HolderGuard>),
    /// The handler does not run.
    Unclaimed(Unclaimed),
}

/// Why a request's handler does not run.
pub(super) enum Unclaimed {
    /// The key's record is completed: a duplicate, after `waited` for the
    /// first request or not.
    Completed { completed: Completed, waited: bool },
    /// The key was used with a different request.
    OtherPayload,
    /// Another request holds the key, past the route's wait.
    InFlight,
    /// The layer is draining and takes no new claims.
    ShuttingDown,
    /// The store failed before the handler ran.
    StoreFailed(StoreError),
}

/// Where the search for a claim stands. `read` says whether the record has
/// been read since the last wait, so that no answer of 409 or of shutting
/// down is given before a duplicate of a completed key has had its replay.
enum Step {
    /// A plain read: it answers a duplicate of a completed key, and refuses
    /// another payload for a key in flight where the claim is a visible row.
    Read,
    /// Take the key in this instance's in-flight table (once per request).
    EnterLocally { read: bool },
    /// Another request on this instance holds the key: wait for it, holding
    /// no connection.
    WaitLocally(watch::Receiver<()>),
    /// Claim the key in the store; the claim's own read answers a duplicate.
    Claim { read: bool },
    /// Another instance holds the key: back off, holding no connection,
    /// then claim again.
    WaitElsewhere,
}

/// Fast-path read, local in-flight check, claim; waits and retries under the
/// wait policy until its deadline.
///
/// The fast path runs for a likely duplicate (cached, or seen completed
/// lately here): one plain read answers it without any lock. Any other
/// request goes straight to the claim, whose read, taken after a try-lock
/// that never waits, answers a duplicate of a completed key just as well;
/// a first delivery so saves the separate read's round trip.
pub(super) async fn acquire(shared: &Shared, identity: &Identity) -> Acquired {
    let mut search = Search::new(shared, identity);
    let mut step = if shared.store.likely_completed(&identity.record) {
        Step::Read
    } else {
        Step::EnterLocally { read: false }
    };
    loop {
        let next = match step {
            Step::Read => search.read().await,
            Step::EnterLocally { read } => search.enter_locally(read),
            Step::WaitLocally(finished) => search.wait_locally(finished).await,
            Step::Claim { read } => search.claim(read).await,
            Step::WaitElsewhere => search.wait_elsewhere().await,
        };
        match next {
            ControlFlow::Continue(next) => step = next,
            ControlFlow::Break(acquired) => return acquired,
        }
    }
}

/// Either the next step, or how the search ended.
type Next = ControlFlow<Acquired, Step>;

/// What one request's search for its claim carries from step to step.
struct Search<'a> {
    shared: &'a Shared,
    identity: &'a Identity,
    /// Until when a duplicate waits for the first request (`None`: it does
    /// not wait, and gets 409 at once).
    deadline: Option<Instant>,
    /// This request's place in the local in-flight table, once it has one.
    holder: Option<HolderGuard>,
    backoff: Duration,
    waiting: Waiting<'a>,
    /// One claim token for the request, so that a retried claim knows its
    /// own; made at the first claim, since a duplicate never needs one.
    request: Option<ClaimRequest>,
}

impl<'a> Search<'a> {
    fn new(shared: &'a Shared, identity: &'a Identity) -> Self {
        let deadline = match shared.config.in_flight {
            InFlight::Wait(bound) => Some(Instant::now() + bound),
            InFlight::Conflict => None,
        };
        Self {
            shared,
            identity,
            deadline,
            holder: None,
            backoff: Duration::from_millis(5),
            waiting: Waiting::new(identity),
            request: None,
        }
    }

    /// The end of a search that found the key's record completed.
    fn completed(&mut self, completed: Completed) -> Next {
        let waited = self.waiting.finish();
        ControlFlow::Break(Acquired::Unclaimed(Unclaimed::Completed { completed, waited }))
    }

    /// A plain read of the key's record.
    async fn read(&mut self) -> Next {
        let store = &self.shared.store;
        let timeout = self.shared.config.store_timeout;
        let found = store_step(store, "lookup", timeout, || store.lookup(&self.identity.record)).await;
        match found {
            Err(error) => ControlFlow::Break(Acquired::Unclaimed(Unclaimed::StoreFailed(error))),
            Ok(Lookup::Completed(completed)) => self.completed(completed),
            Ok(Lookup::InFlight { fingerprint }) if fingerprint != self.identity.fingerprint => {
                ControlFlow::Break(Acquired::Unclaimed(Unclaimed::OtherPayload))
            }
            Ok(Lookup::InFlight { .. } | Lookup::Absent) if self.holder.is_none() => {
                ControlFlow::Continue(Step::EnterLocally { read: true })
            }
            Ok(Lookup::InFlight { .. } | Lookup::Absent) => ControlFlow::Continue(Step::Claim { read: true }),
        }
    }

    /// Takes the key in this instance's in-flight table, or finds its
    /// holder.
    fn enter_locally(&mut self, read: bool) -> Next {
        ControlFlow::Continue(match self.shared.in_flight.enter(&self.identity.record) {
            Entry::Holder(guard) => {
                self.holder = Some(guard);
                Step::Claim { read }
            }
            // Read the record before answering 409 or waiting: the local
            // holder may only be checking a key that is already completed
            // (a duplicate gets its replay, not 409), and a lease-mode claim
            // is a visible row (another payload is refused with 422 at once).
            Entry::Waiter(_) if !read => Step::Read,
            Entry::Waiter(finished) => Step::WaitLocally(finished),
        })
    }

    /// Waits for the local holder of the key to finish, until the deadline.
    async fn wait_locally(&mut self, mut finished: watch::Receiver<()>) -> Next {
        let Some(deadline) = self.deadline else {
            return ControlFlow::Break(Acquired::Unclaimed(Unclaimed::InFlight));
        };
        self.waiting.start();
        // The holder's guard drops when its record is final.
        if tokio::time::timeout_at(deadline, finished.changed()).await.is_err() {
            self.waiting.finish();
            return ControlFlow::Break(Acquired::Unclaimed(Unclaimed::InFlight));
        }
        tracing::debug!("a local duplicate finished; looking again");
        // It most likely completed the key.
        ControlFlow::Continue(Step::Read)
    }

    /// Claims the key in the store; the claim's own read answers a
    /// duplicate. A draining layer takes no new claims, but a plain read
    /// still answers a duplicate of a completed key.
    async fn claim(&mut self, read: bool) -> Next {
        if self.shared.shutdown.is_draining() {
            if !read {
                return ControlFlow::Continue(Step::Read);
            }
            return ControlFlow::Break(Acquired::Unclaimed(Unclaimed::ShuttingDown));
        }
        let (config, store, identity) = (&self.shared.config, &self.shared.store, self.identity);
        let request = self.request.get_or_insert_with(|| {
            ClaimRequest::new(
                identity.record.clone(),
                identity.fingerprint,
                config.mode,
                config.retention,
            )
            .with_body_record(identity.body_record.clone())
        });
        let claimed = store_step(store, "claim", config.store_timeout, || store.claim(request.clone())).await;
        match claimed {
            Err(error) => {
                store.release_unknown_claim(request, &error, config.store_timeout, &self.shared.shutdown);
                ControlFlow::Break(Acquired::Unclaimed(Unclaimed::StoreFailed(error)))
            }
            Ok(ClaimOutcome::Claimed(claim)) => {
                self.waiting.finish();
                ControlFlow::Break(Acquired::Claim(claim, self.holder.take()))
            }
            Ok(ClaimOutcome::Completed(completed)) => self.completed(completed),
            Ok(ClaimOutcome::InFlight { fingerprint })
                if fingerprint.is_some_and(|fingerprint| fingerprint != identity.fingerprint) =>
            {
                ControlFlow::Break(Acquired::Unclaimed(Unclaimed::OtherPayload))
            }
            Ok(ClaimOutcome::InFlight { .. }) => ControlFlow::Continue(Step::WaitElsewhere),
        }
    }

    /// Backs off, holding no connection, while another instance holds the
    /// key; then claims again.
    async fn wait_elsewhere(&mut self) -> Next {
        let Some(deadline) = self.deadline else {
            return ControlFlow::Break(Acquired::Unclaimed(Unclaimed::InFlight));
        };
        let now = Instant::now();
        if now >= deadline {
            self.waiting.finish();
            return ControlFlow::Break(Acquired::Unclaimed(Unclaimed::InFlight));
        }
        self.waiting.start();
        tokio::time::sleep_until((now + self.backoff).min(deadline)).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(200));
        // The next claim's own read says whether the first finished.
        ControlFlow::Continue(Step::Claim { read: false })
    }
}

/// Time a duplicate spent waiting for the first request with its key; the
/// duplicate counts in `idempotency_waiting` while it waits.
pub(super) struct Waiting<'a> {
    identity: &'a Identity,
    since: Option<(Instant, metrics::Occupancy)>,
}

impl<'a> Waiting<'a> {
    fn new(identity: &'a Identity) -> Self {
        Self { identity, since: None }
    }

    fn start(&mut self) {
        if self.since.is_none() {
            self.since = Some((
                Instant::now(),
                metrics::Occupancy::waiting(&self.identity.metrics_label),
            ));
        }
    }

    /// Records the wait, if there was one; says whether there was.
    fn finish(&mut self) -> bool {
        let Some((since, _waiting)) = self.since.take() else {
            return false;
        };
        metrics::wait_duration(&self.identity.metrics_label, since.elapsed());
        true
    }
}
