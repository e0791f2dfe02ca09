//! The provider presets key real payload shapes as the provider documents
//! them, signed as the provider signs them, through the layer on a real
//! Postgres.

mod support;

use axum::body::Body;
use http::{Request, StatusCode};
use serde_json::json;
use support::signing::{stripe_signature, unix_now};
use support::{send, Probe, TestDb};
use tower_idempotency::signature::StripeSignature;
use tower_idempotency::{IdempotencyLayer, Preset};

const STRIPE_SECRET: &str = "whsec_test_secret";

fn signed_stripe_delivery(body: &str) -> Request<Body> {
    Request::post("/r")
        .header("stripe-signature", stripe_signature(STRIPE_SECRET, unix_now(), body))
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request")
}

/// A thin event of Stripe's event destinations (API v2): the event names
/// its object in `related_object` instead of carrying it, and the handler
/// fetches it. Shape as Stripe's documentation gives it.
fn stripe_thin_event(id: &str) -> String {
    json!({
        "id": id,
        "object": "v2.core.event",
        "type": "v1.billing.meter.error_report_triggered",
        "livemode": false,
        "created": "2024-09-17T06:20:52.246Z",
        "related_object": {
            "id": "mtr_test_61R9IeFypPQ7MK6jj41FNpP8ApX7y3bk",
            "type": "billing.meter",
            "url": "/v1/billing/meters/mtr_test_61R9IeFypPQ7MK6jj41FNpP8ApX7y3bk"
        }
    })
    .to_string()
}

#[tokio::test]
async fn the_stripe_preset_keys_a_thin_event_by_its_id_and_type() {
    let db = TestDb::new("preset_stripe_thin").await;
    let probe = Probe::default();
    let stripe = Preset::stripe().verify_signature(StripeSignature::new(STRIPE_SECRET).unwrap());
    let app = probe.app(IdempotencyLayer::new(db.store().await).preset(stripe));
    let event = stripe_thin_event("evt_test_65R9Ijk8tKXs1UvKhoWJ3MCGHnHnc5ugVPr7LsU1lwVMBd");

    let first = send(&app, signed_stripe_delivery(&event)).await;
    let redelivered = send(&app, signed_stripe_delivery(&event)).await;
    let another = send(&app, signed_stripe_delivery(&stripe_thin_event("evt_test_other"))).await;

    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(redelivered.replayed(), "{redelivered:?}");
    assert!(!another.replayed(), "{another:?}");
    assert_eq!(probe.runs(), 2);
    let keys: Vec<(String, String, String)> = db
        .client()
        .await
        .query(
            "SELECT source, event_type, key FROM idempotency_records ORDER BY key",
            &[],
        )
        .await
        .expect("read the records")
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let thin = |id: &str| {
        (
            "stripe".to_owned(),
            "v1.billing.meter.error_report_triggered".to_owned(),
            id.to_owned(),
        )
    };
    assert_eq!(
        keys,
        [
            thin("evt_test_65R9Ijk8tKXs1UvKhoWJ3MCGHnHnc5ugVPr7LsU1lwVMBd"),
            thin("evt_test_other")
        ]
    );
    db.drop_schema().await;
}
