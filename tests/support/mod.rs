//! Shared setup for the tests: the one place that says which Postgres they
//! use (`DATABASE_URL`), a schema per test, a probe handler whose behaviour
//! each request chooses through headers, requests built and read, requests
//! signed as providers sign them ([`signing`]), a proxy on the Postgres
//! wire protocol ([`wire`]) and the PgBouncer in transaction mode that the
//! pooler tests go through ([`pgbouncer`]).
//!
//! Each test file is a crate of its own that includes this module with
//! `mod support;`; what one file does not use is dead code there, hence the
//! `allow` below.
#![allow(dead_code)]

pub mod pgbouncer;
pub mod signing;
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
use tower_idempotency::{IdempotencyLayer, MemoryStore, PoolMode, PostgresStore, ResponseDecision, Store, Tx, TxError};
#[cfg(feature = "sqlx")]
use tower_idempotency::{SqlxStore, SqlxTx};

/// The Postgres the tests use when `DATABASE_URL` is unset or empty.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// `DATABASE_URL`, or [`DEFAULT_DATABASE_URL`] when it is unset or empty.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}

/// [`database_url`] parsed; fails naming DATABASE_URL.
pub fn database_config() -> tokio_postgres::Config {
    database_url()
        .parse()
        .unwrap_or_else(|error| panic!("DATABASE_URL is not a valid Postgres URL: {error}"))
}

/// [`database_url`] with `schema` as the search_path and as the sessions'
/// `application_name`, so that `pg_stat_activity` tells them apart: for
/// child processes, which take a URL.
pub fn schema_url(schema: &str) -> String {
    let url = database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-csearch_path%3D{schema}&application_name={schema}")
}

/// `config` with `schema` as the search_path and its sessions named
/// `application_name`.
pub fn on_schema(mut config: tokio_postgres::Config, schema: &str, application_name: &str) -> tokio_postgres::Config {
    config.options(format!("-c search_path={schema}"));
    config.application_name(application_name);
    config
}

/// A pool of `size` connections made with `config`; `wait` bounds the wait
/// for a free connection (`None`: deadpool's default, no bound).
pub fn pool(config: tokio_postgres::Config, size: usize, wait: Option<Duration>) -> Pool {
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(wait)
        .runtime(Runtime::Tokio1)
        .build()
        .expect("build the pool")
}

/// A direct connection for setup and inspection; fails naming DATABASE_URL.
pub async fn connect() -> tokio_postgres::Client {
    let url = database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|error| {
        panic!(
            "cannot reach Postgres at DATABASE_URL={url} (set DATABASE_URL to a Postgres these tests may \
             create schemas in): {error}"
        )
    });
    tokio::spawn(connection);
    client
}

/// Runs `sql` from synchronous code (a `Drop`), on a thread and a runtime
/// of its own, within `bound`. Failures are ignored: this is cleanup.
pub fn execute_detached(sql: String, bound: Duration) {
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async {
            let Ok((client, connection)) = tokio_postgres::connect(&database_url(), NoTls).await else {
                return;
            };
            tokio::spawn(connection);
            let _ = tokio::time::timeout(bound, client.batch_execute(&sql)).await;
        });
    });
    let _ = cleanup.join();
}

/// A schema of the test's own, reached through a pool whose connections
/// carry the schema's name as `application_name`.
pub struct TestDb {
    pub schema: String,
    /// Direct connections to Postgres: the store's, and the test's own
    /// setup and inspection.
    pub pool: Pool,
    /// Behind PgBouncer ([`TestDb::behind_pgbouncer`]): the role of the
    /// same name as the schema, whose connections through PgBouncer the
    /// store uses instead.
    pooler: Option<pgbouncer::PoolerRole>,
}

/// A schema name of at most 63 bytes for the test `name`: a readable
/// prefix, a hash of the whole name, and the process id.
fn schema_name(name: &str) -> String {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let prefix: String = name.chars().take(32).collect();
    format!("t_{prefix}_{:08x}_{}", hash as u32, std::process::id()).to_lowercase()
}

const CREATE_LEDGER: &str = "CREATE TABLE ledger (id bigserial PRIMARY KEY, body bytea NOT NULL)";

impl TestDb {
    pub async fn new(name: &str) -> Self {
        let schema = schema_name(name);
        let admin = connect().await;
        admin
            .batch_execute(&format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path = {schema};
                 {CREATE_LEDGER};"
            ))
            .await
            .expect("create the test schema");
        let pool = pool_for(&schema, 16);
        Self {
            schema,
            pool,
            pooler: None,
        }
    }

    /// A schema whose store goes through PgBouncer in transaction mode
    /// ([`pgbouncer`]) with [`PoolMode::Transaction`], as a role of the
    /// test's own; [`TestDb::pool`] connects directly, as that role.
    pub async fn behind_pgbouncer(name: &str) -> Self {
        let schema = schema_name(name);
        let role = pgbouncer::PoolerRole::create(&schema).await;
        role.execute_as(CREATE_LEDGER).await;
        Self {
            pool: role.direct_pool(16),
            schema,
            pooler: Some(role),
        }
    }

    /// The pool the store uses: through PgBouncer, or direct.
    pub fn store_pool(&self) -> Pool {
        match &self.pooler {
            Some(role) => role.pgbouncer_pool(16),
            None => self.pool.clone(),
        }
    }

    /// The URL of the store's role through PgBouncer, for child processes
    /// (behind PgBouncer only).
    pub fn pgbouncer_url(&self) -> Option<String> {
        self.pooler.as_ref().map(pgbouncer::PoolerRole::pgbouncer_url)
    }

    /// The pool mode of [`TestDb::store`].
    pub fn pool_mode(&self) -> PoolMode {
        match &self.pooler {
            Some(_) => PoolMode::Transaction,
            None => PoolMode::Session,
        }
    }

    /// The store on [`TestDb::store_pool`], migrated.
    pub async fn store(&self) -> PostgresStore {
        let store = PostgresStore::new(self.store_pool()).with_pool_mode(self.pool_mode());
        store.migrate().await.expect("migrate");
        store
    }

    /// An sqlx pool of `size` connections for the store: on this test's
    /// schema, its sessions named after it; or through PgBouncer, without
    /// a statement cache (sqlx then sends every statement unnamed).
    #[cfg(feature = "sqlx")]
    pub fn sqlx_pool(&self, size: u32) -> sqlx::PgPool {
        match self.pgbouncer_url() {
            Some(url) => {
                let options: sqlx::postgres::PgConnectOptions = url.parse().expect("the PgBouncer URL");
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(size)
                    .acquire_timeout(Duration::from_secs(10))
                    .test_before_acquire(false)
                    .connect_lazy_with(options.statement_cache_capacity(0))
            }
            None => sqlx_pool(&self.schema, size),
        }
    }

    /// An [`SqlxStore`] on a pool of its own ([`TestDb::sqlx_pool`]), in
    /// this database's pool mode, migrated.
    #[cfg(feature = "sqlx")]
    pub async fn sqlx_store(&self) -> SqlxStore {
        let store = SqlxStore::new(self.sqlx_pool(16)).with_pool_mode(self.pool_mode());
        store.migrate().await.expect("migrate through sqlx");
        store
    }

    /// A second, independent pool for the store on the same schema
    /// (another "instance"), through PgBouncer if the store goes through it.
    pub fn another_pool(&self) -> Pool {
        match &self.pooler {
            Some(role) => role.pgbouncer_pool(16),
            None => pool_for(&self.schema, 16),
        }
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

    /// Fails if one of this test's connections stays idle inside a
    /// transaction.
    pub async fn assert_no_idle_transactions(&self) {
        assert_no_idle_transactions(&self.schema).await;
    }

    pub async fn drop_schema(mut self) {
        self.pool.close();
        if let Some(role) = &mut self.pooler {
            role.drop_all().await;
            return;
        }
        let admin = connect().await;
        let _ = admin
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await;
    }
}

/// Fails if a session named `application_name` stays idle inside a
/// transaction: a connection returned to its pool mid-transaction stays that
/// way. Rollbacks of dropped requests run in the background, hence the
/// polling.
pub async fn assert_no_idle_transactions(application_name: &str) {
    let admin = connect().await;
    let query = "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND state LIKE 'idle in transaction%'";
    let bound = Duration::from_secs(5);
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        let idle: i64 = admin
            .query_one(query, &[&application_name])
            .await
            .expect("pg_stat_activity")
            .get(0);
        if idle == 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{idle} session(s) of {application_name} idle in a transaction for {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after
/// `bound`.
pub async fn wait_until<F, Fut>(what: &str, bound: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {bound:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An sqlx pool on `schema` (its search_path and `application_name`),
/// connecting lazily; fails naming DATABASE_URL. It does not ping a
/// connection before handing it out: the layer's pool need not.
#[cfg(feature = "sqlx")]
pub fn sqlx_pool(schema: &str, size: u32) -> sqlx::PgPool {
    sqlx_pool_at(&database_url(), schema, size)
}

/// As [`sqlx_pool`], to the Postgres (or proxy) at `url`.
#[cfg(feature = "sqlx")]
pub fn sqlx_pool_at(url: &str, schema: &str, size: u32) -> sqlx::PgPool {
    let options: sqlx::postgres::PgConnectOptions = url
        .parse()
        .unwrap_or_else(|error| panic!("DATABASE_URL={url} is not a valid Postgres URL: {error}"));
    sqlx_pool_with(options, schema, size)
}

/// As [`sqlx_pool`], with `options` for the server and credentials.
#[cfg(feature = "sqlx")]
pub fn sqlx_pool_with(options: sqlx::postgres::PgConnectOptions, schema: &str, size: u32) -> sqlx::PgPool {
    let options = options.options([("search_path", schema)]).application_name(schema);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

fn pool_for(schema: &str, size: usize) -> Pool {
    pool(
        on_schema(database_config(), schema, schema),
        size,
        Some(Duration::from_secs(10)),
    )
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

    /// The Postgres store on an sqlx pool, on a schema of its own.
    #[cfg(feature = "sqlx")]
    pub async fn sqlx(name: &str) -> Self {
        let db = TestDb::new(name).await;
        let store = db.sqlx_store().await.into();
        Self { store, db: Some(db) }
    }

    /// The sqlx store through PgBouncer in transaction mode.
    #[cfg(feature = "sqlx")]
    pub async fn sqlx_behind_pgbouncer(name: &str) -> Self {
        let db = TestDb::behind_pgbouncer(name).await;
        let store = db.sqlx_store().await.into();
        Self { store, db: Some(db) }
    }

    /// Postgres through PgBouncer in transaction mode, the store in
    /// [`PoolMode::Transaction`].
    pub async fn behind_pgbouncer(name: &str) -> Self {
        let db = TestDb::behind_pgbouncer(name).await;
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

/// Runs one test body against every store: Postgres through
/// tokio-postgres, directly and through PgBouncer in transaction mode; the
/// same through sqlx (with the `sqlx` feature); and the memory store.
#[macro_export]
macro_rules! both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn postgres() {
                let ctx = $crate::support::Ctx::postgres(concat!(stringify!($name), "_pg")).await;
                super::$name(ctx).await;
            }

            #[cfg(feature = "sqlx")]
            #[tokio::test]
            async fn sqlx() {
                let ctx = $crate::support::Ctx::sqlx(concat!(stringify!($name), "_sqlx")).await;
                super::$name(ctx).await;
            }

            #[tokio::test]
            async fn postgres_behind_pgbouncer() {
                let ctx = $crate::support::Ctx::behind_pgbouncer(concat!(stringify!($name), "_pgb")).await;
                super::$name(ctx).await;
            }

            #[cfg(feature = "sqlx")]
            #[tokio::test]
            async fn sqlx_behind_pgbouncer() {
                let ctx = $crate::support::Ctx::sqlx_behind_pgbouncer(concat!(stringify!($name), "_sqlxpgb")).await;
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
    at_gate_tx: mpsc::UnboundedSender<()>,
    at_gate_rx: Arc<Mutex<mpsc::UnboundedReceiver<()>>>,
    gate: Arc<Semaphore>,
}

impl Default for Probe {
    fn default() -> Self {
        let (started_tx, started_rx) = mpsc::unbounded_channel();
        let (at_gate_tx, at_gate_rx) = mpsc::unbounded_channel();
        Self {
            runs: Arc::default(),
            started_tx,
            started_rx: Arc::new(Mutex::new(started_rx)),
            at_gate_tx,
            at_gate_rx: Arc::new(Mutex::new(at_gate_rx)),
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

    /// Waits until a blocked handler run has written its ledger row, had
    /// the answer, and reached the gate.
    pub async fn at_the_gate(&self) {
        tokio::time::timeout(Duration::from_secs(10), self.at_gate_rx.lock().await.recv())
            .await
            .expect("a handler run to reach the gate")
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
    #[cfg(feature = "sqlx")] sqlx_tx: Result<SqlxTx, TxError>,
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
    #[cfg(feature = "sqlx")]
    let sqlx_tx = match sqlx_tx {
        Ok(mut sqlx_tx) => {
            sqlx::query("INSERT INTO ledger (body) VALUES ($1)")
                .bind(body.as_ref())
                .execute(&mut *sqlx_tx)
                .await
                .expect("ledger insert through sqlx");
            Some(sqlx_tx)
        }
        Err(_) => None,
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if header("x-test-block").is_some() {
        let _ = probe.at_gate_tx.send(());
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
    #[cfg(feature = "sqlx")]
    drop(sqlx_tx);
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
