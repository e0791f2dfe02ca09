//! Shared helpers for the tests that run `examples/webhook_receiver.rs` as a
//! real child process and do violent things to it or to its database: a
//! schema of the test's own, the receiver started (and restarted) on it,
//! SIGKILL or another signal, HTTP without panics (a killed server is an expected outcome),
//! and bounded polling of the database.
//!
//! `cargo test` builds the example before it runs the tests; a filtered run
//! does not, so rebuild first:
//! `cargo build --example webhook_receiver && cargo test --test crash`.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};
use tokio::time::{timeout, Instant};
use tokio_postgres::NoTls;

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long the receiver may take to print its `listening on` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound on every request, so that a hung server fails the test.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Settings the tests set themselves; inherited values would skew them.
const SERVER_SETTINGS: [&str; 9] = [
    "BIND",
    "MAX_BODY_BYTES",
    "DEMO_FAILURE_RATE",
    "DEMO_HANDLER_DELAY_MS",
    "POOL_SIZE",
    "DATABASE_URL",
    "RECORD_MODE",
    "LEASE_SECS",
    "SHUTDOWN_GRACE_MS",
];

pub fn base_database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}

/// A direct connection for setup and inspection; fails naming DATABASE_URL.
pub async fn connect_database() -> tokio_postgres::Client {
    let url = base_database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|error| {
        panic!(
            "cannot reach Postgres at DATABASE_URL={url} (set DATABASE_URL to a Postgres these tests may \
             create schemas in): {error}"
        )
    });
    tokio::spawn(connection);
    client
}

/// Polls `condition` every 20 ms until it holds; panics with `what` after
/// `bound`.
pub async fn wait_until<F, Fut>(what: &str, bound: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {bound:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A schema of the test's own, in which the receiver keeps its ledger and
/// records; its sessions carry the schema's name as `application_name`, so
/// that `pg_stat_activity` can tell them apart. Dropped with the guard.
pub struct Schema {
    pub name: String,
    pub db: tokio_postgres::Client,
}

impl Schema {
    pub async fn new(name: &str) -> Self {
        let db = connect_database().await;
        let name = format!("p_{name}_{}", std::process::id());
        db.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"))
            .await
            .unwrap_or_else(|error| panic!("cannot create the schema {name}: {error}"));
        Self { name, db }
    }

    /// The receiver's DATABASE_URL: its tables land in this schema and its
    /// sessions are named after it.
    pub fn database_url(&self) -> String {
        let url = base_database_url();
        let separator = if url.contains('?') { '&' } else { '?' };
        format!(
            "{url}{separator}options=-csearch_path%3D{name}&application_name={name}",
            name = self.name
        )
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let sql = sql.replace("{schema}", &self.name);
        match self.db.query_one(&sql, &[]).await {
            Ok(row) => row.get(0),
            Err(error) => panic!("{sql}: {error}"),
        }
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

    /// The receiver's sessions (by `application_name`) in a given state.
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

    /// Terminates every session of the receiver; returns how many.
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
}

impl Drop for Schema {
    fn drop(&mut self) {
        drop_schema(self.name.clone());
    }
}

/// Drops a schema from synchronous code (a `Drop`), on a thread of its own.
fn drop_schema(schema: String) {
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async {
            let Ok((client, connection)) = tokio_postgres::connect(&base_database_url(), NoTls).await else {
                return;
            };
            tokio::spawn(connection);
            let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE");
            let _ = timeout(REQUEST_TIMEOUT, client.batch_execute(&sql)).await;
        });
    });
    let _ = cleanup.join();
}

/// A running receiver. Dropping it kills the process.
pub struct Receiver {
    pub address: SocketAddr,
    pub pid: u32,
    child: Child,
    stderr: Arc<Mutex<String>>,
    http: Http,
}

impl Receiver {
    /// Starts the receiver on `schema` with the given settings added to the
    /// test defaults (a free port, a pool of 8).
    pub async fn start(schema: &Schema, settings: &[(&str, &str)]) -> Self {
        Self::start_example("webhook_receiver", schema, settings).await
    }

    /// Starts the example `name` the same way.
    pub async fn start_example(name: &str, schema: &Schema, settings: &[(&str, &str)]) -> Self {
        let mut command = Command::new(named_example_binary(name));
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for name in SERVER_SETTINGS {
            command.env_remove(name);
        }
        command
            .env("DATABASE_URL", schema.database_url())
            .env("BIND", "127.0.0.1:0")
            .env("POOL_SIZE", "8");
        for (name, value) in settings {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start the example server: {error}"));
        let pid = child.id().expect("a running child has a pid");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = capture(child.stderr.take().expect("stderr is piped"));
        let address = match timeout(STARTUP_TIMEOUT, listening_address(stdout)).await {
            Ok(Some(address)) => address,
            _ => {
                let _ = child.start_kill();
                let _ = timeout(REQUEST_TIMEOUT, child.wait()).await;
                let text = stderr.lock().map(|text| text.clone()).unwrap_or_default();
                panic!("the example server did not start; its stderr:\n{text}");
            }
        };
        let http = Http {
            address,
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(64)
                .build_http(),
        };
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

    /// A cloneable HTTP handle on this receiver, for requests sent from
    /// other tasks (say, one the test is about to cut off with SIGKILL).
    pub fn http(&self) -> Http {
        self.http.clone()
    }

    pub async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Result<Reply, String> {
        self.http.post(path, headers, body).await
    }

    pub async fn deliver(&self, event_id: &str) -> Result<Reply, String> {
        self.http.deliver(event_id).await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("--- the receiver's stderr ---\n{}", self.stderr());
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
        self.post("/webhooks/stripe", &[], stripe_event(event_id)).await
    }
}

/// One HTTP exchange, fully read.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|value| value == "true")
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {self:?}"))
    }

    pub fn problem_type(&self) -> Option<String> {
        let value: Value = serde_json::from_slice(&self.body).ok()?;
        value["type"].as_str().map(str::to_owned)
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

pub fn stripe_event(id: &str) -> String {
    json!({"id": id, "type": "charge.succeeded", "data": {"object": {"amount": 100}}}).to_string()
}

/// The compiled webhook receiver example.
pub fn example_binary() -> PathBuf {
    named_example_binary("webhook_receiver")
}

/// A compiled example, beside this test binary's `deps/` folder.
pub fn named_example_binary(name: &str) -> PathBuf {
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

/// Reads stdout up to the `listening on ADDRESS` line, then drains the rest
/// in the background.
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
/// fills and a failing test can show it.
fn capture(stderr: tokio::process::ChildStderr) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    tokio::spawn(async move {
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
    text
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
}

/// Delivers every event with `concurrency` workers, each event retried as a
/// provider would until it gets a 200 (the first run or a replay), for at
/// most `give_up` per event. `progress` counts as it goes, so a test can act
/// at points of progress.
pub async fn deliver_all(
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

impl Schema {
    /// Fails if any session of the receiver stays idle inside a transaction
    /// (a connection returned to its pool mid-transaction stays that way).
    pub async fn assert_no_idle_transactions(&self) {
        let bound = Duration::from_secs(5);
        let deadline = Instant::now() + bound;
        loop {
            let idle = self.sessions("idle in transaction%").await;
            if idle == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{idle} session(s) of {} idle in a transaction for {bound:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
