//! The layer on a tonic server, driven by a generated tonic client over
//! loopback, against the real Postgres.

mod payments;
mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use support::TestDb;
use tokio::sync::{mpsc, Barrier, Semaphore};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tower_idempotency::{IdempotencyLayer, IdempotencyTx, InFlight, PostgresStore, RecordKey};

use payments::payments_server::{Payments, PaymentsServer};
use payments::{client, payment, CreatePaymentRequest, Payment};

const CREATE_PAYMENT: &str = "/payments.v1.Payments/CreatePayment";

/// A payments handler that counts its runs, writes a ledger row through the
/// request transaction, and does what the request's metadata asks:
/// `x-test-block` waits for the gate, `x-test-fail` answers UNAVAILABLE
/// after writing.
#[derive(Clone)]
struct Handler {
    runs: Arc<AtomicUsize>,
    started: Option<mpsc::UnboundedSender<()>>,
    gate: Arc<Semaphore>,
}

impl Default for Handler {
    fn default() -> Self {
        Self {
            runs: Arc::default(),
            started: None,
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

#[tonic::async_trait]
impl Payments for Handler {
    async fn create_payment(&self, request: Request<CreatePaymentRequest>) -> Result<Response<Payment>, Status> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        if let Some(started) = &self.started {
            let _ = started.send(());
        }
        let key = request
            .extensions()
            .get::<RecordKey>()
            .cloned()
            .expect("the layer's record key");
        let tx = request
            .extensions()
            .get::<IdempotencyTx>()
            .expect("a transaction")
            .lock()
            .await
            .unwrap();
        let row = tx
            .query_one(
                "INSERT INTO ledger (body) VALUES ($1) RETURNING id",
                &[&key.key().as_bytes()],
            )
            .await
            .unwrap();
        if request.metadata().contains_key("x-test-block") {
            self.gate.acquire().await.unwrap().forget();
        }
        if request.metadata().contains_key("x-test-fail") {
            return Err(Status::unavailable("asked to fail"));
        }
        let message = request.into_inner();
        let mut response = Response::new(Payment {
            ledger_entry_id: row.get(0),
            amount_cents: message.amount_cents,
            currency: message.currency,
        });
        response
            .metadata_mut()
            .insert("x-ledger", MetadataValue::from(row.get::<_, i64>(0)));
        Ok(response)
    }
}

fn layer(store: PostgresStore) -> IdempotencyLayer {
    IdempotencyLayer::new(store)
        .source("grpc")
        .grpc_unary_methods([CREATE_PAYMENT])
}

/// Serves `handler` behind `layer` (plus the health service, whose `Watch`
/// streams) on a free loopback port.
async fn serve(layer: IdempotencyLayer, handler: Handler) -> (SocketAddr, tonic_health::server::HealthReporter) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<PaymentsServer<Handler>>().await;
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(PaymentsServer::new(handler))
            .add_service(health)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (address, reporter)
}

fn with_flag(mut request: Request<CreatePaymentRequest>, flag: &'static str) -> Request<CreatePaymentRequest> {
    request.metadata_mut().insert(flag, MetadataValue::from_static("1"));
    request
}

fn replayed<T>(response: &Response<T>) -> bool {
    response
        .metadata()
        .get("idempotent-replayed")
        .is_some_and(|v| v == "true")
}

#[tokio::test]
async fn a_replay_equals_the_original_message_and_metadata() {
    let db = TestDb::new("grpc_replay").await;
    let handler = Handler::default();
    let (address, _health) = serve(layer(db.store().await), handler.clone()).await;
    let mut client = client(address).await;

    let first = client.create_payment(payment(Some("order-1"), 1999)).await.unwrap();
    let second = client.create_payment(payment(Some("order-1"), 1999)).await.unwrap();

    assert!(!replayed(&first));
    assert!(replayed(&second));
    assert_eq!(second.get_ref(), first.get_ref());
    assert_eq!(second.metadata().get("x-ledger"), first.metadata().get("x-ledger"));
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
    assert_eq!((db.ledger_rows().await, db.records().await), (1, 1));
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn concurrent_duplicate_calls_run_the_handler_once() {
    const CALLS: usize = 20;
    let db = TestDb::new("grpc_concurrent").await;
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let handler = Handler {
        started: Some(started_tx),
        ..Handler::default()
    };
    let (address, _health) = serve(layer(db.store().await).in_flight(InFlight::Conflict), handler.clone()).await;
    let client = client(address).await;
    let barrier = Arc::new(Barrier::new(CALLS));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    for _ in 0..CALLS {
        let (mut client, barrier, done_tx) = (client.clone(), barrier.clone(), done_tx.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            let _ = done_tx.send(
                client
                    .create_payment(with_flag(payment(Some("same"), 5), "x-test-block"))
                    .await,
            );
        });
    }
    started_rx.recv().await.unwrap();
    // The first holds the gate shut: every other call answers on its own.
    let mut refused = Vec::new();
    for _ in 0..CALLS - 1 {
        refused.push(done_rx.recv().await.unwrap().unwrap_err());
    }
    handler.gate.add_permits(CALLS);
    let winner = done_rx.recv().await.unwrap().unwrap();

    assert!(
        refused.iter().all(|status| status.code() == Code::Aborted),
        "{refused:?}"
    );
    assert!(refused[0].metadata().contains_key("retry-after"));
    assert_eq!(winner.get_ref().amount_cents, 5);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
    assert_eq!(db.ledger_rows().await, 1);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn waiting_duplicate_calls_get_the_replay() {
    const CALLS: usize = 20;
    let db = TestDb::new("grpc_wait").await;
    let handler = Handler::default();
    let wait = InFlight::Wait(Duration::from_secs(30));
    let (address, _health) = serve(layer(db.store().await).in_flight(wait), handler.clone()).await;
    let client = client(address).await;
    let barrier = Arc::new(Barrier::new(CALLS));
    let calls = (0..CALLS).map(|_| {
        let (mut client, barrier) = (client.clone(), barrier.clone());
        async move {
            barrier.wait().await;
            client.create_payment(payment(Some("same"), 5)).await
        }
    });
    let results = join_all(calls).await;

    let payments: Vec<_> = results.into_iter().map(|result| result.unwrap()).collect();
    assert!(payments.iter().all(|p| p.get_ref() == payments[0].get_ref()));
    assert_eq!(payments.iter().filter(|p| !replayed(p)).count(), 1);
    assert_eq!(handler.runs.load(Ordering::SeqCst), 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn refusals_are_grpc_statuses() {
    let db = TestDb::new("grpc_refusals").await;
    let (started_tx, mut started_rx) = mpsc::unbounded_channel();
    let handler = Handler {
        started: Some(started_tx),
        ..Handler::default()
    };
    let (address, _health) = serve(layer(db.store().await), handler.clone()).await;
    let mut client = client(address).await;

    let missing = client.create_payment(payment(None, 1)).await.unwrap_err();
    let too_long = client
        .create_payment(payment(Some(&"k".repeat(256)), 1))
        .await
        .unwrap_err();
    let empty = client.create_payment(payment(Some(""), 1)).await.unwrap_err();
    client.create_payment(payment(Some("done"), 1)).await.unwrap();
    let mismatch = client.create_payment(payment(Some("done"), 2)).await.unwrap_err();
    let in_flight = tokio::spawn({
        let mut client = client.clone();
        async move {
            client
                .create_payment(with_flag(payment(Some("busy"), 1), "x-test-block"))
                .await
        }
    });
    started_rx.recv().await.unwrap();
    started_rx.recv().await.unwrap();
    let aborted = client.create_payment(payment(Some("busy"), 1)).await.unwrap_err();
    handler.gate.add_permits(1);
    in_flight.await.unwrap().unwrap();

    assert_eq!(missing.code(), Code::InvalidArgument, "{missing:?}");
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(mismatch.code(), Code::FailedPrecondition, "{mismatch:?}");
    assert_eq!(aborted.code(), Code::Aborted);
    assert_eq!(
        handler.runs.load(Ordering::SeqCst),
        2,
        "no refused call reached the handler"
    );
    assert_eq!(db.ledger_rows().await, 2);
    db.drop_schema().await;
}

#[tokio::test]
async fn an_unavailable_store_is_unavailable() {
    let mut config = deadpool_postgres::Config::new();
    config.url = Some("postgres://postgres@127.0.0.1:1/postgres".into());
    let pool = config
        .create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)
        .unwrap();
    let handler = Handler::default();
    let (address, _health) = serve(layer(PostgresStore::new(pool)), handler.clone()).await;

    let status = client(address)
        .await
        .create_payment(payment(Some("k"), 1))
        .await
        .unwrap_err();

    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(handler.runs.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_error_status_releases_the_key_and_rolls_back_the_handlers_writes() {
    let db = TestDb::new("grpc_error_releases").await;
    let handler = Handler::default();
    let (address, _health) = serve(layer(db.store().await), handler.clone()).await;
    let mut client = client(address).await;

    let failed = client
        .create_payment(with_flag(payment(Some("k"), 1), "x-test-fail"))
        .await
        .unwrap_err();
    assert_eq!((db.ledger_rows().await, db.records().await), (0, 0));
    let retried = client.create_payment(payment(Some("k"), 1)).await.unwrap();

    assert_eq!(failed.code(), Code::Unavailable);
    assert_eq!(failed.message(), "asked to fail");
    assert!(!replayed(&retried));
    assert_eq!(handler.runs.load(Ordering::SeqCst), 2);
    assert_eq!((db.ledger_rows().await, db.records().await), (1, 1));
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn streaming_methods_pass_through_untouched() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let db = TestDb::new("grpc_streaming").await;
    let (address, reporter) = serve(layer(db.store().await), Handler::default()).await;
    let channel = Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let service = "payments.v1.Payments".to_owned();

    // Server streaming: without the key and not listed, so never buffered.
    let mut updates = health
        .watch(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = updates.next().await.unwrap().unwrap();
    reporter.set_not_serving::<PaymentsServer<Handler>>().await;
    let second = updates.next().await.unwrap().unwrap();

    assert_ne!(
        first.status, second.status,
        "the stream delivers updates as they happen"
    );
    assert_eq!(db.records().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn one_layer_value_serves_an_axum_router_and_a_tonic_server() {
    let db = TestDb::new("grpc_and_axum").await;
    let shared = layer(db.store().await);
    let probe = support::Probe::default();
    let app = probe.app(shared.clone());
    let handler = Handler::default();
    let (address, _health) = serve(shared, handler.clone()).await;

    let http_first = support::send(&app, support::request(Some("k"), "{}", &[])).await;
    let http_replay = support::send(&app, support::request(Some("k"), "{}", &[])).await;
    let grpc_first = client(address)
        .await
        .create_payment(payment(Some("g"), 1))
        .await
        .unwrap();
    let grpc_replay = client(address)
        .await
        .create_payment(payment(Some("g"), 1))
        .await
        .unwrap();

    assert_eq!(http_first.status, http::StatusCode::OK);
    assert!(http_replay.replayed());
    assert!(!replayed(&grpc_first));
    assert!(replayed(&grpc_replay));
    assert_eq!((probe.runs(), handler.runs.load(Ordering::SeqCst)), (1, 1));
    db.drop_schema().await;
}
