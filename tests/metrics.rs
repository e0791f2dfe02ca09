//! The layer's metrics move as requests pass (one global recorder for this
//! test binary; each test uses sources of its own).

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use support::{request, send, Probe, Reply};
use tokio::task::JoinHandle;
use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore};

fn recorder() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        PrometheusBuilder::new()
            .install_recorder()
            .expect("install the recorder")
    })
}

/// The value of `idempotency_requests_total` for a source and outcome.
fn requests(source: &str, outcome: &str) -> u64 {
    let text = recorder().render();
    text.lines()
        .filter(|line| line.starts_with("idempotency_requests_total{"))
        .filter(|line| {
            line.contains(&format!("source=\"{source}\"")) && line.contains(&format!("outcome=\"{outcome}\""))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn request_outcomes_are_counted() {
    recorder();
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(MemoryStore::new(100)).source("metrics-outcomes"));

    send(&app, request(Some("a"), "{}", &[])).await;
    send(&app, request(Some("a"), "{}", &[])).await;
    send(&app, request(Some("a"), "{\"x\":1}", &[])).await;
    send(&app, request(None, "{}", &[])).await;
    send(&app, request(Some("a\tb"), "{}", &[])).await;
    send(&app, request(Some("b"), "{}", &[("x-test-status", "500")])).await;

    let source = "metrics-outcomes";
    assert_eq!(requests(source, "first"), 1);
    assert_eq!(requests(source, "replayed"), 1);
    assert_eq!(requests(source, "mismatch"), 1);
    assert_eq!(requests(source, "missing_key"), 1);
    assert_eq!(requests(source, "rejected"), 1);
    assert_eq!(requests(source, "released"), 1);
}

/// Sends a request for `k` whose handler waits for the gate, once it has
/// started.
async fn hold_k_in_flight(probe: &Probe, app: &Router) -> JoinHandle<Reply> {
    let held = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    held
}

#[tokio::test]
async fn conflicts_are_counted() {
    recorder();
    let probe = Probe::default();
    let conflict = probe.app(IdempotencyLayer::new(MemoryStore::new(100)).source("metrics-conflict"));

    let first = hold_k_in_flight(&probe, &conflict).await;
    send(&conflict, request(Some("k"), "{}", &[])).await;
    probe.open_gate();
    first.await.unwrap();

    assert_eq!(requests("metrics-conflict", "conflict"), 1);
}

#[tokio::test]
async fn waits_are_counted() {
    recorder();
    let probe = Probe::default();
    let waiting = probe.app(
        IdempotencyLayer::new(MemoryStore::new(100))
            .source("metrics-wait")
            .in_flight(InFlight::Wait(Duration::from_secs(30))),
    );

    let held = hold_k_in_flight(&probe, &waiting).await;
    let waiter = tokio::spawn({
        let waiting = waiting.clone();
        async move { send(&waiting, request(Some("k"), "{}", &[])).await }
    });
    probe.open_gate();
    held.await.unwrap();
    let waited = waiter.await.unwrap();

    // The waiter either waited for the first or arrived after it finished.
    assert!(waited.replayed());
    assert_eq!(
        requests("metrics-wait", "waited") + requests("metrics-wait", "replayed"),
        1
    );
}

#[tokio::test]
async fn store_latency_is_recorded() {
    recorder();
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(MemoryStore::new(100)).source("metrics-latency"));

    send(&app, request(Some("k"), "{}", &[])).await;

    let text = recorder().render();
    assert!(text.contains("idempotency_store_duration_seconds"), "{text}");
}

#[tokio::test]
async fn per_request_sources_never_become_label_values() {
    recorder();
    let probe = Probe::default();
    let tenant_of = |parts: &http::request::Parts| {
        parts
            .headers
            .get("x-tenant")
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let labelled = probe.app(
        IdempotencyLayer::new(MemoryStore::new(30_000))
            .source_fn(tenant_of)
            .metrics_label("metrics-tenants"),
    );
    let unlabelled = probe.app(IdempotencyLayer::new(MemoryStore::new(30_000)).source_fn(tenant_of));

    for tenant in 0..10_000 {
        let tenant = format!("tenant-{tenant:05}");
        let app = if tenant.ends_with('0') { &unlabelled } else { &labelled };
        let reply = send(app, request(Some("k"), "{}", &[("x-tenant", &tenant)])).await;
        assert_eq!(reply.status, 200, "{tenant}: {}", reply.text());
        send(app, request(Some("k"), "{}", &[("x-tenant", &tenant)])).await;
    }

    let text = recorder().render();
    assert!(!text.contains("tenant-"), "a tenant became a label value");
    let series = |label: &str| {
        text.lines()
            .filter(|line| line.starts_with("idempotency_") && line.contains(&format!("source=\"{label}\"")))
            .count()
    };
    // One series per outcome, plus the store histograms' own lines.
    assert_eq!(requests("metrics-tenants", "first"), 9_000);
    assert_eq!(requests("metrics-tenants", "replayed"), 9_000);
    assert!(series("metrics-tenants") <= 4, "{}", series("metrics-tenants"));
    assert_eq!(requests("per-request", "first"), 1_000);
    assert!(series("per-request") <= 4, "{}", series("per-request"));
}
