//! The Postgres store on an sqlx pool: the same table, statements and
//! guarantees as [`PostgresStore`](crate::PostgresStore), for services whose
//! database access is sqlx. How a statement travels is in [`statement`], the
//! request's transaction in [`tx`].

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ::sqlx::pool::PoolConnection;
use ::sqlx::postgres::{PgConnection, PgPool, PgRow};
use ::sqlx::{AssertSqlSafe, Either, Postgres, Row, SqlSafeStr as _, SqlStr};
use futures_util::TryStreamExt;
use tokio::sync::OnceCell;

mod error;
mod migration;
mod operations;
mod statement;
mod tx;

pub(crate) use tx::SqlxTxConnection;
pub use tx::{SqlxIdempotencyTx, SqlxTx};

use self::error::connect_error;
use self::statement::{bind, inline, lookup_from_row, Timestamp, Value};
use super::cache::RecordCache;
use super::postgres::sql::{self, Statement, Statements, KEY_TAKEN};
use super::postgres::{response_columns, TableName, DEFAULT_TABLE};
use super::recent::RecentKeys;
use super::{
    Backend, Claim, ClaimOutcome, ClaimRequest, Completed, Completion, HeldClaim, InvalidTableName, Lookup,
    ReleaseBound, StoreError, StoreFuture,
};
use crate::key::RecordKey;
use crate::policy::Mode;
use crate::record::StoredResponse;
use crate::shutdown::{self, Tracker};
use crate::store::lease::{self, LeaseClaim, LeaseRows};
use crate::PoolMode;

/// Records in a Postgres table, reached through an sqlx [`PgPool`]: the
/// store for services whose own queries are sqlx's. The table, its
/// migration, both modes, the record cache and the round trips of each path
/// are those of [`PostgresStore`](crate::PostgresStore); in transaction
/// mode the handler gets the request's transaction as sqlx's
/// [`PgConnection`] through [`SqlxTx`].
///
/// ```no_run
/// use tower_idempotency::{IdempotencyLayer, Mode, SqlxStore};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = sqlx::postgres::PgPoolOptions::new()
///     .test_before_acquire(false)
///     .connect("postgres://postgres@127.0.0.1:5432/postgres")
///     .await?;
/// let store = SqlxStore::new(pool).with_table("billing.idempotency_records")?;
/// store.migrate().await?;
/// let layer = IdempotencyLayer::new(store).source("stripe").mode(Mode::Transaction);
/// # let _ = layer;
/// # Ok(()) }
/// ```
///
/// sqlx's pool pings a connection before handing it out
/// (`test_before_acquire`, on by default): a round trip before each of the
/// layer's statements. The layer notices a dead connection by itself (it
/// forgets the pool's idle connections and fails the request as
/// unavailable, per the route's policy), so a pool used by the layer can
/// turn it off, as above.
#[derive(Clone)]
pub struct SqlxStore {
    inner: Arc<Inner>,
}

/// What the builders choose; every builder changes one field and rebuilds
/// [`Inner`] from the whole.
#[derive(Clone)]
struct Settings {
    pool: PgPool,
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
    prepared: Prepared,
    /// The table's schema-qualified name as the server resolves it: the
    /// advisory locks' namespace, as in the tokio-postgres store (so that
    /// both stores on one table exclude each other).
    lock_namespace: OnceCell<String>,
    cache: Option<RecordCache>,
    /// Keys seen completed lately: a likely duplicate is read first.
    recent: RecentKeys,
}

/// The statements run prepared, as sqlx's cache keys them: formatted once.
struct Prepared {
    resolve_table: SqlStr,
    lookup: SqlStr,
    claim_lease: SqlStr,
    renew_lease: SqlStr,
    complete_lease: SqlStr,
    release_lease: SqlStr,
}

impl Inner {
    fn new(settings: Settings) -> Self {
        let sql = Statements::new(&settings.table, settings.advisory_locks, settings.statement_timeout);
        let text = |statement: &Statement| AssertSqlSafe(Arc::<str>::from(statement.text.as_str())).into_sql_str();
        let prepared = Prepared {
            resolve_table: text(&sql.resolve_table),
            lookup: text(&sql.lookup),
            claim_lease: text(&sql.claim_lease),
            renew_lease: text(&sql.renew_lease),
            complete_lease: text(&sql.complete_lease),
            release_lease: text(&sql.release_lease),
        };
        Self {
            sql,
            prepared,
            lock_namespace: OnceCell::new(),
            cache: settings.cache.map(|cache| RecordCache::new(cache.max_bytes, cache.ttl)),
            recent: RecentKeys::new(),
            settings,
        }
    }
}

impl fmt::Debug for SqlxStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlxStore")
            .field("table", &self.inner.settings.table.display)
            .field("pool_mode", &self.inner.settings.pool_mode)
            .finish_non_exhaustive()
    }
}

impl SqlxStore {
    /// A store on `pool` using the table `idempotency_records` in the
    /// connection's default schema.
    pub fn new(pool: PgPool) -> Self {
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
    /// identifier, as for [`PostgresStore::with_table`](crate::PostgresStore::with_table).
    pub fn with_table(self, name: &str) -> Result<Self, InvalidTableName> {
        let table = TableName::parse(name)?;
        Ok(self.with_settings(|settings| settings.table = table))
    }

    /// Keeps completed records in process memory (at most `max_bytes` of
    /// them, each for at most `ttl`), so that a duplicate of a recently
    /// completed event is answered without a database round trip; as
    /// [`PostgresStore::with_cache`](crate::PostgresStore::with_cache).
    ///
    /// ```
    /// # fn store(pool: sqlx::PgPool) {
    /// use std::time::Duration;
    /// use tower_idempotency::SqlxStore;
    ///
    /// let store = SqlxStore::new(pool).with_cache(64 * 1024 * 1024, Duration::from_secs(10));
    /// # let _ = store; }
    /// ```
    pub fn with_cache(self, max_bytes: u64, ttl: Duration) -> Self {
        self.with_settings(|settings| settings.cache = Some(CacheSettings { max_bytes, ttl }))
    }

    /// Says what is between the store and Postgres, as
    /// [`PostgresStore::with_pool_mode`](crate::PostgresStore::with_pool_mode):
    /// behind a transaction-mode pooler ([`PoolMode::Transaction`]) the
    /// store keeps no statement prepared and nothing else beyond a
    /// transaction: every statement of the request path goes as one simple
    /// query with its values written in (one round trip each, as prepared
    /// ones take in session mode), the migration's unnamed. Give the pool
    /// `PgConnectOptions::statement_cache_capacity(0)` too, so that the
    /// handler's own `sqlx::query`s go unnamed, and no `options`.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
    /// use tower_idempotency::{PoolMode, SqlxStore};
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let options: PgConnectOptions = "postgres://app@pgbouncer.internal:6432/app".parse()?;
    /// let pool = PgPoolOptions::new().connect_lazy_with(options.statement_cache_capacity(0));
    /// let store = SqlxStore::new(pool)
    ///     .with_pool_mode(PoolMode::Transaction)
    ///     .with_statement_timeout(Duration::from_secs(5));
    /// store.migrate().await?;
    /// # Ok(()) }
    /// ```
    pub fn with_pool_mode(self, mode: PoolMode) -> Self {
        self.with_settings(|settings| settings.pool_mode = mode)
    }

    /// Has the server cancel any statement of a request's transaction that
    /// runs longer than `timeout` (`SET LOCAL statement_timeout`, sent with
    /// the transaction's `BEGIN`), as
    /// [`PostgresStore::with_statement_timeout`](crate::PostgresStore::with_statement_timeout).
    pub fn with_statement_timeout(self, timeout: Duration) -> Self {
        self.with_settings(|settings| settings.statement_timeout = Some(timeout))
    }

    /// Whether statements are kept prepared (session mode).
    fn prepares(&self) -> bool {
        self.inner.settings.pool_mode == PoolMode::Session
    }

    /// Runs a request-path statement that returns at most one row:
    /// prepared and kept in session mode, inline behind a transaction-mode
    /// pooler (see [`SqlxStore::with_pool_mode`]).
    async fn fetch_optional(
        &self,
        connection: &mut PgConnection,
        prepared: &SqlStr,
        values: &[Value<'_>],
    ) -> Result<Option<PgRow>, ::sqlx::Error> {
        if self.prepares() {
            bind(::sqlx::query(prepared.clone()), values)
                .fetch_optional(connection)
                .await
        } else {
            ::sqlx::raw_sql(AssertSqlSafe(inline(prepared.as_str(), values)))
                .fetch_optional(connection)
                .await
        }
    }

    /// As [`SqlxStore::fetch_optional`], for a statement that always
    /// returns one row.
    async fn fetch_one(
        &self,
        connection: &mut PgConnection,
        prepared: &SqlStr,
        values: &[Value<'_>],
    ) -> Result<PgRow, ::sqlx::Error> {
        self.fetch_optional(connection, prepared, values)
            .await?
            .ok_or(::sqlx::Error::RowNotFound)
    }

    /// As [`SqlxStore::fetch_optional`], for a statement that returns no
    /// rows: how many it changed.
    async fn execute(
        &self,
        connection: &mut PgConnection,
        prepared: &SqlStr,
        values: &[Value<'_>],
    ) -> Result<u64, ::sqlx::Error> {
        let done = if self.prepares() {
            bind(::sqlx::query(prepared.clone()), values)
                .execute(connection)
                .await?
        } else {
            ::sqlx::raw_sql(AssertSqlSafe(inline(prepared.as_str(), values)))
                .execute(connection)
                .await?
        };
        Ok(done.rows_affected())
    }

    /// Claims without the key's advisory lock; for tests of what the
    /// record's unique key still guarantees then, never for production (see
    /// [`PostgresStore`](crate::PostgresStore)'s).
    #[doc(hidden)]
    pub fn without_advisory_locks_for_tests_only(self) -> Self {
        self.with_settings(|settings| settings.advisory_locks = false)
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.settings.pool
    }

    /// The table name as configured.
    fn table_name(&self) -> &TableName {
        &self.inner.settings.table
    }

    async fn connection(&self) -> Result<PoolConnection<Postgres>, StoreError> {
        self.inner.settings.pool.acquire().await.map_err(connect_error)
    }

    /// The completed record of `key` in the record cache, when it is on.
    fn cached(&self, key: &RecordKey) -> Option<Completed> {
        self.inner.cache.as_ref()?.get(key)
    }

    /// Whether `key` is probably a duplicate of a completed record: cached,
    /// or seen completed lately by this instance.
    fn likely_completed(&self, key: &RecordKey) -> bool {
        self.inner.recent.contains(key) || self.cached(key).is_some()
    }

    /// Remembers a completed record read from `row` (which carries its
    /// `expires_at`).
    fn remember_found(&self, key: &RecordKey, row: &PgRow, found: &Lookup) -> Result<(), StoreError> {
        let Lookup::Completed(completed) = found else {
            return Ok(());
        };
        self.inner.recent.insert(key);
        if let Some(cache) = &self.inner.cache {
            let Timestamp(expires_at) = row.try_get("expires_at")?;
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

    /// The advisory lock id of a key, namespaced by the resolved table (one
    /// round trip, the first time only).
    async fn lock_id(&self, connection: &mut PgConnection, key: &RecordKey) -> Result<i64, StoreError> {
        let table = &self.inner.settings.table;
        let namespace = self
            .inner
            .lock_namespace
            .get_or_try_init(|| async {
                let quoted = table.quoted();
                let row = self
                    .fetch_optional(connection, &self.inner.prepared.resolve_table, &[Value::Text(&quoted)])
                    .await?;
                match row {
                    Some(row) => Ok::<_, StoreError>(row.try_get::<String, _>(0)?),
                    None => Err(StoreError::TableMissing(table.display.clone())),
                }
            })
            .await?;
        Ok(key.lock_id(namespace))
    }

    async fn lookup(&self, key: &RecordKey) -> Result<Lookup, StoreError> {
        if let Some(completed) = self.cached(key) {
            return Ok(Lookup::Completed(completed));
        }
        let mut connection = self.connection().await?;
        let row = self
            .fetch_optional(&mut connection, &self.inner.prepared.lookup, &key_values(key))
            .await?;
        let Some(row) = row else {
            return Ok(Lookup::Absent);
        };
        let found = lookup_from_row(&row)?;
        self.remember_found(key, &row, &found)?;
        Ok(found)
    }

    async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        match request.mode {
            Mode::Transaction => self.claim_transaction(request).await,
            Mode::Lease { lease, .. } => self.claim_lease(request, lease).await,
        }
    }

    /// One round trip, as in the tokio-postgres store: `BEGIN`, try the
    /// key's advisory lock, read the record, sent as one simple query. The
    /// read is a statement of its own, so its snapshot is taken after the
    /// try-lock; see `PostgresStore::claim_transaction`. On a route with the
    /// body-hash guard the body's lock is tried in the same statement and
    /// its record read by one more, still in the one round trip.
    async fn claim_transaction(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        let mut pooled = self.connection().await?;
        let key = &request.key;
        let lock_id = self.lock_id(&mut pooled, key).await?;
        let body_record = request.body_record.as_deref();
        let body_lock_id = match body_record {
            Some(body_record) => Some(self.lock_id(&mut pooled, body_record).await?),
            None => None,
        };
        let mut claim = format!(
            "{}; {}",
            self.inner.sql.begin_and_try_lock(lock_id, body_lock_id),
            inline(&self.inner.sql.lookup.text, &key_values(key))
        );
        if let Some(body_record) = body_record {
            claim.push_str("; ");
            claim.push_str(&inline(&self.inner.sql.lookup.text, &key_values(body_record)));
        }
        let mut connection = SqlxTxConnection::new(pooled);
        let Some(conn) = connection.connection() else {
            return Err(StoreError::ConnectionGone);
        };
        let results = match simple_query(conn, claim).await {
            Ok(results) => results,
            Err(error) => {
                connection.discard();
                return Err(error.into());
            }
        };
        // An early return below drops `connection`, which rolls back. The
        // answers end with the try-lock's and the reads'; `BEGIN` (and a
        // `SET LOCAL`) come before them.
        let reads = 1 + usize::from(body_record.is_some());
        let Some(lock_at) = results.len().checked_sub(reads + 1).filter(|at| *at >= 1) else {
            return Err(StoreError::Corrupt(format!(
                "the claim answered {} statements, expected at least {}",
                results.len(),
                reads + 2
            )));
        };
        let locked = match results[lock_at].first() {
            Some(row) => row.try_get::<bool, _>(0)?,
            None => false,
        };
        let key_row = results[lock_at + 1].first();
        let body_row = results.get(lock_at + 2).and_then(|rows| rows.first());
        // The key's record answers first; the body's when the key has none.
        let found = match (key_row, body_record.zip(body_row)) {
            (Some(row), _) => Some((key, row)),
            (None, Some((body, row))) => Some((body, row)),
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
                tx: SqlxIdempotencyTx::new(connection),
            };
            return Ok(ClaimOutcome::Claimed(Claim::new(request, Box::new(held))));
        }
        // Not claimed: the rollback runs in the background, off the
        // response path.
        drop(connection);
        Ok(match found {
            Lookup::Completed(completed) => ClaimOutcome::Completed(completed),
            Lookup::InFlight { fingerprint } => ClaimOutcome::InFlight {
                fingerprint: Some(fingerprint),
            },
            Lookup::Absent => ClaimOutcome::InFlight { fingerprint: None },
        })
    }

    /// One statement, as in the tokio-postgres store: a conditional upsert
    /// under the key's advisory lock that returns, beside the claim token it
    /// wrote (if any), the live record it found (if any).
    async fn claim_lease(&self, request: ClaimRequest, lease: Duration) -> Result<ClaimOutcome, StoreError> {
        let mut connection = ClosedIfAbandoned(Some(self.connection().await?));
        let Some(conn) = connection.0.as_deref_mut() else {
            return Err(StoreError::ConnectionGone);
        };
        let outcome = self.claim_lease_on(conn, request, lease).await;
        connection.keep();
        outcome
    }

    async fn claim_lease_on(
        &self,
        connection: &mut PgConnection,
        request: ClaimRequest,
        lease: Duration,
    ) -> Result<ClaimOutcome, StoreError> {
        let key = &request.key;
        let lock_id = self.lock_id(connection, key).await?;
        let token = request.claim_token;
        for _ in 0..3 {
            let values = [
                Value::Text(&key.source),
                Value::Text(&key.event_type),
                Value::Text(&key.key),
                Value::Bytes(&request.fingerprint),
                Value::Uuid(token),
                Value::Float(lease.as_secs_f64()),
                Value::Float(request.retention.as_secs_f64()),
                Value::BigInt(lock_id),
            ];
            let row = self
                .fetch_one(&mut *connection, &self.inner.prepared.claim_lease, &values)
                .await?;
            if row.try_get::<Option<uuid::Uuid>, _>("claimed")?.is_some() {
                let held = LeaseClaim {
                    store: self.clone(),
                    token,
                };
                return Ok(ClaimOutcome::Claimed(Claim::new(request, Box::new(held))));
            }
            let found = match row.try_get::<Option<i16>, _>("state")? {
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

    async fn renew(&self, key: &RecordKey, token: uuid::Uuid, lease: Duration) -> Result<bool, StoreError> {
        let mut connection = self.connection().await?;
        let values = [
            Value::Text(&key.source),
            Value::Text(&key.event_type),
            Value::Text(&key.key),
            Value::Uuid(token),
            Value::Float(lease.as_secs_f64()),
        ];
        let updated = self
            .execute(&mut connection, &self.inner.prepared.renew_lease, &values)
            .await?;
        Ok(updated == 1)
    }

    async fn complete_lease(
        &self,
        request: &ClaimRequest,
        token: uuid::Uuid,
        response: &StoredResponse,
    ) -> Result<Completion, StoreError> {
        let mut connection = self.connection().await?;
        let key = &request.key;
        let (status, headers, body) = response_columns(response);
        let values = [
            Value::Text(&key.source),
            Value::Text(&key.event_type),
            Value::Text(&key.key),
            Value::Uuid(token),
            Value::SmallInt(status),
            Value::Bytes(&headers),
            Value::OptionalBytes(body),
            Value::Float(request.retention.as_secs_f64()),
        ];
        let updated = self
            .execute(&mut connection, &self.inner.prepared.complete_lease, &values)
            .await?;
        if updated != 1 {
            return Ok(Completion::FencedOut);
        }
        self.cache_completion(request, response);
        Ok(Completion::Recorded)
    }

    async fn release_lease(&self, key: &RecordKey, token: uuid::Uuid) -> Result<(), StoreError> {
        let mut connection = self.connection().await?;
        let mut values = key_values(key).to_vec();
        values.push(Value::Uuid(token));
        self.execute(&mut connection, &self.inner.prepared.release_lease, &values)
            .await?;
        Ok(())
    }

    /// Writes the record (and the body's, on a guarded route) and commits in
    /// one round trip: the upserts and `COMMIT` as one simple query. [`Completion::CompletedElsewhere`] when
    /// another claimant's live record holds the key: the upsert failed, the
    /// `COMMIT` did not run, and a `ROLLBACK` ends the transaction (a
    /// second round trip, on this rare path only). On any other error the
    /// connection is closed rather than reused.
    async fn complete_transaction(
        &self,
        mut connection: SqlxTxConnection,
        request: &ClaimRequest,
        response: &StoredResponse,
    ) -> Result<Completion, StoreError> {
        let Some(conn) = connection.connection() else {
            return Err(StoreError::ConnectionGone);
        };
        let key = &request.key;
        let (status, headers, body) = response_columns(response);
        let values = [
            Value::Text(&key.source),
            Value::Text(&key.event_type),
            Value::Text(&key.key),
            Value::Bytes(&request.fingerprint),
            Value::SmallInt(status),
            Value::Bytes(&headers),
            Value::OptionalBytes(body),
            Value::Float(request.retention.as_secs_f64()),
        ];
        let mut complete = inline(&self.inner.sql.complete_transaction.text, &values);
        // The body's record (the body-hash guard) is written beside the
        // key's, with the same response, in the same transaction.
        if let Some(body) = &request.body_record {
            let mut body_values = values;
            body_values[..3].copy_from_slice(&key_values(body));
            complete.push_str("; ");
            complete.push_str(&inline(&self.inner.sql.complete_transaction.text, &body_values));
        }
        complete.push_str("; ");
        complete.push_str(sql::COMMIT);
        match simple_query(conn, complete).await {
            Ok(_) => {
                connection.closed_cleanly();
                self.cache_completion(request, response);
                Ok(Completion::Recorded)
            }
            Err(error) if self.is_key_taken(&error) => {
                connection.rollback().await?;
                Ok(Completion::CompletedElsewhere)
            }
            Err(error) => {
                connection.discard();
                Err(error.into())
            }
        }
    }

    /// Whether `error` is the completion's refusal to write a second record
    /// of a key, or the table's primary key refusing one.
    fn is_key_taken(&self, error: &::sqlx::Error) -> bool {
        let Some(database) = error.as_database_error() else {
            return false;
        };
        let code = database.code();
        let table = database.table();
        match code.as_deref() {
            Some("22P02") => database.message().contains(KEY_TAKEN),
            Some("23505") => table == Some(self.inner.settings.table.table.as_str()),
            _ => false,
        }
    }
}

/// A key's three parts, as the statements' `$1`, `$2`, `$3`.
fn key_values(key: &RecordKey) -> [Value<'_>; 3] {
    [
        Value::Text(&key.source),
        Value::Text(&key.event_type),
        Value::Text(&key.key),
    ]
}

/// Runs `sql`, which may hold several statements, as one simple query; the
/// rows of each statement, in order.
async fn simple_query(connection: &mut PgConnection, sql: String) -> Result<Vec<Vec<PgRow>>, ::sqlx::Error> {
    let mut results = vec![Vec::new()];
    let mut stream = ::sqlx::raw_sql(AssertSqlSafe(sql)).fetch_many(connection);
    while let Some(step) = stream.try_next().await? {
        match step {
            Either::Left(_done) => results.push(Vec::new()),
            Either::Right(row) => {
                if let Some(rows) = results.last_mut() {
                    rows.push(row);
                }
            }
        }
    }
    // The last statement's completion opened an empty group.
    results.pop();
    Ok(results)
}

impl Backend for SqlxStore {
    fn lookup<'a>(&'a self, key: &'a RecordKey) -> StoreFuture<'a, Lookup> {
        Box::pin(SqlxStore::lookup(self, key))
    }

    fn claim(&self, request: ClaimRequest) -> StoreFuture<'_, ClaimOutcome> {
        Box::pin(SqlxStore::claim(self, request))
    }

    fn cached(&self, key: &RecordKey) -> Option<Completed> {
        SqlxStore::cached(self, key)
    }

    fn likely_completed(&self, key: &RecordKey) -> bool {
        SqlxStore::likely_completed(self, key)
    }

    /// sqlx's pool has no call to close its idle connections: take each one
    /// that is idle now and close it.
    fn forget_idle_connections(&self) {
        let pool = &self.inner.settings.pool;
        for _ in 0..pool.num_idle() {
            match pool.try_acquire() {
                Some(connection) => tx::discard(connection),
                None => break,
            }
        }
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
    store: SqlxStore,
    tx: SqlxIdempotencyTx,
}

impl TxClaim {
    /// The connection back from the handler: `TransactionInUse` while it
    /// still holds an `SqlxTx`.
    fn connection(&self) -> Result<SqlxTxConnection, StoreError> {
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
/// store timeout): an answer still to come would hold up its next user.
struct ClosedIfAbandoned(Option<PoolConnection<Postgres>>);

impl ClosedIfAbandoned {
    /// The statement finished: the connection goes back to the pool.
    fn keep(mut self) {
        self.0.take();
    }
}

impl Drop for ClosedIfAbandoned {
    fn drop(&mut self) {
        if let Some(connection) = self.0.take() {
            tx::discard(connection);
        }
    }
}

impl LeaseRows for SqlxStore {
    fn renew<'a>(&'a self, key: &'a RecordKey, token: uuid::Uuid, lease: Duration) -> StoreFuture<'a, bool> {
        Box::pin(SqlxStore::renew(self, key, token, lease))
    }

    fn complete_lease<'a>(
        &'a self,
        request: &'a ClaimRequest,
        token: uuid::Uuid,
        response: &'a StoredResponse,
    ) -> StoreFuture<'a, Completion> {
        Box::pin(SqlxStore::complete_lease(self, request, token, response))
    }

    fn release_lease<'a>(&'a self, key: &'a RecordKey, token: uuid::Uuid) -> StoreFuture<'a, ()> {
        Box::pin(SqlxStore::release_lease(self, key, token))
    }
}
