//! The memory store's bound: it never forgets a live key to make room.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::{request, send, Probe};
use tower_idempotency::{IdempotencyLayer, MemoryStore, Mode};

#[tokio::test]
async fn a_full_memory_store_refuses_new_claims_but_keeps_replaying() {
    let store = MemoryStore::new(2);
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store.clone()));

    send(&app, request(Some("a"), "{}", &[])).await;
    send(&app, request(Some("b"), "{}", &[])).await;
    let refused = send(&app, request(Some("c"), "{}", &[])).await;
    let replay = send(&app, request(Some("a"), "{}", &[])).await;

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.problem_type(), "urn:tower-idempotency:store-full");
    assert!(refused.headers.contains_key("retry-after"));
    assert!(replay.replayed());
    assert_eq!(probe.runs(), 2);
    assert_eq!(store.len(), 2);
}

#[tokio::test]
async fn a_full_memory_store_evicts_expired_records_first() {
    let store = MemoryStore::new(2);
    let probe = Probe::default();
    let expiring = probe.app(
        IdempotencyLayer::new(store.clone())
            .source("short")
            .retention(Duration::ZERO),
    );
    let lasting = probe.app(IdempotencyLayer::new(store.clone()).source("long"));

    send(&expiring, request(Some("a"), "{}", &[])).await;
    send(&lasting, request(Some("b"), "{}", &[])).await;
    let admitted = send(&lasting, request(Some("c"), "{}", &[])).await;
    let kept = send(&lasting, request(Some("b"), "{}", &[])).await;

    assert_eq!(admitted.status, StatusCode::OK, "the expired record made room");
    assert!(kept.replayed(), "the live record was kept");
    assert_eq!(store.len(), 2);
}

#[tokio::test]
async fn fail_open_does_not_bypass_a_full_store() {
    let store = MemoryStore::new(1);
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store).fail_open(true));

    send(&app, request(Some("a"), "{}", &[])).await;
    let refused = send(&app, request(Some("b"), "{}", &[])).await;

    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a full store is not an outage"
    );
    assert_eq!(probe.runs(), 1);
}

#[tokio::test]
async fn a_full_memory_store_keeps_a_lease_running_past_its_retention() {
    let store = MemoryStore::new(1);
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(store.clone())
            .mode(Mode::lease(Duration::from_secs(60)))
            .retention(Duration::ZERO),
    );
    let running = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("running"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;

    let refused = send(&app, request(Some("other"), "{}", &[])).await;
    probe.open_gate();
    running.await.unwrap();

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{refused:?}");
    assert_eq!(refused.problem_type(), "urn:tower-idempotency:store-full");
    assert_eq!(probe.runs(), 1);
}
