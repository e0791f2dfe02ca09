//! Acquiring a key: the fast-path read, the local in-flight table, the
//! claim, and waiting under the route's in-flight policy.

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
    let config = &shared.config;
    let deadline = match config.in_flight {
        InFlight::Wait(bound) => Some(Instant::now() + bound),
        InFlight::Conflict => None,
    };
    let mut holder: Option<HolderGuard> = None;
    let mut backoff = Duration::from_millis(5);
    let mut waiting = Waiting::new(identity);
    // One claim token for the request, so that a retried claim knows its
    // own; made at the first claim, since a duplicate never needs one.
    let mut request: Option<ClaimRequest> = None;
    let mut step = if shared.store.likely_completed(&identity.record) {
        Step::Read
    } else {
        Step::EnterLocally { read: false }
    };
    loop {
        step = match step {
            Step::Read => {
                let found = store_step(&shared.store, "lookup", config.store_timeout, || {
                    shared.store.lookup(&identity.record)
                })
                .await;
                match found {
                    Err(error) => return Acquired::Unclaimed(Unclaimed::StoreFailed(error)),
                    Ok(Lookup::Completed(completed)) => {
                        let waited = waiting.finish();
                        return Acquired::Unclaimed(Unclaimed::Completed { completed, waited });
                    }
                    Ok(Lookup::InFlight { fingerprint }) if fingerprint != identity.fingerprint => {
                        return Acquired::Unclaimed(Unclaimed::OtherPayload);
                    }
                    Ok(Lookup::InFlight { .. } | Lookup::Absent) if holder.is_none() => {
                        Step::EnterLocally { read: true }
                    }
                    Ok(Lookup::InFlight { .. } | Lookup::Absent) => Step::Claim { read: true },
                }
            }
            Step::EnterLocally { read } => match shared.in_flight.enter(&identity.record) {
                Entry::Holder(guard) => {
                    holder = Some(guard);
                    Step::Claim { read }
                }
                // Read the record before answering 409 or waiting: the local
                // holder may only be checking a key that is already
                // completed (a duplicate gets its replay, not 409), and a
                // lease-mode claim is a visible row (another payload is
                // refused with 422 at once).
                Entry::Waiter(_) if !read => Step::Read,
                Entry::Waiter(finished) => Step::WaitLocally(finished),
            },
            Step::WaitLocally(mut finished) => {
                let Some(deadline) = deadline else {
                    return Acquired::Unclaimed(Unclaimed::InFlight);
                };
                waiting.start();
                // The holder's guard drops when its record is final.
                if tokio::time::timeout_at(deadline, finished.changed()).await.is_err() {
                    waiting.finish();
                    return Acquired::Unclaimed(Unclaimed::InFlight);
                }
                tracing::debug!("a local duplicate finished; looking again");
                // It most likely completed the key.
                Step::Read
            }
            Step::Claim { read: false } if shared.shutdown.is_draining() => {
                // A plain read still answers a duplicate of a completed key.
                Step::Read
            }
            Step::Claim { .. } if shared.shutdown.is_draining() => {
                return Acquired::Unclaimed(Unclaimed::ShuttingDown);
            }
            Step::Claim { .. } => {
                let request = request.get_or_insert_with(|| {
                    ClaimRequest::new(
                        identity.record.clone(),
                        identity.fingerprint,
                        config.mode,
                        config.retention,
                    )
                });
                let claimed = store_step(&shared.store, "claim", config.store_timeout, || {
                    shared.store.claim(request.clone())
                })
                .await;
                match claimed {
                    Err(error) => {
                        shared
                            .store
                            .release_unknown_claim(request, &error, config.store_timeout, &shared.shutdown);
                        return Acquired::Unclaimed(Unclaimed::StoreFailed(error));
                    }
                    Ok(ClaimOutcome::Claimed(claim)) => {
                        waiting.finish();
                        return Acquired::Claim(claim, holder);
                    }
                    Ok(ClaimOutcome::Completed(completed)) => {
                        let waited = waiting.finish();
                        return Acquired::Unclaimed(Unclaimed::Completed { completed, waited });
                    }
                    Ok(ClaimOutcome::InFlight { fingerprint })
                        if fingerprint.is_some_and(|fingerprint| fingerprint != identity.fingerprint) =>
                    {
                        return Acquired::Unclaimed(Unclaimed::OtherPayload);
                    }
                    Ok(ClaimOutcome::InFlight { .. }) => Step::WaitElsewhere,
                }
            }
            Step::WaitElsewhere => {
                let Some(deadline) = deadline else {
                    return Acquired::Unclaimed(Unclaimed::InFlight);
                };
                let now = Instant::now();
                if now >= deadline {
                    waiting.finish();
                    return Acquired::Unclaimed(Unclaimed::InFlight);
                }
                waiting.start();
                tokio::time::sleep_until((now + backoff).min(deadline)).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
                // The next claim's own read says whether the first finished.
                Step::Claim { read: false }
            }
        };
    }
}

/// Time a duplicate spent waiting for the first request with its key.
pub(super) struct Waiting<'a> {
    identity: &'a Identity,
    since: Option<Instant>,
}

impl<'a> Waiting<'a> {
    fn new(identity: &'a Identity) -> Self {
        Self { identity, since: None }
    }

    fn start(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }

    /// Records the wait, if there was one; says whether there was.
    fn finish(&mut self) -> bool {
        let Some(since) = self.since.take() else {
            return false;
        };
        metrics::wait_duration(&self.identity.metrics_label, since.elapsed());
        true
    }
}
