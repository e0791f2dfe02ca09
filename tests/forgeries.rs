//! On a route with a signature verifier, every request is verified before
//! any other decision: what a forged request claims to be (a gRPC content
//! type, a method the route does not protect) never routes it around the
//! check, in either mode, even to a handler that needs nothing from the
//! layer.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::any;
use axum::Router;
use http::{Method, Request, StatusCode};
use support::signing::{stripe_signature, unix_now, INVALID_SIGNATURE};
use support::{send, TestDb};
use tower_idempotency::signature::StripeSignature;
use tower_idempotency::{IdempotencyLayer, Mode, Preset};

const SECRET: &str = "whsec_forgery_test";
const EVENT: &str = r#"{"id":"evt_forged","type":"charge.succeeded"}"#;

/// Content types that look like gRPC, on a route that serves no gRPC.
const GRPC_LOOKING: [&str; 4] = [
    "application/grpc",
    "application/grpc+json",
    "application/grpc+proto",
    "application/grpc;charset=utf-8",
];

/// A Stripe route whose handler needs nothing from the layer (no `Tx`, no
/// `RecordKey`), so only the layer stands between a forgery and its run.
fn stripe_route(layer: IdempotencyLayer, runs: Arc<AtomicUsize>) -> Router {
    Router::new()
        .route(
            "/webhooks/stripe",
            any(move || {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    "handled"
                }
            }),
        )
        .route_layer(layer)
}

fn delivery(method: Method, content_type: &str, signature: Option<String>) -> Request<Body> {
    let mut builder = Request::builder()
        .method(method)
        .uri("/webhooks/stripe")
        .header("content-type", content_type);
    if let Some(signature) = signature {
        builder = builder.header("stripe-signature", signature);
    }
    builder.body(Body::from(EVENT)).expect("request")
}

fn modes() -> [(&'static str, Mode); 2] {
    [
        ("transaction", Mode::Transaction),
        ("lease", Mode::lease(Duration::from_secs(30))),
    ]
}

async fn stripe_layer(db: &TestDb, mode: Mode) -> IdempotencyLayer {
    let verifier = StripeSignature::new(SECRET).expect("a secret");
    IdempotencyLayer::new(db.store().await)
        .preset(Preset::stripe().verify_signature(verifier))
        .mode(mode)
}

fn assert_no_forgery_ran(runs: &AtomicUsize, mode_name: &str) {
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "{mode_name} mode: a forgery reached the handler"
    );
}

#[tokio::test]
async fn forgeries_with_a_grpc_content_type_are_refused_before_the_handler() {
    let db = TestDb::new("forged_grpc_content_types").await;
    for (mode_name, mode) in modes() {
        let runs = Arc::new(AtomicUsize::new(0));
        let app = stripe_route(stripe_layer(&db, mode).await, runs.clone());
        for content_type in GRPC_LOOKING {
            let forged = Some("t=1,v1=00".to_owned());
            for signature in [None, forged] {
                let reply = send(&app, delivery(Method::POST, content_type, signature.clone())).await;
                let what = format!("{mode_name} mode, {content_type}, signature {signature:?}");
                assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}: {}", reply.text());
                assert_eq!(reply.problem_type(), INVALID_SIGNATURE, "{what}");
            }
        }
        assert_no_forgery_ran(&runs, mode_name);
    }
    assert_eq!(db.records().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn forgeries_with_an_unprotected_method_are_refused_before_the_handler() {
    let db = TestDb::new("forged_unprotected_methods").await;
    for (mode_name, mode) in modes() {
        let runs = Arc::new(AtomicUsize::new(0));
        // GET is never protected by default; with `methods`, POST is not either.
        let defaults = stripe_route(stripe_layer(&db, mode).await, runs.clone());
        let put_only = stripe_route(stripe_layer(&db, mode).await.methods([Method::PUT]), runs.clone());
        for (app, method) in [
            (&defaults, Method::GET),
            (&defaults, Method::HEAD),
            (&put_only, Method::POST),
        ] {
            let reply = send(app, delivery(method.clone(), "application/json", None)).await;
            assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{mode_name} mode, {method}");
        }
        assert_no_forgery_ran(&runs, mode_name);
    }
    assert_eq!(db.records().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_verified_request_on_an_unprotected_method_passes_through_without_a_record() {
    let db = TestDb::new("verified_unprotected").await;
    let runs = Arc::new(AtomicUsize::new(0));
    let app = stripe_route(stripe_layer(&db, Mode::Transaction).await, runs.clone());

    // A gRPC-looking POST on a route serving no gRPC method, and a GET: both
    // unprotected, both verified first.
    let grpc_looking = delivery(
        Method::POST,
        "application/grpc",
        Some(stripe_signature(SECRET, unix_now(), EVENT)),
    );
    let reply = send(&app, grpc_looking).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let get = delivery(
        Method::GET,
        "application/json",
        Some(stripe_signature(SECRET, unix_now(), EVENT)),
    );
    assert_eq!(send(&app, get).await.status, StatusCode::OK);

    assert_eq!(runs.load(Ordering::SeqCst), 2, "verified requests run");
    assert_eq!(db.records().await, 0, "an unprotected request leaves no record");
    db.drop_schema().await;
}
