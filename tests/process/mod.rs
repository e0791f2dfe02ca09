//! The harness of every test that runs an example (`examples/*.rs`) as a
//! real child process: a schema of the test's own, the example started (and
//! restarted) on it with its settings cleared of inherited values, SIGKILL
//! or another signal, HTTP that reports a transport failure instead of
//! panicking where a killed server is an expected outcome, runs that must
//! exit before serving, and bounded polling of the database.
//!
//! It builds on `tests/support/` (which says which Postgres the tests use),
//! so a test file includes both: `mod process; mod support;`.
//!
//! `cargo test` builds the examples before it runs the tests; a filtered run
//! does not, so rebuild first:
//! `cargo build --examples && cargo test --test crash`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use crate::support::pgbouncer::PoolerRole;
use crate::support::{self, wait_until};

/// How long an example may take to print its `listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound on every request and process wait, so that a hung server fails
/// the test instead of stalling the run.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Every setting the examples read (`examples/common/mod.rs`,
/// `examples/webhook_receiver.rs`, `examples/grpc_payments.rs`): each run
/// starts without them, since inherited values would skew the tests, which
/// set what they need.
pub const EXAMPLE_SETTINGS: [&str; 17] = [
    "DATABASE_URL",
    "DATABASE_DRIVER",
    "DATABASE_POOL_MODE",
    "BIND",
    "MAX_BODY_BYTES",
    "POOL_SIZE",
    "DEMO_FAILURE_RATE",
    "DEMO_HANDLER_DELAY_MS",
    "RECORD_MODE",
    "LEASE_SECS",
    "RECORD_CACHE_TTL_MS",
    "SHUTDOWN_GRACE_MS",
    "STRIPE_WEBHOOK_SECRET",
    "GITHUB_WEBHOOK_SECRET",
    "STANDARD_WEBHOOK_SECRET",
    "PURGE_INTERVAL_MS",
    "STORE_METRICS_INTERVAL_MS",
];

/// The example's Postgres driver (`DATABASE_DRIVER`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Driver {
    TokioPostgres,
    /// Needs a build with the `sqlx` feature.
    Sqlx,
}

impl Driver {
    /// What tells this driver's schemas apart from the other's.
    pub fn suffix(self) -> &'static str {
        match self {
            Driver::TokioPostgres => "",
            Driver::Sqlx => "_sqlx",
        }
    }

    /// The driver `TEST_DATABASE_DRIVER` names (`tokio-postgres` when unset
    /// or empty): how CI runs a whole black-box test file again on sqlx.
    pub fn from_env() -> Self {
        match std::env::var("TEST_DATABASE_DRIVER").as_deref() {
            Ok("sqlx") => Driver::Sqlx,
            Ok("tokio-postgres" | "") | Err(_) => Driver::TokioPostgres,
            Ok(other) => panic!("TEST_DATABASE_DRIVER={other}: expected `tokio-postgres` or `sqlx`"),
        }
    }
}

/// `settings` with `DATABASE_DRIVER` set for `driver`.
pub fn with_driver<'a>(driver: Driver, settings: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut all = settings.to_vec();
    if driver == Driver::Sqlx {
        all.push(("DATABASE_DRIVER", "sqlx"));
    }
    all
}

/// The pool of a started example: several examples share one Postgres.
const TEST_POOL_SIZE: &str = "8";

/// A schema of the test's own, in which the example keeps its ledger and
/// records; its sessions carry the schema's name as `application_name`, so
/// that `pg_stat_activity` can tell them apart. Dropped with the guard.
pub struct Schema {
    pub name: String,
    pub db: tokio_postgres::Client,
    /// Behind PgBouncer ([`Schema::behind_pgbouncer`]): the role of the
    /// schema's name, as which the example connects through it.
    pooler: Option<PoolerRole>,
}

impl Schema {
    pub async fn new(name: &str) -> Self {
        let db = support::connect().await;
        let name = format!("p_{name}_{}", std::process::id());
        db.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"))
            .await
            .unwrap_or_else(|error| panic!("cannot create the schema {name}: {error}"));
        Self { name, db, pooler: None }
    }

    /// A schema that the example reaches through PgBouncer in transaction
    /// mode ([`support::pgbouncer`]), as a role of the same name whose
    /// `search_path` it is: its [`Schema::database_url`] carries no
    /// `options`, which PgBouncer would refuse, and [`Receiver::start`]
    /// sets `DATABASE_POOL_MODE=transaction`.
    pub async fn behind_pgbouncer(name: &str) -> Self {
        let db = support::connect().await;
        let name = format!("p_{name}_{}", std::process::id());
        let role = PoolerRole::create(&name).await;
        Self {
            name,
            db,
            pooler: Some(role),
        }
    }

    /// The example's DATABASE_URL: its tables land in this schema and its
    /// sessions are named after it.
    pub fn database_url(&self) -> String {
        match &self.pooler {
            Some(role) => role.pgbouncer_url(),
            None => support::schema_url(&self.name),
        }
    }

    /// The `DATABASE_POOL_MODE` the example needs on this schema.
    pub fn pool_mode(&self) -> &'static str {
        match &self.pooler {
            Some(_) => "transaction",
            None => "session",
        }
    }

    /// The single `bigint` that `sql` selects, `{schema}` standing for this
    /// schema's name.
    pub async fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("{schema}", &self.name);
        match self.db.query_one(&sql, &[]).await {
            Ok(row) => row.get(0),
            Err(error) => panic!("{sql}: {error}"),
        }
    }

    /// Every ledger row, oldest first.
    pub async fn ledger(&self) -> Vec<LedgerEntry> {
        let sql = format!(
            "SELECT id, source, event_id, event_type, amount_cents FROM {}.ledger_entries ORDER BY id",
            self.name
        );
        let rows = self.db.query(&sql, &[]).await.expect("ledger_entries is readable");
        rows.iter()
            .map(|row| LedgerEntry {
                id: row.get(0),
                source: row.get(1),
                event_id: row.get(2),
                event_type: row.get(3),
                amount_cents: row.get(4),
            })
            .collect()
    }

    /// Every ledger row as a [`ledger_event`], oldest first.
    pub async fn ledger_events(&self) -> Vec<LedgerEvent> {
        self.ledger()
            .await
            .into_iter()
            .map(|e| (e.source, e.event_id, e.event_type, e.amount_cents))
            .collect()
    }

    /// Ledger rows written for one event.
    pub async fn ledger_rows_for(&self, source: &str, event_id: &str) -> i64 {
        let sql = format!(
            "SELECT count(*) FROM {}.ledger_entries WHERE source = $1 AND event_id = $2",
            self.name
        );
        self.db
            .query_one(&sql, &[&source, &event_id])
            .await
            .expect("ledger_entries is readable")
            .get(0)
    }

    /// Events with other than exactly one ledger row, as (event id, rows).
    pub async fn events_not_run_once(&self, source: &str, event_ids: &[String]) -> Vec<(String, i64)> {
        let sql = format!(
            "SELECT e.id, count(l.id) FROM unnest($2::text[]) AS e(id)
             LEFT JOIN {}.ledger_entries l ON l.source = $1 AND l.event_id = e.id
             GROUP BY e.id HAVING count(l.id) <> 1 ORDER BY e.id",
            self.name
        );
        self.db
            .query(&sql, &[&source, &event_ids])
            .await
            .expect("ledger_entries is readable")
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect()
    }

    /// Every idempotency record as [`record`]s, sorted.
    pub async fn records(&self) -> Vec<Record> {
        let sql = format!(
            "SELECT source, event_type, key, state FROM {}.idempotency_records ORDER BY source, event_type, key",
            self.name
        );
        let rows = self.db.query(&sql, &[]).await.expect("idempotency_records is readable");
        rows.iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect()
    }

    /// Every payment's state (the webhook receiver's ordering guard), sorted
    /// by payment id.
    pub async fn payment_states(&self) -> Vec<(String, String)> {
        let sql = format!(
            "SELECT payment_id, status FROM {}.payment_states ORDER BY payment_id",
            self.name
        );
        let rows = self.db.query(&sql, &[]).await.expect("payment_states is readable");
        rows.iter().map(|row| (row.get(0), row.get(1))).collect()
    }

    /// The example's sessions (by `application_name`) in a given state.
    pub async fn sessions(&self, state_like: &str) -> i64 {
        self.db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND state LIKE $2",
                &[&self.name, &state_like],
            )
            .await
            .expect("pg_stat_activity")
            .get(0)
    }

    /// Terminates every session of the example; returns how many.
    pub async fn terminate_sessions(&self) -> i64 {
        self.db
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                &[&self.name],
            )
            .await
            .expect("pg_terminate_backend")
            .get(0)
    }

    /// Waits, at most `bound`, until a handler has written its ledger row
    /// inside the request's transaction and sleeps: its session idle in
    /// that transaction, last query the `INSERT`.
    pub async fn wait_for_the_ledger_write(&self, bound: Duration) {
        wait_until("the handler wrote its ledger row", bound, || async {
            self.count(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = '{schema}' AND state = 'idle in transaction'
                   AND query LIKE 'INSERT INTO ledger_entries%'",
            )
            .await
                == 1
        })
        .await;
    }

    /// Fails if any session of the example stays idle inside a transaction.
    pub async fn assert_no_idle_transactions(&self) {
        support::assert_no_idle_transactions(&self.name).await;
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        if self.pooler.is_some() {
            // The role's guard drops it, and its schema.
            return;
        }
        // A killed example's sessions may still hold locks for a moment.
        let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {} CASCADE", self.name);
        support::execute_detached(sql, REQUEST_TIMEOUT);
    }
}

/// One row of the example's `ledger_entries`.
#[derive(Debug, PartialEq, Eq)]
pub struct LedgerEntry {
    pub id: i64,
    pub source: String,
    pub event_id: String,
    pub event_type: String,
    pub amount_cents: i64,
}

/// What a ledger row says happened: (source, event id, event type, amount
/// in cents).
pub type LedgerEvent = (String, String, String, i64);

pub fn ledger_event(source: &str, event_id: &str, event_type: &str, amount_cents: i64) -> LedgerEvent {
    (
        source.to_owned(),
        event_id.to_owned(),
        event_type.to_owned(),
        amount_cents,
    )
}

/// One idempotency record: (source, event type, key, state).
pub type Record = (String, String, String, i16);

pub fn record(source: &str, event_type: &str, key: &str, state: i16) -> Record {
    (source.to_owned(), event_type.to_owned(), key.to_owned(), state)
}

/// A running example. Dropping it kills the process.
pub struct Receiver {
    pub address: SocketAddr,
    pub pid: u32,
    child: Child,
    stderr: Arc<Mutex<String>>,
    http: Http,
}

impl Receiver {
    /// Starts the webhook receiver on `schema` with the given settings added
    /// to the test defaults (a free port, a pool of 8).
    pub async fn start(schema: &Schema, settings: &[(&str, &str)]) -> Self {
        Self::start_example("webhook_receiver", schema, settings).await
    }

    /// Starts the example `name` the same way.
    pub async fn start_example(name: &str, schema: &Schema, settings: &[(&str, &str)]) -> Self {
        let mut command = example_command(name, &[]);
        command
            .env("DATABASE_URL", schema.database_url())
            .env("DATABASE_POOL_MODE", schema.pool_mode())
            .env("BIND", "127.0.0.1:0")
            .env("POOL_SIZE", TEST_POOL_SIZE);
        // The webhook receiver runs on the driver CI asks for; a test's own
        // DATABASE_DRIVER comes after, and wins.
        if name == "webhook_receiver" {
            command.envs(with_driver(Driver::from_env(), &[]));
        }
        for (name, value) in settings {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start the example {name}: {error}"));
        let pid = child.id().expect("a running child has a pid");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (stderr, stderr_done) = capture(child.stderr.take().expect("stderr is piped"));
        let address = match timeout(STARTUP_TIMEOUT, listening_address(stdout)).await {
            Ok(Some(address)) => address,
            outcome => {
                let why = if outcome.is_ok() {
                    "exited before it was listening"
                } else {
                    "did not start in time"
                };
                let _ = child.start_kill();
                let _ = timeout(REQUEST_TIMEOUT, child.wait()).await;
                // Let a dead example's last words arrive before quoting them.
                let _ = timeout(REQUEST_TIMEOUT, stderr_done).await;
                let text = stderr.lock().map(|text| text.clone()).unwrap_or_default();
                panic!("the example {name} {why}; its stderr:\n{text}");
            }
        };
        let http = Http::new(address);
        Self {
            address,
            pid,
            child,
            stderr,
            http,
        }
    }

    /// Whether the process is still running (it was never restarted).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, then waits for the process to be gone.
    pub async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL the receiver");
        timeout(REQUEST_TIMEOUT, self.child.wait())
            .await
            .expect("the killed receiver exits")
            .expect("wait for the receiver");
    }

    /// Sends `signal` (`TERM`, `INT`, ...), then waits for the process to
    /// exit, at most `bound`; returns how it exited.
    pub async fn stop_with(mut self, signal: &str, bound: Duration) -> std::process::ExitStatus {
        let sent = std::process::Command::new("kill")
            .args(["-s", signal, &self.pid.to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -s {signal} {} failed", self.pid);
        match timeout(bound, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(error)) => panic!("cannot wait for the receiver: {error}"),
            Err(_) => panic!(
                "the receiver did not exit within {bound:?} of SIG{signal}; its stderr:\n{}",
                self.stderr()
            ),
        }
    }

    /// The receiver's log so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|text| text.clone()).unwrap_or_default()
    }

    /// The resident set size of the process, in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).expect("/proc/<pid>/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    /// A cloneable HTTP handle on this receiver whose requests may fail, for
    /// requests sent from other tasks (say, one the test is about to cut off
    /// with SIGKILL).
    pub fn http(&self) -> Http {
        self.http.clone()
    }

    /// One POST, which must be answered: a transport failure fails the test.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        answered(path, self.http.post(path, headers, body).await)
    }

    /// [`Receiver::post`] with header values of their own.
    pub async fn post_with(&self, path: &str, headers: &[(&str, String)], body: impl Into<Bytes>) -> Reply {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
        self.post(path, &headers, body).await
    }

    /// One GET, which must be answered.
    pub async fn get(&self, path: &str) -> Reply {
        answered(path, self.http.send(Method::GET, path, &[], Bytes::new()).await)
    }

    /// Delivers a Stripe-shaped event, which must be answered.
    pub async fn deliver(&self, event_id: &str) -> Reply {
        answered("/webhooks/stripe", self.http.deliver(event_id).await)
    }
}

/// The example `example` started on a new schema named after `name`, with
/// `settings` added to the test defaults.
pub async fn start_on_a_new_schema(example: &str, name: &str, settings: &[(&str, &str)]) -> (Schema, Receiver) {
    let schema = Schema::new(name).await;
    let receiver = Receiver::start_example(example, &schema, settings).await;
    (schema, receiver)
}

fn answered(path: &str, result: Result<Reply, String>) -> Reply {
    result.unwrap_or_else(|error| panic!("{path}: no answer: {error}"))
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let stderr = self.stderr();
        if std::thread::panicking() && !stderr.is_empty() {
            eprintln!("--- the receiver's stderr ---\n{stderr}");
        }
    }
}

/// HTTP to one receiver, never panicking: a killed server is an expected
/// outcome in these tests.
#[derive(Clone)]
pub struct Http {
    pub address: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Http {
    /// HTTP to any server at `address` (a receiver, or a monitoring system
    /// the test runs beside it).
    pub fn new(address: SocketAddr) -> Self {
        Self {
            address,
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(64)
                .build_http(),
        }
    }

    /// One POST; `Err` for a transport failure (a killed server, a refused
    /// connection) or no answer within the request timeout.
    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Result<Reply, String> {
        self.send(Method::POST, path, headers, body.into()).await
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<Reply, String> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.address));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body)).expect("a valid request");
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|error| format!("{error:?}"))?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|error| error.to_string())?.to_bytes();
            Ok::<_, String>(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(result) => result,
            Err(_) => Err(format!("{path}: no answer within {REQUEST_TIMEOUT:?}")),
        }
    }

    /// Delivers a Stripe-shaped event.
    pub async fn deliver(&self, event_id: &str) -> Result<Reply, String> {
        let event = stripe_event(event_id, "charge.succeeded", 100);
        self.post("/webhooks/stripe", &[], event).await
    }
}

/// One HTTP exchange, fully read.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    pub fn content_type(&self) -> Option<&str> {
        self.header(CONTENT_TYPE.as_str())
    }

    pub fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {self:?}"))
    }

    /// Asserts an RFC 9457 problem with this status.
    pub fn assert_problem(&self, status: StatusCode) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.content_type(), Some("application/problem+json"), "{self:?}");
        let problem = self.json();
        assert_eq!(problem["status"], status.as_u16(), "{self:?}");
        assert!(problem["type"].is_string() && problem["title"].is_string(), "{self:?}");
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

/// A Stripe event as the webhook receiver reads it.
pub fn stripe_event(id: &str, event_type: &str, amount: i64) -> String {
    json!({"id": id, "type": event_type, "data": {"object": {"amount": amount}}}).to_string()
}

/// The compiled example `name`: `target/<profile>/examples/<name>`, beside
/// this test binary's `target/<profile>/deps/`. Fails if it is missing or
/// older than its source.
pub fn example_binary(name: &str) -> PathBuf {
    let test_binary = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test_binary
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    let rebuild = format!("run `cargo test` (which builds the examples), or `cargo build --example {name}` first");
    let built = std::fs::metadata(&binary)
        .and_then(|metadata| metadata.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {rebuild}", binary.display()));
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("examples/{name}.rs"));
    if let Ok(edited) = std::fs::metadata(&source).and_then(|metadata| metadata.modified()) {
        assert!(
            edited <= built,
            "{} is older than its source: {rebuild}",
            binary.display()
        );
    }
    binary
}

/// The example `name` with `args`, its settings cleared of inherited
/// values, its output piped, and killed if the test drops it.
pub fn example_command(name: &str, args: &[&str]) -> Command {
    let mut command = Command::new(example_binary(name));
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for setting in EXAMPLE_SETTINGS {
        command.env_remove(setting);
    }
    command
}

/// Runs the example `name` to its exit, on a free port if it does start:
/// for runs that must not start serving, or `--help`.
pub async fn run_to_exit(name: &str, args: &[&str], settings: &[(&str, &str)]) -> std::process::Output {
    let mut command = example_command(name, args);
    command.env("BIND", "127.0.0.1:0");
    for (setting, value) in settings {
        command.env(setting, value);
    }
    match timeout(REQUEST_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => panic!("cannot run the example {name}: {error}"),
        Err(_) => panic!("the example {name} did not exit within {REQUEST_TIMEOUT:?}"),
    }
}

/// Runs the example `name` with `setting=value` and asserts that it refuses
/// to start, exiting with code 2 and naming the setting; returns its stderr.
pub async fn assert_setting_refused(name: &str, setting: &str, value: &str) -> String {
    let output = run_to_exit(name, &[], &[(setting, value)]).await;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(output.status.code(), Some(2), "{name}: {setting}={value}: {stderr}");
    assert!(stderr.contains(setting), "{name}: the error names {setting}: {stderr}");
    stderr
}

/// The example's `--help`.
pub async fn help(name: &str) -> String {
    let output = run_to_exit(name, &["--help"], &[]).await;
    assert!(output.status.success(), "{name} --help: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Reads stdout up to the `listening on ADDRESS` line; `None` if stdout
/// closes first. The rest is drained in the background, so that the
/// example never blocks on a full pipe.
async fn listening_address(stdout: ChildStdout) -> Option<SocketAddr> {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let address = line
            .split_once("listening on ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|address| address.parse().ok());
        if address.is_some() {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return address;
        }
    }
    None
}

/// Collects stderr as it comes, keeping the last 256 KiB, so the pipe never
/// fills and a failing test can show it. The task ends at EOF.
fn capture(stderr: ChildStderr) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut text) = sink.lock() {
                if text.len() > 256 * 1024 {
                    let cut = text.len() - 128 * 1024;
                    let cut = (cut..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(0);
                    text.drain(..cut);
                }
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    (text, task)
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Answers by status, retries included.
    pub statuses: std::collections::BTreeMap<u16, usize>,
    /// Answers that are neither 200 nor a 503 with `Retry-After`, and
    /// transport errors: each a failure.
    pub unexpected: Vec<String>,
    /// Events that never got their 200.
    pub unfinished: Vec<String>,
}

impl LoadReport {
    fn merge(&mut self, other: LoadReport) {
        for (status, count) in other.statuses {
            *self.statuses.entry(status).or_default() += count;
        }
        self.unexpected.extend(other.unexpected);
        self.unfinished.extend(other.unfinished);
    }

    pub fn count(&self, status: u16) -> usize {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    /// Fails unless every answer was a 200 or a 503 with `Retry-After` and
    /// every event got its 200.
    pub fn assert_only_200s_and_503s_and_every_event_done(&self) {
        assert!(self.unexpected.is_empty(), "only 200s and 503s: {:#?}", self.unexpected);
        assert!(
            self.unfinished.is_empty(),
            "every event got its 200: {:?}",
            self.unfinished
        );
    }
}

/// `count` event ids, `<prefix>_<n>`.
pub fn event_ids(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|n| format!("{prefix}_{n}")).collect()
}

/// Delivers `count` fresh events one at a time: each must run at the first
/// try, and exactly once.
pub async fn assert_fresh_events_run_at_the_first_try(
    receiver: &Receiver,
    schema: &Schema,
    prefix: &str,
    count: usize,
) {
    let events = event_ids(prefix, count);
    for event in &events {
        let reply = receiver.deliver(event).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert!(!reply.replayed());
    }
    assert_eq!(schema.events_not_run_once("stripe", &events).await, vec![]);
}

/// Starts delivering every event with `concurrency` workers, each event
/// retried as a provider would until it gets a 200 (the first run or a
/// replay), for at most `give_up` per event. Returns the progress, which
/// counts as it goes so that a test can act at points of progress, and the
/// run, which ends with its report.
pub fn spawn_load(
    http: Http,
    events: Arc<Vec<String>>,
    concurrency: usize,
    give_up: Duration,
) -> (Arc<Progress>, JoinHandle<LoadReport>) {
    let progress = Arc::new(Progress::default());
    let load = tokio::spawn(deliver_all(http, events, concurrency, progress.clone(), give_up));
    (progress, load)
}

async fn deliver_all(
    http: Http,
    events: Arc<Vec<String>>,
    concurrency: usize,
    progress: Arc<Progress>,
    give_up: Duration,
) -> LoadReport {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, events, next, progress) = (http.clone(), events.clone(), next.clone(), progress.clone());
            tokio::spawn(async move {
                let mut report = LoadReport::default();
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    let Some(event) = events.get(index) else {
                        return report;
                    };
                    let deadline = Instant::now() + give_up;
                    loop {
                        match http.deliver(event).await {
                            Ok(reply) => {
                                *report.statuses.entry(reply.status.as_u16()).or_default() += 1;
                                if reply.status == StatusCode::OK {
                                    progress.done.fetch_add(1, Ordering::SeqCst);
                                    break;
                                }
                                if reply.status == StatusCode::SERVICE_UNAVAILABLE {
                                    progress.unavailable.fetch_add(1, Ordering::SeqCst);
                                }
                                let retryable = reply.status == StatusCode::SERVICE_UNAVAILABLE
                                    && reply.headers.contains_key("retry-after");
                                if !retryable {
                                    report.unexpected.push(format!("{event}: {reply:?}"));
                                    break;
                                }
                            }
                            Err(error) => {
                                report.unexpected.push(format!("{event}: transport error {error}"));
                                break;
                            }
                        }
                        if Instant::now() >= deadline {
                            report.unfinished.push(event.clone());
                            break;
                        }
                        // A provider backs off before it retries.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    let mut report = LoadReport::default();
    for worker in workers {
        report.merge(worker.await.expect("a load worker"));
    }
    report
}

/// How far a load run has come, readable while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Events that got their 200.
    pub done: std::sync::atomic::AtomicUsize,
    /// 503 answers so far.
    pub unavailable: std::sync::atomic::AtomicUsize,
}

impl Progress {
    pub fn done(&self) -> usize {
        self.done.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn unavailable(&self) -> usize {
        self.unavailable.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `target` events are done (bounded).
    pub async fn reaches(&self, target: usize, bound: Duration) {
        wait_until(&format!("{target} events are done"), bound, || async {
            self.done() >= target
        })
        .await;
    }
}
