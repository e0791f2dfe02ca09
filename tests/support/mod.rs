//! Shared setup for the layer's tests: a Postgres schema per test, a probe
//! handler whose behaviour each request chooses through headers, and small
//! request helpers.
#![allow(dead_code)]

pub mod wire;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, Mutex, Semaphore};
use tokio_postgres::NoTls;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore, PostgresStore, ResponseDecision, Store, Tx, TxError};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned())
}

/// A schema of the test's own, reached through a pool whose connections
/// carry the schema's name as `application_name`.
pub struct TestDb {
    pub schema: String,
    pub pool: Pool,
}

impl TestDb {
    pub async fn new(name: &str) -> Self {
        // Identifiers stop at 63 bytes: keep a readable prefix and a hash
        // of the whole name.
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        let prefix: String = name.chars().take(32).collect();
        let schema = format!("t_{prefix}_{:08x}_{}", hash as u32, std::process::id()).to_lowercase();
        let admin = connect().await;
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
                 CREATE TABLE {schema}.ledger (id bigserial PRIMARY KEY, body bytea NOT NULL);"
            ))
            .await
            .expect("create the test schema");
        let pool = pool_for(&schema, 16);
        Self { schema, pool }
    }

    pub async fn store(&self) -> PostgresStore {
        let store = PostgresStore::new(self.pool.clone());
        store.migrate().await.expect("migrate");
        store
    }

    /// A second, independent pool on the same schema (another "instance").
    pub fn another_pool(&self) -> Pool {
        pool_for(&self.schema, 16)
    }

    pub async fn client(&self) -> deadpool_postgres::Object {
        self.pool.get().await.expect("a pooled connection")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.client().await.query_one(sql, &[]).await.expect(sql).get(0)
    }

    pub async fn ledger_rows(&self) -> i64 {
        self.count("SELECT count(*) FROM ledger").await
    }

    pub async fn records(&self) -> i64 {
        self.count("SELECT count(*) FROM idempotency_records").await
    }

    /// Waits until none of this test's connections is idle inside a
    /// transaction. Rollbacks of dropped requests run in the background, so
    /// this polls; a connection returned to the pool inside a transaction
    /// stays that way and fails the test.
    pub async fn assert_no_idle_transactions(&self) {
        let admin = connect().await;
        let query = "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = $1 AND state LIKE 'idle in transaction%'";
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let idle: i64 = admin
                .query_one(query, &[&self.schema])
                .await
                .expect("pg_stat_activity")
                .get(0);
            if idle == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{idle} connection(s) of {} left idle in a transaction",
                self.schema
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn drop_schema(self) {
        self.pool.close();
        let admin = connect().await;
        let _ = admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await;
    }
}

fn pool_for(schema: &str, size: usize) -> Pool {
    let mut config: tokio_postgres::Config = database_url()
        .parse()
        .unwrap_or_else(|error| panic!("DATABASE_URL is not a valid Postgres URL: {error}"));
    config.options(format!("-c search_path={schema}"));
    config.application_name(schema);
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(Duration::from_secs(10)))
        .runtime(Runtime::Tokio1)
        .build()
        .expect("build the pool")
}

/// A direct connection for setup and inspection.
pub async fn connect() -> tokio_postgres::Client {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|error| {
        panic!("cannot reach Postgres at {url}: {error}; set DATABASE_URL to a reachable server")
    });
    tokio::spawn(connection);
    client
}

/// The store a shared test body runs against.
pub struct Ctx {
    pub store: Store,
    pub db: Option<TestDb>,
}

impl Ctx {
    pub async fn postgres(name: &str) -> Self {
        let db = TestDb::new(name).await;
        let store = db.store().await.into();
        Self { store, db: Some(db) }
    }

    pub fn memory() -> Self {
        Self {
            store: MemoryStore::new(10_000).into(),
            db: None,
        }
    }

    pub fn layer(&self) -> IdempotencyLayer {
        IdempotencyLayer::new(self.store.clone())
            .source("test")
            .replay_header(http::HeaderName::from_static("x-replayable"))
    }

    /// Ledger rows written through the request transaction (Postgres only).
    pub async fn ledger_rows(&self) -> Option<i64> {
        match &self.db {
            Some(db) => Some(db.ledger_rows().await),
            None => None,
        }
    }

    pub async fn finish(self) {
        if let Some(db) = self.db {
            db.assert_no_idle_transactions().await;
            db.drop_schema().await;
        }
    }
}

/// Runs one test body against the Postgres store and the memory store.
#[macro_export]
macro_rules! both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn postgres() {
                let ctx = $crate::support::Ctx::postgres(concat!(stringify!($name), "_pg")).await;
                super::$name(ctx).await;
            }

            #[tokio::test]
            async fn memory() {
                super::$name($crate::support::Ctx::memory()).await;
            }
        }
    };
}

/// What the probe handler saw, and the gate that holds blocked requests.
#[derive(Clone)]
pub struct Probe {
    pub runs: Arc<AtomicUsize>,
    started_tx: mpsc::UnboundedSender<()>,
    started_rx: Arc<Mutex<mpsc::UnboundedReceiver<()>>>,
    gate: Arc<Semaphore>,
}

impl Default for Probe {
    fn default() -> Self {
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        Self {
            runs: Arc::default(),
            started_tx,
            started_rx: Arc::new(Mutex::new(started_rx)),
            gate: Arc::new(Semaphore::new(0)),
        }
    }
}

impl Probe {
    pub fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    /// Waits until a handler run has started.
    pub async fn started(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.started_rx.lock().await.recv())
            .await
            .expect("a handler run to start")
            .expect("the probe is alive");
    }

    /// Lets every blocked handler (and all later ones) through.
    pub fn open_gate(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    /// An axum app with the probe handler at `/r` behind `layer`.
    pub fn app(&self, layer: IdempotencyLayer) -> Router {
        Router::new()
            .route("/r", post(probe_handler))
            .route_layer(layer)
            .with_state(self.clone())
    }
}

/// The handler under test. Request headers choose what it does:
/// `x-test-status` (default 200), `x-test-block` (wait for the gate),
/// `x-test-panic`, `x-test-decision` (`commit` or `release`),
/// `x-test-body-bytes` (a body of that many bytes instead of `run N`).
/// It writes one ledger row through the request transaction when it has
/// one, and answers with repeated and never-stored headers too.
async fn probe_handler(
    State(probe): State<Probe>,
    tx: Result<Tx, TxError>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let run = probe.runs.fetch_add(1, Ordering::SeqCst) + 1;
    let _ = probe.started_tx.send(());
    if let Ok(tx) = &tx {
        tx.execute("INSERT INTO ledger (body) VALUES ($1)", &[&body.as_ref()])
            .await
            .expect("ledger insert");
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if header("x-test-block").is_some() {
        probe.gate.acquire().await.expect("gate").forget();
    }
    if header("x-test-panic").is_some() {
        panic!("the probe handler was asked to panic");
    }
    let status = header("x-test-status").map_or(StatusCode::OK, |s| s.parse().expect("status"));
    let body = match header("x-test-body-bytes") {
        Some(n) => "x".repeat(n.parse().expect("size")),
        None => format!("run {run}"),
    };
    drop(tx);
    let mut response = (status, body).into_response();
    let response_headers = response.headers_mut();
    response_headers.append("x-replayable", HeaderValue::from_static("a"));
    response_headers.append("x-replayable", HeaderValue::from_static("b"));
    response_headers.append("set-cookie", HeaderValue::from_static("session=1"));
    response_headers.append("x-not-listed", HeaderValue::from_static("1"));
    match header("x-test-decision").as_deref() {
        Some("commit") => {
            response.extensions_mut().insert(ResponseDecision::Commit);
        }
        Some("release") => {
            response.extensions_mut().insert(ResponseDecision::Release);
        }
        _ => {}
    }
    response
}

/// A POST to `/r` with an `Idempotency-Key` and extra headers.
pub fn request(key: Option<&str>, body: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::post("/r");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from(body.to_owned())).expect("request")
}

/// A response with its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn replayed(&self) -> bool {
        self.headers.get("idempotent-replayed").is_some_and(|v| v == "true")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Asserts a problem+json answer and returns its `type`.
    pub fn problem_type(&self) -> String {
        assert_eq!(
            self.headers.get("content-type").map(|v| v.to_str().unwrap()),
            Some("application/problem+json"),
            "{self:?}"
        );
        let value: serde_json::Value = serde_json::from_slice(&self.body).expect("problem json");
        assert_eq!(value["status"], self.status.as_u16(), "{value}");
        value["type"].as_str().expect("type").to_owned()
    }
}

pub async fn send(app: &Router, request: Request<Body>) -> Reply {
    let response = app.clone().oneshot(request).await.expect("infallible");
    read(response).await
}

pub async fn read(response: Response) -> Reply {
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("response body").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}
