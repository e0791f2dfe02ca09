//! `examples/sqlx_minimal.rs`, the README's "With sqlx" example, run for
//! real: the compiled example as a child process on a Postgres schema of
//! the test's own, sent Stripe-signed deliveries over HTTP; and the README's
//! copy of its code kept identical to it.
//!
//! `cargo test` builds the example before it runs the tests; a filtered run
//! does not, so rebuild first:
//! `cargo build --features sqlx --example sqlx_minimal && cargo test --features sqlx --test sqlx_minimal`.
#![cfg(feature = "sqlx")]

mod process;
mod support;

use http::StatusCode;
use process::{Receiver, Reply, Schema};
use serde_json::json;
use support::signing::stripe_signature;

const EXAMPLE: &str = "sqlx_minimal";
const SECRET: &str = "whsec_sqlx_example_secret";

async fn deliver(receiver: &Receiver, body: &str) -> Reply {
    let signature = stripe_signature(SECRET, support::signing::unix_now(), body);
    let headers = [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Stripe-Signature", signature.as_str()),
    ];
    receiver.post("/webhooks/stripe", &headers, body.to_owned()).await
}

async fn event_rows(schema: &Schema, event_id: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {}.stripe_events WHERE event_id = $1", schema.name);
    schema
        .db
        .query_one(&sql, &[&event_id])
        .await
        .expect("stripe_events is readable")
        .get(0)
}

#[tokio::test]
async fn the_sqlx_example_inserts_an_events_row_once_and_replays_its_duplicate() {
    let schema = Schema::new("sqlx_minimal_once").await;
    let receiver = Receiver::start_example(EXAMPLE, &schema, &[("STRIPE_WEBHOOK_SECRET", SECRET)]).await;
    let event = json!({"id": "evt_sqlx_once", "type": "payment_intent.succeeded"}).to_string();

    let first = deliver(&receiver, &event).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.replayed(), "{first:?}");
    let duplicate = deliver(&receiver, &event).await;
    assert_eq!(duplicate.status, StatusCode::OK, "{duplicate:?}");
    assert!(duplicate.replayed(), "{duplicate:?}");

    assert_eq!(event_rows(&schema, "evt_sqlx_once").await, 1);
    let completed = schema
        .count("SELECT count(*) FROM {schema}.idempotency_records WHERE key = 'evt_sqlx_once' AND state = 2")
        .await;
    assert_eq!(completed, 1, "the row and the record committed together");
}

#[test]
fn the_readme_shows_the_sqlx_example() {
    let code: Vec<&str> = include_str!("../examples/sqlx_minimal.rs")
        .lines()
        .skip_while(|line| line.starts_with("//!"))
        .skip_while(|line| line.is_empty())
        .collect();
    let fenced = format!("```rust,no_run\n{}\n```", code.join("\n"));
    assert!(
        include_str!("../README.md").contains(&fenced),
        "the README's \"With sqlx\" block is examples/sqlx_minimal.rs, without its opening comment"
    );
}
