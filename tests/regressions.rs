//! Regression tests for the bugs the reliability tests found (the model in
//! `model.rs`, the fuzz targets in `fuzz/`, the process tests in `crash.rs`,
//! `outage.rs` and `memory_bound.rs`), one behaviour each.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{request, send, Probe, TestDb};
use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore, PostgresStore};

/// Found by the model test: in transaction mode the memory store showed an
/// in-flight claim's fingerprint, so another payload got 422 at once, where
/// Postgres (whose claim is an uncommitted row) answers "in flight" and only
/// a completed record gets 422. A 422 tells the client not to retry, yet the
/// first request may still fail and leave no record.
#[tokio::test]
async fn memory_store_transaction_mode_answers_another_payload_in_flight_with_409() {
    let probe = Probe::default();
    let layer = IdempotencyLayer::new(MemoryStore::new(100))
        .source("test")
        .in_flight(InFlight::Conflict);
    let app = probe.app(layer);

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), r#"{"a":1}"#, &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    let in_flight = send(&app, request(Some("k"), r#"{"a":2}"#, &[])).await;
    probe.open_gate();
    let first = first.await.expect("the first request");
    let completed = send(&app, request(Some("k"), r#"{"a":2}"#, &[])).await;

    assert_eq!(in_flight.status, StatusCode::CONFLICT, "{in_flight:?}");
    assert_eq!(in_flight.problem_type(), "urn:tower-idempotency:in-flight");
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(completed.status, StatusCode::UNPROCESSABLE_ENTITY, "{completed:?}");
    assert_eq!(probe.runs(), 1);
}

/// Found by the model test (Postgres stores with per-instance caches): an
/// instance that had not seen a key skips the fast-path read and goes
/// straight to its claim, holding the key locally meanwhile; a concurrent
/// duplicate of that *completed* key on the same instance was then answered
/// 409 (conflict policy) instead of its replay. A local waiter now reads the
/// record before it answers or waits.
#[tokio::test]
async fn concurrent_duplicates_of_a_completed_key_on_a_fresh_instance_are_replayed_not_409() {
    let db = TestDb::new("fresh_instance_replay").await;
    let probe = Probe::default();
    let layer = |store: PostgresStore| {
        IdempotencyLayer::new(store)
            .source("test")
            .in_flight(InFlight::Conflict)
    };
    let completed = send(&probe.app(layer(db.store().await)), request(Some("k"), "{}", &[])).await;
    assert_eq!(completed.status, StatusCode::OK);

    // Another instance, fresh (it knows nothing of the key), whose only
    // pooled connection the test holds: its store steps queue for it.
    let config = support::on_schema(support::database_config(), &db.schema, &db.schema);
    let pool = support::pool(config, 1, None);
    let held = pool.get().await.expect("the pool's only connection");
    let fresh = probe.app(layer(PostgresStore::new(pool.clone())));
    let queued = |waiting: usize| {
        let pool = pool.clone();
        async move {
            for _ in 0..500 {
                if pool.status().waiting >= waiting {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("{waiting} store step(s) never queued for the pool");
        }
    };
    let one = tokio::spawn({
        let app = fresh.clone();
        async move { send(&app, request(Some("k"), "{}", &[])).await }
    });
    queued(1).await;
    let mut two = tokio::spawn({
        let app = fresh.clone();
        async move { send(&app, request(Some("k"), "{}", &[])).await }
    });
    // Fixed, the duplicate queues for the pool to read the record; broken,
    // it answers at once.
    let answered_at_once = tokio::select! {
        () = queued(2) => None,
        reply = &mut two => Some(reply.expect("two")),
    };
    drop(held);
    let one = one.await.expect("one");
    let two = match answered_at_once {
        Some(reply) => reply,
        None => two.await.expect("two"),
    };

    for reply in [&one, &two] {
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "a duplicate of a completed key is replayed: {reply:?}"
        );
        assert!(reply.replayed(), "{reply:?}");
        assert_eq!(reply.body, completed.body);
    }
    assert_eq!(probe.runs(), 1);
    db.drop_schema().await;
}
