//! Acquiring a key: the fast-path read, the local in-flight table, the
//! claim, and waiting under the route's in-flight policy.

use std::time::Duration;

use http::Response;
use tokio::time::Instant;

use super::answer::{in_flight, mismatch, replay_or_mismatch, shutting_down};
use super::store_step::store_step;
use super::Identity;
use crate::body::ResponseBody;
use crate::inflight::{Entry, HolderGuard};
use crate::metrics::{self};
use crate::policy::InFlight;
use crate::service::Shared;
use crate::store::{Claim, ClaimOutcome, ClaimRequest, Lookup, StoreError};

/// How the search for a claim ended.
pub(super) enum Acquired<B> {
    Claim(Claim, Option<HolderGuard>),
    /// Answered without running the handler: a replay or a refusal.
    Answer(Response<ResponseBody<B>>),
    StoreFailed(StoreError),
}

/// Fast-path read, local in-flight check, claim; waits and retries under the
/// wait policy until its deadline.
///
/// The fast path runs for a likely duplicate (cached, or seen completed
/// lately here): one plain read answers it without any lock. Any other
/// request goes straight to the claim, whose read, taken after a try-lock
/// that never waits, answers a duplicate of a completed key just as well;
/// a first delivery so saves the separate read's round trip.
pub(super) async fn acquire<B>(shared: &Shared, identity: &Identity) -> Acquired<B> {
    let config = &shared.config;
    let deadline = match config.in_flight {
        InFlight::Wait(bound) => Some(Instant::now() + bound),
        InFlight::Conflict => None,
    };
    let mut holder: Option<HolderGuard> = None;
    let mut backoff = Duration::from_millis(5);
    let mut waiting = Waiting::new(identity);
    let mut read_first = shared.store.likely_completed(&identity.key);
    // One claim token for the request, so that a retried claim knows its
    // own; made at the first claim, since a duplicate never needs one.
    let mut request: Option<ClaimRequest> = None;
    loop {
        if read_first {
            match store_step(&shared.store, "lookup", config.store_timeout, || {
                shared.store.lookup(&identity.key)
            })
            .await
            {
                Err(error) => return Acquired::StoreFailed(error),
                Ok(Lookup::Completed(completed)) => {
                    return Acquired::Answer(replay_or_mismatch(completed, identity, waiting.finish()))
                }
                Ok(Lookup::InProgress { fingerprint }) if fingerprint != identity.fingerprint => {
                    return Acquired::Answer(mismatch(identity));
                }
                Ok(Lookup::InProgress { .. } | Lookup::Absent) => {}
            }
        }
        if holder.is_none() {
            match shared.in_flight.enter(&identity.key) {
                Entry::Holder(guard) => holder = Some(guard),
                Entry::Waiter(mut finished) => {
                    if !read_first {
                        // Read the record before answering 409 or waiting:
                        // the local holder may only be checking a key that
                        // is already completed (a duplicate gets its replay,
                        // not 409), and a lease-mode claim is a visible row
                        // (another payload is refused with 422 at once).
                        read_first = true;
                        continue;
                    }
                    let Some(deadline) = deadline else {
                        return Acquired::Answer(in_flight(identity));
                    };
                    waiting.start();
                    // The holder's guard drops when its record is final.
                    if tokio::time::timeout_at(deadline, finished.changed()).await.is_err() {
                        waiting.finish();
                        return Acquired::Answer(in_flight(identity));
                    }
                    tracing::debug!("a local duplicate finished; looking again");
                    // It most likely completed the key.
                    read_first = true;
                    continue;
                }
            }
        }
        if shared.shutdown.is_draining() {
            if !read_first {
                // A plain read still answers a duplicate of a completed key.
                read_first = true;
                continue;
            }
            tracing::info!("refused: shutting down, no new claims");
            return Acquired::Answer(shutting_down(identity.protocol, "the server is shutting down"));
        }
        let request = request.get_or_insert_with(|| {
            ClaimRequest::new(
                identity.key.clone(),
                identity.fingerprint,
                config.mode,
                config.retention,
            )
        });
        match store_step(&shared.store, "claim", config.store_timeout, || {
            shared.store.claim(request.clone())
        })
        .await
        {
            Err(error) => {
                shared
                    .store
                    .release_unknown_claim(request, &error, config.store_timeout, &shared.shutdown);
                return Acquired::StoreFailed(error);
            }
            Ok(ClaimOutcome::Claimed(claim)) => {
                waiting.finish();
                return Acquired::Claim(claim, holder);
            }
            Ok(ClaimOutcome::Completed(completed)) => {
                return Acquired::Answer(replay_or_mismatch(completed, identity, waiting.finish()))
            }
            Ok(ClaimOutcome::InFlight { fingerprint }) => {
                if fingerprint.is_some_and(|fingerprint| fingerprint != identity.fingerprint) {
                    return Acquired::Answer(mismatch(identity));
                }
                let Some(deadline) = deadline else {
                    return Acquired::Answer(in_flight(identity));
                };
                // Held on another instance: wait without a connection.
                let now = Instant::now();
                if now >= deadline {
                    waiting.finish();
                    return Acquired::Answer(in_flight(identity));
                }
                waiting.start();
                tokio::time::sleep_until((now + backoff).min(deadline)).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
                // The next claim's own read says whether the first finished.
                read_first = false;
            }
        }
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
