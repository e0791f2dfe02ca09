//! How many statements and round trips each path costs, counted on the wire.
//!
//! A small TCP proxy sits between the store's pool and Postgres and reads
//! the frontend protocol: after the startup packet every message is one type
//! byte and a 4-byte length, so Parse, Bind, Execute, Query and Sync can be
//! counted exactly. A round trip is a burst of client messages that follows
//! data from the server (or opens the connection's conversation): messages
//! pipelined without waiting for an answer are one round trip.
//!
//! The handler here touches no database, so every count is the layer's own.
//! Each path is counted for both drivers, from the same test bodies: the
//! tokio-postgres store and (with the `sqlx` feature) the sqlx store, whose
//! counts are the same. sqlx's pool adds one thing of its own: when a
//! connection goes back to the pool, it sends a lone Sync and waits for the
//! answer (a "ping", off the response path); those are counted apart.
//! Run with `--nocapture` to see the table that BENCHMARKS.md quotes.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use axum::Router;
use deadpool_postgres::Pool;
use http::StatusCode;
use support::wire::{pool_through, upstream, FrontendParser};
use support::{request, send, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tower_idempotency::{IdempotencyLayer, Mode, PostgresStore, Store};

/// What crossed the proxy since the last reset.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Counts {
    /// Frontend messages by type byte (`P`arse, `B`ind, `E`xecute, `Q`uery,
    /// `S`ync, ...).
    messages: BTreeMap<char, u32>,
    /// Statements inside simple Query messages (one may carry several).
    query_statements: u32,
    round_trips: u32,
    /// Bursts of a lone Sync: sqlx's pool pinging a connection it takes
    /// back (or, with `test_before_acquire`, hands out).
    pings: u32,
}

impl Counts {
    fn get(&self, kind: char) -> u32 {
        self.messages.get(&kind).copied().unwrap_or(0)
    }

    /// Statements the server ran: each Execute of a prepared statement and
    /// each statement of a simple Query.
    fn statements(&self) -> u32 {
        self.get('E') + self.query_statements
    }

    fn parses(&self) -> u32 {
        self.get('P')
    }
}

/// Per proxied connection: whether the server has spoken since the client's
/// last burst.
#[derive(Default)]
struct Wire {
    counts: Counts,
    server_spoke: BTreeMap<u64, bool>,
}

#[derive(Clone, Default)]
struct Meter(Arc<Mutex<Wire>>);

impl Meter {
    fn reset(&self) {
        let mut wire = self.0.lock().unwrap();
        wire.counts = Counts::default();
        for spoke in wire.server_spoke.values_mut() {
            *spoke = true;
        }
    }

    fn counts(&self) -> Counts {
        self.0.lock().unwrap().counts.clone()
    }

    fn client_burst(&self, connection: u64, messages: &[(u8, u32)]) {
        let mut wire = self.0.lock().unwrap();
        let lone_sync = messages == [(b'S', 0)];
        let spoke = wire.server_spoke.entry(connection).or_insert(true);
        if std::mem::replace(spoke, false) {
            if lone_sync {
                wire.counts.pings += 1;
            } else {
                wire.counts.round_trips += 1;
            }
        }
        for (kind, statements) in messages {
            *wire.counts.messages.entry(*kind as char).or_default() += 1;
            wire.counts.query_statements += statements;
        }
    }

    fn server_data(&self, connection: u64) {
        self.0.lock().unwrap().server_spoke.insert(connection, true);
    }
}

/// Listens on a free port and relays each connection to `upstream`.
async fn start_proxy(upstream: (String, u16), meter: Meter) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut next_id = 0_u64;
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            let server = TcpStream::connect((upstream.0.as_str(), upstream.1))
                .await
                .expect("reach Postgres from the proxy");
            next_id += 1;
            tokio::spawn(relay(next_id, client, server, meter.clone()));
        }
    });
    port
}

async fn relay(id: u64, client: TcpStream, server: TcpStream, meter: Meter) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream_meter = meter.clone();
    let upstream = async move {
        let mut parser = FrontendParser::default();
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            let read = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let kinds = parser.feed(&buffer[..read]);
            upstream_meter.client_burst(id, &kinds);
            if server_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = server_write.shutdown().await;
    };
    let downstream = async move {
        let mut buffer = vec![0_u8; 64 * 1024];
        loop {
            let read = match server_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            meter.server_data(id);
            if client_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upstream, downstream);
}

/// A layer whose handler answers 200 without touching the database.
fn app(store: impl Into<Store>, mode: Mode) -> Router {
    Router::new()
        .route("/r", post(|| async { "done" }))
        .route_layer(IdempotencyLayer::new(store).source("rt").mode(mode))
}

/// The driver under test: its pool through the proxy, and stores on it.
#[derive(Clone)]
enum Driver {
    TokioPostgres(Pool),
    #[cfg(feature = "sqlx")]
    Sqlx(sqlx::PgPool),
    /// sqlx as behind a transaction-mode pooler: the store in
    /// `PoolMode::Transaction`, the pool without a statement cache.
    #[cfg(feature = "sqlx")]
    SqlxPoolModeTransaction(sqlx::PgPool),
}

impl Driver {
    fn tokio_postgres(port: u16, schema: &str) -> Self {
        Driver::TokioPostgres(pool_through(port, schema, 1))
    }

    #[cfg(feature = "sqlx")]
    fn sqlx(port: u16, schema: &str) -> Self {
        Driver::Sqlx(support::wire::sqlx_pool_through(port, schema, 1))
    }

    #[cfg(feature = "sqlx")]
    fn sqlx_pool_mode_transaction(port: u16, schema: &str) -> Self {
        Driver::SqlxPoolModeTransaction(support::wire::sqlx_pool_through(port, schema, 1))
    }

    /// A store of another instance on the same pool, with the record cache
    /// when `cache` says so.
    fn store(&self, cache: bool) -> Store {
        let ttl = Duration::from_secs(60);
        match self {
            Driver::TokioPostgres(pool) => {
                let store = PostgresStore::new(pool.clone());
                if cache { store.with_cache(1 << 20, ttl) } else { store }.into()
            }
            #[cfg(feature = "sqlx")]
            Driver::Sqlx(pool) | Driver::SqlxPoolModeTransaction(pool) => {
                let mut store = tower_idempotency::SqlxStore::new(pool.clone());
                if let Driver::SqlxPoolModeTransaction(_) = self {
                    store = store.with_pool_mode(tower_idempotency::PoolMode::Transaction);
                }
                if cache { store.with_cache(1 << 20, ttl) } else { store }.into()
            }
        }
    }

    async fn migrate(&self) {
        match self {
            Driver::TokioPostgres(pool) => PostgresStore::new(pool.clone()).migrate().await.unwrap(),
            #[cfg(feature = "sqlx")]
            Driver::Sqlx(pool) | Driver::SqlxPoolModeTransaction(pool) => {
                tower_idempotency::SqlxStore::new(pool.clone()).migrate().await.unwrap()
            }
        }
    }

    fn idle(&self) -> bool {
        match self {
            Driver::TokioPostgres(pool) => {
                let status = pool.status();
                status.available == status.size
            }
            #[cfg(feature = "sqlx")]
            Driver::Sqlx(pool) | Driver::SqlxPoolModeTransaction(pool) => pool.num_idle() == pool.size() as usize,
        }
    }

    async fn close(&self) {
        match self {
            Driver::TokioPostgres(pool) => pool.close(),
            #[cfg(feature = "sqlx")]
            Driver::Sqlx(pool) | Driver::SqlxPoolModeTransaction(pool) => pool.close().await,
        }
    }
}

/// Sends one request and returns what it cost on the wire, once the
/// connection is back in the pool (background rollbacks included).
async fn measure(meter: &Meter, pool: &Driver, app: &Router, key: &str) -> (Counts, bool) {
    wait_idle(pool).await;
    meter.reset();
    let reply = send(app, request(Some(key), "{}", &[])).await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    wait_idle(pool).await;
    (meter.counts(), reply.replayed())
}

async fn wait_idle(pool: &Driver) {
    for _ in 0..200 {
        if pool.idle() {
            // Let the proxy relay the last reply.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the pooled connection did not come back");
}

struct Path {
    name: &'static str,
    counts: Counts,
}

fn print_table(mode: &str, driver: &str, paths: &[Path]) {
    println!("{mode} mode, {driver} (the handler runs no statement)");
    println!(
        "  {:<42} {:>11} {:>10} {:>6}   messages (Parse Bind Execute Query Sync)",
        "path", "round trips", "statements", "pings"
    );
    for path in paths {
        let c = &path.counts;
        println!(
            "  {:<42} {:>11} {:>10} {:>6}   P {} B {} E {} Q {} S {}",
            path.name,
            c.round_trips,
            c.statements(),
            c.pings,
            c.get('P'),
            c.get('B'),
            c.get('E'),
            c.get('Q'),
            c.get('S'),
        );
    }
}

/// First deliveries, then duplicates with and without the record cache, on
/// one instance ("warm": it completed the key itself) and on another
/// ("cold": it never saw the key).
async fn count_paths(mode: Mode, name: &str, driver: fn(u16, &str) -> Driver) -> Vec<Path> {
    let db = TestDb::new(name).await;
    let meter = Meter::default();
    let port = start_proxy(upstream(), meter.clone()).await;
    let pool = driver(port, &db.schema);
    pool.migrate().await;
    let layer_app = app(pool.store(false), mode);
    // Warm up: the connection exists and has prepared its statements.
    measure(&meter, &pool, &layer_app, "warm-up").await;
    measure(&meter, &pool, &layer_app, "warm-up").await;

    let mut paths = Vec::new();
    let (first, replayed) = measure(&meter, &pool, &layer_app, "event-1").await;
    assert!(!replayed);
    paths.push(Path {
        name: "first delivery",
        counts: first,
    });
    let (duplicate, replayed) = measure(&meter, &pool, &layer_app, "event-1").await;
    assert!(replayed);
    paths.push(Path {
        name: "duplicate (this instance completed it)",
        counts: duplicate,
    });

    // Another instance on the same pool: it has never seen `event-1`.
    let other = app(pool.store(false), mode);
    measure(&meter, &pool, &other, "warm-up-2").await;
    let (cold, replayed) = measure(&meter, &pool, &other, "event-1").await;
    assert!(replayed);
    paths.push(Path {
        name: "duplicate (another instance completed it)",
        counts: cold,
    });

    let cached = app(pool.store(true), mode);
    measure(&meter, &pool, &cached, "warm-up-3").await;
    measure(&meter, &pool, &cached, "event-1").await;
    let (hit, replayed) = measure(&meter, &pool, &cached, "event-1").await;
    assert!(replayed);
    paths.push(Path {
        name: "duplicate, record cache on",
        counts: hit,
    });
    pool.close().await;
    db.drop_schema().await;
    paths
}

/// The pings each path costs on sqlx's pool: one per connection it takes
/// back (none on the tokio-postgres store's).
struct Pings([u32; 4]);

async fn transaction_mode_round_trips(
    driver: fn(u16, &str) -> Driver,
    name: &str,
    label: &str,
    pings: Pings,
) -> Vec<Path> {
    let paths = count_paths(Mode::Transaction, name, driver).await;
    print_table("transaction", label, &paths);
    let [first, duplicate, cold, cached] = &paths[..] else {
        unreachable!()
    };
    // BEGIN + advisory try-lock + read, pipelined; then the record's upsert
    // + COMMIT, pipelined.
    assert_eq!(first.counts.round_trips, 2, "{first:?}", first = first.counts);
    assert_eq!(first.counts.statements(), 5);
    assert_eq!(
        first.counts.parses(),
        0,
        "every statement is prepared once per connection"
    );
    assert_eq!(duplicate.counts.round_trips, 1, "{:?}", duplicate.counts);
    assert_eq!(duplicate.counts.statements(), 1);
    // The claim's own read answers; its ROLLBACK goes after the response.
    assert_eq!(cold.counts.round_trips, 2, "{:?}", cold.counts);
    assert_eq!(cold.counts.statements(), 4);
    assert_eq!(
        Counts {
            pings: 0,
            ..cached.counts.clone()
        },
        Counts::default(),
        "a cached duplicate costs nothing"
    );
    assert_pings(&paths, pings);
    paths
}

async fn lease_mode_round_trips(driver: fn(u16, &str) -> Driver, name: &str, label: &str, pings: Pings) -> Vec<Path> {
    let paths = count_paths(Mode::lease(Duration::from_secs(60)), name, driver).await;
    print_table("lease", label, &paths);
    let [first, duplicate, cold, cached] = &paths[..] else {
        unreachable!()
    };
    // The claim (an upsert that also returns the live record), then the
    // completion.
    assert_eq!(first.counts.round_trips, 2, "{:?}", first.counts);
    assert_eq!(first.counts.statements(), 2);
    assert_eq!(first.counts.parses(), 0);
    assert_eq!(duplicate.counts.round_trips, 1, "{:?}", duplicate.counts);
    assert_eq!(duplicate.counts.statements(), 1);
    assert_eq!(cold.counts.round_trips, 1, "{:?}", cold.counts);
    assert_eq!(cold.counts.statements(), 1);
    assert_eq!(
        Counts {
            pings: 0,
            ..cached.counts.clone()
        },
        Counts::default()
    );
    assert_pings(&paths, pings);
    paths
}

fn assert_pings(paths: &[Path], Pings(expected): Pings) {
    let pings: Vec<u32> = paths.iter().map(|path| path.counts.pings).collect();
    assert_eq!(pings, expected, "pings per path");
}

#[tokio::test]
async fn transaction_mode_round_trips_tokio_postgres() {
    let driver = Driver::tokio_postgres;
    transaction_mode_round_trips(driver, "round_trips_tx", "tokio-postgres", Pings([0; 4])).await;
}

#[tokio::test]
async fn lease_mode_round_trips_tokio_postgres() {
    let driver = Driver::tokio_postgres;
    lease_mode_round_trips(driver, "round_trips_lease", "tokio-postgres", Pings([0; 4])).await;
}

/// The same counts on sqlx. Each time the layer gives a connection back,
/// sqlx's pool pings it, after the answer: in transaction mode once per
/// request (its one connection); in lease mode once per statement (a first
/// delivery's claim and completion each take a connection); never for a
/// cached duplicate.
#[cfg(feature = "sqlx")]
#[tokio::test]
async fn transaction_mode_round_trips_sqlx() {
    let driver = Driver::sqlx;
    transaction_mode_round_trips(driver, "round_trips_tx_sqlx", "sqlx", Pings([1, 1, 1, 0])).await;
}

#[cfg(feature = "sqlx")]
#[tokio::test]
async fn lease_mode_round_trips_sqlx() {
    let driver = Driver::sqlx;
    lease_mode_round_trips(driver, "round_trips_lease_sqlx", "sqlx", Pings([2, 1, 1, 0])).await;
}

/// Behind a transaction-mode pooler the sqlx store sends every statement as
/// a simple query with its values written in: no Parse at all (so no named
/// statement), and still the same round trips and statements.
#[cfg(feature = "sqlx")]
#[tokio::test]
async fn transaction_mode_round_trips_sqlx_in_pool_mode_transaction() {
    let driver = Driver::sqlx_pool_mode_transaction;
    let label = "sqlx, PoolMode::Transaction";
    let paths = transaction_mode_round_trips(driver, "round_trips_tx_sqlx_pooler", label, Pings([1, 1, 1, 0])).await;
    assert_no_prepared_statement(&paths);
}

#[cfg(feature = "sqlx")]
#[tokio::test]
async fn lease_mode_round_trips_sqlx_in_pool_mode_transaction() {
    let driver = Driver::sqlx_pool_mode_transaction;
    let label = "sqlx, PoolMode::Transaction";
    let paths = lease_mode_round_trips(driver, "round_trips_lease_sqlx_pooler", label, Pings([2, 1, 1, 0])).await;
    assert_no_prepared_statement(&paths);
}

#[cfg(feature = "sqlx")]
fn assert_no_prepared_statement(paths: &[Path]) {
    for path in paths {
        let c = &path.counts;
        assert_eq!(
            (c.parses(), c.get('B')),
            (0, 0),
            "{}: only simple queries: {c:?}",
            path.name
        );
    }
}
