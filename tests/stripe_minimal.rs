//! `examples/stripe_minimal.rs`, the example the README and the crate docs
//! open with, run for real: the compiled example as a child process on a
//! Postgres schema of the test's own, sent Stripe-signed deliveries over
//! HTTP; and the two copies of its code in the docs kept identical to it.
//!
//! `cargo test` builds the example before it runs the tests; a filtered run
//! does not, so rebuild first:
//! `cargo build --example stripe_minimal && cargo test --test stripe_minimal`.

mod process;
mod support;

use http::StatusCode;
use process::{run_to_exit, Receiver, Reply, Schema};
use serde_json::json;
use support::signing::stripe_signature;

const EXAMPLE: &str = "stripe_minimal";
const SECRET: &str = "whsec_minimal_example_secret";

fn stripe_event(id: &str) -> String {
    json!({"id": id, "type": "payment_intent.succeeded", "data": {"object": {"amount": 500}}}).to_string()
}

/// Delivers `body` to the example's route as Stripe does, signed with
/// `secret`.
async fn deliver(receiver: &Receiver, secret: &str, body: &str) -> Reply {
    let signature = stripe_signature(secret, support::signing::unix_now(), body);
    let headers = [
        ("Content-Type", "application/json; charset=utf-8"),
        ("Stripe-Signature", signature.as_str()),
    ];
    receiver.post("/webhooks/stripe", &headers, body.to_owned()).await
}

async fn start(schema: &Schema) -> Receiver {
    Receiver::start_example(EXAMPLE, schema, &[("STRIPE_WEBHOOK_SECRET", SECRET)]).await
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
async fn a_signed_event_runs_once_and_its_duplicate_is_replayed() {
    let schema = Schema::new("minimal_once").await;
    let receiver = start(&schema).await;
    let event = stripe_event("evt_minimal_once");

    let first = deliver(&receiver, SECRET, &event).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.replayed(), "{first:?}");
    let duplicate = deliver(&receiver, SECRET, &event).await;
    assert_eq!(duplicate.status, StatusCode::OK, "{duplicate:?}");
    assert!(duplicate.replayed(), "{duplicate:?}");

    assert_eq!(event_rows(&schema, "evt_minimal_once").await, 1);
}

#[tokio::test]
async fn a_forged_event_is_refused_and_leaves_no_row() {
    let schema = Schema::new("minimal_forged").await;
    let receiver = start(&schema).await;

    let forged = deliver(&receiver, "whsec_guessed", &stripe_event("evt_minimal_forged")).await;
    forged.assert_problem(StatusCode::UNAUTHORIZED);
    assert_eq!(
        forged.json()["type"],
        "urn:tower-idempotency:invalid-signature",
        "{forged:?}"
    );

    assert_eq!(event_rows(&schema, "evt_minimal_forged").await, 0);
    let records = schema.count("SELECT count(*) FROM {schema}.idempotency_records").await;
    assert_eq!(records, 0, "a forgery claims nothing");
}

#[tokio::test]
async fn it_refuses_to_start_without_a_signing_secret() {
    // The harness clears STRIPE_WEBHOOK_SECRET with every other setting.
    let output = run_to_exit(EXAMPLE, &[], &[]).await;

    assert!(!output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("STRIPE_WEBHOOK_SECRET"), "{stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening on"));
}

/// The example's code: the file without its opening `//!` comment.
fn example_code() -> String {
    let code: Vec<&str> = include_str!("../examples/stripe_minimal.rs")
        .lines()
        .skip_while(|line| line.starts_with("//!"))
        .skip_while(|line| line.is_empty())
        .collect();
    code.join("\n")
}

/// The first code block of `lines` that opens with the fence `opening`.
fn first_code_block<'a>(mut lines: impl Iterator<Item = &'a str>, opening: &str) -> Option<String> {
    lines
        .find(|line| line.starts_with("```"))
        .filter(|fence| *fence == opening)?;
    let block: Vec<&str> = lines.take_while(|line| *line != "```").collect();
    Some(block.join("\n"))
}

#[test]
fn the_readme_opens_with_the_example() {
    let readme = include_str!("../README.md").lines();
    assert_eq!(
        first_code_block(readme, "```rust,no_run"),
        Some(example_code()),
        "the README's first code block is examples/stripe_minimal.rs, without its opening comment"
    );
}

#[test]
fn the_crate_docs_open_with_the_example() {
    let docs = include_str!("../src/lib.rs")
        .lines()
        .map_while(|line| line.strip_prefix("//!"))
        .map(|line| line.strip_prefix(' ').unwrap_or(line));
    assert_eq!(
        first_code_block(docs, "```no_run"),
        Some(example_code()),
        "the crate docs' first code block is examples/stripe_minimal.rs, without its opening comment"
    );
}
