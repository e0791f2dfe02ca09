//! Model-based tests: random schedules of deliveries of a few keys (with
//! duplicates, concurrent batches on two instances, failing statuses,
//! handler errors and panics, dropped futures and, in lease mode, claimants
//! that hang until their lease runs out) are run against both stores and
//! checked after every step against a small reference model.
//!
//! Invariants checked after every step:
//! - at most one committed run per key (in transaction mode on Postgres,
//!   also as committed ledger rows written through the request's
//!   transaction);
//! - a key whose runs all failed is never replayed;
//! - every replay equals the committed response, and the record a side
//!   observer reads equals the model's;
//! - no run starts once another run of its key has committed;
//! - no connection is left idle in a transaction (Postgres).
//!
//! A failing schedule is shrunk by proptest and printed step by step. The
//! number of schedules per test is `MODEL_CASES` (default
//! `DEFAULT_CASES`); failures are saved in
//! `tests/model.proptest-regressions` and replayed first on later runs.

mod support;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestCaseError, TestError, TestRunner};
use tokio::sync::{oneshot, Barrier};
use tower::util::BoxCloneService;
use tower::{service_fn, BoxError, Layer, ServiceExt};
#[cfg(feature = "sqlx")]
use tower_idempotency::SqlxIdempotencyTx;
use tower_idempotency::{
    IdempotencyLayer, IdempotencyTx, InFlight, MemoryStore, Mode, PostgresStore, RecordKey, RequestBody, Store, Tx,
};

const DEFAULT_CASES: u32 = 64;
/// How often a shrunk schedule is run before it counts as passing.
const SHRINK_TRIES: usize = 4;
/// Bound on one step; a step that takes longer is a hang, and a failure.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Lease of the normal instances in lease mode: never runs out in a step.
const LEASE: Duration = Duration::from_secs(30);
/// Lease of the instance whose claimants hang: runs out at once.
const HUNG_LEASE: Duration = Duration::from_millis(50);
const PANIC_MESSAGE: &str = "the model handler was asked to panic";

// ---------------------------------------------------------------------------
// Schedules

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    K0,
    K1,
    K2,
}

/// Two payloads, so that a key can be reused with another request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Payload {
    A,
    B,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// A committing status.
    Commit(u16),
    /// A status that releases the claim.
    Fail(u16),
    /// The inner service returns an error.
    Error,
    Panic,
    /// A 200 from a handler that still holds the request's transaction
    /// (sequential deliveries only): where there is one (transaction mode
    /// on Postgres) the commit fails with 503 and nothing is recorded;
    /// elsewhere it is a plain 200.
    HoldTx,
    /// What `HoldTx` is where the commit fails; never generated.
    CommitFailed,
}

#[derive(Clone, Copy, PartialEq, Eq)]
struct Delivery {
    key: Key,
    payload: Payload,
    /// Which of two instances (layers with their own in-process state over
    /// one store) receives it.
    instance: usize,
    outcome: Outcome,
    /// The handler takes a few milliseconds, widening the races.
    slow: bool,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?}/{:?}@i{} -> {:?}{}",
            self.key,
            self.payload,
            self.instance,
            self.outcome,
            if self.slow { " (slow)" } else { "" }
        )
    }
}

#[derive(Clone, Debug)]
enum Step {
    /// One delivery, answered before the next step.
    Deliver(Delivery),
    /// Deliveries started together.
    Concurrent(Vec<Delivery>),
    /// The client drops the request's future while the handler runs.
    Abandon(Delivery),
    /// Lease mode: the claimant hangs (a stuck or crashed process) while
    /// holding a lease that runs out and is taken over; it finishes only
    /// at the end of the schedule, fenced out.
    Hang(Delivery),
}

#[derive(Clone, Debug)]
struct Schedule {
    in_flight: Policy,
    detach: bool,
    steps: Vec<Step>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Policy {
    Conflict,
    Wait,
}

fn delivery() -> impl Strategy<Value = Delivery> {
    delivery_with(false)
}

fn delivery_with(hold_tx: bool) -> impl Strategy<Value = Delivery> {
    let key = prop_oneof![3 => Just(Key::K0), 2 => Just(Key::K1), 1 => Just(Key::K2)];
    let payload = prop_oneof![4 => Just(Payload::A), 1 => Just(Payload::B)];
    let outcome = prop_oneof![
        4 => prop_oneof![Just(200u16), Just(201)].prop_map(Outcome::Commit),
        2 => prop_oneof![Just(503u16), Just(500), Just(400)].prop_map(Outcome::Fail),
        1 => Just(Outcome::Error),
        1 => Just(Outcome::Panic),
    ];
    let outcome = if hold_tx {
        prop_oneof![8 => outcome, 1 => Just(Outcome::HoldTx)].boxed()
    } else {
        outcome.boxed()
    };
    (key, payload, 0..2usize, outcome, prop::bool::weighted(0.3)).prop_map(|(key, payload, instance, outcome, slow)| {
        Delivery {
            key,
            payload,
            instance,
            outcome,
            slow,
        }
    })
}

fn step(lease: bool) -> BoxedStrategy<Step> {
    let common = prop_oneof![
        6 => delivery_with(true).prop_map(Step::Deliver),
        4 => prop::collection::vec(delivery(), 2..=4).prop_map(Step::Concurrent),
        2 => delivery().prop_map(Step::Abandon),
    ];
    if lease {
        prop_oneof![10 => common, 1 => delivery().prop_map(Step::Hang)].boxed()
    } else {
        common.boxed()
    }
}

fn schedule(lease: bool) -> impl Strategy<Value = Schedule> {
    (
        prop_oneof![Just(Policy::Wait), Just(Policy::Conflict)],
        any::<bool>(),
        prop::collection::vec(step(lease), 1..14),
    )
        .prop_map(|(in_flight, detach, steps)| Schedule {
            in_flight,
            detach,
            steps,
        })
}

// ---------------------------------------------------------------------------
// The handler

/// What the handler saw: one entry per run, with global sequence numbers
/// for its start and end.
#[derive(Clone, Debug)]
struct Run {
    tag: u64,
    started: u64,
    ended: Option<u64>,
}

/// A blocked run's signal that it started, and the gate it waits for.
type Block = (oneshot::Sender<()>, oneshot::Receiver<()>);

#[derive(Default)]
struct Handler {
    seq: AtomicU64,
    runs: Mutex<Vec<Run>>,
    /// Blocked deliveries: the handler says it started, then waits for its
    /// gate.
    blocks: Mutex<HashMap<u64, Block>>,
    /// Transactions kept past their handler's response (`HoldTx`), let go
    /// once the step's answers are in: a `Tx` or an `SqlxTx`.
    held: Mutex<Vec<Box<dyn std::any::Any + Send>>>,
}

impl Handler {
    fn runs(&self) -> Vec<Run> {
        self.runs.lock().expect("runs").clone()
    }

    fn tick(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst)
    }

    async fn handle(
        self: Arc<Self>,
        request: Request<RequestBody<Full<Bytes>>>,
    ) -> Result<Response<Full<Bytes>>, BoxError> {
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        let tag: u64 = header("x-tag").and_then(|tag| tag.parse().ok()).expect("x-tag");
        let probe = header("x-probe").is_some();
        let key = request.extensions().get::<RecordKey>().expect("a RecordKey").clone();
        let index = (!probe).then(|| {
            let mut runs = self.runs.lock().expect("runs");
            runs.push(Run {
                tag,
                started: self.tick(),
                ended: None,
            });
            runs.len() - 1
        });
        if let Some(tx) = request.extensions().get::<IdempotencyTx>() {
            let tx = tx.lock().await.map_err(|error| format!("the transaction: {error}"))?;
            tx.execute(
                "INSERT INTO model_ledger (source, key, tag) VALUES ($1, $2, $3)",
                &[&key.source(), &key.key(), &(tag as i64)],
            )
            .await
            .map_err(|error| format!("the ledger insert: {error}"))?;
        }
        #[cfg(feature = "sqlx")]
        if let Some(tx) = request.extensions().get::<SqlxIdempotencyTx>() {
            let mut tx = tx.lock().await.map_err(|error| format!("the transaction: {error}"))?;
            sqlx::query("INSERT INTO model_ledger (source, key, tag) VALUES ($1, $2, $3)")
                .bind(key.source())
                .bind(key.key())
                .bind(tag as i64)
                .execute(&mut *tx)
                .await
                .map_err(|error| format!("the ledger insert through sqlx: {error}"))?;
        }
        if header("x-slow").is_some() {
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
        let block = self.blocks.lock().expect("blocks").remove(&tag);
        if let Some((started, gate)) = block {
            let _ = started.send(());
            let _ = gate.await;
        }
        if let Some(index) = index {
            self.runs.lock().expect("runs")[index].ended = Some(self.tick());
        }
        let outcome = header("x-outcome").expect("x-outcome");
        let (kind, status) = outcome.split_once(':').unwrap_or((&outcome, "0"));
        let status = status.parse::<u16>().ok().and_then(|s| StatusCode::from_u16(s).ok());
        if kind == "hold" {
            if let Some(tx) = request.extensions().get::<IdempotencyTx>() {
                let tx: Tx = tx.lock().await.map_err(|error| format!("the transaction: {error}"))?;
                self.held.lock().expect("held").push(Box::new(tx));
            }
            #[cfg(feature = "sqlx")]
            if let Some(tx) = request.extensions().get::<SqlxIdempotencyTx>() {
                let tx = tx.lock().await.map_err(|error| format!("the transaction: {error}"))?;
                self.held.lock().expect("held").push(Box::new(tx));
            }
            return Ok(Response::new(Full::new(Bytes::from(format!("commit {tag}")))));
        }
        match kind {
            "commit" | "fail" => {
                let mut response = Response::new(Full::new(Bytes::from(format!("{kind} {tag}"))));
                *response.status_mut() = status.expect("a status");
                Ok(response)
            }
            "error" => Err(format!("the handler of {tag} failed").into()),
            _ => std::panic::panic_any(PANIC_MESSAGE),
        }
    }
}

// ---------------------------------------------------------------------------
// The system under test

type Service = tower_idempotency::IdempotencyService<
    BoxCloneService<Request<RequestBody<Full<Bytes>>>, Response<Full<Bytes>>, BoxError>,
>;

/// What a client saw.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Seen {
    Answer { status: u16, replayed: bool, body: String },
    Error(String),
}

impl Seen {
    fn problem_type(&self) -> Option<String> {
        let Seen::Answer { body, .. } = self else {
            return None;
        };
        let value: serde_json::Value = serde_json::from_str(body).ok()?;
        value["type"].as_str().map(str::to_owned)
    }

    /// Whether this is a first answer (not a replay) with `status` and the
    /// problem type `problem`.
    fn is_problem(&self, status: u16, problem: &str) -> bool {
        matches!(self, Seen::Answer { status: seen, replayed: false, .. } if *seen == status)
            && self.problem_type().as_deref() == Some(problem)
    }
}

struct System {
    source: String,
    handler: Arc<Handler>,
    instances: Vec<Service>,
    /// An observer on a third instance: reads a key's record by sending a
    /// request whose handler releases (503), so it never changes a record.
    observer: Service,
    /// Each instance's store: one shared store, or (with per-process
    /// caches) a store of its own over the same database.
    stores: StoreFactory,
    in_flight: InFlight,
    db: Option<Arc<support::TestDb>>,
    lease: bool,
    next_tag: AtomicU64,
}

impl System {
    fn new(
        stores: StoreFactory,
        db: Option<Arc<support::TestDb>>,
        source: String,
        lease: bool,
        schedule: &Schedule,
    ) -> Self {
        let handler = Arc::new(Handler::default());
        let mode = if lease { Mode::lease(LEASE) } else { Mode::Transaction };
        let in_flight = match schedule.in_flight {
            Policy::Conflict => InFlight::Conflict,
            Policy::Wait => InFlight::Wait(Duration::from_secs(10)),
        };
        let base = || IdempotencyLayer::new(stores()).source(source.clone()).mode(mode);
        let service = |layer: IdempotencyLayer| {
            let handler = handler.clone();
            layer.layer(BoxCloneService::new(service_fn(move |request| {
                handler.clone().handle(request)
            })))
        };
        let instances = (0..2)
            .map(|_| service(base().in_flight(in_flight).detach_on_disconnect(schedule.detach)))
            .collect();
        let observer = service(base().in_flight(InFlight::Conflict));
        Self {
            source,
            handler,
            instances,
            observer,
            stores,
            in_flight,
            lease,
            db,
            next_tag: AtomicU64::new(1),
        }
    }

    /// Lease mode: a process of its own whose claim runs out at once and is
    /// never renewed (one per hung claimant, as each is another process).
    fn hanger(&self) -> Service {
        let handler = self.handler.clone();
        IdempotencyLayer::new((self.stores)())
            .source(self.source.clone())
            .in_flight(self.in_flight)
            .mode(Mode::Lease {
                lease: HUNG_LEASE,
                renew_every: Duration::ZERO,
            })
            .layer(BoxCloneService::new(service_fn(move |request| {
                handler.clone().handle(request)
            })))
    }

    fn tag(&self) -> u64 {
        self.next_tag.fetch_add(1, Ordering::SeqCst)
    }

    fn request(&self, key: Key, payload: Payload, tag: u64, outcome: &str, slow: bool) -> Request<Full<Bytes>> {
        let mut request = Request::post("/events")
            .header("idempotency-key", format!("{key:?}").to_lowercase())
            .header("x-tag", tag.to_string())
            .header("x-outcome", outcome);
        if slow {
            request = request.header("x-slow", "1");
        }
        request
            .body(Full::new(Bytes::from(format!("{{\"payload\":\"{payload:?}\"}}"))))
            .expect("a request")
    }

    fn delivery_request(&self, delivery: &Delivery, tag: u64) -> Request<Full<Bytes>> {
        let outcome = match delivery.outcome {
            Outcome::Commit(status) => format!("commit:{status}"),
            Outcome::Fail(status) => format!("fail:{status}"),
            Outcome::Error => "error".to_owned(),
            Outcome::Panic => "panic".to_owned(),
            Outcome::HoldTx | Outcome::CommitFailed => "hold".to_owned(),
        };
        self.request(delivery.key, delivery.payload, tag, &outcome, delivery.slow)
    }

    /// Registers a gate for `tag`: returns (started, open).
    fn block(&self, tag: u64) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (started_tx, started_rx) = oneshot::channel();
        let (gate_tx, gate_rx) = oneshot::channel();
        self.handler
            .blocks
            .lock()
            .expect("blocks")
            .insert(tag, (started_tx, gate_rx));
        (started_rx, gate_tx)
    }
}

type Answer = Result<Response<tower_idempotency::ResponseBody<Full<Bytes>>>, BoxError>;

fn call(service: Service, request: Request<Full<Bytes>>) -> futures_util::future::BoxFuture<'static, Seen> {
    // Boxed outside an async block: rustc cannot prove the unboxed service
    // future `Send` inside one (a higher-ranked lifetime limitation).
    let answer: futures_util::future::BoxFuture<'static, Answer> = Box::pin(service.oneshot(request));
    Box::pin(read_answer(answer))
}

async fn read_answer(answer: futures_util::future::BoxFuture<'static, Answer>) -> Seen {
    let response = match answer.await {
        Ok(response) => response,
        Err(error) => return Seen::Error(error.to_string()),
    };
    let status = response.status().as_u16();
    let replayed = response
        .headers()
        .get("idempotent-replayed")
        .is_some_and(|value| value == "true");
    let body = match response.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => return Seen::Error(format!("the response body failed: {error}")),
    };
    Seen::Answer {
        status,
        replayed,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

// ---------------------------------------------------------------------------
// The model

/// A committed record, as the model knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Committed {
    payload: Payload,
    status: u16,
    body: String,
    tag: u64,
}

#[derive(Default, Debug)]
struct Model {
    committed: HashMap<Key, Committed>,
}

/// One delivery's record for checking: what it was, its tag, what its
/// client saw (None: the client went away), and whether the handler ran.
struct Observed {
    delivery: Delivery,
    tag: u64,
    seen: Option<Seen>,
    run: Option<Run>,
}

macro_rules! check {
    ($condition:expr, $($message:tt)+) => {
        if !$condition {
            return Err(format!($($message)+));
        }
    };
}

impl Model {
    /// Checks one step's deliveries against the model and applies them.
    /// `in_flight_visible`: a claim's payload is visible to others while it
    /// runs (lease mode), so another payload gets 422 rather than the
    /// in-flight answer. `cut_off_commits`: a run whose
    /// client went away still commits (it was detached).
    fn apply(
        &mut self,
        in_flight_visible: bool,
        policy: Policy,
        observed: &[Observed],
        cut_off_commits: bool,
    ) -> Result<(), String> {
        let mut keys: Vec<Key> = observed.iter().map(|o| o.delivery.key).collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let group: Vec<&Observed> = observed.iter().filter(|o| o.delivery.key == key).collect();
            let before = self.committed.get(&key).cloned();
            let ran: Vec<&Observed> = group.iter().copied().filter(|o| o.run.is_some()).collect();
            if let Some(before) = &before {
                check!(
                    ran.is_empty(),
                    "{key:?} was committed (by run {}) but the handler ran again for {:?}",
                    before.tag,
                    ran.iter().map(|o| o.delivery).collect::<Vec<_>>()
                );
            }
            // Which runs committed: a committing outcome whose client saw it
            // as a first response, or that was cut off but detached.
            let committers: Vec<&Observed> = ran
                .iter()
                .copied()
                .filter(|o| match (o.delivery.outcome, &o.seen) {
                    (Outcome::Commit(_), Some(_)) => true,
                    (Outcome::Commit(_), None) => cut_off_commits,
                    _ => false,
                })
                .collect();
            check!(
                committers.len() <= 1,
                "{key:?}: more than one committed run: {:?}",
                committers.iter().map(|o| (o.tag, o.delivery)).collect::<Vec<_>>()
            );
            let committed = match (&before, committers.first()) {
                (Some(before), _) => Some(before.clone()),
                (None, Some(committer)) => {
                    let Outcome::Commit(status) = committer.delivery.outcome else {
                        unreachable!("filtered above")
                    };
                    Some(Committed {
                        payload: committer.delivery.payload,
                        status,
                        body: format!("commit {}", committer.tag),
                        tag: committer.tag,
                    })
                }
                (None, None) => None,
            };
            // Once a run has ended with a commit, no run of its key starts.
            if let Some(committer) = committers.first() {
                let ended = committer.run.as_ref().and_then(|run| run.ended);
                for other in ran.iter().filter(|o| o.tag != committer.tag) {
                    let started = other.run.as_ref().map(|run| run.started);
                    check!(
                        ended.is_none() || started < ended,
                        "{key:?}: run {} started after run {} had committed",
                        other.tag,
                        committer.tag
                    );
                }
            }
            for o in &group {
                check_answer(key, in_flight_visible, policy, o, committed.as_ref(), &group)?;
            }
            if let Some(committed) = committed {
                self.committed.insert(key, committed);
            }
        }
        Ok(())
    }
}

/// Whether one client's answer is one the model allows.
fn check_answer(
    key: Key,
    in_flight_visible: bool,
    policy: Policy,
    o: &Observed,
    committed: Option<&Committed>,
    group: &[&Observed],
) -> Result<(), String> {
    let Some(seen) = &o.seen else {
        return Ok(());
    };
    let d = o.delivery;
    if o.run.is_some() {
        let expected = match d.outcome {
            Outcome::Commit(status) => Seen::Answer {
                status,
                replayed: false,
                body: format!("commit {}", o.tag),
            },
            Outcome::Fail(status) => Seen::Answer {
                status,
                replayed: false,
                body: format!("fail {}", o.tag),
            },
            Outcome::Error => Seen::Error(format!("the handler of {} failed", o.tag)),
            Outcome::HoldTx => unreachable!("resolved by execute()"),
            Outcome::CommitFailed => {
                check!(
                    seen.is_problem(500, "urn:tower-idempotency:transaction-held"),
                    "{key:?}: run {} kept its transaction: it must answer 500 transaction-held, got {seen:?}",
                    o.tag
                );
                return Ok(());
            }
            Outcome::Panic => {
                check!(
                    seen.is_problem(500, "urn:tower-idempotency:handler-failed"),
                    "{key:?}: a panicking run {} must answer 500 handler-failed, got {seen:?}",
                    o.tag
                );
                return Ok(());
            }
        };
        check!(
            *seen == expected,
            "{key:?}: run {} ({d:?}) answered {seen:?}, expected {expected:?}",
            o.tag
        );
        return Ok(());
    }
    // The handler did not run for this delivery.
    let other_ran = |payload_differs: bool| {
        group
            .iter()
            .any(|g| g.tag != o.tag && g.run.is_some() && (!payload_differs || g.delivery.payload != d.payload))
    };
    match seen {
        Seen::Answer {
            replayed: true,
            status,
            body,
        } => {
            let Some(committed) = committed else {
                return Err(format!(
                    "{key:?}: {} got a replay ({seen:?}) but no run of the key committed",
                    o.tag
                ));
            };
            check!(
                committed.payload == d.payload,
                "{key:?}: {} replayed the response to another payload",
                o.tag
            );
            check!(
                (*status, body) == (committed.status, &committed.body),
                "{key:?}: the replay to {} ({seen:?}) differs from the committed response {committed:?}",
                o.tag
            );
        }
        Seen::Answer { status: 422, .. } => {
            let mismatch = committed.is_some_and(|c| c.payload != d.payload) || (in_flight_visible && other_ran(true));
            check!(
                mismatch && seen.problem_type().as_deref() == Some("urn:tower-idempotency:fingerprint-mismatch"),
                "{key:?}: {} got {seen:?} without a record of another payload",
                o.tag
            );
        }
        Seen::Answer { status: 409, .. } => {
            check!(
                policy == Policy::Conflict
                    && other_ran(false)
                    && seen.problem_type().as_deref() == Some("urn:tower-idempotency:in-flight"),
                "{key:?}: {} got {seen:?} with no run of the key in flight",
                o.tag
            );
        }
        other => {
            return Err(format!(
                "{key:?}: {} ({d:?}) did not run and got {other:?} (committed: {committed:?})",
                o.tag
            ))
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Running a schedule

async fn run_schedule(system: &System, lease: bool, schedule: &Schedule) -> Result<(), String> {
    let mut model = Model::default();
    let mut hung: Vec<(Delivery, u64, oneshot::Sender<()>, tokio::task::JoinHandle<Seen>)> = Vec::new();
    for (number, step) in schedule.steps.iter().enumerate() {
        let result = tokio::time::timeout(STEP_TIMEOUT, async {
            let observed = execute(system, step, &mut hung).await?;
            // A run whose client went away commits only when it was
            // detached; a hung run never does (its lease is taken over).
            let cut_off_commits = schedule.detach && matches!(step, Step::Abandon(_));
            let in_flight_visible = lease;
            model.apply(in_flight_visible, schedule.in_flight, &observed, cut_off_commits)?;
            verify_store(system, &model).await
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(why)) => return Err(failure(schedule, number, &why)),
            Err(_) => {
                return Err(failure(
                    schedule,
                    number,
                    &format!("did not finish within {STEP_TIMEOUT:?}"),
                ))
            }
        }
    }
    // The hung claimants finish at last: fenced out, their answers are
    // still sent, and they change no record.
    for (delivery, tag, gate, task) in hung {
        let _ = gate.send(());
        let seen = tokio::time::timeout(STEP_TIMEOUT, task)
            .await
            .map_err(|_| format!("the hung run {tag} did not finish"))?
            .map_err(|error| format!("the hung run {tag}: {error}"))?;
        if let Outcome::Commit(status) = delivery.outcome {
            check!(
                seen == Seen::Answer {
                    status,
                    replayed: false,
                    body: format!("commit {tag}")
                },
                "the fenced-out run {tag} must still answer its client, got {seen:?}"
            );
        }
    }
    verify_store(system, &model)
        .await
        .map_err(|why| format!("after the hung runs finished: {why}"))
}

type HungRun = (Delivery, u64, oneshot::Sender<()>, tokio::task::JoinHandle<Seen>);

/// A failure report: the schedule up to the step that broke an invariant
/// (later steps never ran), one step a line.
fn failure(schedule: &Schedule, number: usize, why: &str) -> String {
    let mut text = format!(
        "step {number}: {why}\nschedule (in_flight {:?}, detach_on_disconnect {}):\n",
        schedule.in_flight, schedule.detach
    );
    for (index, step) in schedule.steps.iter().enumerate().take(number + 1) {
        text.push_str(&format!("  {index:>2}. {step:?}\n"));
    }
    text
}

async fn execute(system: &System, step: &Step, hung: &mut Vec<HungRun>) -> Result<Vec<Observed>, String> {
    let runs_before = system.handler.runs().len();
    let mut observed = match step {
        Step::Deliver(delivery) => {
            let tag = system.tag();
            let seen = call(
                system.instances[delivery.instance].clone(),
                system.delivery_request(delivery, tag),
            )
            .await;
            vec![(*delivery, tag, Some(seen))]
        }
        Step::Concurrent(deliveries) => {
            let barrier = Arc::new(Barrier::new(deliveries.len()));
            let tagged: Vec<(Delivery, u64)> = deliveries.iter().map(|d| (*d, system.tag())).collect();
            let seen = join_all(tagged.iter().map(|(delivery, tag)| {
                let request = system.delivery_request(delivery, *tag);
                let service = system.instances[delivery.instance].clone();
                let barrier = barrier.clone();
                let task = tokio::spawn(async move {
                    barrier.wait().await;
                    call(service, request).await
                });
                async move { task.await.unwrap_or_else(|error| Seen::Error(error.to_string())) }
            }))
            .await;
            tagged
                .into_iter()
                .zip(seen)
                .map(|((delivery, tag), seen)| (delivery, tag, Some(seen)))
                .collect()
        }
        Step::Abandon(delivery) => {
            let tag = system.tag();
            let (started, gate) = system.block(tag);
            let service = system.instances[delivery.instance].clone();
            let request = system.delivery_request(delivery, tag);
            let mut task = tokio::spawn(async move { call(service, request).await });
            let seen = tokio::select! {
                _ = started => {
                    // The client goes away mid-handler; then the handler may go on.
                    task.abort();
                    let _ = task.await;
                    let _ = gate.send(());
                    None
                }
                seen = &mut task => Some(seen.map_err(|error| error.to_string())?),
            };
            system.handler.blocks.lock().expect("blocks").remove(&tag);
            vec![(*delivery, tag, seen)]
        }
        Step::Hang(delivery) => {
            let tag = system.tag();
            let (started, gate) = system.block(tag);
            let service = system.hanger();
            let request = system.delivery_request(delivery, tag);
            let mut task = tokio::spawn(async move { call(service, request).await });
            tokio::select! {
                _ = started => {
                    // Its lease has run out: the observer takes it over (and
                    // releases it) before the next step.
                    hung.push((*delivery, tag, gate, task));
                    vec![(*delivery, tag, None)]
                }
                seen = &mut task => {
                    system.handler.blocks.lock().expect("blocks").remove(&tag);
                    vec![(*delivery, tag, Some(seen.map_err(|error| error.to_string())?))]
                }
            }
        }
    };
    // Transactions held past their response are let go: their commit has
    // failed by now.
    system.handler.held.lock().expect("held").clear();
    // Let cut-off and detached runs settle: the observer waits until no
    // claim of the step's keys is in flight (asking with the payload of the
    // claim, which would otherwise be refused at once in lease mode).
    for (key, payload) in step_keys(step) {
        observe(system, key, payload).await?;
    }
    let runs = system.handler.runs();
    let new_runs = &runs[runs_before..];
    Ok(observed
        .drain(..)
        .map(|(mut delivery, tag, seen)| {
            if delivery.outcome == Outcome::HoldTx {
                let has_transaction = !system.lease && system.db.is_some();
                delivery.outcome = if has_transaction {
                    Outcome::CommitFailed
                } else {
                    Outcome::Commit(200)
                };
            }
            (delivery, tag, seen)
        })
        .map(|(delivery, tag, seen)| Observed {
            delivery,
            tag,
            seen,
            run: new_runs.iter().find(|run| run.tag == tag).cloned(),
        })
        .collect())
}

/// The keys a step delivered, each with the payload of its first delivery.
fn step_keys(step: &Step) -> Vec<(Key, Payload)> {
    let mut keys: Vec<(Key, Payload)> = match step {
        Step::Deliver(d) | Step::Abandon(d) | Step::Hang(d) => vec![(d.key, d.payload)],
        Step::Concurrent(ds) => ds.iter().map(|d| (d.key, d.payload)).collect(),
    };
    keys.dedup_by_key(|(key, _)| *key);
    keys.sort_by_key(|(key, _)| *key);
    keys.dedup_by_key(|(key, _)| *key);
    keys
}

/// What the observer finds for a key.
#[derive(Debug, PartialEq, Eq)]
enum Record {
    Absent,
    Completed {
        status: u16,
        body: String,
    },
    /// Completed with a payload other than the one asked with.
    OtherPayload,
}

/// Reads a key's record through the layer: a request with `payload` whose
/// handler would release. Waits (bounded) while a claim is in flight.
async fn observe(system: &System, key: Key, payload: Payload) -> Result<Record, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let tag = system.tag();
        let mut request = system.request(key, payload, tag, "fail:503", false);
        request
            .headers_mut()
            .insert("x-probe", http::HeaderValue::from_static("1"));
        let seen = call(system.observer.clone(), request).await;
        match &seen {
            Seen::Answer { status: 409, .. } if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Seen::Answer {
                status: 503,
                replayed: false,
                body,
            } if *body == format!("fail {tag}") => return Ok(Record::Absent),
            Seen::Answer {
                status,
                replayed: true,
                body,
            } => {
                return Ok(Record::Completed {
                    status: *status,
                    body: body.clone(),
                })
            }
            Seen::Answer { status: 422, .. } => return Ok(Record::OtherPayload),
            other => return Err(format!("the observer of {key:?} got {other:?}")),
        }
    }
}

/// The store agrees with the model: each key's record, the committed ledger
/// rows (transaction mode on Postgres), and no idle transactions.
async fn verify_store(system: &System, model: &Model) -> Result<(), String> {
    for key in [Key::K0, Key::K1, Key::K2] {
        let expected = model.committed.get(&key);
        let payload = expected.map_or(Payload::A, |c| c.payload);
        let record = observe(system, key, payload).await?;
        let wanted = match expected {
            Some(c) => Record::Completed {
                status: c.status,
                body: c.body.clone(),
            },
            None => Record::Absent,
        };
        check!(
            record == wanted,
            "{key:?}: the store holds {record:?}, the model {wanted:?}"
        );
    }
    let Some(db) = &system.db else {
        return Ok(());
    };
    if system.lease {
        // Lease mode hands the handler no transaction: nothing to count.
        return check_no_idle_transactions(db).await;
    }
    let client = db.pool.get().await.map_err(|error| error.to_string())?;
    let rows = client
        .query(
            "SELECT key, count(*), min(tag) FROM model_ledger WHERE source = $1 GROUP BY key",
            &[&system.source],
        )
        .await
        .map_err(|error| error.to_string())?;
    let ledger: HashMap<String, (i64, i64)> = rows.iter().map(|row| (row.get(0), (row.get(1), row.get(2)))).collect();
    for key in [Key::K0, Key::K1, Key::K2] {
        let name = format!("{key:?}").to_lowercase();
        let found = ledger.get(&name).copied();
        let wanted = model.committed.get(&key).map(|c| (1, c.tag as i64));
        check!(
            found == wanted,
            "{key:?}: committed ledger rows (count, tag) {found:?}, the model wants {wanted:?}"
        );
    }
    drop(client);
    check_no_idle_transactions(db).await
}

async fn check_no_idle_transactions(db: &support::TestDb) -> Result<(), String> {
    let admin = support::connect().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let idle: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND state LIKE 'idle in transaction%'",
                &[&db.schema],
            )
            .await
            .map_err(|error| error.to_string())?
            .get(0);
        if idle == 0 {
            return Ok(());
        }
        check!(
            tokio::time::Instant::now() < deadline,
            "{idle} connection(s) left idle in a transaction"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// The tests

#[derive(Clone, Copy, Debug)]
enum Backend {
    Postgres,
    /// Postgres, each instance with its own cache of completed records.
    PostgresCached,
    /// Postgres through sqlx.
    #[cfg(feature = "sqlx")]
    Sqlx,
    /// Postgres through PgBouncer in transaction mode, the store in
    /// `PoolMode::Transaction`.
    PostgresBehindPgBouncer,
    /// Postgres through sqlx, behind PgBouncer in transaction mode.
    #[cfg(feature = "sqlx")]
    SqlxBehindPgBouncer,
    Memory,
}

impl Backend {
    fn behind_pgbouncer(self) -> bool {
        match self {
            Backend::PostgresBehindPgBouncer => true,
            #[cfg(feature = "sqlx")]
            Backend::SqlxBehindPgBouncer => true,
            _ => false,
        }
    }
}

type StoreFactory = Arc<dyn Fn() -> Store + Send + Sync>;

fn cases() -> u32 {
    std::env::var("MODEL_CASES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// Silences the panics the handler is asked for; others still print.
fn quiet_requested_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<&str>() != Some(&PANIC_MESSAGE) {
                default(info);
            }
        }));
    });
}

fn run_model(backend: Backend, lease: bool) {
    quiet_requested_panics();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let name = format!("model_{backend:?}_{}", if lease { "lease" } else { "tx" }).to_lowercase();
    let db = match backend {
        Backend::Memory => None,
        _ => Some(Arc::new(runtime.block_on(async {
            let db = if backend.behind_pgbouncer() {
                support::TestDb::behind_pgbouncer(&name).await
            } else {
                support::TestDb::new(&name).await
            };
            db.client()
                .await
                .batch_execute(
                    "CREATE TABLE model_ledger (source text NOT NULL, key text NOT NULL, tag bigint NOT NULL)",
                )
                .await
                .expect("model_ledger");
            db
        }))),
    };
    let store: Option<Store> = db.as_ref().map(|db| match backend {
        #[cfg(feature = "sqlx")]
        Backend::Sqlx | Backend::SqlxBehindPgBouncer => runtime.block_on(db.sqlx_store()).into(),
        _ => runtime.block_on(db.store()).into(),
    });
    let pool = db.as_ref().map(|db| db.pool.clone());
    let config = Config {
        cases: cases(),
        max_shrink_iters: 512,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/model.proptest-regressions",
        ))),
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let case = AtomicU64::new(0);
    // Once a schedule has failed, proptest shrinks it; races make a failure
    // intermittent, so each shrunk candidate gets several tries.
    let shrinking = std::sync::atomic::AtomicBool::new(false);
    let result = runner.run(&schedule(lease), |schedule| {
        let tries = if shrinking.load(Ordering::SeqCst) {
            SHRINK_TRIES
        } else {
            1
        };
        for _ in 0..tries {
            let source = format!("case{}", case.fetch_add(1, Ordering::SeqCst));
            let stores: StoreFactory = match (backend, &store, &pool) {
                // Every instance a process of its own, with its own cache of
                // completed records.
                (Backend::PostgresCached, _, Some(pool)) => {
                    let pool = pool.clone();
                    Arc::new(move || {
                        PostgresStore::new(pool.clone())
                            .with_cache(1 << 20, Duration::from_secs(30))
                            .into()
                    })
                }
                (_, Some(store), _) => {
                    let store = store.clone();
                    Arc::new(move || store.clone())
                }
                (_, None, _) => {
                    let store: Store = MemoryStore::new(1_000).into();
                    Arc::new(move || store.clone())
                }
            };
            let system = System::new(stores, db.clone(), source, lease, &schedule);
            if let Err(why) = runtime.block_on(run_schedule(&system, lease, &schedule)) {
                shrinking.store(true, Ordering::SeqCst);
                return Err(TestCaseError::fail(why));
            }
        }
        Ok(())
    });
    if let Some(db) = db {
        if let Ok(db) = Arc::try_unwrap(db) {
            runtime.block_on(db.drop_schema());
        }
    }
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, _)) => panic!("{name}: a schedule broke an invariant at {why}"),
        Err(TestError::Abort(why)) => panic!("{name}: aborted: {why}"),
    }
}

#[test]
fn model_transaction_mode_postgres() {
    run_model(Backend::Postgres, false);
}

#[test]
fn model_transaction_mode_memory() {
    run_model(Backend::Memory, false);
}

#[test]
fn model_lease_mode_postgres() {
    run_model(Backend::Postgres, true);
}

#[test]
fn model_transaction_mode_postgres_behind_pgbouncer() {
    run_model(Backend::PostgresBehindPgBouncer, false);
}

#[test]
fn model_lease_mode_postgres_behind_pgbouncer() {
    run_model(Backend::PostgresBehindPgBouncer, true);
}

#[test]
fn model_transaction_mode_postgres_with_record_caches() {
    run_model(Backend::PostgresCached, false);
}

#[cfg(feature = "sqlx")]
#[test]
fn model_transaction_mode_sqlx() {
    run_model(Backend::Sqlx, false);
}

#[cfg(feature = "sqlx")]
#[test]
fn model_lease_mode_sqlx() {
    run_model(Backend::Sqlx, true);
}

#[cfg(feature = "sqlx")]
#[test]
fn model_transaction_mode_sqlx_behind_pgbouncer() {
    run_model(Backend::SqlxBehindPgBouncer, false);
}

#[cfg(feature = "sqlx")]
#[test]
fn model_lease_mode_sqlx_behind_pgbouncer() {
    run_model(Backend::SqlxBehindPgBouncer, true);
}

#[test]
fn model_lease_mode_memory() {
    run_model(Backend::Memory, true);
}
