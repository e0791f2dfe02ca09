//! [`OrderingGuard`]: applies a status that webhooks move forward only when
//! it moves forward, so that a late or out-of-order delivery can never roll
//! a payment back from `succeeded` to `processing`.
//!
//! The change is one `INSERT ... ON CONFLICT ... DO UPDATE ... WHERE` in
//! the handler's transaction: Postgres locks the row and evaluates the
//! condition against its latest committed state, so concurrent deliveries
//! in any order converge on the furthest state, and a terminal state, once
//! committed, stays.

use std::fmt;
use std::sync::Arc;

use deadpool_postgres::ClientWrapper;
use sha2::{Digest, Sha256};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Row;

use crate::PoolMode;

/// Applies status changes in a declared order, inside the caller's
/// transaction.
///
/// States are declared in stages, earliest first; a state may move to any
/// state of a later stage, never back, never sideways within its stage,
/// and never out of a terminal stage. A repeat of the current state changes
/// nothing. [`OrderingGuard::force`] overrides the order explicitly, and
/// logs it.
///
/// The table needs a unique key column, a `status text` column and an
/// `updated_at timestamptz` column; [`OrderingGuard::create_table`] creates
/// it:
///
/// ```sql
/// CREATE TABLE IF NOT EXISTS payment_states (
///     payment_id text PRIMARY KEY,
///     status     text NOT NULL,
///     updated_at timestamptz NOT NULL DEFAULT now());
/// ```
///
/// ```no_run
/// use axum::Json;
/// use serde_json::Value;
/// use tower_idempotency::{OrderingGuard, Transition, Tx};
///
/// fn payment_states() -> Result<OrderingGuard, tower_idempotency::OrderingError> {
///     Ok(OrderingGuard::new("payment_states", "payment_id")?
///         .then(["created"])
///         .then(["processing"])
///         .terminal(["succeeded", "payment_failed", "canceled"]))
/// }
///
/// // In a handler behind the layer (transaction mode): the state change
/// // commits with the idempotency record, or neither does.
/// async fn stripe_webhook(tx: Tx, Json(event): Json<Value>) -> Result<&'static str, String> {
///     let guard = payment_states().map_err(|e| e.to_string())?;
///     let payment = event["data"]["object"]["id"].as_str().unwrap_or_default();
///     let status = event["type"].as_str().unwrap_or_default().trim_start_matches("payment_intent.");
///     let transition = guard.advance(&tx, payment, status).await.map_err(|e| e.to_string())?;
///     if let Transition::Ignored { current } = transition {
///         tracing::info!(%current, "a late event; the state stays");
///     }
///     Ok("ok")
/// }
/// # let _ = stripe_webhook;
/// ```
#[derive(Clone)]
pub struct OrderingGuard {
    table: String,
    states: Vec<State>,
    statements: Arc<Statements>,
    pool_mode: PoolMode,
}

#[derive(Clone, Debug)]
struct State {
    name: String,
    rank: i32,
    terminal: bool,
}

impl fmt::Debug for OrderingGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrderingGuard")
            .field("table", &self.table)
            .field("states", &self.states)
            .field("pool_mode", &self.pool_mode)
            .finish_non_exhaustive()
    }
}

/// What [`OrderingGuard::advance`] or [`OrderingGuard::force`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Transition {
    /// The key had no state; it now has the given one.
    Inserted,
    /// The state moved forward to the given one.
    Advanced,
    /// The key was already in the given state; nothing changed.
    Unchanged,
    /// Nothing changed: the given state would move backwards or sideways,
    /// the current one is terminal, or the current one is not declared.
    Ignored {
        /// The state the key keeps.
        current: String,
    },
    /// [`OrderingGuard::force`] set the state regardless of the order.
    Overridden {
        /// The state before, if the key had one.
        previous: Option<String>,
    },
}

impl Transition {
    /// Whether the stored state changed.
    pub fn changed(&self) -> bool {
        matches!(
            self,
            Transition::Inserted | Transition::Advanced | Transition::Overridden { .. }
        )
    }
}

/// Why the guard could not be built or could not apply a change.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderingError {
    /// A table or column name is not a plain SQL identifier.
    #[error("`{0}` is not a valid name: use letters, digits and `_` (a table may be `schema.table`)")]
    InvalidName(String),
    /// The state was not declared with `then` or `terminal`.
    #[error("the state `{0}` is not declared in this ordering guard")]
    UnknownState(String),
    /// The key's row was deleted, again and again, while its state was
    /// being changed.
    #[error("the row for `{0}` was deleted while its state was being changed")]
    RowDeleted(String),
    /// The database refused or failed the statement; in the layer's
    /// transaction, answer with a non-2xx status so that it rolls back.
    #[error("the ordering guard's statement failed: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
    /// As [`OrderingError::Database`], through sqlx.
    #[cfg(feature = "sqlx")]
    #[error("the ordering guard's statement failed: {0}")]
    Sqlx(#[from] sqlx::Error),
}

/// The server's code and message (tokio-postgres' own message is only "db
/// error"), and what to set when a named statement went missing behind a
/// transaction-mode pooler.
fn describe(error: &tokio_postgres::Error) -> String {
    let Some(db) = error.as_db_error() else {
        return match std::error::Error::source(error) {
            Some(source) => format!("{error}: {source}"),
            None => error.to_string(),
        };
    };
    let code = db.code().code();
    match crate::pool_mode::pooler_hint(code) {
        Some(_) => format!(
            "{code}: {}; named prepared statements do not survive a transaction-mode pooler: behind one, \
             set OrderingGuard::with_pool_mode(PoolMode::Transaction)",
            db.message()
        ),
        None => format!("{code}: {}", db.message()),
    }
}

/// Every statement, formatted once with the table and key column.
struct Statements {
    /// The table, quoted.
    table: String,
    advance: String,
    current: String,
    lock_current: String,
    force: String,
    create: String,
    create_lock: i64,
}

impl OrderingGuard {
    /// A guard over `table` (`table` or `schema.table`) keyed by
    /// `key_column`, with no states yet. Names are plain identifiers, used
    /// quoted as written.
    pub fn new(table: &str, key_column: &str) -> Result<Self, OrderingError> {
        let (schema, name) = match table.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, table),
        };
        for part in schema.into_iter().chain([name]) {
            check_identifier(part).map_err(|()| OrderingError::InvalidName(table.to_owned()))?;
        }
        check_identifier(key_column).map_err(|()| OrderingError::InvalidName(key_column.to_owned()))?;
        let quoted = match schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        };
        Ok(Self {
            table: table.to_owned(),
            states: Vec::new(),
            statements: Arc::new(Statements::new(table, &quoted, &format!("\"{key_column}\""))),
            pool_mode: PoolMode::Session,
        })
    }

    /// Says what is between the guard's connections and Postgres, as
    /// [`PostgresStore::with_pool_mode`](crate::PostgresStore::with_pool_mode)
    /// does for the store: behind a transaction-mode pooler
    /// ([`PoolMode::Transaction`]) every statement is sent unnamed with its
    /// parameter types, never as a named prepared statement that the next
    /// transaction's server session would not know. Session mode (the
    /// default) keeps the statements prepared on each connection.
    ///
    /// ```
    /// use tower_idempotency::{OrderingGuard, PoolMode};
    ///
    /// let guard = OrderingGuard::new("payment_states", "payment_id")?
    ///     .then(["created"])
    ///     .terminal(["succeeded", "canceled"])
    ///     .with_pool_mode(PoolMode::Transaction);
    /// # let _ = guard;
    /// # Ok::<(), tower_idempotency::OrderingError>(())
    /// ```
    #[must_use]
    pub fn with_pool_mode(mut self, mode: PoolMode) -> Self {
        self.pool_mode = mode;
        self
    }

    /// Runs `sql` on `client` and returns its one row, if any: prepared
    /// once per connection in session mode, unnamed and typed in
    /// transaction mode.
    async fn query_opt(
        &self,
        client: &ClientWrapper,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        match self.pool_mode {
            PoolMode::Transaction => client.query_typed_opt(sql, params).await,
            _ => {
                let statement = client.prepare_cached(sql).await?;
                let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(value, _)| *value).collect();
                client.query_opt(&statement, &values).await
            }
        }
    }

    /// Declares the next stage: states reached after every earlier one.
    ///
    /// # Panics
    ///
    /// Panics if a state is empty or already declared: states are fixed at
    /// configuration time, so the mistake shows at start-up.
    #[must_use]
    pub fn then<I, S>(self, states: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.stage(states, false)
    }

    /// Declares the final stage: states that never change once reached.
    ///
    /// # Panics
    ///
    /// As [`OrderingGuard::then`].
    #[must_use]
    pub fn terminal<I, S>(self, states: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.stage(states, true)
    }

    fn stage<I, S>(mut self, states: I, terminal: bool) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let rank = self.states.iter().map(|state| state.rank + 1).max().unwrap_or(0);
        for name in states {
            let name = name.into();
            assert!(!name.is_empty(), "an ordering guard state must not be empty");
            assert!(
                self.rank_of(&name).is_none(),
                "the state `{name}` is declared twice in the ordering guard on {}",
                self.table
            );
            self.states.push(State { name, rank, terminal });
        }
        self
    }

    fn rank_of(&self, status: &str) -> Option<i32> {
        self.states
            .iter()
            .find(|state| state.name == status)
            .map(|state| state.rank)
    }

    /// Moves `key` to `status` if that is forward in the declared order (or
    /// records it, if the key has no state yet), through `client`: pass the
    /// handler's [`Tx`](crate::Tx) so that the change commits with the
    /// idempotency record. Concurrent calls for one key wait for each
    /// other's transactions on the row's lock.
    pub async fn advance(&self, client: &ClientWrapper, key: &str, status: &str) -> Result<Transition, OrderingError> {
        let rank = self
            .rank_of(status)
            .ok_or_else(|| OrderingError::UnknownState(status.to_owned()))?;
        let names: Vec<&str> = self.states.iter().map(|state| state.name.as_str()).collect();
        let ranks: Vec<i32> = self.states.iter().map(|state| state.rank).collect();
        let terminal: Vec<&str> = self
            .states
            .iter()
            .filter(|state| state.terminal)
            .map(|state| state.name.as_str())
            .collect();
        let advance: [(&(dyn ToSql + Sync), Type); 6] = [
            (&key, Type::TEXT),
            (&status, Type::TEXT),
            (&rank, Type::INT4),
            (&names, Type::TEXT_ARRAY),
            (&ranks, Type::INT4_ARRAY),
            (&terminal, Type::TEXT_ARRAY),
        ];
        // The row can only vanish between the two statements if something
        // else deletes it; then the change is simply tried again.
        for _ in 0..3 {
            if let Some(row) = self.query_opt(client, &self.statements.advance, &advance).await? {
                let transition = if row.try_get::<_, bool>(0)? {
                    Transition::Inserted
                } else {
                    Transition::Advanced
                };
                tracing::debug!(table = %self.table, key, status, ?transition, "ordering guard applied a state");
                return Ok(transition);
            }
            // Not applied: the conflicting row is now locked by this
            // transaction, so this read sees the state that prevailed.
            if let Some(row) = self
                .query_opt(client, &self.statements.current, &[(&key, Type::TEXT)])
                .await?
            {
                let current: String = row.try_get(0)?;
                let transition = if current == status {
                    Transition::Unchanged
                } else {
                    Transition::Ignored { current }
                };
                tracing::debug!(table = %self.table, key, status, ?transition, "ordering guard kept the state");
                return Ok(transition);
            }
        }
        Err(OrderingError::RowDeleted(key.to_owned()))
    }

    /// Sets `key` to `status` whatever the order says (a declared state
    /// still), for an operator's correction or a deliberate reopening, and
    /// logs it at `warn` with the previous state and `reason`.
    pub async fn force(
        &self,
        client: &ClientWrapper,
        key: &str,
        status: &str,
        reason: &str,
    ) -> Result<Transition, OrderingError> {
        if self.rank_of(status).is_none() {
            return Err(OrderingError::UnknownState(status.to_owned()));
        }
        let previous: Option<String> = match self
            .query_opt(client, &self.statements.lock_current, &[(&key, Type::TEXT)])
            .await?
        {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        };
        self.query_opt(
            client,
            &self.statements.force,
            &[(&key, Type::TEXT), (&status, Type::TEXT)],
        )
        .await?;
        tracing::warn!(
            table = %self.table,
            key,
            previous = previous.as_deref().unwrap_or(""),
            status,
            reason,
            "ordering guard override: state set regardless of the order"
        );
        Ok(Transition::Overridden { previous })
    }

    /// Creates the table if absent (the schema must exist), in a
    /// transaction of its own under an advisory lock, so that many
    /// instances may run it at start-up at once. The table is looked up
    /// first (as the server resolves the name: schema-qualified, or through
    /// the `search_path`) and created only when missing, so that a role
    /// with only `SELECT`, `INSERT` and `UPDATE` on an existing table
    /// passes: `CREATE TABLE IF NOT EXISTS` alone would demand the schema's
    /// `CREATE` privilege before it looks.
    pub async fn create_table(&self, client: &mut ClientWrapper) -> Result<(), OrderingError> {
        // Once per start: unnamed statements whatever the pool mode.
        let transaction = client.transaction().await?;
        transaction
            .execute_typed(
                "SELECT pg_advisory_xact_lock($1)",
                &[(&self.statements.create_lock, Type::INT8)],
            )
            .await?;
        let exists: bool = transaction
            .query_typed_one(
                "SELECT to_regclass($1) IS NOT NULL",
                &[(&self.statements.table, Type::TEXT)],
            )
            .await?
            .try_get(0)?;
        if !exists {
            transaction.batch_execute(&self.statements.create).await?;
        }
        transaction.commit().await?;
        Ok(())
    }
}

/// The guard on an sqlx connection: pass the handler's
/// [`SqlxTx`](crate::SqlxTx) (`&mut *tx`) so that the change commits with
/// the idempotency record.
#[cfg(feature = "sqlx")]
impl OrderingGuard {
    /// [`OrderingGuard::advance`] through sqlx.
    ///
    /// ```no_run
    /// use tower_idempotency::{OrderingGuard, SqlxTx};
    ///
    /// async fn handler(guard: &OrderingGuard, mut tx: SqlxTx) -> Result<(), tower_idempotency::OrderingError> {
    ///     guard.advance_sqlx(&mut tx, "pi_1", "succeeded").await?;
    ///     Ok(())
    /// }
    /// # let _ = handler;
    /// ```
    pub async fn advance_sqlx(
        &self,
        connection: &mut sqlx::PgConnection,
        key: &str,
        status: &str,
    ) -> Result<Transition, OrderingError> {
        use sqlx::{AssertSqlSafe, Row};

        let rank = self
            .rank_of(status)
            .ok_or_else(|| OrderingError::UnknownState(status.to_owned()))?;
        let names: Vec<&str> = self.states.iter().map(|state| state.name.as_str()).collect();
        let ranks: Vec<i32> = self.states.iter().map(|state| state.rank).collect();
        let terminal: Vec<&str> = self
            .states
            .iter()
            .filter(|state| state.terminal)
            .map(|state| state.name.as_str())
            .collect();
        for _ in 0..3 {
            let applied = sqlx::query(AssertSqlSafe(self.statements.advance.as_str()))
                .bind(key)
                .bind(status)
                .bind(rank)
                .bind(&names)
                .bind(&ranks)
                .bind(&terminal)
                .persistent(self.keeps_prepared())
                .fetch_optional(&mut *connection)
                .await?;
            if let Some(row) = applied {
                let transition = if row.try_get::<bool, _>(0)? {
                    Transition::Inserted
                } else {
                    Transition::Advanced
                };
                tracing::debug!(table = %self.table, key, status, ?transition, "ordering guard applied a state");
                return Ok(transition);
            }
            // Not applied: the conflicting row is now locked by this
            // transaction, so this read sees the state that prevailed.
            let current = sqlx::query(AssertSqlSafe(self.statements.current.as_str()))
                .bind(key)
                .persistent(self.keeps_prepared())
                .fetch_optional(&mut *connection)
                .await?;
            if let Some(row) = current {
                let current: String = row.try_get(0)?;
                let transition = if current == status {
                    Transition::Unchanged
                } else {
                    Transition::Ignored { current }
                };
                tracing::debug!(table = %self.table, key, status, ?transition, "ordering guard kept the state");
                return Ok(transition);
            }
        }
        Err(OrderingError::RowDeleted(key.to_owned()))
    }

    /// [`OrderingGuard::force`] through sqlx.
    pub async fn force_sqlx(
        &self,
        connection: &mut sqlx::PgConnection,
        key: &str,
        status: &str,
        reason: &str,
    ) -> Result<Transition, OrderingError> {
        use sqlx::{AssertSqlSafe, Row};

        if self.rank_of(status).is_none() {
            return Err(OrderingError::UnknownState(status.to_owned()));
        }
        let previous: Option<String> = match sqlx::query(AssertSqlSafe(self.statements.lock_current.as_str()))
            .bind(key)
            .persistent(self.keeps_prepared())
            .fetch_optional(&mut *connection)
            .await?
        {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        };
        sqlx::query(AssertSqlSafe(self.statements.force.as_str()))
            .bind(key)
            .bind(status)
            .persistent(self.keeps_prepared())
            .execute(&mut *connection)
            .await?;
        tracing::warn!(
            table = %self.table,
            key,
            previous = previous.as_deref().unwrap_or(""),
            status,
            reason,
            "ordering guard override: state set regardless of the order"
        );
        Ok(Transition::Overridden { previous })
    }

    /// Whether sqlx may keep the guard's statements prepared: not behind a
    /// transaction-mode pooler ([`OrderingGuard::with_pool_mode`]).
    fn keeps_prepared(&self) -> bool {
        self.pool_mode == crate::PoolMode::Session
    }

    /// [`OrderingGuard::create_table`] through sqlx.
    pub async fn create_table_sqlx(&self, connection: &mut sqlx::PgConnection) -> Result<(), OrderingError> {
        use sqlx::{AssertSqlSafe, Connection, Row};

        let mut transaction = connection.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(self.statements.create_lock)
            .persistent(false)
            .execute(&mut *transaction)
            .await?;
        let exists: bool = sqlx::query("SELECT to_regclass($1) IS NOT NULL")
            .bind(self.statements.table.as_str())
            .persistent(false)
            .fetch_one(&mut *transaction)
            .await?
            .try_get(0)?;
        if !exists {
            sqlx::raw_sql(AssertSqlSafe(self.statements.create.as_str()))
                .execute(&mut *transaction)
                .await?;
        }
        transaction.commit().await?;
        Ok(())
    }
}

fn check_identifier(name: &str) -> Result<(), ()> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if starts_well && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && name.len() <= 63 {
        Ok(())
    } else {
        Err(())
    }
}

impl Statements {
    fn new(display: &str, table: &str, key: &str) -> Self {
        let digest = Sha256::digest(format!("tower-idempotency ordering guard {display}").as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        Self {
            table: table.to_owned(),
            // $1 key, $2 new status, $3 its rank, $4/$5 every declared state
            // and its rank, $6 the terminal states. An undeclared current
            // state has no rank, so the comparison is NULL: never replaced.
            advance: format!(
                "INSERT INTO {table} AS current ({key}, status, updated_at) VALUES ($1, $2, now())
                 ON CONFLICT ({key}) DO UPDATE SET status = EXCLUDED.status, updated_at = now()
                 WHERE current.status <> ALL ($6::text[])
                   AND (SELECT declared.rank FROM unnest($4::text[], $5::int4[]) AS declared(name, rank)
                        WHERE declared.name = current.status) < $3::int4
                 RETURNING (xmax = 0) AS inserted"
            ),
            current: format!("SELECT status FROM {table} WHERE {key} = $1"),
            lock_current: format!("SELECT status FROM {table} WHERE {key} = $1 FOR UPDATE"),
            force: format!(
                "INSERT INTO {table} ({key}, status, updated_at) VALUES ($1, $2, now())
                 ON CONFLICT ({key}) DO UPDATE SET status = EXCLUDED.status, updated_at = now()"
            ),
            create: format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                     {key} text PRIMARY KEY,
                     status text NOT NULL,
                     updated_at timestamptz NOT NULL DEFAULT now())"
            ),
            create_lock: i64::from_be_bytes(first),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payments() -> OrderingGuard {
        OrderingGuard::new("payment_states", "payment_id")
            .unwrap()
            .then(["created"])
            .then(["processing"])
            .terminal(["succeeded", "payment_failed", "canceled"])
    }

    #[test]
    fn stages_rank_in_declaration_order() {
        let guard = payments();
        assert_eq!(guard.rank_of("created"), Some(0));
        assert_eq!(guard.rank_of("processing"), Some(1));
        assert_eq!(guard.rank_of("succeeded"), Some(2));
        assert_eq!(guard.rank_of("canceled"), Some(2));
        assert_eq!(guard.rank_of("refunded"), None);
    }

    #[test]
    fn names_must_be_plain_identifiers() {
        for (table, key) in [
            ("payment states", "id"),
            ("payments;drop", "id"),
            ("", "id"),
            ("a.b.c", "id"),
            ("t", "id\""),
            ("t", "1id"),
        ] {
            assert!(
                matches!(OrderingGuard::new(table, key), Err(OrderingError::InvalidName(_))),
                "{table} {key}"
            );
        }
        assert!(OrderingGuard::new("billing.payment_states", "payment_id").is_ok());
    }

    #[test]
    #[should_panic(expected = "declared twice")]
    fn a_state_declared_twice_panics() {
        let _ = payments().then(["created"]);
    }

    #[test]
    fn only_changes_count_as_changed() {
        assert!(Transition::Inserted.changed());
        assert!(Transition::Advanced.changed());
        assert!(Transition::Overridden { previous: None }.changed());
        assert!(!Transition::Unchanged.changed());
        assert!(!Transition::Ignored { current: "x".into() }.changed());
    }
}
