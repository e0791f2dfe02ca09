//! Releasing a claim is bounded, and a graceful shutdown lets handlers
//! finish up to a deadline, then cuts them off and releases their claims at
//! once.
//!
//! The stalls are real: a pool whose every connection the test holds (a
//! lease release then cannot get one), and a proxy between the pool and
//! Postgres that stops forwarding (a rollback then gets no answer).

mod support;

use std::time::Duration;

use axum::Router;
use deadpool_postgres::Pool;
use http::StatusCode;
use support::wire::{self, FaultyProxy};
use support::{request, send, wait_until, Ctx, Probe, Reply, TestDb};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tower_idempotency::{IdempotencyLayer, InFlight, Mode, PostgresStore};

/// A bound on every wait, so that a hang fails the test instead of hanging
/// it; generous, never a measure of speed.
const BOUND: Duration = Duration::from_secs(20);
/// The store timeout of the layers under test, which also bounds a release.
const STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// A lease far longer than any test: a claim left to it would block its key.
const LONG_LEASE: Duration = Duration::from_secs(600);

/// A pool of `size` connections on the test's schema that waits for a free
/// connection without any bound (deadpool's default), reaching Postgres
/// directly or through `proxy`, its sessions named `application_name`.
fn unbounded_pool(db: &TestDb, proxy: Option<&FaultyProxy>, application_name: &str, size: usize) -> Pool {
    let config = match proxy {
        Some(proxy) => wire::proxied_config(proxy.port),
        None => support::database_config(),
    };
    support::pool(support::on_schema(config, &db.schema, application_name), size, None)
}

/// Sessions named `application_name`, with an optional `state` and
/// last-query filter, as Postgres sees them now (one query, no waiting).
async fn sessions(application_name: &str, state: &str, query_like: &str) -> i64 {
    support::connect()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND state LIKE $2 AND query LIKE $3",
            &[&application_name, &state, &query_like],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Waits until the handler of a transaction-mode request has written its
/// ledger row: its session sits idle in the transaction, last query the
/// `INSERT`.
async fn wait_for_the_ledger_write(application_name: &str) {
    wait_until("the handler wrote its ledger row", BOUND, || async {
        sessions(application_name, "idle in transaction", "INSERT INTO ledger%").await == 1
    })
    .await;
}

async fn records_in_flight(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM idempotency_records WHERE state = 1")
        .await
}

async fn records_completed(db: &TestDb) -> i64 {
    db.count("SELECT count(*) FROM idempotency_records WHERE state = 2")
        .await
}

/// Sends a request whose handler waits for the gate, then answers 500.
fn spawn_a_blocked_500(app: &Router) -> JoinHandle<Reply> {
    let app = app.clone();
    tokio::spawn(async move {
        send(
            &app,
            request(Some("k"), "{}", &[("x-test-block", "1"), ("x-test-status", "500")]),
        )
        .await
    })
}

#[tokio::test]
async fn a_lease_release_waiting_for_a_saturated_pool_does_not_hold_the_response_back() {
    let db = TestDb::new("release_saturated_pool").await;
    db.store().await;
    let pool = unbounded_pool(&db, None, &db.schema, 1);
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(PostgresStore::new(pool.clone()))
            .source("test")
            .mode(Mode::lease(LONG_LEASE))
            .store_timeout(STORE_TIMEOUT),
    );
    let failing = spawn_a_blocked_500(&app);
    probe.started().await;
    // The claim has given its connection back; the test takes the pool's
    // only one, so the release after the 500 cannot get a connection.
    let held = pool.get().await.expect("the pool's only connection");
    probe.open_gate();

    let failed = timeout(BOUND, failing)
        .await
        .expect("the 500 arrives although its release cannot get a connection")
        .expect("the request task");
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(records_in_flight(&db).await, 1, "not released yet: no connection");

    // The release goes on in the background and takes the connection as
    // soon as it is free again.
    drop(held);
    wait_until("the claim is released", BOUND, || async {
        records_in_flight(&db).await == 0
    })
    .await;
    // The local in-flight entry went with the response: a conflict-policy
    // duplicate would get 409 while it stays.
    let retried = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(retried.status, StatusCode::OK, "{retried:?}");
    assert!(!retried.replayed());
    assert_eq!(probe.runs(), 2);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_rollback_on_a_stalled_server_is_bounded_and_its_connection_closed() {
    let db = TestDb::new("release_stalled_rollback").await;
    db.store().await;
    let proxy = FaultyProxy::stalling().await;
    let proxied = format!("{}_proxied", db.schema);
    let pool = unbounded_pool(&db, Some(&proxy), &proxied, 1);
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(PostgresStore::new(pool.clone()))
            .source("test")
            .store_timeout(STORE_TIMEOUT),
    );
    let failing = spawn_a_blocked_500(&app);
    // Past the write's answer, not only past the write: a stall while that
    // answer is still on its way would hold the handler, not the rollback.
    probe.at_the_gate().await;
    proxy.stall();
    probe.open_gate();

    let failed = timeout(BOUND, failing)
        .await
        .expect("the 500 arrives although its rollback gets no answer")
        .expect("the request task");
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        pool.status().size,
        0,
        "a connection whose rollback timed out is closed, not returned to the pool"
    );

    // The closed connection ends the server's session, which rolls back.
    proxy.resume();
    wait_until("the stalled session is gone", BOUND, || async {
        sessions(&proxied, "%", "%").await == 0
    })
    .await;
    let retried = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(retried.status, StatusCode::OK, "{retried:?}");
    assert!(!retried.replayed());
    assert_eq!(probe.runs(), 2);
    assert_eq!(db.ledger_rows().await, 1, "the failed run's row rolled back");
    db.drop_schema().await;
}

/// A request whose handler runs until the gate opens, its client gone: the
/// handler goes on detached.
async fn detach_a_blocked_request(probe: &Probe, app: &Router, key: &str) {
    let abandoned = tokio::spawn({
        let app = app.clone();
        let key = key.to_owned();
        async move { send(&app, request(Some(&key), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    abandoned.abort();
    let _ = abandoned.await;
}

async fn a_detached_handler_finishes_and_commits_within_the_grace(name: &str, mode: Mode) {
    let db = TestDb::new(name).await;
    let layer = IdempotencyLayer::new(db.store().await).source("test").mode(mode);
    let shutdown = layer.shutdown_handle();
    let probe = Probe::default();
    let app = probe.app(layer);
    detach_a_blocked_request(&probe, &app, "k").await;

    let mut stopping = Box::pin(shutdown.shutdown(BOUND));
    assert!(
        timeout(Duration::ZERO, &mut stopping).await.is_err(),
        "the shutdown waits for the detached handler"
    );
    probe.open_gate();
    let report = timeout(BOUND, stopping).await.expect("the shutdown ends");

    assert_eq!(report.cancelled, 0);
    assert_eq!(
        records_completed(&db).await,
        1,
        "committed before the shutdown returned"
    );
    if mode == Mode::Transaction {
        assert_eq!(db.ledger_rows().await, 1);
    }
    db.drop_schema().await;
}

#[tokio::test]
async fn within_the_grace_a_detached_handler_finishes_and_commits() {
    a_detached_handler_finishes_and_commits_within_the_grace("grace_commit_tx", Mode::Transaction).await;
}

#[tokio::test]
async fn within_the_grace_a_detached_lease_mode_handler_finishes_and_completes_its_record() {
    a_detached_handler_finishes_and_commits_within_the_grace("grace_commit_lease", Mode::lease(LONG_LEASE)).await;
}

#[tokio::test]
async fn past_the_grace_a_handler_is_cut_off_and_its_transaction_rolled_back_before_shutdown_returns() {
    let db = TestDb::new("grace_cut_off_tx").await;
    let layer = IdempotencyLayer::new(db.store().await).source("test");
    let shutdown = layer.shutdown_handle();
    let probe = Probe::default();
    let app = probe.app(layer);
    let cut_off = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    wait_for_the_ledger_write(&db.schema).await;

    let report = timeout(BOUND, shutdown.shutdown(Duration::from_millis(100)))
        .await
        .expect("the shutdown ends past its grace");

    assert_eq!(report.cancelled, 1);
    assert_eq!(
        sessions(&db.schema, "idle in transaction%", "%").await,
        0,
        "rolled back before the shutdown returned"
    );
    let answer = cut_off.await.expect("the request task");
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.problem_type(), "urn:tower-idempotency:shutting-down");
    // The next instance runs the key at once.
    let successor = probe.app(IdempotencyLayer::new(db.store().await).source("test"));
    let redelivered = send(&successor, request(Some("k"), "{}", &[])).await;
    assert_eq!(redelivered.status, StatusCode::OK, "{redelivered:?}");
    assert!(!redelivered.replayed());
    assert_eq!(db.ledger_rows().await, 1, "the cut-off run's row rolled back");
    db.drop_schema().await;
}

#[tokio::test]
async fn past_the_grace_a_lease_claim_is_deleted_so_the_next_delivery_runs_at_once() {
    let db = TestDb::new("grace_cut_off_lease").await;
    let mode = Mode::lease(LONG_LEASE);
    let layer = IdempotencyLayer::new(db.store().await).source("test").mode(mode);
    let shutdown = layer.shutdown_handle();
    let probe = Probe::default();
    let app = probe.app(layer);
    detach_a_blocked_request(&probe, &app, "k").await;

    let report = timeout(BOUND, shutdown.shutdown(Duration::from_millis(100)))
        .await
        .expect("the shutdown ends past its grace");

    assert_eq!(report.cancelled, 1);
    assert_eq!(records_in_flight(&db).await, 0, "deleted before the shutdown returned");
    // Conflict policy: a claim left to its lease would be 409 here.
    let successor = probe.app(
        IdempotencyLayer::new(db.store().await)
            .source("test")
            .mode(mode)
            .in_flight(InFlight::Conflict),
    );
    let redelivered = send(&successor, request(Some("k"), "{}", &[])).await;
    assert_eq!(redelivered.status, StatusCode::OK, "{redelivered:?}");
    assert!(!redelivered.replayed());
    assert_eq!(probe.runs(), 2);
    db.drop_schema().await;
}

async fn a_request_arriving_during_shutdown_gets_503_and_runs_nothing(ctx: Ctx) {
    let probe = Probe::default();
    let layer = ctx.layer();
    let shutdown = layer.shutdown_handle();
    let app = probe.app(layer);
    let report = timeout(BOUND, shutdown.shutdown(BOUND))
        .await
        .expect("nothing to wait for");

    let refused = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(report.cancelled, 0);
    assert!(shutdown.is_shutting_down());
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.problem_type(), "urn:tower-idempotency:shutting-down");
    assert_eq!(refused.headers["retry-after"], "2");
    assert_eq!(probe.runs(), 0);
    ctx.finish().await;
}
both_stores!(a_request_arriving_during_shutdown_gets_503_and_runs_nothing);

#[tokio::test]
async fn during_shutdown_a_duplicate_of_a_completed_key_is_still_replayed() {
    let db = TestDb::new("shutdown_replay").await;
    let probe = Probe::default();
    let first = send(
        &probe.app(IdempotencyLayer::new(db.store().await).source("test")),
        request(Some("k"), "{}", &[]),
    )
    .await;
    // Another instance, which has not seen the key: its claim would have
    // been the read that answers the duplicate.
    let layer = IdempotencyLayer::new(PostgresStore::new(db.another_pool())).source("test");
    let shutdown = layer.shutdown_handle();
    let app = probe.app(layer);
    timeout(BOUND, shutdown.shutdown(BOUND))
        .await
        .expect("nothing to wait for");

    let duplicate = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(first.status, StatusCode::OK);
    assert!(duplicate.replayed(), "{duplicate:?}");
    assert_eq!(duplicate.body, first.body);
    assert_eq!(probe.runs(), 1);
    db.drop_schema().await;
}
