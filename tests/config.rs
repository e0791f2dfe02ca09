//! A configuration that cannot work is refused when the layer is built,
//! never answered with a panic per request.

mod support;

use std::time::Duration;

use axum::routing::post;
use axum::Router;
use support::{request, send, Probe, TestDb};
use tower_idempotency::{IdempotencyLayer, InFlight, InvalidConfig, MemoryStore, Mode, PostgresStore, MAX_DURATION};

fn layer() -> IdempotencyLayer {
    IdempotencyLayer::new(MemoryStore::new(100))
}

#[test]
fn a_wait_bound_that_overflows_the_clock_is_refused() {
    let error = layer().in_flight(InFlight::Wait(Duration::MAX)).validate().unwrap_err();
    assert!(
        matches!(
            error,
            InvalidConfig::DurationTooLong {
                setting: "in_flight wait",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn a_retention_that_overflows_timestamps_is_refused() {
    let error = layer().retention(Duration::MAX).validate().unwrap_err();
    assert!(
        matches!(
            error,
            InvalidConfig::DurationTooLong {
                setting: "retention",
                ..
            }
        ),
        "{error}"
    );
    assert!(
        layer().retention(MAX_DURATION).validate().is_ok(),
        "the limit itself is accepted"
    );
}

#[test]
fn a_lease_that_overflows_the_clock_is_refused() {
    let mode = Mode::Lease {
        lease: Duration::MAX,
        renew_every: Duration::from_secs(1),
    };
    let error = layer().mode(mode).validate().unwrap_err();
    assert!(
        matches!(error, InvalidConfig::DurationTooLong { setting: "lease", .. }),
        "{error}"
    );
}

#[test]
fn a_renewal_interval_not_shorter_than_the_lease_is_refused() {
    for renew_every in [Duration::from_secs(10), Duration::from_secs(11)] {
        let mode = Mode::Lease {
            lease: Duration::from_secs(10),
            renew_every,
        };
        let error = layer().mode(mode).validate().unwrap_err();
        assert!(
            matches!(error, InvalidConfig::RenewalNotShorterThanLease { .. }),
            "{renew_every:?}: {error}"
        );
    }
    let never_renewed = Mode::Lease {
        lease: Duration::from_secs(10),
        renew_every: Duration::ZERO,
    };
    assert!(layer().mode(never_renewed).validate().is_ok());
    assert!(layer().mode(Mode::lease(Duration::from_secs(10))).validate().is_ok());
}

#[test]
fn a_zero_store_timeout_or_response_buffer_timeout_is_refused() {
    let error = layer().store_timeout(Duration::ZERO).validate().unwrap_err();
    assert!(
        matches!(
            error,
            InvalidConfig::ZeroTimeout {
                setting: "store_timeout"
            }
        ),
        "{error}"
    );
    let error = layer().response_buffer_timeout(Duration::ZERO).validate().unwrap_err();
    assert!(
        matches!(
            error,
            InvalidConfig::ZeroTimeout {
                setting: "response_buffer_timeout"
            }
        ),
        "{error}"
    );
}

#[test]
#[should_panic(expected = "invalid IdempotencyLayer configuration: the in_flight wait")]
fn building_a_router_with_a_configuration_that_cannot_work_panics_at_once() {
    let _router: Router = Router::new()
        .route("/r", post(|| async { "ok" }))
        .route_layer(layer().in_flight(InFlight::Wait(Duration::MAX)));
}

#[tokio::test]
async fn a_cache_ttl_past_any_clock_is_bounded_by_the_records_retention() {
    let db = TestDb::new("cache_ttl_max").await;
    let store = PostgresStore::new(db.pool.clone()).with_cache(1 << 20, Duration::MAX);
    store.migrate().await.expect("migrate");
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store).source("test"));

    let first = send(&app, request(Some("k"), "{}", &[])).await;
    let duplicate = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(first.status, 200);
    assert!(duplicate.replayed(), "{}", duplicate.text());
    assert_eq!(probe.runs(), 1);
    db.drop_schema().await;
}

#[test]
fn a_body_hash_guard_on_a_lease_mode_route_is_refused() {
    let error = layer()
        .mode(Mode::lease(Duration::from_secs(30)))
        .body_hash_guard(true)
        .validate()
        .unwrap_err();
    assert!(
        matches!(error, InvalidConfig::BodyHashGuardNeedsTransactionMode),
        "{error}"
    );
    assert!(layer().body_hash_guard(true).validate().is_ok());
}
