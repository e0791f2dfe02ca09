//! `PoolMode::Transaction`: what the store and the ordering guard send, seen
//! on the wire (no named prepared statement, nothing session-scoped), and
//! what they do behind a real PgBouncer in transaction mode (operations,
//! migrations, the ordering guard, the per-transaction statement timeout,
//! and the message that names the setting when it is missing).
//!
//! PgBouncer is `PGBOUNCER_URL`'s, or one the tests start
//! (`tests/support/pgbouncer.rs`).

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use deadpool_postgres::Pool;
use futures_util::future::join_all;
use http::StatusCode;
use support::pgbouncer::PoolerRole;
use support::wire::{proxied_config, upstream, FrontendParser};
use support::{on_schema, pool, request, send, Probe, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_postgres::NoTls;
use tower_idempotency::{
    Deletion, IdempotencyLayer, Mode, OrderingGuard, PoolMode, PostgresStore, StoreError, Transition, Tx,
};

// ---------------------------------------------------------------------------
// On the wire

/// What a client sent that a transaction-mode pooler cannot carry from one
/// transaction to the next.
#[derive(Debug, Default)]
struct SessionState {
    /// Named statements parsed, bound, described or closed.
    named_statements: Vec<String>,
    /// Simple-query statements that set or hold something for the session:
    /// a `SET` without `LOCAL`, a session advisory lock, `LISTEN`, a
    /// temporary table, `PREPARE`.
    session_statements: Vec<String>,
    /// Statements seen, all kinds: the witness saw the workload.
    statements: usize,
}

impl SessionState {
    fn record(&mut self, frame: &support::wire::Frame) {
        match frame.kind {
            b'P' => {
                if let Some((name, sql)) = frame.parsed_statement() {
                    self.statements += 1;
                    if !name.is_empty() {
                        self.named_statements.push(format!("Parse {name}: {sql}"));
                    }
                    self.check_sql(sql);
                }
            }
            b'B' => {
                if let Some(name) = frame.bound_statement().filter(|name| !name.is_empty()) {
                    self.named_statements.push(format!("Bind {name}"));
                }
            }
            b'Q' => {
                let text = String::from_utf8_lossy(&frame.body).trim_end_matches('\0').to_owned();
                for statement in text.split(';') {
                    self.statements += 1;
                    self.check_sql(statement);
                }
            }
            _ => {}
        }
    }

    fn check_sql(&mut self, sql: &str) {
        let statement = sql.trim().to_uppercase();
        let session_scoped = (statement.starts_with("SET ") && !statement.starts_with("SET LOCAL "))
            || statement.contains("PG_ADVISORY_LOCK(")
            || statement.contains("PG_TRY_ADVISORY_LOCK(")
            || statement.starts_with("LISTEN")
            || statement.starts_with("PREPARE")
            || statement.contains("TEMPORARY TABLE")
            || statement.contains("TEMP TABLE");
        if session_scoped {
            self.session_statements.push(sql.trim().to_owned());
        }
    }
}

/// A proxy to Postgres that records what its clients send.
async fn recording_proxy() -> (u16, Arc<Mutex<SessionState>>) {
    let seen = Arc::new(Mutex::new(SessionState::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
    let port = listener.local_addr().expect("the proxy's address").port();
    let (host, upstream_port) = upstream();
    tokio::spawn({
        let seen = seen.clone();
        async move {
            while let Ok((client, _)) = listener.accept().await {
                let server = TcpStream::connect((host.as_str(), upstream_port))
                    .await
                    .expect("reach Postgres from the proxy");
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let seen = seen.clone();
                tokio::spawn(async move {
                    let mut parser = FrontendParser::default();
                    let mut buffer = vec![0_u8; 64 * 1024];
                    while let Ok(read) = client_read.read(&mut buffer).await {
                        if read == 0 {
                            break;
                        }
                        for frame in parser.frames(&buffer[..read]) {
                            seen.lock().expect("seen").record(&frame);
                        }
                        if server_write.write_all(&buffer[..read]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown().await;
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                });
            }
        }
    });
    (port, seen)
}

fn payment_states(mode: PoolMode) -> OrderingGuard {
    OrderingGuard::new("payment_states", "payment_id")
        .expect("a valid guard")
        .then(["created"])
        .then(["processing"])
        .terminal(["succeeded", "canceled"])
        .with_pool_mode(mode)
}

/// Everything the store and the guard do, through `pool`: a migration,
/// transaction-mode claims (first runs, replays, a released run, the
/// guard in the handler's transaction), lease-mode claims, and the
/// operations.
async fn exercise(pool: Pool, mode: PoolMode) {
    let store = PostgresStore::new(pool.clone())
        .with_pool_mode(mode)
        .with_statement_timeout(Duration::from_secs(5));
    store.migrate().await.expect("migrate");
    let guard = payment_states(mode);
    guard
        .create_table(&mut pool.get().await.expect("a connection"))
        .await
        .expect("create payment_states");

    let app = Router::new()
        .route(
            "/r",
            post(move |tx: Tx, body: String| {
                let guard = guard.clone();
                async move {
                    match guard.advance(&tx, "pi_1", &body).await {
                        Ok(_) => StatusCode::OK.into_response(),
                        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response(),
                    }
                }
            }),
        )
        .route_layer(IdempotencyLayer::new(store.clone()).source("wire"));
    for (key, body) in [
        ("k1", "created"),
        ("k1", "created"),
        ("k2", "succeeded"),
        ("k3", "processing"),
    ] {
        let reply = send(&app, request(Some(key), body, &[])).await;
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    let released = send(&app, request(Some("k4"), "refunded", &[])).await;
    assert_eq!(released.status, StatusCode::SERVICE_UNAVAILABLE, "an undeclared state");

    let probe = Probe::default();
    let lease = probe.app(IdempotencyLayer::new(store.clone()).source("lease").mode(Mode::Lease {
        lease: Duration::from_secs(30),
        renew_every: Duration::from_millis(5),
    }));
    for (key, status) in [("l1", "200"), ("l1", "200"), ("l2", "500")] {
        send(&lease, request(Some(key), "{}", &[("x-test-status", status)])).await;
    }
    assert_eq!(probe.runs(), 2);

    store.stats().await.expect("stats");
    store.count_expired().await.expect("count_expired");
    store.purge_expired(10).await.expect("purge_expired");
    assert!(store.record("wire", "", "k1").await.expect("record").is_some());
    assert_eq!(
        store
            .delete_record("wire", "", "k2", false)
            .await
            .expect("delete_record"),
        Deletion::Deleted
    );
}

#[tokio::test]
async fn transaction_pool_mode_sends_no_named_statement_and_nothing_session_scoped() {
    for mode in [PoolMode::Transaction, PoolMode::Session] {
        let db = TestDb::new(&format!("pool_mode_wire_{mode:?}")).await;
        let (port, seen) = recording_proxy().await;
        exercise(
            pool(on_schema(proxied_config(port), &db.schema, &db.schema), 4, None),
            mode,
        )
        .await;

        let seen = std::mem::take(&mut *seen.lock().unwrap());
        assert!(seen.statements > 20, "{mode:?}: the witness saw the workload: {seen:?}");
        assert_eq!(seen.session_statements, Vec::<String>::new(), "{mode:?}");
        match mode {
            PoolMode::Transaction => assert_eq!(seen.named_statements, Vec::<String>::new()),
            // The witness tells them apart: session mode keeps its
            // request path prepared.
            _ => assert!(!seen.named_statements.is_empty(), "{seen:?}"),
        }
        db.drop_schema().await;
    }
}

// ---------------------------------------------------------------------------
// Behind PgBouncer

/// A plain connection through PgBouncer, as `role`.
async fn pgbouncer_client(role: &PoolerRole) -> tokio_postgres::Client {
    let (client, connection) = role
        .pgbouncer_config()
        .connect(NoTls)
        .await
        .unwrap_or_else(|error| panic!("cannot reach PgBouncer as {}: {error}", role.name));
    tokio::spawn(connection);
    client
}

/// Runs `operation` (whose statements a session-mode client prepares once
/// and then reuses) while another client holds the server connection it
/// last ran on in an open transaction, until it fails: PgBouncer reuses its
/// most recently used server connection first, so the held one is,
/// normally at once, the one where the statement was prepared.
async fn fails_on_another_server_connection<F, Fut, E>(role: &PoolerRole, mut operation: F) -> E
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let holder = pgbouncer_client(role).await;
    for _ in 0..50 {
        if let Err(error) = operation().await {
            return error;
        }
        holder
            .batch_execute("BEGIN; SELECT 1")
            .await
            .expect("hold a server connection");
        let outcome = operation().await;
        holder.batch_execute("ROLLBACK").await.expect("let it go");
        if let Err(error) = outcome {
            return error;
        }
    }
    panic!("a session-mode client behind PgBouncer never lost its prepared statement");
}

#[tokio::test]
async fn a_session_mode_store_behind_pgbouncer_names_the_pool_mode_setting() {
    let mut role = PoolerRole::create(&format!("pm_hint_{}", std::process::id())).await;
    PostgresStore::new(role.direct_pool(1))
        .migrate()
        .await
        .expect("migrate");
    let store = PostgresStore::new(role.pgbouncer_pool(1));

    let error: StoreError =
        fails_on_another_server_connection(&role, || async { store.purge_expired(10).await.map(|_| ()) }).await;

    let message = error.to_string();
    assert!(message.contains("26000"), "{message}");
    assert!(
        message.contains("PostgresStore::with_pool_mode(PoolMode::Transaction)"),
        "the error names the setting: {message}"
    );
    assert!(message.contains("DATABASE_POOL_MODE=transaction"), "{message}");
    // The same store in transaction mode, on the same pooler, is fine.
    let store = PostgresStore::new(role.pgbouncer_pool(1)).with_pool_mode(PoolMode::Transaction);
    let holder = pgbouncer_client(&role).await;
    for _ in 0..5 {
        store.purge_expired(10).await.expect("purge in transaction mode");
        holder.batch_execute("BEGIN; SELECT 1").await.unwrap();
        store.purge_expired(10).await.expect("purge in transaction mode");
        holder.batch_execute("ROLLBACK").await.unwrap();
    }
    role.drop_all().await;
}

#[tokio::test]
async fn a_session_mode_ordering_guard_behind_pgbouncer_names_its_pool_mode_setting() {
    let mut role = PoolerRole::create(&format!("pm_guard_hint_{}", std::process::id())).await;
    let pool = role.pgbouncer_pool(1);
    let guard = payment_states(PoolMode::Session);
    guard
        .create_table(&mut pool.get().await.unwrap())
        .await
        .expect("create");

    let error = fails_on_another_server_connection(&role, || async {
        let client = pool.get().await.expect("a connection");
        guard.advance(&client, "pi_1", "created").await.map(|_| ())
    })
    .await;

    let message = error.to_string();
    assert!(message.contains("26000"), "{message}");
    assert!(
        message.contains("OrderingGuard::with_pool_mode(PoolMode::Transaction)"),
        "{message}"
    );
    role.drop_all().await;
}

#[tokio::test]
async fn migrations_from_many_instances_at_once_behind_pgbouncer() {
    let mut role = PoolerRole::create(&format!("pm_migrate_{}", std::process::id())).await;
    let stores: Vec<PostgresStore> = (0..8)
        .map(|_| PostgresStore::new(role.pgbouncer_pool(2)).with_pool_mode(PoolMode::Transaction))
        .collect();

    let migrations = join_all(stores.iter().map(PostgresStore::migrate)).await;

    for migration in migrations {
        migration.expect("every instance migrates");
    }
    // Once the table exists, a migration only checks it.
    stores[0].migrate().await.expect("a later start");
    let direct = role.direct_pool(1);
    let tables: i64 = direct
        .get()
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'idempotency_records'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 1);
    role.drop_all().await;
}

#[tokio::test]
async fn operations_behind_pgbouncer_in_transaction_mode() {
    let db = TestDb::behind_pgbouncer("pool_mode_operations").await;
    let store = db.store().await;
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store.clone()).source("ops"));
    let expired = probe.app(
        IdempotencyLayer::new(store.clone())
            .source("ops")
            .retention(Duration::ZERO),
    );
    for key in ["a", "b", "c"] {
        send(&app, request(Some(key), "{}", &[("x-test-status", "201")])).await;
    }
    for key in ["old1", "old2"] {
        send(&expired, request(Some(key), "{}", &[])).await;
    }
    db.client()
        .await
        .batch_execute(
            "INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, claim_token, locked_until, expires_at)
             VALUES ('ops', '', 'busy', '\\x00', 1, gen_random_uuid(), now() + interval '1 hour', now() + interval '1 day')",
        )
        .await
        .expect("an open claim");

    // Concurrently, so that they run on several server connections.
    let (stats, expired_count, record, missing) = tokio::join!(
        store.stats(),
        store.count_expired(),
        store.record("ops", "", "a"),
        store.record("ops", "", "nope"),
    );
    let stats = stats.expect("stats");
    assert_eq!(
        (stats.completed, stats.in_flight, stats.expired_awaiting_purge),
        (3, 1, 2)
    );
    assert_eq!(expired_count.expect("count_expired"), 2);
    let record = record.expect("record").expect("a record");
    assert_eq!(record.state, "completed");
    assert_eq!(record.response_status, Some(201));
    assert_eq!(record.response_body.as_deref(), Some(&b"run 1"[..]));
    assert!(missing.expect("record").is_none());

    let (deleted, in_flight, not_found, purged) = tokio::join!(
        store.delete_record("ops", "", "b", false),
        store.delete_record("ops", "", "busy", false),
        store.delete_record("ops", "", "nope", false),
        store.purge_expired(1),
    );
    assert_eq!(deleted.expect("delete"), Deletion::Deleted);
    assert_eq!(in_flight.expect("delete"), Deletion::InFlight);
    assert_eq!(not_found.expect("delete"), Deletion::NotFound);
    assert_eq!(purged.expect("purge"), 2, "in batches of one");
    let stats = store.stats().await.expect("stats");
    assert_eq!(
        (stats.completed, stats.in_flight, stats.expired_awaiting_purge),
        (2, 1, 0)
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn the_ordering_guard_behind_pgbouncer_keeps_the_furthest_state() {
    let mut role = PoolerRole::create(&format!("pm_guard_{}", std::process::id())).await;
    let pool = role.pgbouncer_pool(8);
    let guard = payment_states(PoolMode::Transaction);
    guard
        .create_table(&mut pool.get().await.unwrap())
        .await
        .expect("create");
    let statuses = ["created", "processing", "succeeded", "processing", "created"];

    let transitions = join_all((0..32).map(|n| {
        let (pool, guard) = (pool.clone(), guard.clone());
        async move {
            let client = pool.get().await.expect("a connection");
            guard.advance(&client, "pi_1", statuses[n % statuses.len()]).await
        }
    }))
    .await;

    for transition in transitions {
        transition.expect("every advance applies or is ignored");
    }
    let client = pool.get().await.unwrap();
    let current = guard.advance(&client, "pi_1", "processing").await.expect("advance");
    assert_eq!(
        current,
        Transition::Ignored {
            current: "succeeded".to_owned()
        }
    );
    let forced = guard.force(&client, "pi_1", "created", "test").await.expect("force");
    assert_eq!(
        forced,
        Transition::Overridden {
            previous: Some("succeeded".to_owned())
        }
    );
    role.drop_all().await;
}

/// A handler whose statement outlasts the store's statement timeout: the
/// server cancels it (57014) and the handler answers 503 with the code.
fn slow_handler_app(store: PostgresStore) -> Router {
    Router::new()
        .route(
            "/r",
            post(|tx: Tx| async move {
                match tx.batch_execute("SELECT pg_sleep(5)").await {
                    Ok(()) => StatusCode::OK.into_response(),
                    Err(error) => {
                        let code = error.code().map(|code| code.code().to_owned()).unwrap_or_default();
                        (StatusCode::SERVICE_UNAVAILABLE, code).into_response()
                    }
                }
            }),
        )
        .route_layer(IdempotencyLayer::new(store).source("slow"))
}

#[tokio::test]
async fn the_statement_timeout_cancels_a_slow_request_transaction_and_ends_with_it() {
    // Directly, where the pool's one connection is one server session: the
    // setting must not outlive the transaction on it.
    let db = TestDb::new("pool_mode_statement_timeout").await;
    let pool = support::pool(on_schema(support::database_config(), &db.schema, &db.schema), 1, None);
    let before: String = pool
        .get()
        .await
        .unwrap()
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    let store = PostgresStore::new(pool.clone()).with_statement_timeout(Duration::from_millis(200));
    store.migrate().await.unwrap();

    let reply = send(&slow_handler_app(store), request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.text(), "57014", "query_canceled by the statement timeout");
    let after: String = pool
        .get()
        .await
        .unwrap()
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(after, before, "SET LOCAL ended with the transaction");
    db.drop_schema().await;

    // Behind PgBouncer, in transaction mode.
    let mut role = PoolerRole::create(&format!("pm_timeout_{}", std::process::id())).await;
    let store = PostgresStore::new(role.pgbouncer_pool(2))
        .with_pool_mode(PoolMode::Transaction)
        .with_statement_timeout(Duration::from_millis(200));
    store.migrate().await.unwrap();

    let reply = send(&slow_handler_app(store.clone()), request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{reply:?}");
    assert_eq!(reply.text(), "57014");
    // A statement outside a request transaction is not bounded by it.
    let client = pgbouncer_client(&role).await;
    client
        .batch_execute("SELECT pg_sleep(0.4)")
        .await
        .expect("no timeout outside the request transaction");
    role.drop_all().await;
}

/// `idempotency-admin` with `DATABASE_POOL_MODE=transaction`, through
/// PgBouncer.
#[cfg(feature = "admin")]
#[tokio::test]
async fn idempotency_admin_works_behind_pgbouncer_in_transaction_mode() {
    let db = TestDb::behind_pgbouncer("pool_mode_admin").await;
    let store = db.store().await;
    let probe = Probe::default();
    let expired = probe.app(
        IdempotencyLayer::new(store.clone())
            .source("stripe")
            .retention(Duration::ZERO),
    );
    let kept = probe.app(IdempotencyLayer::new(store).source("stripe"));
    send(&expired, request(Some("old"), "{}", &[])).await;
    send(&kept, request(Some("evt_1"), "{}", &[("x-test-status", "201")])).await;
    let url = db.pgbouncer_url().expect("behind PgBouncer");
    let admin = |args: &[&str], mode: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_idempotency-admin"))
            .args(args)
            .env("DATABASE_URL", &url)
            .env("DATABASE_POOL_MODE", mode)
            .output()
            .expect("run idempotency-admin");
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (output.status.code(), text(&output.stdout), text(&output.stderr))
    };

    let (code, stats, stderr) = admin(&["stats", "--json"], "transaction");
    assert_eq!(code, Some(0), "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("stats as JSON");
    assert_eq!(
        (stats["completed"].as_i64(), stats["expired_awaiting_purge"].as_i64()),
        (Some(1), Some(1))
    );
    let (code, shown, stderr) = admin(&["show", "stripe", "", "evt_1", "--json"], "transaction");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(shown.contains("\"completed\""), "{shown}");
    let (code, purged, stderr) = admin(&["purge"], "transaction");
    assert_eq!((code, purged.trim()), (Some(0), "purged 1 expired records"), "{stderr}");
    let (code, deleted, stderr) = admin(&["delete", "stripe", "", "evt_1"], "transaction");
    assert_eq!((code, deleted.trim()), (Some(0), "deleted"), "{stderr}");
    let (code, _, stderr) = admin(&["stats"], "pgbouncer");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("DATABASE_POOL_MODE"), "{stderr}");
    db.drop_schema().await;
}
