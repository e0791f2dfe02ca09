//! The layer's metrics move as requests pass, and the Postgres store's
//! tasks export theirs (one global recorder for this test binary; each test
//! uses sources, or tables, of its own).

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use support::wire::{pool_through, FaultyProxy};
use support::{request, send, wait_until, Probe, Reply, TestDb};
use tokio::task::JoinHandle;
use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore, PostgresStore};

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

/// The value of the one series of `name` whose labels include every one of
/// `labels` (`name="value"` each); `None` while there is none.
fn series(name: &str, labels: &[&str]) -> Option<f64> {
    let text = recorder().render();
    let values: Vec<f64> = text
        .lines()
        .filter(|line| line.starts_with(&format!("{name}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(values.len() <= 1, "several series of {name} with {labels:?}: {text}");
    values.first().copied()
}

/// Waits until the series of `name` with `labels` has the value `expected`.
async fn series_reaches(name: &str, labels: &[&str], expected: f64) {
    let what = format!("{name}{labels:?} is {expected}");
    wait_until(&what, Duration::from_secs(10), || async {
        series(name, labels) == Some(expected)
    })
    .await;
}

#[tokio::test]
async fn in_flight_and_waiting_requests_are_gauged_while_they_last() {
    recorder();
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(MemoryStore::new(100))
            .source("metrics-occupancy")
            .in_flight(InFlight::Wait(Duration::from_secs(30))),
    );
    let source = ["source=\"metrics-occupancy\""];

    let held = hold_k_in_flight(&probe, &app).await;
    assert_eq!(series("idempotency_in_flight", &source), Some(1.0));
    let waiter = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), "{}", &[])).await }
    });
    series_reaches("idempotency_waiting", &source, 1.0).await;
    probe.open_gate();
    held.await.unwrap();
    assert!(waiter.await.unwrap().replayed());

    assert_eq!(series("idempotency_in_flight", &source), Some(0.0));
    assert_eq!(series("idempotency_waiting", &source), Some(0.0));
}

#[tokio::test]
async fn a_waiter_dropped_while_waiting_leaves_the_waiting_gauge() {
    recorder();
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(MemoryStore::new(100))
            .source("metrics-dropped-waiter")
            .in_flight(InFlight::Wait(Duration::from_secs(30)))
            // A dropped request future then drops its search for the key.
            .detach_on_disconnect(false),
    );
    let source = ["source=\"metrics-dropped-waiter\""];

    let held = hold_k_in_flight(&probe, &app).await;
    let waiter = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), "{}", &[])).await }
    });
    series_reaches("idempotency_waiting", &source, 1.0).await;
    waiter.abort();
    let _ = waiter.await;

    assert_eq!(series("idempotency_waiting", &source), Some(0.0));
    probe.open_gate();
    held.await.unwrap();
    assert_eq!(series("idempotency_in_flight", &source), Some(0.0));
}

/// The store of `db` on the table `<schema>.records`, migrated: a table
/// label no other test shares.
async fn store_of_its_own(db: &TestDb, pool: deadpool_postgres::Pool) -> (PostgresStore, String) {
    let table = format!("{}.records", db.schema);
    let store = PostgresStore::new(pool).with_table(&table).unwrap();
    store.migrate().await.expect("migrate");
    (store, table)
}

#[tokio::test]
async fn the_metrics_task_exports_the_store_gauges_and_whether_the_store_answers() {
    recorder();
    let db = TestDb::new("metrics_store_gauges").await;
    let proxy = FaultyProxy::stalling().await;
    let (store, table) = store_of_its_own(&db, pool_through(proxy.port, &db.schema, 2)).await;
    db.client()
        .await
        .execute(
            &format!(
                "INSERT INTO {table} (source, event_type, key, fingerprint, state, created_at, expires_at)
                 VALUES ('s', '', 'expired', '\\x00', 2, now() - interval '2 days', now() - interval '1 day')"
            ),
            &[],
        )
        .await
        .unwrap();
    let label = format!("table=\"{table}\"");
    let labels = [label.as_str()];

    let task = store.spawn_metrics_task(Duration::from_millis(50));
    series_reaches("idempotency_store_up", &labels, 1.0).await;
    assert_eq!(series("idempotency_expired_awaiting_purge", &labels), Some(1.0));
    assert_eq!(series("idempotency_claims_past_lease", &labels), Some(0.0));
    assert_eq!(series("idempotency_oldest_open_claim_age_seconds", &labels), Some(0.0));
    let expired_for = series("idempotency_oldest_expired_age_seconds", &labels).expect("the oldest expired");
    assert!((86_000.0..87_000.0).contains(&expired_for), "{expired_for}");
    assert!(series("idempotency_table_bytes", &labels).is_some_and(|bytes| bytes > 0.0));

    proxy.go_down();
    series_reaches("idempotency_store_up", &labels, 0.0).await;
    proxy.restore();
    series_reaches("idempotency_store_up", &labels, 1.0).await;
    task.abort();
    db.drop_schema().await;
}

#[tokio::test]
async fn purge_runs_are_counted_with_the_records_they_delete_and_their_failures() {
    recorder();
    let db = TestDb::new("metrics_purge").await;
    let (store, table) = store_of_its_own(&db, db.pool.clone()).await;
    db.client()
        .await
        .execute(
            &format!(
                "INSERT INTO {table} (source, event_type, key, fingerprint, state, created_at, expires_at)
                 SELECT 's', '', n::text, '\\x00', 2, now() - interval '2 days', now() - interval '1 day'
                 FROM generate_series(1, 5) AS n"
            ),
            &[],
        )
        .await
        .unwrap();
    let label = format!("table=\"{table}\"");

    let purger = store.spawn_purge_task(Duration::from_millis(20), 2);
    series_reaches("idempotency_purged_records_total", &[label.as_str()], 5.0).await;
    wait_until("a second run, which finds nothing", Duration::from_secs(10), || async {
        series("idempotency_purge_runs_total", &[label.as_str(), "result=\"ok\""]).is_some_and(|runs| runs >= 2.0)
    })
    .await;
    assert!(series("idempotency_purge_duration_seconds_count", &[label.as_str()]).is_some_and(|runs| runs >= 2.0));
    assert_eq!(
        series("idempotency_purge_runs_total", &[label.as_str(), "result=\"failed\""]),
        None
    );
    purger.abort();

    // A table that is not there: every run fails, and is counted.
    let missing = format!("{}.absent", db.schema);
    let failing = PostgresStore::new(db.pool.clone()).with_table(&missing).unwrap();
    let purger = failing.spawn_purge_task(Duration::from_millis(20), 2);
    let missing_label = format!("table=\"{missing}\"");
    wait_until("a failed purge run is counted", Duration::from_secs(10), || async {
        series(
            "idempotency_purge_runs_total",
            &[missing_label.as_str(), "result=\"failed\""],
        )
        .is_some_and(|runs| runs >= 1.0)
    })
    .await;
    assert_eq!(
        series("idempotency_purged_records_total", &[missing_label.as_str()]),
        None
    );
    purger.abort();
    db.drop_schema().await;
}
