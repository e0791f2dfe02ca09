//! What the example servers share: settings from the environment, the
//! connection pool, the ledger table, fault injection and shutdown.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::Type;
use tokio_postgres::NoTls;
use tower_idempotency::{PoolMode, ShutdownHandle};

pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const DEFAULT_POOL_SIZE: &str = "32";
pub const DEFAULT_SHUTDOWN_GRACE_MS: &str = "10000";

/// How long opening a database connection may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free pooled connection before it fails.
pub const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(2);
/// The server cancels any statement running longer than this.
pub const STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialises concurrent creations of `ledger_entries`: two instances
/// starting at once would otherwise race in `CREATE TABLE IF NOT EXISTS`.
const LEDGER_MIGRATION_LOCK: i64 = 0x7765_6268_6f6f_6b31;

const CREATE_LEDGER: &str = "CREATE TABLE IF NOT EXISTS ledger_entries (
    id bigserial primary key, source text not null,
    event_id text not null, event_type text not null default '',
    amount_cents bigint not null default 0,
    created_at timestamptz not null default now())";

const INSERT_LEDGER_ENTRY: &str =
    "INSERT INTO ledger_entries (source, event_id, event_type, amount_cents) VALUES ($1, $2, $3, $4) RETURNING id";

/// Parses an environment variable, or `default` when it is unset or empty.
pub fn setting<T>(name: &str, default: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<T, String> {
    let text = match std::env::var(name) {
        Ok(text) if !text.is_empty() => text,
        Ok(_) | Err(std::env::VarError::NotPresent) => default.to_owned(),
        Err(std::env::VarError::NotUnicode(_)) => return Err(format!("invalid {name}: not valid UTF-8")),
    };
    parse(&text).map_err(|why| format!("invalid {name}={text:?}: {why}"))
}

pub fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(value) if value > 0 => Ok(value),
        _ => Err("expected a whole number greater than 0".to_owned()),
    }
}

/// `SHUTDOWN_GRACE_MS`: how long handlers may take to finish once a
/// shutdown signal has come.
pub fn shutdown_grace_setting() -> Result<Duration, String> {
    setting("SHUTDOWN_GRACE_MS", DEFAULT_SHUTDOWN_GRACE_MS, |text| {
        text.parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| "expected a whole number of milliseconds".to_owned())
    })
}

/// `DATABASE_URL`, parsed apart so that an error never echoes a password.
pub fn database_setting() -> Result<tokio_postgres::Config, String> {
    let url = setting("DATABASE_URL", DEFAULT_DATABASE_URL, |text| Ok(text.to_owned()))?;
    url.parse().map_err(|error| format!("invalid DATABASE_URL: {error}"))
}

/// `DATABASE_POOL_MODE`'s lines of `--help`.
pub const POOL_MODE_HELP: &str = "  DATABASE_POOL_MODE     `session` when DATABASE_URL reaches Postgres directly
                         (or through a session-mode pooler), `transaction`
                         when it reaches a transaction-mode pooler (PgBouncer
                         with pool_mode = transaction, Supavisor, RDS Proxy):
                         then nothing outlives a transaction on a server
                         connection (no named prepared statements, no
                         `options` startup parameter; the statement timeout
                         is set with SET LOCAL in each transaction)
                         [default: session]
";

/// `DATABASE_POOL_MODE`: what `DATABASE_URL` reaches, checked against it:
/// a transaction-mode pooler refuses the `options` startup parameter
/// (PgBouncer: `unsupported startup parameter: options`), or, told to
/// ignore it, drops the settings it carries without a word.
pub fn pool_mode_setting(database: &tokio_postgres::Config) -> Result<PoolMode, String> {
    let mode = setting("DATABASE_POOL_MODE", "session", |text| match text {
        "session" => Ok(PoolMode::Session),
        "transaction" => Ok(PoolMode::Transaction),
        _ => Err("expected `session` or `transaction`".to_owned()),
    })?;
    let has_options = database.get_options().is_some_and(|options| !options.trim().is_empty());
    if mode == PoolMode::Transaction && has_options {
        return Err(
            "invalid DATABASE_URL with DATABASE_POOL_MODE=transaction: its `options` is a startup parameter, which a \
             transaction-mode pooler refuses or drops; set those settings on the role instead \
             (ALTER ROLE ... SET ...)"
                .to_owned(),
        );
    }
    Ok(mode)
}

/// The fault-injection knobs, applied after a handler writes its ledger row.
#[derive(Clone, Copy, Debug)]
pub struct Demo {
    pub failure_rate: f64,
    pub handler_delay: Duration,
}

impl Demo {
    /// `DEMO_FAILURE_RATE` and `DEMO_HANDLER_DELAY_MS`.
    pub fn from_env() -> Result<Self, String> {
        let failure_rate = setting("DEMO_FAILURE_RATE", "0", |text| match text.parse::<f64>() {
            Ok(rate) if (0.0..=1.0).contains(&rate) => Ok(rate),
            _ => Err("expected a probability between 0 and 1".to_owned()),
        })?;
        let delay_ms = setting("DEMO_HANDLER_DELAY_MS", "0", |text| {
            text.parse::<u64>()
                .map_err(|_| "expected a whole number of milliseconds".to_owned())
        })?;
        Ok(Self {
            failure_rate,
            handler_delay: Duration::from_millis(delay_ms),
        })
    }

    /// Sleeps the configured delay, then says whether to fail this request.
    pub async fn after_write(&self) -> bool {
        if !self.handler_delay.is_zero() {
            tokio::time::sleep(self.handler_delay).await;
        }
        self.failure_rate > 0.0 && fastrand::f64() < self.failure_rate
    }
}

/// The pool every request draws from. Each timeout is explicit so that a
/// slow or absent database turns into a prompt error, never a hung request.
///
/// In session mode the statement timeout is a startup option of every
/// connection. Behind a transaction-mode pooler there is no such thing as a
/// connection's setting (the pooler refuses startup options, and a session
/// `SET` would stay on whichever server connection ran it): each
/// transaction sets it with `SET LOCAL` instead ([`postgres_store`],
/// [`create_ledger`]).
pub fn connection_pool(mut database: tokio_postgres::Config, size: usize, mode: PoolMode) -> Result<Pool, String> {
    if mode == PoolMode::Session {
        // Keep options the URL may carry (a search_path, say) and add ours.
        let statement_timeout = format!("-c statement_timeout={}", STATEMENT_TIMEOUT.as_millis());
        let options = match database.get_options() {
            Some(existing) if !existing.trim().is_empty() => format!("{existing} {statement_timeout}"),
            _ => statement_timeout,
        };
        database.options(options);
    }
    database.connect_timeout(CONNECT_TIMEOUT);
    let manager = Manager::from_config(
        database,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(POOL_WAIT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|error| format!("cannot build the connection pool: {error}"))
}

/// The pool's timeouts, for the startup line.
pub fn pool_summary(size: usize, mode: PoolMode) -> String {
    format!(
        "pool {size} connections, connect timeout {}s, pool wait {}s, {}",
        CONNECT_TIMEOUT.as_secs(),
        POOL_WAIT_TIMEOUT.as_secs(),
        statement_timeout_summary(mode),
    )
}

/// How the statement timeout is set, for the startup line.
pub fn statement_timeout_summary(mode: PoolMode) -> String {
    match mode {
        PoolMode::Transaction => format!(
            "statement timeout {}s (SET LOCAL in each transaction, pool mode transaction)",
            STATEMENT_TIMEOUT.as_secs()
        ),
        _ => format!("statement timeout {}s", STATEMENT_TIMEOUT.as_secs()),
    }
}

/// `SET LOCAL statement_timeout` for a transaction of the example's own,
/// behind a transaction-mode pooler.
fn set_local_statement_timeout() -> String {
    format!("SET LOCAL statement_timeout = {}", STATEMENT_TIMEOUT.as_millis())
}

/// The store for `pool`: behind a transaction-mode pooler it sends no named
/// prepared statement and sets the statement timeout in each request
/// transaction (the handler's statements through `Tx` included).
pub fn postgres_store(pool: Pool, mode: PoolMode) -> tower_idempotency::PostgresStore {
    let store = tower_idempotency::PostgresStore::new(pool).with_pool_mode(mode);
    match mode {
        PoolMode::Transaction => store.with_statement_timeout(STATEMENT_TIMEOUT),
        _ => store,
    }
}

/// `user@host:port/dbname`, for error messages: the URL itself may hold a
/// password.
pub fn describe_database(database: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;

    let port = database.get_ports().first().copied().unwrap_or(5432);
    let hosts: Vec<String> = database
        .get_hosts()
        .iter()
        .map(|host| match host {
            Host::Tcp(name) => format!("{name}:{port}"),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let mut text = String::new();
    if let Some(user) = database.get_user() {
        let _ = write!(text, "{user}@");
    }
    text.push_str(&hosts.join(","));
    if let Some(dbname) = database.get_dbname() {
        let _ = write!(text, "/{dbname}");
    }
    text
}

/// An error with its causes, each once: the root cause (say, "connection
/// refused") often is only in the chain. A pooler's refusal of the
/// `options` startup parameter gets the setting that avoids it.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    if text.contains("unsupported startup parameter") {
        text.push_str(
            "; DATABASE_URL reaches a transaction-mode pooler, which refuses the statement timeout's startup \
             option: set DATABASE_POOL_MODE=transaction",
        );
    }
    text
}

/// Creates `ledger_entries` when absent. It is looked up first (through the
/// `search_path`, as the server resolves it), so that a role with only DML
/// grants starts once the table exists: `CREATE TABLE IF NOT EXISTS` alone
/// would demand the schema's CREATE privilege before it looks.
///
/// Its statements go unnamed (one round trip each, whatever the pool mode):
/// they run once per start.
pub async fn create_ledger(pool: &Pool, mode: PoolMode) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = pool.get().await?;
    let transaction = client.transaction().await?;
    if mode == PoolMode::Transaction {
        transaction.batch_execute(&set_local_statement_timeout()).await?;
    }
    transaction
        .execute_typed(
            "SELECT pg_advisory_xact_lock($1)",
            &[(&LEDGER_MIGRATION_LOCK, Type::INT8)],
        )
        .await?;
    let exists: bool = transaction
        .query_typed_one("SELECT to_regclass('ledger_entries') IS NOT NULL", &[])
        .await?
        .try_get(0)?;
    if !exists {
        transaction.batch_execute(CREATE_LEDGER).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// One business effect: a ledger row. Returns its id.
///
/// On a direct connection the statement is prepared once per connection
/// and reused. Behind a transaction-mode pooler a prepared statement would
/// stay on the server connection that prepared it, which the next
/// transaction may not get: the statement goes unnamed with its parameter
/// types instead, in one round trip all the same.
pub async fn insert_ledger_entry(
    client: &ClientWrapper,
    mode: PoolMode,
    source: &str,
    event_id: &str,
    event_type: &str,
    amount_cents: i64,
) -> Result<i64, tokio_postgres::Error> {
    let row = match mode {
        PoolMode::Transaction => {
            client
                .query_typed_one(
                    INSERT_LEDGER_ENTRY,
                    &[
                        (&source, Type::TEXT),
                        (&event_id, Type::TEXT),
                        (&event_type, Type::TEXT),
                        (&amount_cents, Type::INT8),
                    ],
                )
                .await?
        }
        _ => {
            let statement = client.prepare_cached(INSERT_LEDGER_ENTRY).await?;
            client
                .query_one(&statement, &[&source, &event_id, &event_type, &amount_cents])
                .await?
        }
    };
    row.try_get(0)
}

/// The sqlx pool every request draws from (`DATABASE_DRIVER=sqlx`), with
/// the same timeouts as [`connection_pool`]. It does not ping a connection
/// before handing it out: a dead one fails its statement, and the layer
/// then forgets the pool's idle connections.
///
/// Behind a transaction-mode pooler it keeps no statement prepared
/// (`statement_cache_capacity(0)`: sqlx then sends every statement unnamed)
/// and sets no startup option; the statement timeout is set with
/// `SET LOCAL` in each transaction instead ([`sqlx_store`]).
#[cfg(feature = "sqlx")]
pub fn sqlx_pool(database_url: &str, size: usize, mode: PoolMode) -> Result<sqlx::PgPool, String> {
    let mut options: sqlx::postgres::PgConnectOptions = database_url
        .parse()
        .map_err(|_| "invalid DATABASE_URL: not a Postgres URL sqlx can read".to_owned())?;
    if mode == PoolMode::Session {
        // Keep options the URL may carry (a search_path, say) and add ours.
        options = options.options([("statement_timeout", STATEMENT_TIMEOUT.as_millis().to_string())]);
    } else {
        options = options.statement_cache_capacity(0);
    }
    Ok(sqlx::postgres::PgPoolOptions::new()
        .max_connections(size as u32)
        .acquire_timeout(POOL_WAIT_TIMEOUT)
        .test_before_acquire(false)
        .connect_lazy_with(options))
}

/// The sqlx store for `pool`, as [`postgres_store`] for tokio-postgres.
#[cfg(feature = "sqlx")]
pub fn sqlx_store(pool: sqlx::PgPool, mode: PoolMode) -> tower_idempotency::SqlxStore {
    let store = tower_idempotency::SqlxStore::new(pool).with_pool_mode(mode);
    match mode {
        PoolMode::Transaction => store.with_statement_timeout(STATEMENT_TIMEOUT),
        _ => store,
    }
}

/// [`create_ledger`] through sqlx.
#[cfg(feature = "sqlx")]
pub async fn create_ledger_sqlx(pool: &sqlx::PgPool, mode: PoolMode) -> Result<(), Box<dyn std::error::Error>> {
    use sqlx::{Connection, Row};

    let mut connection = pool.acquire().await?;
    let mut transaction = connection.begin().await?;
    if mode == PoolMode::Transaction {
        sqlx::raw_sql(sqlx::AssertSqlSafe(set_local_statement_timeout()))
            .execute(&mut *transaction)
            .await?;
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(LEDGER_MIGRATION_LOCK)
        .execute(&mut *transaction)
        .await?;
    let exists: bool = sqlx::query("SELECT to_regclass('ledger_entries') IS NOT NULL")
        .fetch_one(&mut *transaction)
        .await?
        .try_get(0)?;
    if !exists {
        sqlx::raw_sql(CREATE_LEDGER).execute(&mut *transaction).await?;
    }
    transaction.commit().await?;
    Ok(())
}

/// [`insert_ledger_entry`] through sqlx: the request's transaction
/// ([`tower_idempotency::SqlxTx`]) or a pooled connection.
///
/// Behind a transaction-mode pooler the statement goes unnamed
/// (`persistent(false)`).
#[cfg(feature = "sqlx")]
pub async fn insert_ledger_entry_sqlx(
    connection: &mut sqlx::PgConnection,
    mode: PoolMode,
    source: &str,
    event_id: &str,
    event_type: &str,
    amount_cents: i64,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(INSERT_LEDGER_ENTRY)
        .bind(source)
        .bind(event_id)
        .bind(event_type)
        .bind(amount_cents)
        .persistent(mode == PoolMode::Session)
        .fetch_one(connection)
        .await
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                terminate.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();

    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// The future a server stops accepting on.
pub type StopSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs the server that `serve` builds around a stop signal until SIGTERM or
/// Ctrl-C, then shuts down within `grace` of it: the server stops accepting
/// and the layer takes no new claims at once; in-flight and detached handlers
/// may finish until the deadline; past it the layer cuts them off and
/// releases their claims (rolled back, or deleted by their claim token), and
/// connections still open are dropped. axum and tonic alone would wait for
/// open connections without any bound.
pub async fn serve_until_shutdown<S, E>(
    serve: impl FnOnce(StopSignal) -> S,
    layer: &ShutdownHandle,
    grace: Duration,
) -> Result<(), E>
where
    S: Future<Output = Result<(), E>>,
{
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = serve(Box::pin(async move {
        let _ = stopped.await;
    }));
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => return result,
        () = shutdown_signal() => {}
    }
    let deadline = tokio::time::Instant::now() + grace;
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        "shutting down: letting in-flight requests finish"
    );
    let _ = stop.send(());
    let (served, report) = tokio::join!(tokio::time::timeout_at(deadline, &mut server), layer.shutdown(grace));
    match served {
        Ok(result) => result?,
        Err(_) => tracing::warn!("connections still open at the shutdown deadline were closed"),
    }
    tracing::info!(
        cut_off = report.cancelled,
        "shut down; requests cut off at the deadline had their claims released"
    );
    Ok(())
}
