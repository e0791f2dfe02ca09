//! tokio-postgres' and deadpool's errors, turned into the store's
//! driver-neutral [`DatabaseError`].

use std::error::Error as _;

use crate::store::{DatabaseError, StoreError};

/// SQLSTATEs of a server going away: admin_shutdown, crash_shutdown,
/// cannot_connect_now.
const CONNECTION_LOST_CODES: [&str; 3] = ["57P01", "57P02", "57P03"];

impl From<tokio_postgres::Error> for DatabaseError {
    fn from(error: tokio_postgres::Error) -> Self {
        let sqlstate = error.code().map(|code| code.code().to_owned());
        let connection_lost = error.is_closed()
            || sqlstate
                .as_deref()
                .is_some_and(|code| CONNECTION_LOST_CODES.contains(&code))
            || (error.as_db_error().is_none()
                && error
                    .source()
                    .is_some_and(|source| source.downcast_ref::<std::io::Error>().is_some()));
        DatabaseError::new(describe(&error), sqlstate, connection_lost, Box::new(error))
    }
}

/// tokio-postgres' own message is terse ("db error"); the server's message
/// or the I/O cause says what happened.
fn describe(error: &tokio_postgres::Error) -> String {
    match (error.as_db_error(), error.source()) {
        (Some(db), _) => match crate::pool_mode::pooler_hint(db.code().code()) {
            Some(hint) => format!("{}: {}; {hint}", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        (None, Some(source)) => format!("{error}: {source}"),
        (None, None) => error.to_string(),
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> Self {
        StoreError::Database(error.into())
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        match error {
            deadpool_postgres::PoolError::Backend(error) => StoreError::Connect(error.into()),
            other => StoreError::Connect(DatabaseError::new(other.to_string(), None, false, Box::new(other))),
        }
    }
}
