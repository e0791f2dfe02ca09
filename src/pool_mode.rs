//! [`PoolMode`]: what sits between the Postgres store (or the ordering
//! guard) and the server, and so what they may leave on a server session.

/// What sits between the store (or the ordering guard) and Postgres, which
/// decides what they may leave on a server connection from one transaction
/// to the next: set with [`PostgresStore::with_pool_mode`](crate::PostgresStore::with_pool_mode)
/// and [`OrderingGuard::with_pool_mode`](crate::OrderingGuard::with_pool_mode).
///
/// A transaction-mode pooler (PgBouncer with `pool_mode = transaction`,
/// Supavisor on port 6543, RDS Proxy) hands each transaction, and each
/// statement outside one, to whichever server connection is free. Whatever
/// a session holds (a named prepared statement, a session `SET`, a session
/// advisory lock) stays behind on a server connection the next transaction
/// may not get: tokio-postgres' statements fail there with `prepared
/// statement "s6" does not exist`.
///
/// ```no_run
/// use tower_idempotency::{PoolMode, PostgresStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // PgBouncer in transaction mode on port 6432. No `options` in the URL:
/// // PgBouncer refuses startup parameters it does not know.
/// let mut config = deadpool_postgres::Config::new();
/// config.url = Some("postgres://app@127.0.0.1:6432/app".into());
/// let pool = config.create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)?;
/// let store = PostgresStore::new(pool).with_pool_mode(PoolMode::Transaction);
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PoolMode {
    /// Each pooled connection is one server session (a direct connection,
    /// or a pooler in session mode): the store prepares its request-path
    /// statements once per connection and reuses them.
    #[default]
    Session,
    /// Each transaction may run on another server session: the store sends
    /// every statement unnamed, with its parameter types, in one round trip
    /// (never a named prepared statement), and keeps nothing on a session
    /// beyond its transaction (transaction-scoped advisory locks only,
    /// settings with `SET LOCAL`).
    Transaction,
}

/// What a SQLSTATE 26000 ("prepared statement ... does not exist") or 42P05
/// ("prepared statement ... already exists") from the store means, and what
/// to set: named statements that went to one server session and were used
/// on another, behind a transaction-mode pooler.
pub(crate) fn pooler_hint(code: &str) -> Option<&'static str> {
    matches!(code, "26000" | "42P05").then_some(
        "named prepared statements do not survive a transaction-mode pooler (PgBouncer, Supavisor, RDS Proxy); \
         behind one, set PostgresStore::with_pool_mode(PoolMode::Transaction) \
         (DATABASE_POOL_MODE=transaction in the examples)",
    )
}
