//! Which read answers a duplicate. A key this instance saw completed is
//! read first (one plain read); any other request goes straight to its
//! claim, whose own read answers a duplicate as well. These tests prove the
//! second way gives the same answers as the first, and that a wrong guess
//! costs statements, never correctness.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{request, send, Probe, TestDb};
use tower_idempotency::{IdempotencyLayer, Mode, PostgresStore};

fn layer(store: PostgresStore, mode: Mode) -> IdempotencyLayer {
    IdempotencyLayer::new(store).source("test").mode(mode)
}

async fn an_instance_that_never_saw_the_key_replays_it(mode: Mode, name: &str) {
    let db = TestDb::new(name).await;
    let probe = Probe::default();
    let first_instance = probe.app(layer(db.store().await, mode));
    let other_instance = probe.app(layer(PostgresStore::new(db.another_pool()), mode));

    let first = send(&first_instance, request(Some("k"), "{}", &[])).await;
    let replay = send(&other_instance, request(Some("k"), "{}", &[])).await;
    let mismatch = send(&other_instance, request(Some("k2"), "{}", &[])).await;
    let other_payload = send(
        &probe.app(layer(PostgresStore::new(db.another_pool()), mode)),
        request(Some("k"), r#"{"a":1}"#, &[]),
    )
    .await;

    assert_eq!(first.status, StatusCode::OK);
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, first.body);
    assert!(!mismatch.replayed(), "another key runs");
    assert_eq!(other_payload.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(probe.runs(), 2);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn in_transaction_mode_an_instance_that_never_saw_the_key_replays_it() {
    an_instance_that_never_saw_the_key_replays_it(Mode::Transaction, "cold_duplicate_tx").await;
}

#[tokio::test]
async fn in_lease_mode_an_instance_that_never_saw_the_key_replays_it() {
    an_instance_that_never_saw_the_key_replays_it(Mode::lease(Duration::from_secs(60)), "cold_duplicate_lease").await;
}

#[tokio::test]
async fn a_lease_claim_on_a_completed_record_writes_nothing() {
    let db = TestDb::new("lease_claim_reads_only").await;
    let probe = Probe::default();
    let mode = Mode::lease(Duration::from_secs(60));
    let first_instance = probe.app(layer(db.store().await, mode));
    send(&first_instance, request(Some("k"), "{}", &[])).await;
    let version = "SELECT xmin::text || '/' || xmax::text FROM idempotency_records";
    let before: String = db.client().await.query_one(version, &[]).await.unwrap().get(0);

    // A claim on another instance finds the completed record: no row lock,
    // no new version.
    let other_instance = probe.app(layer(PostgresStore::new(db.another_pool()), mode));
    let replay = send(&other_instance, request(Some("k"), "{}", &[])).await;
    let after: String = db.client().await.query_one(version, &[]).await.unwrap().get(0);

    assert!(replay.replayed());
    assert_eq!(after, before, "the record was neither locked nor rewritten");
    assert!(before.ends_with("/0"), "{before}");
    db.drop_schema().await;
}

async fn a_stale_guess_that_a_key_is_completed_costs_a_read_only(mode: Mode, name: &str) {
    let db = TestDb::new(name).await;
    let probe = Probe::default();
    let store = db.store().await;
    let app = probe.app(layer(store, mode));
    send(&app, request(Some("k"), "{}", &[])).await;

    // Deleted through another instance: this one still takes `k` for a
    // completed key, reads, finds nothing, and claims.
    let operator = PostgresStore::new(db.another_pool());
    operator.delete_record("test", "", "k", false).await.unwrap();
    let again = send(&app, request(Some("k"), "{}", &[])).await;
    let replay = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(again.status, StatusCode::OK);
    assert!(!again.replayed(), "the released key runs again");
    assert!(replay.replayed());
    assert_eq!(replay.body, again.body);
    assert_eq!(probe.runs(), 2);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn in_transaction_mode_a_stale_guess_that_a_key_is_completed_costs_a_read_only() {
    a_stale_guess_that_a_key_is_completed_costs_a_read_only(Mode::Transaction, "stale_guess_tx").await;
}

#[tokio::test]
async fn in_lease_mode_a_stale_guess_that_a_key_is_completed_costs_a_read_only() {
    a_stale_guess_that_a_key_is_completed_costs_a_read_only(Mode::lease(Duration::from_secs(60)), "stale_guess_lease")
        .await;
}
