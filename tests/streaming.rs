//! Streaming and slow response bodies: server-sent events and the content
//! types a route lists pass through without a record; reading a response to
//! record it is bounded in time; a lease is renewed until the response is
//! recorded.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::StatusCode;
use http_body_util::BodyExt;
use support::{request, TestDb};
use tokio::sync::{mpsc, Semaphore};
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, Mode, Tx, TxError};

/// A handler whose response body sends `first`, then waits for the gate
/// before sending `rest`. It writes a ledger row through the request's
/// transaction when it has one.
#[derive(Clone)]
struct Slow {
    runs: Arc<AtomicUsize>,
    started: mpsc::UnboundedSender<()>,
    gate: Arc<Semaphore>,
    content_type: &'static str,
}

impl Slow {
    fn new(content_type: &'static str) -> (Self, mpsc::UnboundedReceiver<()>) {
        let (started, started_rx) = mpsc::unbounded_channel();
        let slow = Self {
            runs: Arc::default(),
            started,
            gate: Arc::new(Semaphore::new(0)),
            content_type,
        };
        (slow, started_rx)
    }

    fn app(&self, layer: IdempotencyLayer) -> Router {
        Router::new()
            .route("/r", post(slow_handler))
            .route_layer(layer)
            .with_state(self.clone())
    }

    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }
}

async fn slow_handler(State(slow): State<Slow>, tx: Result<Tx, TxError>) -> Response {
    slow.runs.fetch_add(1, Ordering::SeqCst);
    if let Ok(tx) = &tx {
        tx.execute("INSERT INTO ledger (body) VALUES ('streamed')", &[])
            .await
            .expect("ledger insert");
    }
    drop(tx);
    let _ = slow.started.send(());
    let gate = slow.gate.clone();
    let chunks = futures_util::stream::unfold(0, move |step| {
        let gate = gate.clone();
        async move {
            match step {
                0 => Some((Ok::<_, Infallible>(Bytes::from_static(b"data: first\n\n")), 1)),
                1 => {
                    gate.acquire().await.expect("gate").forget();
                    Some((Ok(Bytes::from_static(b"data: rest\n\n")), 2))
                }
                _ => None,
            }
        }
    });
    ([(CONTENT_TYPE, slow.content_type)], Body::from_stream(chunks)).into_response()
}

async fn body_text(response: Response) -> String {
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8(bytes.to_vec()).expect("UTF-8")
}

async fn call(app: &Router) -> Response {
    tokio::time::timeout(
        Duration::from_secs(10),
        app.clone().oneshot(request(Some("k"), "{}", &[])),
    )
    .await
    .expect("the response head within the bound")
    .expect("infallible")
}

#[tokio::test]
async fn server_sent_events_pass_through_without_a_record() {
    let db = TestDb::new("sse_pass_through").await;
    for mode in [Mode::Transaction, Mode::lease(Duration::from_secs(30))] {
        let (slow, _started) = Slow::new("text/event-stream; charset=utf-8");
        let app = slow.app(IdempotencyLayer::new(db.store().await).source("test").mode(mode));
        slow.gate.add_permits(10);

        for delivery in 1..=2 {
            let response = call(&app).await;
            assert_eq!(response.status(), StatusCode::OK);
            assert!(response.headers().get("idempotent-replayed").is_none(), "{mode:?}");
            assert_eq!(
                body_text(response).await,
                "data: first\n\ndata: rest\n\n",
                "{mode:?} #{delivery}"
            );
        }

        assert_eq!(slow.runs(), 2, "{mode:?}: nothing recorded, so each delivery runs");
        assert_eq!(db.records().await, 0, "{mode:?}: no record, no claim left behind");
    }
    // In transaction mode the stream's writes commit as if unprotected.
    assert_eq!(db.ledger_rows().await, 2);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn a_listed_content_type_passes_through_without_a_record() {
    let db = TestDb::new("listed_stream_type").await;
    let (slow, _started) = Slow::new("Application/X-NDJSON");
    let layer = IdempotencyLayer::new(db.store().await)
        .source("test")
        .streaming_content_type("application/x-ndjson");
    let app = slow.app(layer);
    slow.gate.add_permits(10);

    for _ in 0..2 {
        let response = call(&app).await;
        assert!(response.headers().get("idempotent-replayed").is_none());
        body_text(response).await;
    }

    assert_eq!(slow.runs(), 2);
    assert_eq!(db.records().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_body_slower_than_the_bound_passes_through_and_the_record_keeps_its_head() {
    let db = TestDb::new("slow_body_bound").await;
    let (slow, _started) = Slow::new("application/json");
    let layer = IdempotencyLayer::new(db.store().await)
        .source("test")
        .response_buffer_timeout(Duration::from_millis(200));
    let app = slow.app(layer);

    // The gate is shut: without the bound the layer would wait for the body
    // forever and the head would never come.
    let response = call(&app).await;
    assert_eq!(response.status(), StatusCode::OK);
    slow.gate.add_permits(10);
    assert_eq!(
        body_text(response).await,
        "data: first\n\ndata: rest\n\n",
        "the whole body, in order"
    );

    let replay = call(&app).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()[CONTENT_TYPE], "application/json");
    assert_eq!(body_text(replay).await, "", "the body was not retained");
    assert_eq!(slow.runs(), 1);
    assert_eq!(
        db.ledger_rows().await,
        1,
        "the handler's writes committed with the record"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn the_lease_is_renewed_while_the_response_body_is_read() {
    let db = TestDb::new("lease_covers_body").await;
    let (slow, mut started) = Slow::new("application/json");
    let mode = Mode::Lease {
        lease: Duration::from_secs(30),
        renew_every: Duration::from_millis(50),
    };
    let app = slow.app(IdempotencyLayer::new(db.store().await).source("test").mode(mode));

    let first = tokio::spawn({
        let app = app.clone();
        async move { body_text(call(&app).await).await }
    });
    tokio::time::timeout(Duration::from_secs(10), started.recv())
        .await
        .expect("the handler to start")
        .expect("the handler is alive");

    // The handler has answered its head; the layer is reading the body. The
    // lease must still be moving forward.
    let locked_until = || async {
        db.client()
            .await
            .query_one("SELECT locked_until FROM idempotency_records", &[])
            .await
            .expect("the claim row")
            .get::<_, SystemTime>(0)
    };
    let seen = locked_until().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while locked_until().await == seen {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lease was not renewed while the body was read"
        );
        tokio::task::yield_now().await;
    }

    slow.gate.add_permits(10);
    assert_eq!(first.await.expect("the first request"), "data: first\n\ndata: rest\n\n");
    let replay = call(&app).await;
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(body_text(replay).await, "data: first\n\ndata: rest\n\n");
    assert_eq!(slow.runs(), 1);
    db.drop_schema().await;
}
