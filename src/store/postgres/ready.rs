//! How each statement of [`super::sql`] is sent in each [`PoolMode`].

use deadpool_postgres::ClientWrapper;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Transaction};

use super::sql::Statement;
use crate::PoolMode;

/// Parameters paired with the types a statement declares for them.
fn typed<'a>(statement: &Statement, params: &[&'a (dyn ToSql + Sync)]) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    debug_assert_eq!(
        statement.types.len(),
        params.len(),
        "a statement's declared parameter types match its parameters"
    );
    params
        .iter()
        .zip(statement.types)
        .map(|(param, ty)| (*param, ty.clone()))
        .collect()
}

impl PoolMode {
    /// Makes `statement` ready to run on `client`. In session mode a
    /// request-path statement (`cached`) is prepared once per connection
    /// (deadpool's statement cache) and reused; any other is prepared, run
    /// and closed each time. In transaction mode nothing is prepared: the
    /// statement goes unnamed, with its declared parameter types, in one
    /// round trip, and nothing of it stays on the server session.
    pub(super) async fn ready<'s>(
        self,
        client: &ClientWrapper,
        statement: &'s Statement,
    ) -> Result<Ready<'s>, tokio_postgres::Error> {
        Ok(match self {
            PoolMode::Session if statement.cached => Ready::Prepared(client.prepare_cached(&statement.text).await?),
            PoolMode::Session => Ready::Named(statement),
            PoolMode::Transaction => Ready::Unnamed(statement),
        })
    }

    /// [`PoolMode::ready`] for a statement that is never cached, such as
    /// one inside the migration's transaction: needs no connection yet.
    pub(super) fn unprepared(self, statement: &Statement) -> Ready<'_> {
        match self {
            PoolMode::Session => Ready::Named(statement),
            PoolMode::Transaction => Ready::Unnamed(statement),
        }
    }
}

/// A statement as [`PoolMode::ready`] made it ready to run.
pub(super) enum Ready<'s> {
    /// Prepared on this connection, named, reused (session mode).
    Prepared(tokio_postgres::Statement),
    /// Prepared, run and closed in turn by tokio-postgres (session mode).
    Named(&'s Statement),
    /// Sent as the unnamed statement with its parameter types
    /// (transaction mode).
    Unnamed(&'s Statement),
}

impl Ready<'_> {
    pub(super) async fn query_opt(
        &self,
        client: &Client,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, tokio_postgres::Error> {
        match self {
            Ready::Prepared(prepared) => client.query_opt(prepared, params).await,
            Ready::Named(statement) => client.query_opt(statement.text.as_str(), params).await,
            Ready::Unnamed(statement) => client.query_typed_opt(&statement.text, &typed(statement, params)).await,
        }
    }

    pub(super) async fn query_one(
        &self,
        client: &Client,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        match self {
            Ready::Prepared(prepared) => client.query_one(prepared, params).await,
            Ready::Named(statement) => client.query_one(statement.text.as_str(), params).await,
            Ready::Unnamed(statement) => client.query_typed_one(&statement.text, &typed(statement, params)).await,
        }
    }

    pub(super) async fn execute(
        &self,
        client: &Client,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        match self {
            Ready::Prepared(prepared) => client.execute(prepared, params).await,
            Ready::Named(statement) => client.execute(statement.text.as_str(), params).await,
            Ready::Unnamed(statement) => client.execute_typed(&statement.text, &typed(statement, params)).await,
        }
    }

    /// [`Ready::query_one`] inside an open transaction.
    pub(super) async fn query_one_in(
        &self,
        transaction: &Transaction<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, tokio_postgres::Error> {
        match self {
            Ready::Prepared(prepared) => transaction.query_one(prepared, params).await,
            Ready::Named(statement) => transaction.query_one(statement.text.as_str(), params).await,
            Ready::Unnamed(statement) => {
                transaction
                    .query_typed_one(&statement.text, &typed(statement, params))
                    .await
            }
        }
    }

    /// [`Ready::execute`] inside an open transaction.
    pub(super) async fn execute_in(
        &self,
        transaction: &Transaction<'_>,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, tokio_postgres::Error> {
        match self {
            Ready::Prepared(prepared) => transaction.execute(prepared, params).await,
            Ready::Named(statement) => transaction.execute(statement.text.as_str(), params).await,
            Ready::Unnamed(statement) => {
                transaction
                    .execute_typed(&statement.text, &typed(statement, params))
                    .await
            }
        }
    }
}
