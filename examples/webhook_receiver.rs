//! An idempotent webhook receiver: Stripe, GitHub and Standard Webhooks
//! deliveries and `Idempotency-Key` payments, each handled exactly once,
//! backed by Postgres.
//!
//! ```text
//! cargo run --release --example webhook_receiver
//! cargo run --release --example webhook_receiver -- --help
//! ```
//!
//! Every protected route writes one row into its own `ledger_entries` table
//! through the request's transaction ([`Tx`]); the layer commits that row
//! together with the idempotency record, or rolls both back. Deliver the same
//! event twice and the second delivery is answered from the record, marked
//! `Idempotent-Replayed: true`, without a second ledger row:
//!
//! ```text
//! curl -i localhost:3000/webhooks/stripe -d '{"id":"evt_1","type":"charge.succeeded","data":{"object":{"amount":500}}}'
//! curl -i localhost:3000/webhooks/stripe -d '{"id":"evt_1","type":"charge.succeeded","data":{"object":{"amount":500}}}'
//! curl -i localhost:3000/payments -H 'Idempotency-Key: order-42' -d '{"amount":1999}'
//! ```
//!
//! `DEMO_FAILURE_RATE` makes handlers fail after writing their row, to show
//! that a failed delivery leaves nothing behind and its retry runs afresh;
//! `DEMO_HANDLER_DELAY_MS` keeps handlers busy so that concurrent duplicates
//! can be watched waiting (webhooks) or refused with `409` (payments).
//! `POST /baseline` runs the same business logic without the layer, so the
//! layer's cost can be measured against it in one run of one server.
//!
//! With `STRIPE_WEBHOOK_SECRET`, `GITHUB_WEBHOOK_SECRET` or
//! `STANDARD_WEBHOOK_SECRET` set, that route verifies the provider's
//! signature before anything is claimed (401 otherwise). The Stripe route
//! also keeps each payment intent's latest state in `payment_states`
//! through an [`OrderingGuard`]: a late `payment_intent.processing` never
//! overwrites `succeeded`.
//!
//! On SIGTERM or Ctrl-C it stops accepting, lets in-flight and detached
//! handlers finish for up to `SHUTDOWN_GRACE_MS`, then cuts off what is
//! left, releases its claims (so their redeliveries run at once) and exits 0.
//!
//! `DATABASE_DRIVER=sqlx` (in a build with `--features sqlx`) runs the same
//! routes on [`SqlxStore`](tower_idempotency::SqlxStore): the ledger row is
//! written with `sqlx::query` through the request's transaction
//! ([`SqlxTx`](tower_idempotency::SqlxTx)), and the answers are the same.
//!
//! `RECORD_MODE=lease` (with `LEASE_SECS`) records in lease mode instead:
//! the ledger row autocommits outside the record's transaction while the
//! handler holds a renewed lease, so a run cut off by a crash is taken over
//! once its lease runs out, and runs again (at least once).
//!
//! In the background it purges expired records every `PURGE_INTERVAL_MS`
//! and reads the store's gauges every `STORE_METRICS_INTERVAL_MS`, for
//! `GET /metrics`; `tests/monitoring.rs` scrapes it with a real Prometheus
//! and the rules of `monitoring/prometheus/`.
//!
//! Its routes, settings and answers are a stable contract, checked end to
//! end by `tests/webhook_receiver.rs` (and, under crashes and outages, by
//! `tests/crash.rs`, `tests/outage.rs` and `tests/postgres_restart.rs`).

#[path = "common/mod.rs"]
mod common;

use std::future::IntoFuture;
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use common::{
    connection_pool, create_ledger, describe_database, error_chain, positive, setting, Demo, CONNECT_TIMEOUT,
    DEFAULT_DATABASE_URL, DEFAULT_POOL_SIZE, DEFAULT_SHUTDOWN_GRACE_MS, POOL_MODE_HELP, POOL_WAIT_TIMEOUT,
    STATEMENT_TIMEOUT,
};
use deadpool_postgres::Pool;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::Value;
use tokio::net::TcpListener;
use tower_idempotency::signature::{GitHubSignature, StandardWebhooksSignature, StripeSignature, VerifySignature};
#[cfg(feature = "sqlx")]
use tower_idempotency::SqlxTx;
use tower_idempotency::{
    IdempotencyLayer, Mode, OrderingError, OrderingGuard, PoolMode, Preset, RecordKey, ShutdownHandle, Store,
    Transition, Tx,
};

const DEFAULT_BIND: &str = "127.0.0.1:3000";
const DEFAULT_MAX_BODY_BYTES: &str = "1048576";
const DEFAULT_LEASE_SECS: &str = "60";
const DEFAULT_PURGE_INTERVAL_MS: &str = "60000";
const DEFAULT_STORE_METRICS_INTERVAL_MS: &str = "15000";
/// Records each purge batch deletes (one short transaction each).
const PURGE_BATCH: u32 = 10_000;
/// Histogram buckets of every `*_seconds` metric, in seconds: store steps
/// (milliseconds), waits (up to the routes' 10 s) and purge runs. 0.1 is a
/// bound, so that the alert on a p99 over 100 ms is exact.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// The record cache's bound when `RECORD_CACHE_TTL_MS` turns it on.
const RECORD_CACHE_BYTES: u64 = 64 << 20;

/// How long `/healthz` gives the database to answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// `Retry-After` of this example's own 503s, in seconds.
const RETRY_AFTER_SECONDS: u32 = 1;

fn usage() -> String {
    format!(
        "webhook_receiver: an idempotent webhook receiver backed by Postgres

Usage: webhook_receiver [--help]

Routes:
  POST /webhooks/stripe    keyed by JSON /id, event type JSON /type
  POST /webhooks/github    keyed by X-GitHub-Delivery, event type X-GitHub-Event
  POST /webhooks/standard  keyed by webhook-id, event type JSON /type
  POST /payments           keyed by Idempotency-Key (required); 201
  POST /baseline           the Stripe handler without the layer
  GET  /healthz            200 when the database answers
  GET  /metrics            the layer's metrics, Prometheus text format

Environment (all optional; an empty value counts as unset):
  DATABASE_URL           Postgres for the idempotency records and the ledger
                         [default: {DEFAULT_DATABASE_URL}]
  DATABASE_DRIVER        the Postgres driver: `tokio-postgres`, or `sqlx` (a build
                         with --features sqlx), whose store hands handlers the
                         request's transaction as sqlx's PgConnection
                         [default: tokio-postgres]
{POOL_MODE_HELP}  BIND                   listen address, IP:port (port 0 picks a free one)
                         [default: {DEFAULT_BIND}]
  MAX_BODY_BYTES         request body limit; larger bodies get 413
                         [default: {DEFAULT_MAX_BODY_BYTES}]
  DEMO_FAILURE_RATE      probability (0 to 1) that a handler answers 503 after
                         writing its ledger row [default: 0]
  DEMO_HANDLER_DELAY_MS  how long a handler sleeps after writing its ledger row
                         [default: 0]
  POOL_SIZE              database connections in the pool; every in-flight
                         protected request holds one for its handler's duration
                         [default: {DEFAULT_POOL_SIZE}]
  RECORD_MODE            how the protected routes record events: `transaction`
                         (the ledger row commits with the record: exactly once)
                         or `lease` (the row is written outside the record's
                         transaction under a renewed lease: at least once, a
                         crashed run's lease expires and a redelivery takes
                         over) [default: transaction]
  LEASE_SECS             lease mode's lease, in seconds, renewed every third
                         of it while a handler runs [default: {DEFAULT_LEASE_SECS}]
  RECORD_CACHE_TTL_MS    when above 0, completed records are also kept in
                         process memory (at most {cache_mib} MiB of them) for this
                         many milliseconds, so a duplicate of a recently
                         completed event costs no database round trip; another
                         instance's release of a record may go unseen here for
                         that long [default: 0, off]
  SHUTDOWN_GRACE_MS      on SIGTERM or Ctrl-C, how long in-flight and detached
                         handlers may take to finish; past it they are cut off,
                         their claims released (rolled back, or deleted in lease
                         mode) so that redeliveries run at once, and the process
                         exits 0 [default: {DEFAULT_SHUTDOWN_GRACE_MS}]
  STRIPE_WEBHOOK_SECRET  the Stripe endpoint's signing secret (whsec_...); when
                         set, /webhooks/stripe verifies Stripe-Signature
                         [default: unset, no verification]
  GITHUB_WEBHOOK_SECRET  the GitHub webhook's secret; when set,
                         /webhooks/github verifies X-Hub-Signature-256
                         [default: unset, no verification]
  STANDARD_WEBHOOK_SECRET  the Standard Webhooks secret, with or without its
                         whsec_ prefix; when set, /webhooks/standard verifies
                         webhook-signature [default: unset, no verification]
  PURGE_INTERVAL_MS      how often expired records are purged, in batches of
                         {purge_batch} [default: {DEFAULT_PURGE_INTERVAL_MS}]
  STORE_METRICS_INTERVAL_MS  how often the store's gauges (store up, oldest
                         open claim, expired records awaiting purge, table
                         size) are read for /metrics, one cheap query each
                         time [default: {DEFAULT_STORE_METRICS_INTERVAL_MS}]

Database timeouts: connect {connect}s, pool wait {wait}s (then 503 with
Retry-After), statement {statement}s: a startup option of every connection,
or with DATABASE_POOL_MODE=transaction, SET LOCAL in every transaction (the
protected routes' request transactions, the start-up's); statements outside
a transaction (lease mode's handler statements, /baseline's insert) then run
without one.

Signatures: a missing, malformed, stale or wrong one is 401, checked after the
body size and before anything else; signed timestamps more than {tolerance}s
in the past or the future are refused.
",
        connect = CONNECT_TIMEOUT.as_secs(),
        wait = POOL_WAIT_TIMEOUT.as_secs(),
        statement = STATEMENT_TIMEOUT.as_secs(),
        tolerance = tower_idempotency::signature::DEFAULT_SIGNATURE_TOLERANCE.as_secs(),
        cache_mib = RECORD_CACHE_BYTES >> 20,
        purge_batch = PURGE_BATCH,
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    match args.next().as_deref() {
        None => {}
        Some("-h" | "--help") => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!("webhook_receiver: unexpected argument `{other}`; it is configured by environment variables, see --help");
            return ExitCode::from(2);
        }
    }

    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("webhook_receiver: {error}\nrun with --help for the list of settings");
            return ExitCode::from(2);
        }
    };

    // Logs go to stderr: stdout carries only the `listening on` line, which
    // scripts and tests wait for.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();

    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("webhook_receiver: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Everything read from the environment, checked before anything starts.
struct Settings {
    database: tokio_postgres::Config,
    /// `DATABASE_URL` as given, for sqlx's own parser.
    #[cfg_attr(not(feature = "sqlx"), allow(dead_code))]
    database_url: String,
    driver: Driver,
    /// `DATABASE_POOL_MODE`.
    pool_mode: PoolMode,
    bind: SocketAddr,
    max_body_bytes: usize,
    pool_size: usize,
    demo: Demo,
    record_mode: RecordMode,
    signatures: Signatures,
    /// `RECORD_CACHE_TTL_MS`; zero keeps the record cache off.
    record_cache_ttl: Duration,
    /// `SHUTDOWN_GRACE_MS`.
    shutdown_grace: Duration,
    /// `PURGE_INTERVAL_MS`.
    purge_interval: Duration,
    /// `STORE_METRICS_INTERVAL_MS`.
    store_metrics_interval: Duration,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        // Parsed apart so that an error never echoes a password in the URL.
        let database_url = setting("DATABASE_URL", DEFAULT_DATABASE_URL, |text| Ok(text.to_owned()))?;
        let database = tokio_postgres::Config::from_str(&database_url)
            .map_err(|error| format!("invalid DATABASE_URL: {error}"))?;
        let driver = setting("DATABASE_DRIVER", "tokio-postgres", |text| match text {
            "tokio-postgres" => Ok(Driver::TokioPostgres),
            #[cfg(feature = "sqlx")]
            "sqlx" => Ok(Driver::Sqlx),
            #[cfg(not(feature = "sqlx"))]
            "sqlx" => Err("this build has no sqlx driver: build the example with --features sqlx".to_owned()),
            _ => Err("expected `tokio-postgres` or `sqlx`".to_owned()),
        })?;
        let pool_mode = common::pool_mode_setting(&database)?;
        let bind = setting("BIND", DEFAULT_BIND, |text| {
            text.parse()
                .map_err(|_| "expected an IP address and port, such as 127.0.0.1:3000".to_owned())
        })?;
        let max_body_bytes = setting("MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES, positive)?;
        let pool_size = setting("POOL_SIZE", DEFAULT_POOL_SIZE, positive)?;
        let demo = Demo::from_env()?;
        let lease_secs = setting("LEASE_SECS", DEFAULT_LEASE_SECS, positive)?;
        let record_mode = setting("RECORD_MODE", "transaction", |text| match text {
            "transaction" => Ok(RecordMode::Transaction),
            "lease" => Ok(RecordMode::Lease(Duration::from_secs(lease_secs as u64))),
            _ => Err("expected `transaction` or `lease`".to_owned()),
        })?;
        let signatures = Signatures::from_env()?;
        let record_cache_ms = setting("RECORD_CACHE_TTL_MS", "0", |text| {
            text.parse::<u64>()
                .map_err(|_| "expected a whole number of milliseconds".to_owned())
        })?;
        Ok(Self {
            database,
            database_url,
            driver,
            pool_mode,
            bind,
            max_body_bytes,
            pool_size,
            demo,
            record_mode,
            signatures,
            record_cache_ttl: Duration::from_millis(record_cache_ms),
            shutdown_grace: common::shutdown_grace_setting()?,
            purge_interval: milliseconds_setting("PURGE_INTERVAL_MS", DEFAULT_PURGE_INTERVAL_MS)?,
            store_metrics_interval: milliseconds_setting(
                "STORE_METRICS_INTERVAL_MS",
                DEFAULT_STORE_METRICS_INTERVAL_MS,
            )?,
        })
    }
}

/// A positive whole number of milliseconds from the environment.
fn milliseconds_setting(name: &str, default: &str) -> Result<Duration, String> {
    setting(name, default, positive).map(|ms| Duration::from_millis(ms as u64))
}

/// The webhook routes' signature checks, each on when its secret is set.
#[derive(Clone, Debug, Default)]
struct Signatures {
    stripe: Option<StripeSignature>,
    github: Option<GitHubSignature>,
    standard: Option<StandardWebhooksSignature>,
}

impl Signatures {
    fn from_env() -> Result<Self, String> {
        Ok(Self {
            stripe: secret_setting("STRIPE_WEBHOOK_SECRET", |secret| StripeSignature::new(secret))?,
            github: secret_setting("GITHUB_WEBHOOK_SECRET", |secret| GitHubSignature::new(secret))?,
            standard: secret_setting("STANDARD_WEBHOOK_SECRET", StandardWebhooksSignature::new)?,
        })
    }
}

/// A verifier built from a secret in the environment; `None` when the
/// variable is unset or empty. Errors never echo the secret.
fn secret_setting<V, E: std::fmt::Display>(
    name: &str,
    verifier: impl FnOnce(&str) -> Result<V, E>,
) -> Result<Option<V>, String> {
    match std::env::var(name) {
        Ok(secret) if !secret.trim().is_empty() => verifier(secret.trim())
            .map(Some)
            .map_err(|error| format!("invalid {name}: {error}")),
        Ok(_) | Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(format!("invalid {name}: not valid UTF-8")),
    }
}

/// Adds the provider's signature check to its preset when its secret is set.
fn verified(preset: Preset, verifier: Option<impl VerifySignature>) -> Preset {
    match verifier {
        Some(verifier) => preset.verify_signature(verifier),
        None => preset,
    }
}

/// `DATABASE_DRIVER`: which Postgres driver the store and the handlers use.
#[derive(Clone, Copy, Debug)]
enum Driver {
    TokioPostgres,
    #[cfg(feature = "sqlx")]
    Sqlx,
}

/// The pool of the chosen driver.
#[derive(Clone)]
enum Database {
    TokioPostgres(Pool),
    #[cfg(feature = "sqlx")]
    Sqlx(sqlx::PgPool),
}

/// What the handlers share.
#[derive(Clone)]
struct App {
    database: Database,
    pool_mode: PoolMode,
    demo: Demo,
    max_body_bytes: usize,
    record_mode: RecordMode,
    payment_states: OrderingGuard,
}

/// How the protected routes record their events (`RECORD_MODE`).
#[derive(Clone, Copy, Debug)]
enum RecordMode {
    /// The ledger row and the record commit together: exactly once.
    Transaction,
    /// The ledger row autocommits while the handler holds a lease of this
    /// length on the record: at least once.
    Lease(Duration),
}

/// Where a protected handler writes its ledger row: the request's
/// transaction in transaction mode; in lease mode an autocommitting pooled
/// connection, outside the record's transaction. Each through the chosen
/// driver.
enum Db {
    Tx(Tx),
    Pooled(Box<deadpool_postgres::Object>),
    #[cfg(feature = "sqlx")]
    SqlxTx(SqlxTx),
    #[cfg(feature = "sqlx")]
    SqlxPooled(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

impl Db {
    /// An autocommitting pooled connection.
    async fn pooled(database: &Database) -> Result<Self, Response> {
        match database {
            Database::TokioPostgres(pool) => pool
                .get()
                .await
                .map(|client| Db::Pooled(Box::new(client)))
                .map_err(|error| database_unavailable(&error)),
            #[cfg(feature = "sqlx")]
            Database::Sqlx(pool) => pool
                .acquire()
                .await
                .map(Db::SqlxPooled)
                .map_err(|error| database_unavailable(&error)),
        }
    }

    /// Writes a ledger row; its id.
    async fn insert_ledger_entry(
        &mut self,
        mode: PoolMode,
        entry: &LedgerEntry<'_>,
    ) -> Result<i64, Box<dyn std::error::Error>> {
        let (source, event_id, event_type, amount) = (
            entry.source,
            entry.event_id.as_str(),
            entry.event_type.as_str(),
            entry.amount_cents,
        );
        Ok(match self {
            Db::Tx(tx) => common::insert_ledger_entry(tx, mode, source, event_id, event_type, amount).await?,
            Db::Pooled(client) => {
                common::insert_ledger_entry(client, mode, source, event_id, event_type, amount).await?
            }
            #[cfg(feature = "sqlx")]
            Db::SqlxTx(tx) => common::insert_ledger_entry_sqlx(tx, mode, source, event_id, event_type, amount).await?,
            // Behind a transaction-mode pooler, an sqlx statement outside a
            // transaction is two exchanges (its unnamed Parse, then its
            // Bind), which the pooler may send to two server connections:
            // a short transaction of its own keeps them on one.
            #[cfg(feature = "sqlx")]
            Db::SqlxPooled(connection) if mode == PoolMode::Transaction => {
                use sqlx::Connection as _;
                let mut transaction = connection.begin().await?;
                let id = common::insert_ledger_entry_sqlx(&mut transaction, mode, source, event_id, event_type, amount)
                    .await?;
                transaction.commit().await?;
                id
            }
            #[cfg(feature = "sqlx")]
            Db::SqlxPooled(connection) => {
                common::insert_ledger_entry_sqlx(connection, mode, source, event_id, event_type, amount).await?
            }
        })
    }

    /// Moves a payment's state forward through `guard`.
    async fn advance(
        &mut self,
        guard: &OrderingGuard,
        payment: &str,
        status: &str,
    ) -> Result<Transition, OrderingError> {
        match self {
            Db::Tx(tx) => guard.advance(tx, payment, status).await,
            Db::Pooled(client) => guard.advance(client, payment, status).await,
            #[cfg(feature = "sqlx")]
            Db::SqlxTx(tx) => guard.advance_sqlx(tx, payment, status).await,
            #[cfg(feature = "sqlx")]
            Db::SqlxPooled(connection) => {
                // As in `insert_ledger_entry`: one transaction behind a
                // transaction-mode pooler.
                use sqlx::Connection as _;
                let mut transaction = connection.begin().await?;
                let transition = guard.advance_sqlx(&mut transaction, payment, status).await?;
                transaction.commit().await?;
                Ok(transition)
            }
        }
    }
}

impl axum::extract::FromRequestParts<App> for Db {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, app: &App) -> Result<Self, Response> {
        match (app.record_mode, &app.database) {
            (RecordMode::Transaction, Database::TokioPostgres(_)) => Tx::from_request_parts(parts, app)
                .await
                .map(Db::Tx)
                .map_err(IntoResponse::into_response),
            #[cfg(feature = "sqlx")]
            (RecordMode::Transaction, Database::Sqlx(_)) => SqlxTx::from_request_parts(parts, app)
                .await
                .map(Db::SqlxTx)
                .map_err(IntoResponse::into_response),
            (RecordMode::Lease(_), database) => Db::pooled(database).await,
        }
    }
}

/// The chosen driver's pool and the store on it (with the record cache when
/// asked), migrated, with the example's own tables created.
async fn open_database(settings: &Settings, guard: &OrderingGuard) -> Result<(Database, Store), String> {
    let target = describe_database(&settings.database);
    let cannot = |what: &str, error: &dyn std::error::Error| {
        format!(
            "cannot {what} in the database {target} named by DATABASE_URL: {}",
            error_chain(error)
        )
    };
    let cache = (!settings.record_cache_ttl.is_zero()).then_some(settings.record_cache_ttl);
    let pool_mode = settings.pool_mode;
    match settings.driver {
        Driver::TokioPostgres => {
            let pool = connection_pool(settings.database.clone(), settings.pool_size, pool_mode)?;
            let mut store = common::postgres_store(pool.clone(), pool_mode);
            if let Some(ttl) = cache {
                store = store.with_cache(RECORD_CACHE_BYTES, ttl);
            }
            store.migrate().await.map_err(|error| {
                format!(
                    "cannot use the database {target} named by DATABASE_URL: {}",
                    error_chain(&error)
                )
            })?;
            create_ledger(&pool, pool_mode)
                .await
                .map_err(|error| cannot("create ledger_entries", &*error))?;
            create_payment_states(&pool, guard)
                .await
                .map_err(|error| cannot("create payment_states", &*error))?;
            // Every instance purges (the batches of concurrent purgers never
            // overlap) and reads the store's gauges; both end with the process.
            store.spawn_purge_task(settings.purge_interval, PURGE_BATCH);
            store.spawn_metrics_task(settings.store_metrics_interval);
            Ok((Database::TokioPostgres(pool), store.into()))
        }
        #[cfg(feature = "sqlx")]
        Driver::Sqlx => {
            let pool = common::sqlx_pool(&settings.database_url, settings.pool_size, pool_mode)?;
            let mut store = common::sqlx_store(pool.clone(), pool_mode);
            if let Some(ttl) = cache {
                store = store.with_cache(RECORD_CACHE_BYTES, ttl);
            }
            store.migrate().await.map_err(|error| {
                format!(
                    "cannot use the database {target} named by DATABASE_URL: {}",
                    error_chain(&error)
                )
            })?;
            common::create_ledger_sqlx(&pool, pool_mode)
                .await
                .map_err(|error| cannot("create ledger_entries", &*error))?;
            let created = async {
                let mut connection = pool.acquire().await?;
                guard.create_table_sqlx(&mut connection).await?;
                Ok::<_, Box<dyn std::error::Error>>(())
            };
            created
                .await
                .map_err(|error| cannot("create payment_states", &*error))?;
            store.spawn_purge_task(settings.purge_interval, PURGE_BATCH);
            store.spawn_metrics_task(settings.store_metrics_interval);
            Ok((Database::Sqlx(pool), store.into()))
        }
    }
}

async fn run(settings: Settings) -> Result<(), String> {
    let payment_states = payment_states()
        .map_err(|error| format!("invalid payment_states guard: {error}"))?
        .with_pool_mode(settings.pool_mode);
    // Installed first: the purge and gauge tasks that open_database starts
    // report through it from their first tick.
    let metrics = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &DURATION_BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|error| format!("cannot install the metrics recorder: {error}"))?;
    let _ = METRICS.set(metrics);
    let (database, store) = open_database(&settings, &payment_states).await?;

    let app = App {
        database,
        pool_mode: settings.pool_mode,
        demo: settings.demo,
        max_body_bytes: settings.max_body_bytes,
        record_mode: settings.record_mode,
        payment_states,
    };
    let (router, shutdown) = router(app, &store, settings.signatures);

    let listener = TcpListener::bind(settings.bind)
        .await
        .map_err(|error| format!("cannot listen on BIND={}: {error}", settings.bind))?;
    let address = listener
        .local_addr()
        .map_err(|error| format!("cannot read the bound address: {error}"))?;
    println!(
        "listening on {address} ({})",
        common::pool_summary(settings.pool_size, settings.pool_mode)
    );
    // Whoever started us waits for that line; don't leave it in a buffer.
    std::io::stdout()
        .flush()
        .map_err(|error| format!("cannot write to stdout: {error}"))?;

    let serve = |stop| axum::serve(listener, router).with_graceful_shutdown(stop).into_future();
    common::serve_until_shutdown(serve, &shutdown, settings.shutdown_grace)
        .await
        .map_err(|error| format!("server error: {error}"))
}

/// The Stripe route's ordering guard: each payment intent's latest state in
/// `payment_states`, moving only forward.
fn payment_states() -> Result<OrderingGuard, tower_idempotency::OrderingError> {
    Ok(OrderingGuard::new("payment_states", "payment_id")?
        .then(["created"])
        .then(["processing"])
        .terminal(["succeeded", "payment_failed", "canceled"]))
}

async fn create_payment_states(pool: &Pool, guard: &OrderingGuard) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = pool.get().await?;
    guard.create_table(&mut client).await?;
    Ok(())
}

/// Each protected route gets a layer of its own: its source, where its key
/// and event type come from, and what a concurrent duplicate gets. They are
/// all made from one base layer, so one handle shuts them all down.
fn router(app: App, store: &Store, signatures: Signatures) -> (Router, ShutdownHandle) {
    let mode = match app.record_mode {
        RecordMode::Transaction => Mode::Transaction,
        RecordMode::Lease(lease) => Mode::lease(lease),
    };
    let base = IdempotencyLayer::new(store.clone())
        .max_request_bytes(app.max_body_bytes)
        .mode(mode);
    let shutdown = base.shutdown_handle();

    // Each webhook preset keys the provider's documented event id, requires
    // JSON where the key or event type is read from it, and lets a duplicate
    // wait up to 10 s for its in-flight first delivery: providers retry a
    // 409 anyway, but waiting answers them at once. A signature, where its
    // secret is set, is checked on the raw body before the key is read or
    // claimed: a forgery leaves no trace.
    let stripe = base.clone().preset(verified(Preset::stripe(), signatures.stripe));
    let github = base.clone().preset(verified(Preset::github(), signatures.github));
    // This route's source is `standard`, not the preset's `standard-webhooks`.
    let standard = base
        .clone()
        .preset(verified(Preset::standard_webhooks(), signatures.standard))
        .source("standard");
    // The Idempotency-Key preset answers an in-flight duplicate 409 at once:
    // API clients are told to retry it, and holding their request open would
    // only tie up a connection. The body must be JSON even though the key is
    // a header: the handler reads `/amount`.
    let payments = base
        .preset(Preset::idempotency_key())
        .source("payments")
        .json_body(true);

    let router = Router::new()
        .route("/webhooks/stripe", post(stripe_webhook).route_layer(stripe))
        .route("/webhooks/github", post(github_webhook).route_layer(github))
        .route("/webhooks/standard", post(standard_webhook).route_layer(standard))
        .route("/payments", post(create_payment).route_layer(payments))
        .route("/baseline", post(baseline))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        // The layer enforces MAX_BODY_BYTES with a problem+json 413, and
        // /baseline does the same by hand; axum's own limit would answer in
        // plain text, or refuse a body the layer had accepted.
        .layer(DefaultBodyLimit::disable())
        .with_state(app);
    (router, shutdown)
}

async fn stripe_webhook(
    State(app): State<App>,
    mut tx: Db,
    Extension(record): Extension<RecordKey>,
    body: Bytes,
) -> Response {
    let amount = amount_at(&body, "/data/object/amount");
    // A payment intent event also moves its payment's state, forward only,
    // in the same transaction as the ledger row: a late or out-of-order
    // event still answers 200 and writes its row, but leaves the state.
    if let Some((payment, status)) = payment_state_change(&body) {
        if let Err(error) = tx.advance(&app.payment_states, &payment, status).await {
            return database_unavailable(&error);
        }
    }
    process(&app, &mut tx, LedgerEntry::for_record(&record, amount), StatusCode::OK).await
}

/// The payment id (JSON `/data/object/id`) and the state a
/// `payment_intent.*` event reports; `None` for other events.
fn payment_state_change(body: &[u8]) -> Option<(String, &'static str)> {
    let event: Value = serde_json::from_slice(body).ok()?;
    let status = match event.pointer("/type")?.as_str()? {
        "payment_intent.created" => "created",
        "payment_intent.processing" => "processing",
        "payment_intent.succeeded" => "succeeded",
        "payment_intent.payment_failed" => "payment_failed",
        "payment_intent.canceled" => "canceled",
        _ => return None,
    };
    let payment = event.pointer("/data/object/id")?.as_str()?.to_owned();
    Some((payment, status))
}

async fn github_webhook(State(app): State<App>, mut tx: Db, Extension(record): Extension<RecordKey>) -> Response {
    process(&app, &mut tx, LedgerEntry::for_record(&record, 0), StatusCode::OK).await
}

async fn standard_webhook(State(app): State<App>, mut tx: Db, Extension(record): Extension<RecordKey>) -> Response {
    process(&app, &mut tx, LedgerEntry::for_record(&record, 0), StatusCode::OK).await
}

async fn create_payment(
    State(app): State<App>,
    mut tx: Db,
    Extension(record): Extension<RecordKey>,
    body: Bytes,
) -> Response {
    let amount = amount_at(&body, "/amount");
    process(
        &app,
        &mut tx,
        LedgerEntry::for_record(&record, amount),
        StatusCode::CREATED,
    )
    .await
}

/// The Stripe handler without the layer: no key check, no record, and its
/// `INSERT` autocommits, so nothing undoes it when the handler then fails.
async fn baseline(State(app): State<App>, headers: HeaderMap, body: Body) -> Response {
    let body = match read_limited(&headers, body, app.max_body_bytes).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let event: Value = match serde_json::from_slice(&body) {
        Ok(event) => event,
        Err(error) => {
            let detail = format!("the request body is not valid JSON: {error}");
            return problem(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Request body is not valid JSON",
                &detail,
            );
        }
    };
    let entry = LedgerEntry {
        source: "baseline",
        event_id: id_text(event.pointer("/id")),
        event_type: event
            .pointer("/type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        amount_cents: event
            .pointer("/data/object/amount")
            .and_then(Value::as_i64)
            .unwrap_or(0),
    };
    let mut db = match Db::pooled(&app.database).await {
        Ok(db) => db,
        Err(response) => return response,
    };
    process(&app, &mut db, entry, StatusCode::OK).await
}

/// 200 when a `SELECT 1` comes back in time.
/// The recorder behind `GET /metrics`, installed once at startup.
static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The layer's counters and histograms (`idempotency_requests_total` by
/// source and outcome, store and wait latencies) in Prometheus text format.
async fn metrics_text() -> Response {
    match METRICS.get() {
        Some(handle) => ([(CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn healthz(State(app): State<App>) -> Response {
    let check = async {
        match &app.database {
            Database::TokioPostgres(pool) => {
                let client = pool.get().await.map_err(|error| error.to_string())?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map_err(|error| error.to_string())?;
            }
            #[cfg(feature = "sqlx")]
            Database::Sqlx(pool) => {
                sqlx::raw_sql("SELECT 1")
                    .execute(pool)
                    .await
                    .map_err(|error| error.to_string())?;
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
        Ok(Ok(_)) => json_response(StatusCode::OK, r#"{"status":"ok"}"#.to_owned()),
        Ok(Err(error)) => unavailable(&format!("the database did not answer: {error}")),
        Err(_) => unavailable(&format!(
            "the database did not answer within {}s",
            HEALTH_TIMEOUT.as_secs()
        )),
    }
}

/// The row each run of a handler writes: no unique constraint on the event,
/// so that every run shows.
struct LedgerEntry<'a> {
    source: &'a str,
    event_id: String,
    event_type: String,
    amount_cents: i64,
}

impl<'a> LedgerEntry<'a> {
    /// The entry for a protected request: the layer has already read and
    /// checked the key and event type.
    fn for_record(record: &'a RecordKey, amount_cents: i64) -> Self {
        Self {
            source: record.source(),
            event_id: record.key().to_owned(),
            event_type: record.event_type().to_owned(),
            amount_cents,
        }
    }
}

/// Writes the ledger row through `db` (the request's transaction, or an
/// autocommitting connection for /baseline), then applies the demo knobs
/// and answers.
async fn process(app: &App, db: &mut Db, entry: LedgerEntry<'_>, success: StatusCode) -> Response {
    let id = match db.insert_ledger_entry(app.pool_mode, &entry).await {
        Ok(id) => id,
        Err(error) => return database_unavailable(&error),
    };
    if app.demo.after_write().await {
        // Behind the layer this 503 rolls the row back and leaves the key
        // free for the provider's retry.
        return problem_with_retry(
            StatusCode::SERVICE_UNAVAILABLE,
            "injected-failure",
            "Injected failure",
            "DEMO_FAILURE_RATE made this request fail after it wrote its ledger row",
        );
    }
    let body = format!(
        r#"{{"ledger_entry_id":{id},"event_id":{}}}"#,
        Value::String(entry.event_id)
    );
    json_response(success, body)
}

/// The integer at `pointer` in a JSON body; 0 when absent or not an integer.
fn amount_at(body: &[u8], pointer: &str) -> i64 {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|event| event.pointer(pointer).and_then(Value::as_i64))
        .unwrap_or(0)
}

/// An event id as text: a string as it is, an integer in decimal, anything
/// else empty.
fn id_text(id: Option<&Value>) -> String {
    match id {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(number)) if number.is_i64() || number.is_u64() => number.to_string(),
        _ => String::new(),
    }
}

/// Reads a body of at most `limit` bytes; 413 past it, as the layer does.
async fn read_limited(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, Response> {
    let too_large = || {
        let detail = format!("the request body is larger than {limit} bytes");
        problem(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Request body too large",
            &detail,
        )
    };
    // Refuse a declared oversize body without reading it.
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(too_large());
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
        Err(error) => {
            let detail = format!("the request body could not be read: {error}");
            Err(problem(
                StatusCode::BAD_REQUEST,
                "body-unreadable",
                "Request body could not be read",
                &detail,
            ))
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        body,
    )
        .into_response()
}

fn database_unavailable(error: &dyn std::fmt::Display) -> Response {
    tracing::error!(%error, "database unavailable");
    unavailable(&format!("the database is unavailable: {error}"))
}

fn unavailable(detail: &str) -> Response {
    problem_with_retry(
        StatusCode::SERVICE_UNAVAILABLE,
        "database-unavailable",
        "Database unavailable",
        detail,
    )
}

/// An RFC 9457 `application/problem+json` response.
fn problem(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response {
    let document = serde_json::json!({
        "type": format!("urn:webhook-receiver:{kind}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
    });
    let content_type = HeaderValue::from_static("application/problem+json");
    (status, [(CONTENT_TYPE, content_type)], document.to_string()).into_response()
}

/// A problem the client may retry shortly.
fn problem_with_retry(status: StatusCode, kind: &str, title: &str, detail: &str) -> Response {
    let mut response = problem(status, kind, title, detail);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
    response
}
