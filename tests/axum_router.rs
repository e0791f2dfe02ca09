//! The layer on a whole axum router with `.layer(...)`, beside the
//! per-route `.route_layer(...)` the other tests use.

mod support;

use axum::routing::{get, post};
use axum::Router;
use http::{Request, StatusCode};
use support::{read, request, send};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore};

#[tokio::test]
async fn a_router_wide_layer_protects_posts_and_lets_safe_methods_through() {
    let app = Router::new()
        .route("/r", post(|| async { "posted" }))
        .route("/health", get(|| async { "up" }))
        .layer(IdempotencyLayer::new(MemoryStore::new(100)));

    let health = app
        .clone()
        .oneshot(Request::get("/health").body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();
    let unkeyed_post = send(&app, request(None, "{}", &[])).await;
    send(&app, request(Some("k"), "{}", &[])).await;
    let replay = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(read(health).await.text(), "up", "GET needs no key");
    assert_eq!(unkeyed_post.status, StatusCode::BAD_REQUEST);
    assert!(replay.replayed());
}

#[tokio::test]
async fn the_protected_methods_can_be_chosen() {
    let app = Router::new()
        .route("/r", post(|| async { "posted" }).put(|| async { "put" }))
        .layer(IdempotencyLayer::new(MemoryStore::new(100)).methods([http::Method::PUT]));

    let post_without_key = send(&app, request(None, "{}", &[])).await;
    let put_without_key = app
        .clone()
        .oneshot(Request::put("/r").body(axum::body::Body::empty()).unwrap())
        .await
        .unwrap();

    assert_eq!(post_without_key.status, StatusCode::OK);
    assert_eq!(put_without_key.status(), StatusCode::BAD_REQUEST);
}
