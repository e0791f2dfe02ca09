//! A bounded in-process store, for tests and single-process services.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{
    Backend, Claim, ClaimOutcome, ClaimRequest, Completed, Completion, HeldClaim, Lookup, ReleaseBound, StoreError,
    StoreFuture,
};
use crate::key::RecordKey;
use crate::policy::Mode;
use crate::record::StoredResponse;

/// Records in process memory, at most `capacity` of them.
///
/// It protects one process only and forgets everything on restart: use it in
/// tests and single-instance tools, and [`PostgresStore`](crate::PostgresStore)
/// wherever more than one process serves a route. When full, it first drops
/// expired records, then refuses new claims with `503` rather than forget a
/// live key. In transaction mode it holds claims without a lease (there is no
/// transaction to hand to the handler); a claim is released when its request
/// fails or is dropped.
///
/// ```
/// use tower_idempotency::{IdempotencyLayer, MemoryStore};
///
/// let layer = IdempotencyLayer::new(MemoryStore::new(10_000));
/// # let _ = layer;
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Records>>,
}

struct Records {
    capacity: usize,
    by_key: HashMap<RecordKey, Record>,
    next_token: u64,
    /// No record dies before this (`None`: none can die before it is
    /// released); lets a full store skip a sweep that would find nothing.
    earliest_death: Option<Instant>,
}

struct Record {
    fingerprint: [u8; 32],
    state: State,
    expires_at: Instant,
}

enum State {
    InFlight { token: u64, locked_until: Option<Instant> },
    Completed(StoredResponse),
}

impl Record {
    /// The one definition of a live record here, as in the Postgres store:
    /// completed and unexpired, or in flight with a running lease,
    /// whatever `expires_at` says (retention never ends a lease that is
    /// still being renewed). A transaction-mode claim has no lease: it lives
    /// until its request completes or releases it.
    fn is_live(&self, now: Instant) -> bool {
        match &self.state {
            State::Completed(_) => self.expires_at > now,
            State::InFlight { locked_until, .. } => locked_until.is_none_or(|until| until > now),
        }
    }

    /// When the record stops being live unless renewed or completed; `None`
    /// for a claim that lives until it is released.
    fn dies_at(&self) -> Option<Instant> {
        match &self.state {
            State::Completed(_) => Some(self.expires_at),
            State::InFlight { locked_until, .. } => *locked_until,
        }
    }

    fn is_owned_by(&self, claim_token: u64) -> bool {
        matches!(self.state, State::InFlight { token, .. } if token == claim_token)
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let records = self.records();
        f.debug_struct("MemoryStore")
            .field("capacity", &records.capacity)
            .field("len", &records.by_key.len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store that holds at most `capacity` records.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Records {
                capacity,
                by_key: HashMap::new(),
                next_token: 0,
                earliest_death: None,
            })),
        }
    }

    /// How many records it holds, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.records().by_key.len()
    }

    /// Whether it holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        // A panic while holding this lock cannot leave the map inconsistent:
        // every update is a single insert or remove.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(super) fn lookup(&self, key: &RecordKey) -> Lookup {
        let records = self.records();
        match records.by_key.get(key) {
            Some(record) if record.is_live(Instant::now()) => found(record),
            _ => Lookup::Absent,
        }
    }

    /// Claims the request's records (the key's, and the body's on a guarded
    /// route) at once, or none of them: a live one answers instead.
    pub(super) fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let now = Instant::now();
        let mut records = self.records();
        let live = request
            .records()
            .find_map(|key| records.by_key.get(key).filter(|record| record.is_live(now)));
        if let Some(record) = live {
            return Ok(match found(record) {
                Lookup::Completed(completed) => ClaimOutcome::Completed(completed),
                Lookup::InFlight { fingerprint } => ClaimOutcome::InFlight {
                    fingerprint: Some(fingerprint),
                },
                Lookup::Absent => ClaimOutcome::InFlight { fingerprint: None },
            });
        }
        let new_records = request
            .records()
            .filter(|key| !records.by_key.contains_key(*key))
            .count();
        if records.by_key.len() + new_records > records.capacity {
            records.sweep(now);
            let new_records = request
                .records()
                .filter(|key| !records.by_key.contains_key(*key))
                .count();
            if records.by_key.len() + new_records > records.capacity {
                return Err(StoreError::Full);
            }
        }
        records.next_token += 1;
        let token = records.next_token;
        let locked_until = match request.mode {
            Mode::Transaction => None,
            Mode::Lease { lease, .. } => Some(now + lease),
        };
        for key in request.records() {
            let record = Record {
                fingerprint: request.fingerprint,
                state: State::InFlight { token, locked_until },
                expires_at: now + request.retention,
            };
            records.note_death(record.dies_at());
            records.by_key.insert(key.clone(), record);
        }
        drop(records);
        let held = MemoryClaim {
            store: self.clone(),
            token,
        };
        Ok(ClaimOutcome::Claimed(Claim::new(request, Box::new(held))))
    }

    pub(super) fn renew(&self, key: &RecordKey, token: u64, lease: Duration) -> bool {
        let mut records = self.records();
        let dies_at = match records.by_key.get_mut(key) {
            Some(record) if record.is_owned_by(token) => {
                record.state = State::InFlight {
                    token,
                    locked_until: Some(Instant::now() + lease),
                };
                record.dies_at()
            }
            _ => return false,
        };
        records.note_death(dies_at);
        true
    }

    pub(super) fn complete(&self, request: &ClaimRequest, token: u64, response: &StoredResponse) -> Completion {
        let now = Instant::now();
        let mut records = self.records();
        let expires_at = now + request.retention;
        let owned = request
            .records()
            .all(|key| records.by_key.get(key).is_some_and(|record| record.is_owned_by(token)));
        if !owned {
            return Completion::FencedOut;
        }
        for key in request.records() {
            if let Some(record) = records.by_key.get_mut(key) {
                record.state = State::Completed(response.clone());
                record.expires_at = expires_at;
            }
        }
        records.note_death(Some(expires_at));
        Completion::Recorded
    }

    /// Removes the request's records that this claim still holds.
    pub(super) fn release(&self, request: &ClaimRequest, token: u64) {
        let mut records = self.records();
        for key in request.records() {
            if records.by_key.get(key).is_some_and(|record| record.is_owned_by(token)) {
                records.by_key.remove(key);
            }
        }
    }
}

impl Records {
    fn note_death(&mut self, at: Option<Instant>) {
        if let Some(at) = at {
            self.earliest_death = Some(self.earliest_death.map_or(at, |earliest| earliest.min(at)));
        }
    }

    /// Drops dead records (expired, or claims whose lease ran out).
    fn sweep(&mut self, now: Instant) {
        if self.earliest_death.is_none_or(|earliest| earliest > now) {
            return;
        }
        self.by_key.retain(|_, record| record.is_live(now));
        self.earliest_death = self.by_key.values().filter_map(Record::dies_at).min();
    }
}

fn found(record: &Record) -> Lookup {
    match &record.state {
        State::Completed(response) => Lookup::Completed(Completed {
            fingerprint: record.fingerprint,
            response: response.clone(),
        }),
        // A transaction-mode claim is invisible until it completes, as its
        // uncommitted row is on Postgres: another payload gets the in-flight
        // answer, not a 422 for a record that may never exist.
        State::InFlight { locked_until: None, .. } => Lookup::Absent,
        State::InFlight { .. } => Lookup::InFlight {
            fingerprint: record.fingerprint,
        },
    }
}

impl Backend for MemoryStore {
    fn lookup<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Lookup> {
        Box::pin(std::future::ready(Ok(MemoryStore::lookup(self, key))))
    }

    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, ClaimOutcome> {
        Box::pin(std::future::ready(MemoryStore::claim(self, request)))
    }
}

/// A claim on a key of the memory store, owned by its token.
#[derive(Debug)]
struct MemoryClaim {
    store: MemoryStore,
    token: u64,
}

impl HeldClaim for MemoryClaim {
    fn renew<'a>(&'a self, request: &'a ClaimRequest, lease: Duration) -> StoreFuture<'a, bool> {
        Box::pin(std::future::ready(Ok(self.store.renew(
            &request.key,
            self.token,
            lease,
        ))))
    }

    fn complete<'a>(
        self: Box<Self>,
        request: &'a ClaimRequest,
        response: &'a StoredResponse,
    ) -> StoreFuture<'a, Completion> {
        Box::pin(std::future::ready(Ok(self
            .store
            .complete(request, self.token, response))))
    }

    fn end_unrecorded<'a>(self: Box<Self>, request: &'a ClaimRequest) -> StoreFuture<'a, ()> {
        self.store.release(request, self.token);
        Box::pin(std::future::ready(Ok(())))
    }

    fn release<'a>(self: Box<Self>, request: &'a ClaimRequest, _bound: &'a ReleaseBound) -> StoreFuture<'a, ()> {
        self.store.release(request, self.token);
        Box::pin(std::future::ready(Ok(())))
    }

    fn abandon(self: Box<Self>, request: &ClaimRequest, _bound: &ReleaseBound) {
        self.store.release(request, self.token);
    }
}
