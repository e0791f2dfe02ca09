//! Every statement the Postgres store runs, in one place, each named by
//! what it does: the request path's (formatted once per table), the
//! operations', the migration's, and the transaction's own. Each carries
//! its parameters' types, so that it can also be sent unnamed behind a
//! transaction-mode pooler ([`PoolMode`](super::PoolMode)).

use std::time::Duration;

use tokio_postgres::types::Type;

use super::TableName;

/// A statement with parameters: its text, its parameters' types in order,
/// and whether a session-mode connection keeps it prepared (the request
/// path's statements) or prepares it each time (the operators' and the
/// migration's).
pub(in crate::store) struct Statement {
    pub(in crate::store) text: String,
    pub(in crate::store) types: &'static [Type],
    pub(in crate::store) cached: bool,
}

impl Statement {
    /// A request-path statement, kept prepared in session mode.
    fn cached(text: String, types: &'static [Type]) -> Self {
        Self {
            text,
            types,
            cached: true,
        }
    }

    /// A statement prepared each time it runs in session mode.
    fn once(text: String, types: &'static [Type]) -> Self {
        Self {
            text,
            types,
            cached: false,
        }
    }
}

/// The key columns' parameters, `$1` to `$3`.
const KEY: [Type; 3] = [Type::TEXT, Type::TEXT, Type::TEXT];

/// Record states in the `state` column.
pub(in crate::store) const IN_PROGRESS: i16 = 1;
pub(in crate::store) const COMPLETED: i16 = 2;

/// What the completion's refusal of a key that already has a live record
/// says, in the server's log and the error it returns.
pub(in crate::store) const KEY_TAKEN: &str = "the idempotency key already has a live record";

/// Whether a row is a live record: completed and unexpired, or in flight
/// with a running lease, whatever its `expires_at` (retention never ends a
/// lease that is still being renewed). Every statement that asks uses this
/// one definition; `row` is the row's alias with its dot, or empty. Never
/// NULL, so that `NOT` of it is a plain negation.
pub(in crate::store) fn live(row: &str) -> String {
    format!(
        "(({row}state = {COMPLETED} AND {row}expires_at > now())
          OR ({row}state = {IN_PROGRESS} AND ({row}locked_until > now()) IS TRUE))"
    )
}

/// Every statement, formatted once with the table name.
pub(in crate::store) struct Statements {
    pub(in crate::store) resolve_table: Statement,
    pub(in crate::store) lookup: Statement,
    pub(in crate::store) complete_transaction: Statement,
    pub(in crate::store) claim_lease: Statement,
    pub(in crate::store) renew_lease: Statement,
    pub(in crate::store) complete_lease: Statement,
    pub(in crate::store) release_lease: Statement,
    /// `BEGIN`, and the transaction's own settings.
    begin: String,
    advisory_locks: bool,
}

impl Statements {
    /// Begins a transaction (setting its `statement_timeout`, if the store
    /// has one, with `SET LOCAL`) and tries the key's advisory lock; the
    /// answer's one row says `t` when the lock is had. Only numbers are
    /// formatted in: a simple query, so that it travels as one message.
    ///
    /// With the body-hash guard the body's lock is tried too, in the same
    /// statement: the row says `t` only when both are had.
    pub(in crate::store) fn begin_and_try_lock(&self, lock_id: i64, body_lock_id: Option<i64>) -> String {
        let begin = &self.begin;
        if !self.advisory_locks {
            return format!("{begin}; SELECT true");
        }
        match body_lock_id {
            None => format!("{begin}; SELECT pg_try_advisory_xact_lock({lock_id})"),
            Some(body_lock_id) => format!(
                "{begin}; SELECT pg_try_advisory_xact_lock({lock_id}) AND pg_try_advisory_xact_lock({body_lock_id})"
            ),
        }
    }

    pub(in crate::store) fn new(name: &TableName, advisory_locks: bool, statement_timeout: Option<Duration>) -> Self {
        let t = name.quoted();
        let key = "source = $1 AND event_type = $2 AND key = $3";
        let live_row = live("");
        let live_conflicting = live("r.");
        let try_lock = if advisory_locks {
            "pg_try_advisory_xact_lock($8::int8)"
        } else {
            "$8::int8 IS NOT NULL"
        };
        let begin = match statement_timeout {
            Some(timeout) => format!(
                "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL statement_timeout = {}",
                timeout.as_millis().max(1)
            ),
            None => "BEGIN ISOLATION LEVEL READ COMMITTED".to_owned(),
        };
        Self {
            resolve_table: Statement::once(
                "SELECT n.nspname || '.' || c.relname
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE c.oid = to_regclass($1)"
                    .to_owned(),
                &[Type::TEXT],
            ),
            lookup: Statement::cached(
                format!(
                    "SELECT state, fingerprint, response_status, response_headers, response_body, expires_at
                     FROM {t} WHERE {key} AND {live_row}"
                ),
                &KEY,
            ),
            // Written once, at completion; `now()` is the transaction's start,
            // which is when the claim was taken. The advisory lock and the
            // claim's read mean an existing row is normally a dead one, which
            // the upsert replaces. Where the lock did not exclude another
            // claimant, the key is the arbiter: the upsert finds a live row
            // (waiting first for the other's transaction, if still open) and
            // fails instead of overwriting it, so that this transaction is
            // aborted and its pipelined `COMMIT` rolls back. It fails by
            // casting a sentence (which names the key) to a number, a branch
            // only a live row reaches: one plain upsert, as fast as one that
            // never fails, where a data-modifying CTE with a second insert
            // made to violate the key cost a fifth to a third of this statement's
            // throughput in pgbench.
            complete_transaction: Statement::cached(
                format!(
                    "INSERT INTO {t} AS r (source, event_type, key, fingerprint, state,
                                       response_status, response_headers, response_body,
                                       created_at, completed_at, expires_at)
                 VALUES ($1, $2, $3, $4, {COMPLETED}, $5, $6, $7, now(), clock_timestamp(),
                         clock_timestamp() + $8 * interval '1 second')
                 ON CONFLICT (source, event_type, key) DO UPDATE SET
                     state = CASE WHEN {live_conflicting}
                                  THEN ('{KEY_TAKEN}: ' || r.key)::smallint
                                  ELSE {COMPLETED} END,
                     fingerprint = EXCLUDED.fingerprint,
                     claim_token = NULL, locked_until = NULL,
                     response_status = EXCLUDED.response_status,
                     response_headers = EXCLUDED.response_headers,
                     response_body = EXCLUDED.response_body,
                     created_at = EXCLUDED.created_at, completed_at = EXCLUDED.completed_at,
                     expires_at = EXCLUDED.expires_at"
                ),
                &[
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::BYTEA,
                    Type::INT2,
                    Type::BYTEA,
                    Type::BYTEA,
                    Type::FLOAT8,
                ],
            ),
            // The claim takes the key's advisory lock for the length of this
            // one statement, so it never slips in while a transaction-mode
            // claimant holds the key. It inserts nothing when the statement's
            // snapshot holds a live record (no row lock, no write: a
            // duplicate stays a read); the upsert's condition, checked on the
            // latest row version, decides a takeover. A row carrying this
            // claim's own token is this request's claim, committed by an
            // attempt whose answer was lost: it is claimed again, never taken
            // for another's. The outer query returns the claim token
            // written, if any, and the live record of the snapshot, if any:
            // always one row.
            claim_lease: Statement::cached(
                format!(
                    "WITH claimed AS (
                     INSERT INTO {t} AS r (source, event_type, key, fingerprint, state, claim_token,
                                           locked_until, created_at, expires_at)
                     SELECT $1::text, $2::text, $3::text, $4::bytea, {IN_PROGRESS}, $5::uuid,
                            clock_timestamp() + $6::float8 * interval '1 second', clock_timestamp(),
                            clock_timestamp() + $7::float8 * interval '1 second'
                     WHERE {try_lock}
                       AND NOT EXISTS (SELECT 1 FROM {t}
                                       WHERE {key} AND {live_row} AND claim_token IS DISTINCT FROM $5::uuid)
                     ON CONFLICT (source, event_type, key) DO UPDATE SET
                         fingerprint = EXCLUDED.fingerprint, state = {IN_PROGRESS},
                         claim_token = EXCLUDED.claim_token, locked_until = EXCLUDED.locked_until,
                         response_status = NULL, response_headers = NULL, response_body = NULL,
                         created_at = EXCLUDED.created_at, completed_at = NULL,
                         expires_at = EXCLUDED.expires_at
                     WHERE NOT {live_conflicting}
                        OR (r.state = {IN_PROGRESS} AND r.claim_token = EXCLUDED.claim_token)
                     RETURNING claim_token
                 )
                 SELECT (SELECT claim_token FROM claimed) AS claimed,
                        live.state, live.fingerprint, live.response_status, live.response_headers,
                        live.response_body, live.expires_at
                 FROM (VALUES (1)) AS one
                 LEFT JOIN (SELECT * FROM {t} WHERE {key} AND {live_row}) AS live ON true"
                ),
                &[
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::BYTEA,
                    Type::UUID,
                    Type::FLOAT8,
                    Type::FLOAT8,
                    Type::INT8,
                ],
            ),
            renew_lease: Statement::cached(
                format!(
                    "UPDATE {t} SET locked_until = clock_timestamp() + $5 * interval '1 second'
                     WHERE {key} AND claim_token = $4 AND state = {IN_PROGRESS}"
                ),
                &[Type::TEXT, Type::TEXT, Type::TEXT, Type::UUID, Type::FLOAT8],
            ),
            complete_lease: Statement::cached(
                format!(
                    "UPDATE {t} SET state = {COMPLETED}, claim_token = NULL, locked_until = NULL,
                         response_status = $5, response_headers = $6, response_body = $7,
                         completed_at = clock_timestamp(),
                         expires_at = clock_timestamp() + $8 * interval '1 second'
                     WHERE {key} AND claim_token = $4 AND state = {IN_PROGRESS}"
                ),
                &[
                    Type::TEXT,
                    Type::TEXT,
                    Type::TEXT,
                    Type::UUID,
                    Type::INT2,
                    Type::BYTEA,
                    Type::BYTEA,
                    Type::FLOAT8,
                ],
            ),
            release_lease: Statement::cached(
                format!("DELETE FROM {t} WHERE {key} AND claim_token = $4 AND state = {IN_PROGRESS}"),
                &[Type::TEXT, Type::TEXT, Type::TEXT, Type::UUID],
            ),
            begin,
            advisory_locks,
        }
    }
}

/// The migration's lock: concurrent migrations of one table take turns.
pub(in crate::store) fn take_migration_lock() -> Statement {
    Statement::once("SELECT pg_advisory_xact_lock($1)".to_owned(), &[Type::INT8])
}

/// Where the table is (or would be created) and what of it exists, as the
/// server sees it for the current role.
///
/// An unqualified name resolves through the connection's effective
/// `search_path` (`current_schemas(true)`, which leaves out schemas the role
/// may not use), as the layer's own statements will; a new table goes to
/// `current_schema()`, as `CREATE TABLE` would put it. Catalogs are read
/// directly rather than through `to_regclass`, which raises for a schema the
/// role may not use.
pub(in crate::store) fn inspect_migration() -> Statement {
    Statement::once(
        INSPECT_MIGRATION.to_owned(),
        &[Type::TEXT, Type::TEXT, Type::TEXT_ARRAY],
    )
}

const INSPECT_MIGRATION: &str = "
WITH candidate AS (
    SELECT n.oid AS namespace, n.nspname, path.position
    FROM unnest(CASE WHEN $1::text IS NULL THEN current_schemas(true) ELSE ARRAY[$1::text]::name[] END)
         WITH ORDINALITY AS path(nspname, position)
    JOIN pg_namespace n ON n.nspname = path.nspname
), found AS (
    SELECT c.oid AS relation, candidate.nspname::text AS schema
    FROM candidate JOIN pg_class c ON c.relnamespace = candidate.namespace AND c.relname = $2::text
    ORDER BY candidate.position
    LIMIT 1
), target AS (
    SELECT (SELECT relation FROM found) AS relation,
           coalesce((SELECT schema FROM found), $1::text, current_schema()::text) AS schema
)
SELECT current_user::text AS role,
       quote_ident(current_user) AS grantee,
       current_database()::text AS database,
       target.schema,
       n.oid IS NOT NULL AS schema_exists,
       n.oid IS NOT NULL AND has_schema_privilege(n.oid, 'USAGE') AS schema_usage,
       target.relation IS NOT NULL AS table_exists,
       EXISTS (SELECT 1 FROM pg_index x
               JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
               WHERE x.indrelid = target.relation AND a.attname = 'expires_at') AS index_exists,
       EXISTS (SELECT 1 FROM pg_index x
               JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
               WHERE x.indrelid = target.relation AND a.attname = 'created_at'
                 AND x.indpred IS NOT NULL) AS open_claims_index_exists,
       ARRAY(SELECT wanted.privilege
             FROM unnest($3::text[]) WITH ORDINALITY AS wanted(privilege, position)
             WHERE target.relation IS NOT NULL AND NOT has_table_privilege(target.relation, wanted.privilege)
             ORDER BY wanted.position) AS missing_privileges
FROM target LEFT JOIN pg_namespace n ON n.nspname = target.schema";

pub(in crate::store) fn create_schema(schema: &str) -> String {
    format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\";\n")
}

pub(in crate::store) fn create_table(name: &TableName) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {} (
    source           text        NOT NULL,
    event_type       text        NOT NULL DEFAULT '',
    key              text        NOT NULL,
    fingerprint      bytea       NOT NULL,
    state            smallint    NOT NULL,
    claim_token      uuid,
    locked_until     timestamptz,
    response_status  smallint,
    response_headers bytea,
    response_body    bytea,
    created_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    expires_at       timestamptz NOT NULL,
    PRIMARY KEY (source, event_type, key)
);\n",
        name.quoted()
    )
}

pub(in crate::store) fn index_name(name: &TableName) -> String {
    format!("{}_expires_at", name.table)
}

pub(in crate::store) fn create_index(name: &TableName) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS \"{}\" ON {} (expires_at);\n",
        index_name(name),
        name.quoted()
    )
}

/// The SQL of the operations, formatted with the table name.
pub(in crate::store) struct OperationsSql;

impl OperationsSql {
    pub(in crate::store) fn stats(t: &str) -> Statement {
        let live = live("");
        Statement::once(
            format!(
                "SELECT count(*) FILTER (WHERE state = {IN_PROGRESS} AND {live}),
                    count(*) FILTER (WHERE state = {COMPLETED} AND {live}),
                    count(*) FILTER (WHERE expires_at <= now() AND NOT {live}),
                    count(*) FILTER (WHERE state = {IN_PROGRESS} AND expires_at > now() AND NOT {live}),
                    min(created_at) FILTER (WHERE state = {IN_PROGRESS} AND {live})
             FROM {t}"
            ),
            &[],
        )
    }

    /// Deletes up to `$1` expired records, oldest first, through the expiry
    /// index. `SKIP LOCKED` lets concurrent purgers take disjoint batches
    /// instead of waiting on each other or counting a row twice. A live
    /// record is never purged: an open claim with a running lease stays
    /// however long ago its retention ran out.
    pub(in crate::store) fn purge_batch(t: &str) -> Statement {
        let live = live("");
        Statement::cached(
            format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM {t}
                 WHERE expires_at <= now() AND NOT {live}
                 ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))"
            ),
            &[Type::INT8],
        )
    }

    pub(in crate::store) fn count_expired(t: &str) -> Statement {
        let live = live("");
        Statement::once(
            format!("SELECT count(*) FROM {t} WHERE expires_at <= now() AND NOT {live}"),
            &[],
        )
    }

    pub(in crate::store) fn show(t: &str) -> Statement {
        Statement::once(
            format!(
                "SELECT state, fingerprint, created_at, completed_at, expires_at, locked_until,
                    response_status, response_headers, response_body
             FROM {t} WHERE source = $1 AND event_type = $2 AND key = $3"
            ),
            &KEY,
        )
    }

    /// Deletes the record unless it is an open claim with a live lease (or
    /// `$4`, force, is set); says what it found either way.
    pub(in crate::store) fn release(t: &str) -> Statement {
        let live = live("");
        Statement::once(
            format!(
            "WITH found AS (SELECT state, locked_until FROM {t} WHERE source = $1 AND event_type = $2 AND key = $3),
                  deleted AS (DELETE FROM {t} WHERE source = $1 AND event_type = $2 AND key = $3
                                AND ($4 OR NOT (state = {IN_PROGRESS} AND {live}))
                              RETURNING 1)
             SELECT EXISTS (SELECT 1 FROM found), EXISTS (SELECT 1 FROM deleted)"
            ),
            &[Type::TEXT, Type::TEXT, Type::TEXT, Type::BOOL],
        )
    }
}

/// Ends the request's transaction, keeping its writes.
pub(in crate::store) const COMMIT: &str = "COMMIT";
/// Ends the request's transaction, undoing its writes.
pub(in crate::store) const ROLLBACK: &str = "ROLLBACK";

/// Marks where an optional migration step starts, so that its failure can
/// be undone without aborting the migration's transaction.
pub(in crate::store) const SAVEPOINT_OPTIONAL_STEP: &str = "SAVEPOINT optional_step";

/// Undoes a failed optional migration step.
pub(in crate::store) const ROLLBACK_OPTIONAL_STEP: &str = "ROLLBACK TO SAVEPOINT optional_step";

/// The open claims' index: lease mode's in-flight rows by when they were
/// claimed. Partial, so it holds only rows in flight (none at all in
/// transaction mode, whose rows are written completed), and keyed by a
/// column a lease renewal never changes, so renewals stay HOT updates.
pub(in crate::store) fn open_claims_index_name(name: &TableName) -> String {
    format!("{}_open_claims", name.table)
}

pub(in crate::store) fn create_open_claims_index(name: &TableName) -> String {
    format!(
        "CREATE INDEX IF NOT EXISTS \"{}\" ON {} (created_at) WHERE state = {IN_PROGRESS};\n",
        open_claims_index_name(name),
        name.quoted()
    )
}

/// Records a purge would delete are counted up to this many (one default
/// purge batch), so that the gauges' read stays cheap however far behind
/// the purge is; the oldest expired record's age tells how far.
pub(in crate::store) const EXPIRED_COUNT_CAP: i64 = 10_000;

impl OperationsSql {
    /// The gauges: one row, read through the two indexes and never the
    /// whole table. The open claims come from the open claims' index (its
    /// first live entry; and every entry, to count those whose lease ran
    /// out); the expired records from the `expires_at` index, counted up to
    /// [`EXPIRED_COUNT_CAP`], and its first entry for the oldest; the size
    /// from the relation's files, without reading them.
    pub(in crate::store) fn gauges(t: &str) -> String {
        let live = live("");
        format!(
            "SELECT (SELECT extract(epoch FROM now() - min(created_at))::float8 FROM {t}
                     WHERE state = {IN_PROGRESS} AND locked_until > now()) AS oldest_open_claim_age,
                    (SELECT count(*) FROM {t}
                     WHERE state = {IN_PROGRESS} AND (locked_until > now()) IS NOT TRUE) AS claims_past_lease,
                    (SELECT count(*) FROM (SELECT 1 FROM {t} WHERE expires_at <= now() AND NOT {live}
                                           LIMIT {EXPIRED_COUNT_CAP}) AS capped) AS expired_awaiting_purge,
                    (SELECT extract(epoch FROM now() - min(expires_at))::float8 FROM {t}
                     WHERE expires_at <= now() AND NOT {live}) AS oldest_expired_age,
                    pg_total_relation_size('{t}'::regclass) AS table_bytes"
        )
    }
}
