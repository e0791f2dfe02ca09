//! An axum + sqlx service made idempotent: however often Stripe delivers an
//! event, its row is inserted once, through the request's sqlx transaction.
//!
//! ```text
//! STRIPE_WEBHOOK_SECRET=whsec_... cargo run --example sqlx_minimal --features sqlx
//! ```

use axum::{http::StatusCode, routing::post, Json, Router};
use serde_json::Value;
use tower_idempotency::signature::StripeSignature;
use tower_idempotency::{IdempotencyLayer, Preset, SqlxStore, SqlxTx};

/// Runs once per event: its row commits with the idempotency record, or
/// neither does.
async fn stripe_webhook(mut tx: SqlxTx, Json(event): Json<Value>) -> Result<StatusCode, StatusCode> {
    sqlx::query("INSERT INTO stripe_events (event_id, event_type) VALUES ($1, $2)")
        .bind(event["id"].as_str())
        .bind(event["type"].as_str())
        .execute(&mut *tx)
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

    let pool = sqlx::PgPool::connect(&env("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")).await?;
    let store = SqlxStore::new(pool.clone());
    store.migrate().await?; // the idempotency records' table
    sqlx::raw_sql("CREATE TABLE IF NOT EXISTS stripe_events (event_id text NOT NULL, event_type text)")
        .execute(&pool)
        .await?;

    let app = Router::new()
        .route("/webhooks/stripe", post(stripe_webhook))
        .route_layer(IdempotencyLayer::new(store).preset(stripe));

    let listener = tokio::net::TcpListener::bind(env("BIND", "127.0.0.1:3000")).await?;
    println!("listening on {}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
