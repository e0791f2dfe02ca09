//! sqlx's errors, turned into the store's driver-neutral [`DatabaseError`].

use crate::store::{DatabaseError, StoreError};

/// SQLSTATEs of a server going away: admin_shutdown, crash_shutdown,
/// cannot_connect_now.
const CONNECTION_LOST_CODES: [&str; 3] = ["57P01", "57P02", "57P03"];

impl From<::sqlx::Error> for DatabaseError {
    fn from(error: ::sqlx::Error) -> Self {
        let (message, sqlstate, connection_lost) = match &error {
            ::sqlx::Error::Database(database) => {
                let sqlstate = database.code().map(|code| code.into_owned());
                let lost = sqlstate
                    .as_deref()
                    .is_some_and(|code| CONNECTION_LOST_CODES.contains(&code));
                let message = match &sqlstate {
                    Some(code) => format!("{code}: {}", database.message()),
                    None => database.message().to_owned(),
                };
                (message, sqlstate, lost)
            }
            // The connection broke, or its conversation is out of step:
            // either way it is unusable and a fresh one may succeed.
            ::sqlx::Error::Io(_) | ::sqlx::Error::Protocol(_) | ::sqlx::Error::Tls(_) => {
                (error.to_string(), None, true)
            }
            other => (other.to_string(), None, false),
        };
        DatabaseError::new(message, sqlstate, connection_lost, Box::new(error))
    }
}

impl From<::sqlx::Error> for StoreError {
    fn from(error: ::sqlx::Error) -> Self {
        match error {
            // A column the store wrote that does not read back: the record,
            // not the database, is at fault.
            ::sqlx::Error::ColumnDecode { .. } | ::sqlx::Error::Decode(_) | ::sqlx::Error::ColumnNotFound(_) => {
                StoreError::Corrupt(error.to_string())
            }
            error => StoreError::Database(error.into()),
        }
    }
}

/// A connection could not be had from the pool.
pub(super) fn connect_error(error: ::sqlx::Error) -> StoreError {
    StoreError::Connect(error.into())
}
