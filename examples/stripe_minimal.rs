//! The smallest idempotent Stripe webhook receiver: however often Stripe
//! delivers an event, its row is inserted once.
//!
//! ```text
//! STRIPE_WEBHOOK_SECRET=whsec_... cargo run --example stripe_minimal
//! ```

use axum::{http::StatusCode, routing::post, Json, Router};
use serde_json::Value;
use tower_idempotency::signature::StripeSignature;
use tower_idempotency::{IdempotencyLayer, PostgresStore, Preset, Tx};

/// Runs once per event: its row commits with the idempotency record, or
/// neither does.
async fn stripe_webhook(tx: Tx, Json(event): Json<Value>) -> Result<StatusCode, StatusCode> {
    tx.execute(
        "INSERT INTO stripe_events (event_id, event_type) VALUES ($1, $2)",
        &[&event["id"].as_str(), &event["type"].as_str()],
    )
    .await
    // Not a 2xx: the row rolls back and Stripe's retry runs afresh.
    .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    Ok(StatusCode::OK)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let secret = std::env::var("STRIPE_WEBHOOK_SECRET").map_err(|_| "set STRIPE_WEBHOOK_SECRET (whsec_...)")?;
    let stripe = Preset::stripe().verify_signature(StripeSignature::new(secret)?);
    let env = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_owned());

    let mut config = deadpool_postgres::Config::new();
    config.url = Some(env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres"));
    let pool = config.create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)?;
    let store = PostgresStore::new(pool.clone());
    store.migrate().await?; // the idempotency records' table
    pool.get()
        .await?
        .batch_execute("CREATE TABLE IF NOT EXISTS stripe_events (event_id text NOT NULL, event_type text)")
        .await?;

    let app = Router::new()
        .route("/webhooks/stripe", post(stripe_webhook))
        .route_layer(IdempotencyLayer::new(store).preset(stripe));

    let listener = tokio::net::TcpListener::bind(env("BIND", "127.0.0.1:3000")).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
