//! The Postgres store: records in a table reached through a
//! deadpool-postgres pool; its statements are in [`sql`], the request's
//! transaction in [`tx`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use deadpool_postgres::{Object, Pool};
use http::StatusCode;
use tokio::sync::OnceCell;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, SimpleQueryMessage};

mod error;
mod migration;
mod operations;
mod ready;
pub(super) mod sql;
mod tx;

#[cfg(feature = "sqlx")]
pub(super) use migration::{migration_lock_id, refused_for_privilege, Found, TABLE_PRIVILEGES};
pub use operations::{Deletion, RecordView, StoreGauges, StoreStats};
pub(crate) use tx::TxConnection;
pub use tx::{IdempotencyTx, Tx, TxError};

use self::sql::{Statements, COMPLETED, KEY_TAKEN};
use super::cache::RecordCache;
use super::recent::RecentKeys;
use super::{
    Backend, Claim, ClaimOutcome, ClaimRequest, Completed, Completion, HeldClaim, Lookup, ReleaseBound, StoreError,
    StoreFuture,
};
use crate::key::RecordKey;
use crate::policy::Mode;
use crate::record::{decode_headers, encode_headers, StoredResponse};
use crate::shutdown::{self, Tracker};
use crate::store::lease::{self, LeaseClaim, LeaseRows};
use crate::PoolMode;

/// The default records table.
pub const DEFAULT_TABLE: &str = "idempotency_records";

/// Records in a Postgres table, reached through a deadpool-postgres pool.
///
/// ```no_run
/// use tower_idempotency::PostgresStore;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut config = deadpool_postgres::Config::new();
/// config.url = Some("postgres://postgres@127.0.0.1:5432/postgres".into());
/// let pool = config.create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)?;
/// let store = PostgresStore::new(pool).with_table("billing.idempotency_records")?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

/// What the builders choose. Every builder changes one field and rebuilds
/// [`Inner`] from the whole, so that none of them can drop another's choice,
/// whatever order they are called in.
#[derive(Clone)]
struct Settings {
    pool: Pool,
    table: TableName,
    cache: Option<CacheSettings>,
    /// Off only in tests that need two claimants past the lock at once.
    advisory_locks: bool,
    pool_mode: PoolMode,
    /// Set with `SET LOCAL` at the start of each request transaction.
    statement_timeout: Option<Duration>,
}

#[derive(Clone, Copy)]
struct CacheSettings {
    max_bytes: u64,
    ttl: Duration,
}

struct Inner {
    settings: Settings,
    sql: Statements,
    /// The table's schema-qualified name as the server resolves it. Advisory
    /// locks are database-wide, so two tables of the same name in different
    /// schemas must not share lock ids.
    lock_namespace: OnceCell<String>,
    cache: Option<RecordCache>,
    /// Keys seen completed lately: a likely duplicate is read first.
    recent: RecentKeys,
}

impl Inner {
    fn new(settings: Settings) -> Self {
        Self {
            sql: Statements::new(&settings.table, settings.advisory_locks, settings.statement_timeout),
            lock_namespace: OnceCell::new(),
            cache: settings.cache.map(|cache| RecordCache::new(cache.max_bytes, cache.ttl)),
            recent: RecentKeys::new(),
            settings,
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("table", &self.inner.settings.table.display)
            .field("pool_mode", &self.inner.settings.pool_mode)
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// A store on `pool` using the table `idempotency_records` in the
    /// connection's default schema.
    pub fn new(pool: Pool) -> Self {
        Self {
            inner: Arc::new(Inner::new(Settings {
                pool,
                table: TableName::unqualified(DEFAULT_TABLE),
                cache: None,
                advisory_locks: true,
                pool_mode: PoolMode::Session,
                statement_timeout: None,
            })),
        }
    }

    /// The same store with one setting changed, every other one kept.
    fn with_settings(self, change: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = self.inner.settings.clone();
        change(&mut settings);
        Self {
            inner: Arc::new(Inner::new(settings)),
        }
    }

    /// Uses another table: `name` or `schema.name`, each an unquoted SQL
    /// identifier (letters, digits and `_`, not starting with a digit, at
    /// most 63 bytes).
    pub fn with_table(self, name: &str) -> Result<Self, InvalidTableName> {
        let table = TableName::parse(name)?;
        Ok(self.with_settings(|settings| settings.table = table))
    }

    /// Keeps completed records in process memory (at most `max_bytes` of
    /// them, each for at most `ttl`), so that a duplicate of a recently
    /// completed event is answered without a database round trip. Off by
    /// default. A record only changes by expiring or by an operator's
    /// release; after a release, an instance whose cache holds the record
    /// may still replay it for up to `ttl`, so keep `ttl` short (seconds).
    ///
    /// ```
    /// # fn store(pool: deadpool_postgres::Pool) {
    /// use std::time::Duration;
    /// use tower_idempotency::PostgresStore;
    ///
    /// let store = PostgresStore::new(pool).with_cache(64 * 1024 * 1024, Duration::from_secs(10));
    /// # let _ = store; }
    /// ```
    pub fn with_cache(self, max_bytes: u64, ttl: Duration) -> Self {
        self.with_settings(|settings| settings.cache = Some(CacheSettings { max_bytes, ttl }))
    }

    /// Says what is between the store and Postgres: [`PoolMode::Session`]
    /// (the default) for direct connections and session-mode poolers,
    /// [`PoolMode::Transaction`] behind a transaction-mode pooler (PgBouncer
    /// with `pool_mode = transaction`, Supavisor's transaction port, RDS
    /// Proxy). In transaction mode the store uses no named prepared
    /// statement and nothing else that outlives a transaction: every
    /// statement is sent unnamed with its parameter types, in one round
    /// trip. Everything else works the same: claims, completions,
    /// replays, the handler's [`Tx`], the operations and
    /// [`PostgresStore::migrate`].
    ///
    /// The handler's own statements must follow the same rule (see
    /// [`Tx`]), and so must the pool: no `options` startup parameter
    /// (set timeouts with [`PostgresStore::with_statement_timeout`]).
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use tower_idempotency::{PoolMode, PostgresStore};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let mut config = deadpool_postgres::Config::new();
    /// config.url = Some("postgres://app@pgbouncer.internal:6432/app".into());
    /// let pool = config.create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)?;
    /// let store = PostgresStore::new(pool)
    ///     .with_pool_mode(PoolMode::Transaction)
    ///     .with_statement_timeout(Duration::from_secs(5));
    /// store.migrate().await?;
    /// # Ok(()) }
    /// ```
    pub fn with_pool_mode(self, mode: PoolMode) -> Self {
        self.with_settings(|settings| settings.pool_mode = mode)
    }

    /// Has the server cancel any statement of a request's transaction
    /// ([`Mode::Transaction`](crate::Mode::Transaction): the claim's read,
    /// the handler's statements through [`Tx`], the completion and the
    /// commit) that runs longer than
    /// `timeout`: `SET LOCAL statement_timeout` travels with the
    /// transaction's `BEGIN`, in the same message, so it costs no round
    /// trip and ends with the transaction. It works behind a
    /// transaction-mode pooler, which refuses the `options` startup
    /// parameter that would set it for a whole session. Statements outside
    /// a request transaction (lease mode's, the operations') are bounded by
    /// the layer's `store_timeout` on the client side only. Unset by
    /// default; a timeout under a millisecond counts as one.
    ///
    /// ```
    /// # fn store(pool: deadpool_postgres::Pool) {
    /// use std::time::Duration;
    /// use tower_idempotency::PostgresStore;
    ///
    /// let store = PostgresStore::new(pool).with_statement_timeout(Duration::from_secs(5));
    /// # let _ = store; }
    /// ```
    pub fn with_statement_timeout(self, timeout: Duration) -> Self {
        self.with_settings(|settings| settings.statement_timeout = Some(timeout))
    }

    /// How statements are sent (see [`PostgresStore::with_pool_mode`]).
    pub(super) fn pool_mode(&self) -> PoolMode {
        self.inner.settings.pool_mode
    }

    /// Claims without the key's advisory lock, so that two claimants of one
    /// key can both get past it, as they can where the lock does not exclude
    /// (a lock-id collision, a misconfigured pooler, a distributed Postgres
    /// whose nodes keep their own locks). For tests of what the record's
    /// unique key still guarantees then; never for production.
    #[doc(hidden)]
    pub fn without_advisory_locks_for_tests_only(self) -> Self {
        self.with_settings(|settings| settings.advisory_locks = false)
    }

    /// Forgets a released record: its cache entry and its hint.
    pub(super) fn forget(&self, key: &RecordKey) {
        if let Some(cache) = &self.inner.cache {
            cache.remove(key);
        }
        self.inner.recent.remove(key);
    }

    /// The cached completed record of `key`, when the cache is on.
    pub(super) fn cached(&self, key: &RecordKey) -> Option<Completed> {
        self.inner.cache.as_ref()?.get(key)
    }

    /// Whether `key` is probably a duplicate of a completed record: cached,
    /// or seen completed lately by this instance. Only chooses which
    /// statement goes first; never an answer.
    pub(super) fn likely_completed(&self, key: &RecordKey) -> bool {
        self.inner.recent.contains(key) || self.inner.cache.as_ref().is_some_and(|cache| cache.get(key).is_some())
    }

    /// Remembers a completed record read from `row` (which carries its
    /// `expires_at`).
    fn remember_found(&self, key: &RecordKey, row: &Row, found: &Lookup) -> Result<(), StoreError> {
        let Lookup::Completed(completed) = found else {
            return Ok(());
        };
        self.inner.recent.insert(key);
        if let Some(cache) = &self.inner.cache {
            let expires_at: SystemTime = row.try_get("expires_at")?;
            let valid_for = expires_at.duration_since(SystemTime::now()).unwrap_or_default();
            cache.insert(key, completed.clone(), valid_for);
        }
        Ok(())
    }

    /// Remembers a record just completed by this instance.
    fn cache_completion(&self, request: &ClaimRequest, response: &StoredResponse) {
        self.inner.recent.insert(&request.key);
        if let Some(cache) = &self.inner.cache {
            let completed = Completed {
                fingerprint: request.fingerprint,
                response: response.clone(),
            };
            cache.insert(&request.key, completed, request.retention);
        }
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &Pool {
        &self.inner.settings.pool
    }

    /// The table name, quoted for SQL.
    pub(super) fn quoted_table(&self) -> String {
        self.inner.settings.table.quoted()
    }

    /// The table name as configured.
    pub(super) fn table_name(&self) -> &TableName {
        &self.inner.settings.table
    }

    pub(super) async fn connection(&self) -> Result<Object, StoreError> {
        Ok(self.inner.settings.pool.get().await?)
    }

    /// The advisory lock id of a key, namespaced by the resolved table (one
    /// round trip, the first time only).
    async fn lock_id(&self, client: &Object, key: &RecordKey) -> Result<i64, StoreError> {
        let namespace = self
            .inner
            .lock_namespace
            .get_or_try_init(|| async {
                let row = self
                    .pool_mode()
                    .unprepared(&self.inner.sql.resolve_table)
                    .query_opt(client, &[&self.inner.settings.table.quoted()])
                    .await?;
                match row {
                    Some(row) => Ok::<_, StoreError>(row.try_get::<_, String>(0)?),
                    None => Err(StoreError::TableMissing(self.inner.settings.table.display.clone())),
                }
            })
            .await?;
        Ok(key.lock_id(namespace))
    }

    pub(super) async fn lookup(&self, key: &RecordKey) -> Result<Lookup, StoreError> {
        if let Some(completed) = self.inner.cache.as_ref().and_then(|cache| cache.get(key)) {
            return Ok(Lookup::Completed(completed));
        }
        let client = self.connection().await?;
        let statement = self.pool_mode().ready(&client, &self.inner.sql.lookup).await?;
        let row = statement
            .query_opt(&client, &[&key.source, &key.event_type, &key.key])
            .await?;
        let Some(row) = row else {
            return Ok(Lookup::Absent);
        };
        let found = lookup_from_row(&row)?;
        self.remember_found(key, &row, &found)?;
        Ok(found)
    }

    pub(super) async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        match request.mode {
            Mode::Transaction => self.claim_transaction(request).await,
            Mode::Lease { lease, .. } => self.claim_lease(request, lease).await,
        }
    }

    /// One round trip: `BEGIN`, try the key's advisory lock, read the record.
    /// The read is a statement of its own so that its snapshot is taken after
    /// the try-lock: when the lock is had, nobody else can complete the key
    /// before this transaction ends; when it is not, the read is still a
    /// fresh plain read. Either way it answers a duplicate of a completed
    /// key, so no separate read has to come first.
    ///
    /// `BEGIN` and the try-lock travel as one simple query (its only value is
    /// the lock id, a number computed here), so the server answers them with
    /// one flush instead of two.
    ///
    /// On a route with the body-hash guard the body's record is locked and
    /// read in the same round trip; the claim is had only when both locks
    /// are and neither record is live, and a live body record answers as a
    /// live key record would.
    async fn claim_transaction(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let client = self.connection().await?;
        let lookup = self.pool_mode().ready(&client, &self.inner.sql.lookup).await?;
        let key = &request.key;
        let lock_id = self.lock_id(&client, key).await?;
        let body_record = request.body_record.as_deref();
        let body_lock_id = match body_record {
            Some(body_record) => Some(self.lock_id(&client, body_record).await?),
            None => None,
        };
        let connection = TxConnection::new(client);
        let Some(client) = connection.object() else {
            return Err(StoreError::ConnectionGone);
        };
        let begin_and_try_lock = self.inner.sql.begin_and_try_lock(lock_id, body_lock_id);
        let key_params: [&(dyn ToSql + Sync); 3] = [&key.source, &key.event_type, &key.key];
        let body_lookup = async {
            match body_record {
                Some(body) => lookup
                    .query_opt(client, &[&body.source, &body.event_type, &body.key])
                    .await
                    .map(|row| row.map(|row| (body, row))),
                None => Ok(None),
            }
        };
        let pipelined = tokio::try_join!(
            client.simple_query(&begin_and_try_lock),
            lookup.query_opt(client, &key_params),
            body_lookup,
        );
        let (locked, row, body_row) = match pipelined {
            Ok(results) => results,
            Err(error) => {
                connection.discard();
                return Err(error.into());
            }
        };
        // An early return below drops `connection`, which rolls back.
        let locked = locked.iter().any(|message| match message {
            SimpleQueryMessage::Row(row) => row.get(0) == Some("t"),
            _ => false,
        });
        // The key's record answers first; the body's when the key has none.
        let found = match (&row, &body_row) {
            (Some(row), _) => Some((key, row)),
            (None, Some((body, row))) => Some((*body, row)),
            (None, None) => None,
        };
        let found = match found {
            Some((record, row)) => {
                let lookup = lookup_from_row(row)?;
                self.remember_found(record, row, &lookup)?;
                lookup
            }
            None => Lookup::Absent,
        };
        if locked && matches!(found, Lookup::Absent) {
            let held = TxClaim {
                store: self.clone(),
                tx: IdempotencyTx::new(connection),
            };
            return Ok(ClaimOutcome::Claimed(Claim::new(request, Box::new(held))));
        }
        // Not claimed: the answer is known, so the rollback runs in the
        // background, off the response path; the connection goes back to
        // the pool only once it is done.
        drop(connection);
        Ok(match found {
            Lookup::Completed(completed) => ClaimOutcome::Completed(completed),
            Lookup::InFlight { fingerprint } => ClaimOutcome::InFlight {
                fingerprint: Some(fingerprint),
            },
            Lookup::Absent => ClaimOutcome::InFlight { fingerprint: None },
        })
    }

    /// One statement: a conditional upsert under the key's advisory lock
    /// that inserts a claim or takes over an expired record or lease, and
    /// returns, beside the claim token it wrote (if any), the live record it
    /// found (if any), so that a duplicate is answered by the same round
    /// trip. It writes nothing when a live record is there.
    async fn claim_lease(&self, request: ClaimRequest, lease: Duration) -> Result<ClaimOutcome, StoreError> {
        let connection = ClosedIfAbandoned(Some(self.connection().await?));
        let Some(client) = &connection.0 else {
            return Err(StoreError::ConnectionGone);
        };
        let outcome = self.claim_lease_on(client, request, lease).await;
        connection.keep();
        outcome
    }

    async fn claim_lease_on(
        &self,
        client: &Object,
        request: ClaimRequest,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let claim = self.pool_mode().ready(client, &self.inner.sql.claim_lease).await?;
        let key = &request.key;
        let lock_id = self.lock_id(client, key).await?;
        // The statement reads the record as of its start: one that went away
        // since (released, expired) leaves nothing claimed and nothing found,
        // and the claim is tried again.
        let token = request.claim_token;
        for _ in 0..3 {
            let row = claim
                .query_one(
                    client,
                    &[
                        &key.source,
                        &key.event_type,
                        &key.key,
                        &&request.fingerprint[..],
                        &token,
                        &lease.as_secs_f64(),
                        &request.retention.as_secs_f64(),
                        &lock_id,
                    ],
                )
                .await?;
            if row.try_get::<_, Option<uuid::Uuid>>("claimed")?.is_some() {
                let held = LeaseClaim {
                    store: self.clone(),
                    token,
                };
                return Ok(ClaimOutcome::Claimed(Claim::new(request, Box::new(held))));
            }
            let found = match row.try_get::<_, Option<i16>>("state")? {
                Some(_) => lookup_from_row(&row)?,
                None => Lookup::Absent,
            };
            self.remember_found(key, &row, &found)?;
            match found {
                Lookup::Completed(completed) => return Ok(ClaimOutcome::Completed(completed)),
                Lookup::InFlight { fingerprint } => {
                    return Ok(ClaimOutcome::InFlight {
                        fingerprint: Some(fingerprint),
                    })
                }
                Lookup::Absent => continue,
            }
        }
        Ok(ClaimOutcome::InFlight { fingerprint: None })
    }

    pub(super) async fn renew(&self, key: &RecordKey, token: uuid::Uuid, lease: Duration) -> Result<bool, StoreError> {
        let client = self.connection().await?;
        let statement = self.pool_mode().ready(&client, &self.inner.sql.renew_lease).await?;
        let updated = statement
            .execute(
                &client,
                &[&key.source, &key.event_type, &key.key, &token, &lease.as_secs_f64()],
            )
            .await?;
        Ok(updated == 1)
    }

    pub(super) async fn complete_lease(
        &self,
        request: &ClaimRequest,
        token: uuid::Uuid,
        response: &StoredResponse,
    ) -> Result<Completion, StoreError> {
        let client = self.connection().await?;
        let statement = self.pool_mode().ready(&client, &self.inner.sql.complete_lease).await?;
        let key = &request.key;
        let (status, headers, body) = response_columns(response);
        let updated = statement
            .execute(
                &client,
                &[
                    &key.source,
                    &key.event_type,
                    &key.key,
                    &token,
                    &status,
                    &headers,
                    &body,
                    &request.retention.as_secs_f64(),
                ],
            )
            .await?;
        if updated == 1 {
            self.cache_completion(request, response);
        }
        Ok(if updated == 1 {
            Completion::Recorded
        } else {
            Completion::FencedOut
        })
    }

    pub(super) async fn release_lease(&self, key: &RecordKey, token: uuid::Uuid) -> Result<(), StoreError> {
        let client = self.connection().await?;
        let statement = self.pool_mode().ready(&client, &self.inner.sql.release_lease).await?;
        statement
            .execute(&client, &[&key.source, &key.event_type, &key.key, &token])
            .await?;
        Ok(())
    }

    /// Writes the record and commits in one pipelined round trip.
    /// [`Completion::CompletedElsewhere`] when another claimant's live record
    /// holds the key: the write failed and the `COMMIT` rolled back, so the
    /// connection, its state known, goes back to the pool. On any other error
    /// the connection is closed rather than reused, since the transaction's
    /// state is then unknown.
    pub(super) async fn complete_transaction(
        &self,
        connection: TxConnection,
        request: &ClaimRequest,
        response: &StoredResponse,
    ) -> Result<Completion, StoreError> {
        let Some(client) = connection.object() else {
            return Err(StoreError::ConnectionGone);
        };
        let statement = match self
            .pool_mode()
            .ready(client, &self.inner.sql.complete_transaction)
            .await
        {
            Ok(statement) => statement,
            Err(error) => {
                connection.discard();
                return Err(error.into());
            }
        };
        let key = &request.key;
        let (status, headers, body) = response_columns(response);
        let retention = request.retention.as_secs_f64();
        let fingerprint = &request.fingerprint[..];
        let params: [&(dyn ToSql + Sync); 8] = [
            &key.source,
            &key.event_type,
            &key.key,
            &fingerprint,
            &status,
            &headers,
            &body,
            &retention,
        ];
        // The body's record (the body-hash guard) is written beside the key's,
        // with the same response, in the same transaction.
        let body_written = async {
            let Some(body) = &request.body_record else {
                return Ok(0);
            };
            let mut body_params = params;
            body_params[..3].copy_from_slice(&[&body.source, &body.event_type, &body.key]);
            statement.execute(client, &body_params).await
        };
        // All run to the end: after a failed write, the server still runs
        // the pipelined `COMMIT`, which then rolls back (and says so only in
        // its command tag, not as an error).
        let (written, body_written, committed) = tokio::join!(
            statement.execute(client, &params),
            body_written,
            client.batch_execute(sql::COMMIT)
        );
        let written = written.and(body_written);
        match (written, committed) {
            (Ok(_), Ok(())) => {
                connection.closed_cleanly();
                self.cache_completion(request, response);
                Ok(Completion::Recorded)
            }
            (Err(error), Ok(())) if self.is_key_taken(&error) => {
                connection.closed_cleanly();
                Ok(Completion::CompletedElsewhere)
            }
            (Err(error), _) | (Ok(_), Err(error)) => {
                connection.discard();
                Err(error.into())
            }
        }
    }

    /// Whether `error` is the completion's refusal to write a second record
    /// of a key (see `Statements::complete_transaction`), or the table's
    /// primary key refusing one.
    fn is_key_taken(&self, error: &tokio_postgres::Error) -> bool {
        use tokio_postgres::error::SqlState;
        error.as_db_error().is_some_and(|db| {
            (db.code() == &SqlState::INVALID_TEXT_REPRESENTATION && db.message().contains(KEY_TAKEN))
                || (db.code() == &SqlState::UNIQUE_VIOLATION
                    && db.table() == Some(self.inner.settings.table.table.as_str()))
        })
    }
}

impl Backend for PostgresStore {
    fn lookup<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Lookup> {
        Box::pin(PostgresStore::lookup(self, key))
    }

    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, ClaimOutcome> {
        Box::pin(PostgresStore::claim(self, request))
    }

    fn cached(&self, key: &RecordKey) -> Option<Completed> {
        PostgresStore::cached(self, key)
    }

    fn likely_completed(&self, key: &RecordKey) -> bool {
        PostgresStore::likely_completed(self, key)
    }

    fn forget_idle_connections(&self) {
        self.pool().retain(|_, _| false);
    }

    fn release_unknown_claim(
        &self,
        request: &ClaimRequest,
        error: &StoreError,
        bound: Duration,
        tracker: &Arc<Tracker>,
    ) {
        lease::release_unknown_claim(self, request, error, bound, tracker);
    }
}

/// A transaction-mode claim: the open transaction holding the key's
/// advisory lock, handed to the handler.
#[derive(Debug)]
struct TxClaim {
    store: PostgresStore,
    tx: IdempotencyTx,
}

impl TxClaim {
    /// The connection back from the handler: `TransactionInUse` while it
    /// still holds a `Tx`.
    fn connection(&self) -> Result<TxConnection, StoreError> {
        let connection = self.tx.take().map_err(|_| StoreError::TransactionInUse)?;
        connection.ok_or(StoreError::ConnectionGone)
    }
}

impl HeldClaim for TxClaim {
    fn lend_transaction(&self, extensions: &mut http::Extensions) {
        extensions.insert(self.tx.clone());
    }

    fn complete<'a>(
        self: Box<Self>,
        request: &'a ClaimRequest,
        response: &'a StoredResponse,
    ) -> StoreFuture<'a, Completion> {
        Box::pin(async move {
            let connection = self.connection()?;
            self.store.complete_transaction(connection, request, response).await
        })
    }

    fn end_unrecorded<'a>(self: Box<Self>, _request: &'a ClaimRequest) -> StoreFuture<'a, ()> {
        Box::pin(async move { self.connection()?.commit().await.map_err(StoreError::from) })
    }

    fn release<'a>(self: Box<Self>, _request: &'a ClaimRequest, bound: &'a ReleaseBound) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            match self.tx.take() {
                Ok(Some(connection)) => match tokio::time::timeout(bound.timeout, connection.rollback()).await {
                    Ok(rolled_back) => rolled_back.map_err(StoreError::from),
                    Err(_) => Err(StoreError::Timeout(bound.timeout)),
                },
                // The slot's own guard rolls back once the handler lets go.
                Ok(None) | Err(_) => Ok(()),
            }
        })
    }

    fn abandon(self: Box<Self>, _request: &ClaimRequest, bound: &ReleaseBound) {
        // A handler that still holds a `Tx` lets go later; the connection's
        // own guard rolls back then.
        if let Ok(Some(connection)) = self.tx.take() {
            let timeout = bound.timeout;
            shutdown::spawn(bound.tracker.as_ref(), async move {
                // Past the bound the connection is closed, not reused.
                let _ = tokio::time::timeout(timeout, connection.rollback()).await;
            });
        }
    }
}

/// A pooled connection that is closed instead of going back to the pool when
/// the statement it runs is abandoned half-way (its future dropped by the
/// store timeout). An answer still to come would hold up the connection's
/// next user, such as the background release of the abandoned claim.
struct ClosedIfAbandoned(Option<Object>);

impl ClosedIfAbandoned {
    /// The statement finished: the connection goes back to the pool.
    fn keep(mut self) {
        self.0.take();
    }
}

impl Drop for ClosedIfAbandoned {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(Object::take(object));
        }
    }
}

/// A response as the record's columns: status, encoded headers (and
/// trailers), body.
pub(in crate::store) fn response_columns(response: &StoredResponse) -> (i16, Vec<u8>, Option<&[u8]>) {
    let status = response.status.as_u16() as i16;
    let headers = encode_headers(&response.headers, response.trailers.as_deref());
    (status, headers, response.body.as_deref())
}

fn lookup_from_row(row: &Row) -> Result<Lookup, StoreError> {
    let state: i16 = row.try_get("state")?;
    let fingerprint: &[u8] = row.try_get("fingerprint")?;
    if state != COMPLETED {
        return lookup_from_columns(state, fingerprint, None, None, None);
    }
    let status: i16 = row.try_get("response_status")?;
    let headers: &[u8] = row.try_get("response_headers")?;
    let body: Option<&[u8]> = row.try_get("response_body")?;
    lookup_from_columns(state, fingerprint, Some(status), Some(headers), body)
}

/// A live record from its columns, whichever driver read them; the response
/// columns are read only for a completed one.
pub(in crate::store) fn lookup_from_columns(
    state: i16,
    fingerprint: &[u8],
    status: Option<i16>,
    headers: Option<&[u8]>,
    body: Option<&[u8]>,
) -> Result<Lookup, StoreError> {
    let fingerprint = fingerprint_from(fingerprint)?;
    if state != COMPLETED {
        return Ok(Lookup::InFlight { fingerprint });
    }
    let (Some(status), Some(headers)) = (status, headers) else {
        return Err(StoreError::Corrupt(
            "a completed record without its response".to_owned(),
        ));
    };
    let status = u16::try_from(status)
        .ok()
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| StoreError::Corrupt(format!("status {status} is not an HTTP status")))?;
    let (headers, trailers) = decode_headers(headers).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    Ok(Lookup::Completed(Completed {
        fingerprint,
        response: StoredResponse {
            status,
            headers,
            body: body.map(Bytes::copy_from_slice),
            trailers,
        },
    }))
}

fn fingerprint_from(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("fingerprint of {} bytes, expected 32", bytes.len())))
}

/// A validated, quoted table name.
#[derive(Clone, Debug)]
pub(in crate::store) struct TableName {
    pub(in crate::store) schema: Option<String>,
    pub(in crate::store) table: String,
    /// As the user wrote it; also the advisory lock namespace.
    pub(in crate::store) display: String,
}

impl TableName {
    pub(in crate::store) fn unqualified(table: &str) -> Self {
        Self {
            schema: None,
            table: table.to_owned(),
            display: table.to_owned(),
        }
    }

    pub(in crate::store) fn parse(name: &str) -> Result<Self, InvalidTableName> {
        let invalid = || InvalidTableName(name.to_owned());
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, name),
        };
        for part in schema.iter().chain([&table]) {
            let mut chars = part.chars();
            let starts_well = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
            let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !starts_well || !rest_ok || part.len() > 63 {
                return Err(invalid());
            }
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            table: table.to_owned(),
            display: name.to_owned(),
        })
    }

    pub(in crate::store) fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.table),
            None => format!("\"{}\"", self.table),
        }
    }
}

/// A table name that is not a plain SQL identifier.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a valid table name: use `table` or `schema.table` with letters, digits and `_`")]
pub struct InvalidTableName(String);

impl LeaseRows for PostgresStore {
    fn renew<'a>(&'a self, key: &'a RecordKey, token: uuid::Uuid, lease: Duration) -> StoreFuture<'a, bool> {
        Box::pin(PostgresStore::renew(self, key, token, lease))
    }

    fn complete_lease<'a>(
        &'a self,
        request: &'a ClaimRequest,
        token: uuid::Uuid,
        response: &'a StoredResponse,
    ) -> StoreFuture<'a, Completion> {
        Box::pin(PostgresStore::complete_lease(self, request, token, response))
    }

    fn release_lease<'a>(&'a self, key: &'a RecordKey, token: uuid::Uuid) -> StoreFuture<'a, ()> {
        Box::pin(PostgresStore::release_lease(self, key, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_plain_identifiers() {
        assert!(TableName::parse("idempotency_records").is_ok());
        assert_eq!(
            TableName::parse("billing.records").unwrap().quoted(),
            "\"billing\".\"records\""
        );
        for bad in ["", "1abc", "a-b", "a.b.c", "a\"b", "a;drop", &"x".repeat(64)] {
            assert!(TableName::parse(bad).is_err(), "{bad}");
        }
    }
}
