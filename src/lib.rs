//! Idempotent webhook receivers and APIs with one `.layer(...)`, backed by
//! the Postgres the application already runs.
//!
//! Webhook providers deliver at-least-once and API clients retry `POST`s
//! with an `Idempotency-Key`. [`IdempotencyLayer`] makes the wrapped
//! handler run once per event: it buffers the request body (bounded), reads
//! the key, claims it in the store under a Postgres advisory lock, runs the
//! handler, then commits or releases the claim by the response status, and
//! answers every later duplicate with the stored response marked
//! `Idempotent-Replayed: true`.
//!
//! In [`Mode::Transaction`] (the default) the handler writes through the
//! request's own transaction ([`Tx`]), and the record commits atomically
//! with those writes: effects in the same database happen exactly once.
//! A whole Stripe webhook receiver, signature checked, each event's row
//! inserted once (`examples/stripe_minimal.rs`):
//!
//! ```no_run
//! use axum::{http::StatusCode, routing::post, Json, Router};
//! use serde_json::Value;
//! use tower_idempotency::signature::StripeSignature;
//! use tower_idempotency::{IdempotencyLayer, PostgresStore, Preset, Tx};
//!
//! /// Runs once per event: its row commits with the idempotency record, or
//! /// neither does.
//! async fn stripe_webhook(tx: Tx, Json(event): Json<Value>) -> Result<StatusCode, StatusCode> {
//!     tx.execute(
//!         "INSERT INTO stripe_events (event_id, event_type) VALUES ($1, $2)",
//!         &[&event["id"].as_str(), &event["type"].as_str()],
//!     )
//!     .await
//!     // Not a 2xx: the row rolls back and Stripe's retry runs afresh.
//!     .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
//!     Ok(StatusCode::OK)
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let secret = std::env::var("STRIPE_WEBHOOK_SECRET").map_err(|_| "set STRIPE_WEBHOOK_SECRET (whsec_...)")?;
//!     let stripe = Preset::stripe().verify_signature(StripeSignature::new(secret)?);
//!     let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());
//!
//!     let mut config = deadpool_postgres::Config::new();
//!     config.url = Some(env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"));
//!     let pool = config.create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)?;
//!     let store = PostgresStore::new(pool.clone());
//!     store.migrate().await?; // the idempotency records' table
//!     pool.get()
//!         .await?
//!         .batch_execute("CREATE TABLE IF NOT EXISTS stripe_events (event_id text NOT NULL, event_type text)")
//!         .await?;
//!
//!     let app = Router::new()
//!         .route("/webhooks/stripe", post(stripe_webhook))
//!         .route_layer(IdempotencyLayer::new(store).preset(stripe));
//!
//!     let listener = tokio::net::TcpListener::bind(env("BIND", "127.0.0.1:3000")).await?;
//!     println!("listening on {}", listener.local_addr()?);
//!     axum::serve(listener, app).await?;
//!     Ok(())
//! }
//! ```
//!
//! Behind a transaction-mode pooler (PgBouncer, Supavisor, RDS Proxy), give
//! the store [`PoolMode::Transaction`] with [`PostgresStore::with_pool_mode`]:
//! it then sends no named prepared statement and keeps nothing on a server
//! session beyond its transaction.
//!
//! With the `sqlx` feature, `SqlxStore` keeps the records on the service's
//! own `sqlx::PgPool` (the same table, migration, modes, record cache and
//! round trips), and a handler takes the request's transaction as sqlx's
//! `PgConnection` through `SqlxTx`: `sqlx::query(..).execute(&mut *tx)`
//! commits with the record.
//!
//! # Webhook providers
//!
//! A [`Preset`] sets a provider's documented key, event type and, given
//! its secret, signature scheme (in [`signature`]: Stripe, GitHub, Shopify,
//! Standard Webhooks and Svix, Slack, Twilio, Paystack, Flutterwave) in one
//! call to [`IdempotencyLayer::preset`].
//! Signatures are checked on the raw body before anything is claimed.
//! [`Extractor::common_event_id`] keys senders that document no event id,
//! and an [`OrderingGuard`] keeps out-of-order deliveries from moving a
//! state backwards.
//!
//! # Errors the layer answers itself
//!
//! Every refusal is `application/problem+json` (RFC 9457) with a stable
//! `type`:
//!
//! | status | `type` | when |
//! | --- | --- | --- |
//! | 400 | `urn:tower-idempotency:missing-key` | no key, on a route that requires one |
//! | 400 | `urn:tower-idempotency:invalid-key` | empty, too long, control characters, not UTF-8, wrong JSON type |
//! | 400 | `urn:tower-idempotency:malformed-json` | a body that must be JSON is not |
//! | 400 | `urn:tower-idempotency:body-unreadable` | the request body failed mid-stream |
//! | 401 | `urn:tower-idempotency:invalid-signature` | the route verifies signatures and this one is missing, malformed, stale or wrong |
//! | 409 | `urn:tower-idempotency:in-flight` | the key is being processed (`Retry-After: 1`) |
//! | 413 | `urn:tower-idempotency:payload-too-large` | the body is over the route's limit |
//! | 422 | `urn:tower-idempotency:fingerprint-mismatch` | the key was used with another request |
//! | 500 | `urn:tower-idempotency:handler-failed` | the handler panicked or was cancelled |
//! | 500 | `urn:tower-idempotency:corrupt-record` | a stored response could not be decoded |
//! | 500 | `urn:tower-idempotency:store-misconfigured` | the records table is missing or the role lacks a privilege (permanent) |
//! | 500 | `urn:tower-idempotency:transaction-held` | the handler kept its [`Tx`] after answering (a bug); its writes roll back |
//! | 503 | `urn:tower-idempotency:store-unavailable` | the store is down or timed out (`Retry-After: 2`) |
//! | 503 | `urn:tower-idempotency:commit-failed` | the handler's transaction did not commit and was rolled back (`Retry-After: 2`) |
//! | 503 | `urn:tower-idempotency:commit-outcome-unknown` | the commit was sent but not answered: it may have committed (`Retry-After: 2`) |
//! | 503 | `urn:tower-idempotency:store-full` | a [`MemoryStore`] is full of live records (`Retry-After: 2`) |
//! | 503 | `urn:tower-idempotency:shutting-down` | the layer is shutting down ([`ShutdownHandle`]): the request needed a new claim, or was cut off at the deadline (`Retry-After: 2`) |
#![cfg_attr(docsrs, feature(doc_cfg))]
#![warn(
    clippy::all,
    clippy::dbg_macro,
    clippy::todo,
    clippy::unwrap_used,
    missing_debug_implementations,
    missing_docs,
    rust_2018_idioms
)]
#![deny(unreachable_pub)]
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used))]

// Entry points for the micro-benchmarks in benches/, built only with the
// bench-internals feature.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod bench;
mod body;
mod fingerprint;
// Entry points for the fuzz targets in fuzz/, built only by cargo-fuzz.
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod inflight;
mod key;
mod layer;
mod metrics;
mod ordering;
mod pipeline;
mod policy;
mod pool_mode;
mod preset;
mod problem;
mod record;
mod service;
mod shutdown;
pub mod signature;
mod store;

pub use body::{BoxError, ResponseBody};
pub use fingerprint::Fingerprint;
pub use key::{Extractor, InvalidJsonPath, KeyError, KeyField, RecordKey};
pub use layer::{
    IdempotencyLayer, InvalidConfig, DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_REQUEST_BYTES,
    DEFAULT_MAX_STORED_RESPONSE_BYTES, DEFAULT_RESPONSE_BUFFER_TIMEOUT, DEFAULT_RETENTION, DEFAULT_STORE_TIMEOUT,
    MAX_DURATION,
};
pub use ordering::{OrderingError, OrderingGuard, Transition};
pub use policy::{InFlight, MissingKey, Mode, ResponseDecision};
pub use pool_mode::PoolMode;
pub use preset::Preset;
pub use service::{IdempotencyService, RequestBody, ResponseFuture, REPLAYED_HEADER};
pub use shutdown::{ShutdownHandle, ShutdownReport};
pub use store::{
    DatabaseError, Deletion, IdempotencyTx, InvalidTableName, MemoryStore, PostgresStore, RecordView, Store,
    StoreError, StoreGauges, StoreStats, Tx, TxError, DEFAULT_TABLE,
};
#[cfg(feature = "sqlx")]
pub use store::{SqlxIdempotencyTx, SqlxStore, SqlxTx};

/// The README's code blocks, compiled as doctests; its "With sqlx" blocks
/// need the `sqlx` feature, so they run with it (`cargo test
/// --all-features`, as CI does).
#[cfg(all(doctest, feature = "sqlx"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
