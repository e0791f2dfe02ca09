//! The store's errors, in terms every backend shares: a driver's error is
//! turned into a [`DatabaseError`] where that backend lives.

use std::error::Error;
use std::fmt;
use std::time::Duration;

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No connection could be had (pool timeout, connect failure).
    #[error("could not get a database connection: {0}")]
    Connect(#[source] DatabaseError),
    /// A statement failed.
    #[error("database error: {0}")]
    Database(#[source] DatabaseError),
    /// The store did not answer within the route's store timeout.
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The in-memory store is full of live records.
    #[error("the in-memory store is full of live records; raise its capacity")]
    Full,
    /// A stored record could not be decoded.
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
    /// The records table does not exist.
    #[error("the records table `{0}` does not exist: run PostgresStore::migrate() first")]
    TableMissing(String),
    /// [`PostgresStore::migrate`](crate::PostgresStore::migrate) found the
    /// schema, the records table or one of its indexes missing, and the role
    /// may not create it.
    #[error(
        "cannot create {object}: the role `{role}` lacks {privilege}; run the migration as a role that has it \
         (the owner), or apply PostgresStore::migration_sql() with your migration tool \
         (migrations/0001_idempotency_records.sql for the default table)"
    )]
    CannotCreate {
        /// What was missing, as `table schema.name`, `index schema.name` or
        /// `schema name`.
        object: String,
        /// The role that tried.
        role: String,
        /// What creating it takes, as `CREATE on schema public`.
        privilege: String,
    },
    /// The role lacks a privilege the layer needs on the records table or
    /// its schema.
    #[error("the role `{role}` lacks {privileges} on {object}, which the layer needs: as the owner, run GRANT {privileges} ON {object} TO {grantee}")]
    MissingGrant {
        /// `table schema.name` or `schema name`.
        object: String,
        /// The role.
        role: String,
        /// The role as an SQL identifier.
        grantee: String,
        /// The missing privileges, as `UPDATE, DELETE`.
        privileges: String,
    },
    /// The claim's connection was already gone.
    #[error("the claim's connection is no longer available")]
    ConnectionGone,
    /// The handler kept its transaction past its response.
    #[error("the handler still holds the request's transaction after answering")]
    TransactionInUse,
}

/// A database driver's error, as the layer reasons about it: the SQLSTATE
/// the server answered with, if it answered, and whether the connection
/// died. The driver's own error is its [`source`](Error::source).
///
/// ```
/// use tower_idempotency::StoreError;
///
/// fn is_undefined_table(error: &StoreError) -> bool {
///     match error {
///         StoreError::Database(database) => database.sqlstate() == Some("42P01"),
///         _ => false,
///     }
/// }
/// # let _ = is_undefined_table;
/// ```
#[derive(Debug)]
pub struct DatabaseError {
    message: String,
    sqlstate: Option<String>,
    connection_lost: bool,
    source: Box<dyn Error + Send + Sync>,
}

impl DatabaseError {
    /// A driver's error. `message` says what happened (the server's
    /// message, or the I/O cause); `sqlstate` is the server's code when the
    /// server answered; `connection_lost` says whether the connection died
    /// (a restarted server, a terminated backend), so that a fresh one may
    /// succeed.
    pub(crate) fn new(
        message: String,
        sqlstate: Option<String>,
        connection_lost: bool,
        source: Box<dyn Error + Send + Sync>,
    ) -> Self {
        Self {
            message,
            sqlstate,
            connection_lost,
            source,
        }
    }

    /// The SQLSTATE the server answered with, such as `42P01`; `None` when
    /// no answer came (a connection error, a timeout in the driver).
    pub fn sqlstate(&self) -> Option<&str> {
        self.sqlstate.as_deref()
    }

    /// Whether the connection died under the statement: a fresh connection
    /// may succeed.
    pub fn is_connection_lost(&self) -> bool {
        self.connection_lost
    }
}

impl fmt::Display for DatabaseError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl Error for DatabaseError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

/// SQLSTATEs that say the store is set up wrong rather than down: retrying
/// cannot help until an operator acts.
const MISCONFIGURATION_CODES: [&str; 7] = [
    "42P01", // undefined_table
    "42703", // undefined_column
    "3F000", // invalid_schema_name
    "42501", // insufficient_privilege
    "3D000", // invalid_catalog_name: the database does not exist
    "28000", // invalid_authorization_specification
    "28P01", // invalid_password
];

impl StoreError {
    /// The driver's error behind a connect or statement failure.
    fn database_error(&self) -> Option<&DatabaseError> {
        match self {
            StoreError::Connect(error) | StoreError::Database(error) => Some(error),
            _ => None,
        }
    }

    /// Whether the store could not be reached or did not answer in time, as
    /// opposed to answering with something wrong (a full memory store, a
    /// corrupt record, a missing table or privilege). Only the former fails
    /// open.
    pub(crate) fn is_unavailable(&self) -> bool {
        let outage = matches!(
            self,
            StoreError::Connect(_) | StoreError::Database(_) | StoreError::Timeout(_) | StoreError::ConnectionGone
        );
        outage && !self.is_misconfiguration()
    }

    /// Whether the store is set up wrong (a missing table, column or
    /// schema, a missing privilege, a wrong database or credentials): a
    /// permanent fault until an operator fixes it.
    pub(crate) fn is_misconfiguration(&self) -> bool {
        if matches!(self, StoreError::TableMissing(_)) {
            return true;
        }
        self.database_error()
            .and_then(DatabaseError::sqlstate)
            .is_some_and(|code| MISCONFIGURATION_CODES.contains(&code))
    }

    /// Whether a failed commit may still have committed: its request was
    /// sent and no answer came (a timeout, a connection lost on the way).
    /// An error the server answered with, or one raised before anything was
    /// sent, leaves the transaction rolled back.
    pub(crate) fn commit_outcome_unknown(&self) -> bool {
        match self {
            StoreError::Timeout(_) => true,
            StoreError::Database(error) => error.sqlstate().is_none() && error.is_connection_lost(),
            _ => false,
        }
    }

    /// Whether the error came from a connection that died (a restarted
    /// server, a terminated backend), so a fresh connection may succeed.
    pub(crate) fn is_connection_lost(&self) -> bool {
        self.database_error().is_some_and(DatabaseError::is_connection_lost)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn database(sqlstate: Option<&str>, connection_lost: bool) -> DatabaseError {
        DatabaseError::new(
            "test".to_owned(),
            sqlstate.map(str::to_owned),
            connection_lost,
            "test".into(),
        )
    }

    #[test]
    fn a_missing_privilege_is_a_misconfiguration_not_an_outage() {
        let error = StoreError::Database(database(Some("42501"), false));
        assert!(error.is_misconfiguration());
        assert!(!error.is_unavailable());
    }

    #[test]
    fn a_refused_login_at_connect_is_a_misconfiguration() {
        assert!(StoreError::Connect(database(Some("28P01"), false)).is_misconfiguration());
    }

    #[test]
    fn a_connection_lost_without_an_answer_leaves_a_commit_unknown() {
        let error = StoreError::Database(database(None, true));
        assert!(error.commit_outcome_unknown());
        assert!(error.is_unavailable());
    }

    #[test]
    fn a_commit_the_server_refused_is_known_to_have_failed() {
        // admin_shutdown: the server answered, so the commit did not happen.
        let error = StoreError::Database(database(Some("57P01"), true));
        assert!(!error.commit_outcome_unknown());
        assert!(error.is_connection_lost());
    }
}
