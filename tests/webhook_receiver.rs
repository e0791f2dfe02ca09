//! End-to-end tests of `examples/webhook_receiver.rs`, black box: each test
//! starts the compiled example as a child process on a port of its own and
//! a Postgres schema of its own (`tests/process/`), drives it over HTTP, and
//! reads the database afterwards.
//!
//! `cargo test` builds the example before it runs the tests. A filtered run
//! does not, so rebuild it first:
//!
//! ```text
//! cargo build --example webhook_receiver && cargo test --test webhook_receiver
//! ```
//!
//! Postgres is taken from `DATABASE_URL` (a `postgres://` URL; default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the tests create and drop
//! schemas named `p_*` in it.

mod process;
mod support;

use futures_util::future::join_all;
use http::header::RETRY_AFTER;
use http::StatusCode;
use process::{
    assert_setting_refused, ledger_event, record, run_to_exit, stripe_event, Receiver, Reply, Schema, EXAMPLE_SETTINGS,
};
use serde_json::json;
use support::signing::{
    github_headers, github_signature, hmac_sha256, standard_headers, standard_signature, stripe_signature, unix_now,
    INVALID_SIGNATURE, STANDARD_SECRET, TOO_FAR_AHEAD,
};
use support::DEFAULT_DATABASE_URL;
use tokio::sync::Barrier;

async fn start(name: &str, settings: &[(&str, &str)]) -> (Schema, Receiver) {
    process::start_on_a_new_schema("webhook_receiver", name, settings).await
}

// ---------------------------------------------------------------------------
// Keys and replays

#[tokio::test]
async fn stripe_event_delivered_twice_runs_once() {
    let (schema, receiver) = start("twice", &[]).await;
    let event = stripe_event("evt_twice", "charge.succeeded", 4200);

    let first = receiver.post("/webhooks/stripe", &[], event.clone()).await;
    let second = receiver.post("/webhooks/stripe", &[], event).await;

    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.replayed(), "a first delivery is not a replay: {first:?}");
    assert_eq!(first.content_type(), Some("application/json"));
    let body = first.json();
    assert_eq!(body["event_id"], "evt_twice");
    assert!(body["ledger_entry_id"].is_i64(), "{body}");

    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert!(second.replayed(), "the second delivery must be a replay: {second:?}");
    assert_eq!(
        second.body, first.body,
        "a replay returns the stored body byte for byte"
    );

    let ledger = schema.ledger().await;
    assert_eq!(ledger.len(), 1, "the handler ran once: {ledger:?}");
    let entry = &ledger[0];
    assert_eq!(entry.id, body["ledger_entry_id"].as_i64().unwrap_or_default());
    assert_eq!(
        (
            entry.source.as_str(),
            entry.event_id.as_str(),
            entry.event_type.as_str(),
            entry.amount_cents
        ),
        ("stripe", "evt_twice", "charge.succeeded", 4200)
    );
    let records = schema.records().await;
    assert_eq!(records, vec![record("stripe", "charge.succeeded", "evt_twice", 2)]);
}

#[tokio::test]
async fn github_deliveries_are_keyed_by_delivery_id_and_event_type() {
    let (schema, receiver) = start("github", &[]).await;
    let push = [("X-GitHub-Delivery", "d-1"), ("X-GitHub-Event", "push")];
    let issues = [("X-GitHub-Delivery", "d-1"), ("X-GitHub-Event", "issues")];

    let first = receiver.post("/webhooks/github", &push, "{}").await;
    let replay = receiver.post("/webhooks/github", &push, "{}").await;
    let other_type = receiver.post("/webhooks/github", &issues, "{}").await;
    // The same id from another provider is another event.
    let stripe = receiver
        .post("/webhooks/stripe", &[], stripe_event("d-1", "push", 0))
        .await;

    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.replayed());
    assert_eq!(replay.status, StatusCode::OK, "{replay:?}");
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    for reply in [&other_type, &stripe] {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert!(!reply.replayed(), "a different event must run: {reply:?}");
        assert_ne!(reply.json()["ledger_entry_id"], first.json()["ledger_entry_id"]);
    }

    assert_eq!(
        schema.ledger_events().await,
        vec![
            ledger_event("github", "d-1", "push", 0),
            ledger_event("github", "d-1", "issues", 0),
            ledger_event("stripe", "d-1", "push", 0),
        ]
    );
    assert_eq!(
        schema.records().await,
        vec![
            record("github", "issues", "d-1", 2),
            record("github", "push", "d-1", 2),
            record("stripe", "push", "d-1", 2)
        ]
    );
}

#[tokio::test]
async fn standard_webhooks_are_keyed_by_the_webhook_id_header() {
    let (schema, receiver) = start("standard", &[]).await;
    let event = json!({"type": "invoice.paid", "data": {}}).to_string();

    let first = receiver
        .post("/webhooks/standard", &[("webhook-id", "msg_1")], event.clone())
        .await;
    let replay = receiver
        .post("/webhooks/standard", &[("webhook-id", "msg_1")], event)
        .await;

    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.replayed());
    assert_eq!(first.json()["event_id"], "msg_1");
    assert_eq!(replay.status, StatusCode::OK, "{replay:?}");
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);

    assert_eq!(
        schema.ledger_events().await,
        vec![ledger_event("standard", "msg_1", "invoice.paid", 0)]
    );
}

async fn post_payment(receiver: &Receiver, key: &str, payment: &str) -> Reply {
    receiver
        .post("/payments", &[("Idempotency-Key", key)], payment.to_owned())
        .await
}

#[tokio::test]
async fn a_payment_key_is_bound_to_its_first_payload() {
    let (schema, receiver) = start("payments", &[]).await;
    let payment = json!({"amount": 1999, "currency": "eur"}).to_string();

    let first = post_payment(&receiver, "pay-1", &payment).await;
    let replay = post_payment(&receiver, "pay-1", &payment).await;
    let changed = post_payment(&receiver, "pay-1", &json!({"amount": 1}).to_string()).await;

    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(!first.replayed());
    assert_eq!(first.json()["event_id"], "pay-1");
    assert_eq!(replay.status, StatusCode::CREATED, "{replay:?}");
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    changed.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);

    assert_eq!(
        schema.ledger_events().await,
        vec![ledger_event("payments", "pay-1", "", 1999)],
        "only the accepted payment wrote a row"
    );
    assert_eq!(schema.records().await.len(), 1);
}

#[tokio::test]
async fn payment_keys_are_1_to_255_bytes_without_control_characters() {
    let (schema, receiver) = start("payment_keys", &[]).await;
    let payment = json!({"amount": 1999, "currency": "eur"}).to_string();
    let key_255 = "k".repeat(255);
    let key_256 = "k".repeat(256);

    let too_long = post_payment(&receiver, &key_256, &payment).await;
    let empty = post_payment(&receiver, "", &payment).await;
    let control = post_payment(&receiver, "pay\t3", &payment).await;
    let longest = post_payment(&receiver, &key_255, &payment).await;

    too_long.assert_problem(StatusCode::BAD_REQUEST);
    empty.assert_problem(StatusCode::BAD_REQUEST);
    control.assert_problem(StatusCode::BAD_REQUEST);
    assert_eq!(
        longest.status,
        StatusCode::CREATED,
        "a 255-byte key is allowed: {longest:?}"
    );
    assert_eq!(longest.json()["event_id"], key_255.as_str());

    assert_eq!(
        schema.ledger_events().await,
        vec![ledger_event("payments", &key_255, "", 1999)],
        "only the accepted payment wrote a row"
    );
    assert_eq!(schema.records().await.len(), 1);
}

#[tokio::test]
async fn stripe_keys_an_integer_event_id_by_its_decimal_text() {
    let (schema, receiver) = start("stripe_integer_id", &[]).await;

    let integer = receiver
        .post("/webhooks/stripe", &[], json!({"id": 12345, "type": "t"}).to_string())
        .await;

    assert_eq!(integer.status, StatusCode::OK, "{integer:?}");
    assert_eq!(integer.json()["event_id"], "12345");
    let ledger = schema.ledger().await;
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].event_id, "12345");
    assert_eq!(schema.records().await, vec![record("stripe", "t", "12345", 2)]);
}

// ---------------------------------------------------------------------------
// Refusals

async fn assert_refusals_left_no_trace(schema: &Schema) {
    assert_eq!(
        schema.ledger().await,
        vec![],
        "no refused request may write a ledger row"
    );
    assert_eq!(schema.records().await, vec![], "no refused request may leave a record");
}

/// A request the receiver must refuse: what it is, and its path, headers
/// and body.
type Refused<'a> = (&'a str, (&'a str, Vec<(&'a str, &'a str)>, String));

/// Sends each refused request, expecting a problem with `status`, then
/// checks that none wrote a ledger row or left a record.
async fn assert_refused(schema: &Schema, receiver: &Receiver, status: StatusCode, refused: Vec<Refused<'_>>) {
    for (what, (path, headers, body)) in refused {
        let reply = receiver.post(path, &headers, body).await;
        assert_eq!(reply.status, status, "{what}: {reply:?}");
        reply.assert_problem(status);
    }
    assert_refusals_left_no_trace(schema).await;
}

#[tokio::test]
async fn webhooks_without_a_usable_event_id_are_refused_with_400() {
    let (schema, receiver) = start("no_event_id", &[]).await;
    let stripe = |body: serde_json::Value| ("/webhooks/stripe", vec![], body.to_string());
    let refused = vec![
        ("a float id", stripe(json!({"id": 1.5, "type": "t"}))),
        ("a boolean id", stripe(json!({"id": true, "type": "t"}))),
        ("a null id", stripe(json!({"id": null, "type": "t"}))),
        ("an object id", stripe(json!({"id": {"x": 1}, "type": "t"}))),
        ("no id", stripe(json!({"type": "t"}))),
        (
            "no X-GitHub-Delivery",
            ("/webhooks/github", vec![("X-GitHub-Event", "push")], "{}".to_owned()),
        ),
        (
            "no webhook-id",
            (
                "/webhooks/standard",
                vec![],
                json!({"type": "invoice.paid", "data": {}}).to_string(),
            ),
        ),
        (
            "no Idempotency-Key",
            (
                "/payments",
                vec![],
                json!({"amount": 1999, "currency": "eur"}).to_string(),
            ),
        ),
    ];
    assert_refused(&schema, &receiver, StatusCode::BAD_REQUEST, refused).await;
}

#[tokio::test]
async fn malformed_json_is_refused_with_400_on_every_route() {
    let (schema, receiver) = start("malformed_json", &[]).await;
    let refused = vec![
        ("stripe", ("/webhooks/stripe", vec![], "{\"id\": \"evt_1\"".to_owned())),
        (
            "standard",
            (
                "/webhooks/standard",
                vec![("webhook-id", "msg_2")],
                "{not json".to_owned(),
            ),
        ),
        (
            "payments",
            (
                "/payments",
                vec![("Idempotency-Key", "pay-2")],
                "{\"amount\":".to_owned(),
            ),
        ),
        ("baseline", ("/baseline", vec![], "{oops".to_owned())),
    ];
    assert_refused(&schema, &receiver, StatusCode::BAD_REQUEST, refused).await;

    // JSON is checked before the key.
    let malformed_no_key = receiver.post("/payments", &[], "{\"amount\":").await;
    malformed_no_key.assert_problem(StatusCode::BAD_REQUEST);
    assert_eq!(malformed_no_key.json()["type"], "urn:tower-idempotency:malformed-json");
}

#[tokio::test]
async fn bodies_over_max_body_bytes_are_refused_with_413() {
    let (schema, receiver) = start("oversize", &[("MAX_BODY_BYTES", "1024")]).await;
    let pad = "x".repeat(2000);
    let refused = vec![
        (
            "stripe",
            (
                "/webhooks/stripe",
                vec![],
                json!({"id": "evt_big", "type": "t", "pad": pad}).to_string(),
            ),
        ),
        (
            "baseline",
            ("/baseline", vec![], json!({"id": "big", "pad": pad}).to_string()),
        ),
    ];
    assert_refused(&schema, &receiver, StatusCode::PAYLOAD_TOO_LARGE, refused).await;
}

// ---------------------------------------------------------------------------
// Failures and the route without the layer

#[tokio::test]
async fn an_injected_failure_on_a_protected_route_leaves_no_trace() {
    let (schema, receiver) = start("failure", &[("DEMO_FAILURE_RATE", "1")]).await;
    let event = stripe_event("evt_fail", "charge.succeeded", 100);

    let first = receiver.post("/webhooks/stripe", &[], event.clone()).await;
    first.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(first.header(RETRY_AFTER.as_str()).is_some(), "{first:?}");
    assert_eq!(schema.ledger().await, vec![], "the layer rolls the handler's row back");
    assert_eq!(schema.records().await, vec![], "a failed delivery leaves no record");

    // The key was released: the retry runs the handler again (and fails
    // again) instead of replaying or being refused as in flight.
    let retry = receiver.post("/webhooks/stripe", &[], event).await;
    retry.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(!retry.replayed());
    assert_eq!(schema.ledger().await, vec![]);
    assert_eq!(schema.records().await, vec![]);
}

#[tokio::test]
async fn without_the_layer_an_injected_failure_keeps_its_ledger_row() {
    let (schema, receiver) = start("baseline_failure", &[("DEMO_FAILURE_RATE", "1")]).await;
    let event = stripe_event("evt_fail", "charge.succeeded", 100);

    let baseline = receiver.post("/baseline", &[], event).await;

    baseline.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(baseline.header(RETRY_AFTER.as_str()).is_some(), "{baseline:?}");
    let ledger = schema.ledger().await;
    assert_eq!(
        ledger.len(),
        1,
        "without the layer nothing rolls the row back: {ledger:?}"
    );
    assert_eq!(
        (ledger[0].source.as_str(), ledger[0].event_id.as_str()),
        ("baseline", "evt_fail")
    );
    assert_eq!(schema.records().await, vec![]);
}

#[tokio::test]
async fn baseline_runs_every_delivery_without_the_layer() {
    let (schema, receiver) = start("baseline", &[]).await;
    let event = stripe_event("evt_base", "charge.succeeded", 700);

    let first = receiver.post("/baseline", &[], event.clone()).await;
    let second = receiver.post("/baseline", &[], event).await;
    let integer_id = receiver
        .post("/baseline", &[], json!({"id": 77, "type": "t"}).to_string())
        .await;

    for reply in [&first, &second, &integer_id] {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert!(!reply.replayed());
        assert_eq!(reply.content_type(), Some("application/json"));
    }
    assert_ne!(first.json()["ledger_entry_id"], second.json()["ledger_entry_id"]);
    assert_eq!(integer_id.json()["event_id"], "77");

    let base = |id: &str, event_type: &str, amount| ledger_event("baseline", id, event_type, amount);
    assert_eq!(
        schema.ledger_events().await,
        vec![
            base("evt_base", "charge.succeeded", 700),
            base("evt_base", "charge.succeeded", 700),
            base("77", "t", 0)
        ]
    );
    assert_eq!(schema.records().await, vec![], "/baseline keeps no records");
}

// ---------------------------------------------------------------------------
// Concurrent duplicates

/// Sends `requests` copies of one POST at once, released together.
async fn post_at_once(
    receiver: &Receiver,
    requests: usize,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<Reply> {
    let barrier = Barrier::new(requests);
    let barrier = &barrier;
    join_all((0..requests).map(|_| async move {
        barrier.wait().await;
        receiver.post(path, headers, body.to_owned()).await
    }))
    .await
}

#[tokio::test]
async fn concurrent_webhook_duplicates_wait_for_the_first_and_replay_it() {
    const DELIVERIES: usize = 20;
    let (schema, receiver) = start("wait", &[("DEMO_HANDLER_DELAY_MS", "300")]).await;
    let event = stripe_event("evt_race", "charge.succeeded", 1000);

    let replies = post_at_once(&receiver, DELIVERIES, "/webhooks/stripe", &[], &event).await;

    for reply in &replies {
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "every duplicate waits and gets the answer: {reply:?}"
        );
        assert_eq!(reply.body, replies[0].body, "every duplicate gets the same body");
    }
    let firsts = replies.iter().filter(|reply| !reply.replayed()).count();
    assert_eq!(
        firsts, 1,
        "exactly one delivery ran the handler; the others are replays"
    );
    assert_eq!(schema.ledger().await.len(), 1, "the handler ran once");
    assert_eq!(
        schema.records().await,
        vec![record("stripe", "charge.succeeded", "evt_race", 2)]
    );
}

#[tokio::test]
async fn concurrent_payment_duplicates_get_409_or_the_replay() {
    const REQUESTS: usize = 10;
    let (schema, receiver) = start("conflict", &[("DEMO_HANDLER_DELAY_MS", "300")]).await;
    let payment = json!({"amount": 500}).to_string();

    let replies = post_at_once(
        &receiver,
        REQUESTS,
        "/payments",
        &[("Idempotency-Key", "pay-race")],
        &payment,
    )
    .await;

    let mut created = Vec::new();
    for reply in &replies {
        match reply.status {
            StatusCode::CREATED => created.push(reply),
            StatusCode::CONFLICT => {
                reply.assert_problem(StatusCode::CONFLICT);
                assert!(
                    reply.header(RETRY_AFTER.as_str()).is_some(),
                    "a 409 says when to retry: {reply:?}"
                );
            }
            _ => panic!("a concurrent duplicate must get 201 or 409: {reply:?}"),
        }
    }
    assert!(!created.is_empty(), "one request must succeed: {replies:?}");
    assert_eq!(
        created.iter().filter(|reply| !reply.replayed()).count(),
        1,
        "{replies:?}"
    );
    assert!(created.iter().all(|reply| reply.body == created[0].body), "{created:?}");
    assert_eq!(schema.ledger().await.len(), 1, "the handler ran once");
    assert_eq!(schema.records().await, vec![record("payments", "", "pay-race", 2)]);
}

// ---------------------------------------------------------------------------
// Operations: health, metrics, settings

#[tokio::test]
async fn healthz_answers_200_when_the_database_answers() {
    let (_schema, receiver) = start("healthz", &[]).await;
    let reply = receiver.get("/healthz").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

#[tokio::test]
async fn metrics_count_first_deliveries_and_replays() {
    let (_schema, receiver) = start("metrics", &[]).await;
    let event = stripe_event("evt_metrics", "charge.succeeded", 1);
    receiver.post("/webhooks/stripe", &[], event.clone()).await;
    receiver.post("/webhooks/stripe", &[], event).await;

    let reply = receiver.get("/metrics").await;
    let text = String::from_utf8_lossy(&reply.body).into_owned();

    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    let count = |outcome: &str| {
        text.lines()
            .find(|line| {
                line.starts_with("idempotency_requests_total{")
                    && line.contains("source=\"stripe\"")
                    && line.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!(count("first"), Some(1), "{text}");
    assert_eq!(count("replayed"), Some(1), "{text}");
    assert!(text.contains("idempotency_store_duration_seconds"), "{text}");
}

#[tokio::test]
async fn unreachable_database_is_a_clear_error_not_a_panic() {
    let output = run_to_exit(
        "webhook_receiver",
        &[],
        &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres")],
    )
    .await;
    assert!(!output.status.success(), "the server must not start: {output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DATABASE_URL"),
        "the error names the setting to fix: {stderr}"
    );
    assert!(!stderr.contains("panicked at"), "a clear error, not a panic: {stderr}");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening on"));
}

#[tokio::test]
async fn invalid_settings_exit_with_code_2() {
    for (name, value) in [
        ("DEMO_FAILURE_RATE", "1.5"),
        ("DEMO_HANDLER_DELAY_MS", "soon"),
        ("MAX_BODY_BYTES", "0"),
        ("POOL_SIZE", "-1"),
        ("BIND", "nowhere"),
        ("DATABASE_URL", "postgres://[broken"),
        ("DATABASE_DRIVER", "mysql"),
    ] {
        let stderr = assert_setting_refused("webhook_receiver", name, value).await;
        assert!(!stderr.contains("panicked at"), "{stderr}");
    }
}

#[tokio::test]
async fn help_lists_every_setting_with_its_default() {
    let help = process::help("webhook_receiver").await;
    for setting in EXAMPLE_SETTINGS {
        assert!(help.contains(setting), "--help lists {setting}: {help}");
    }
    for default in [
        DEFAULT_DATABASE_URL,
        "127.0.0.1:3000",
        "1048576",
        "[default: 32]",
        "[default: tokio-postgres]",
    ] {
        assert!(help.contains(default), "--help shows the default {default}: {help}");
    }
}

// ---------------------------------------------------------------------------
// Signatures: STRIPE_WEBHOOK_SECRET, GITHUB_WEBHOOK_SECRET,
// STANDARD_WEBHOOK_SECRET. Requests are signed here as each provider signs
// them (the schemes' published vectors are checked in src/signature/).

const STRIPE_SECRET: &str = "whsec_e2e_stripe_secret";
const GITHUB_SECRET: &str = "It's a Secret to Everybody";

fn signed_settings(standard_secret: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET),
        ("GITHUB_WEBHOOK_SECRET", GITHUB_SECRET),
        ("STANDARD_WEBHOOK_SECRET", standard_secret),
    ]
}

fn assert_invalid_signature(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}: {reply:?}");
    reply.assert_problem(StatusCode::UNAUTHORIZED);
    assert_eq!(reply.json()["type"], INVALID_SIGNATURE, "{what}: {reply:?}");
}

#[tokio::test]
async fn signed_deliveries_are_accepted_on_every_verifying_route() {
    let (schema, receiver) = start("signed", &signed_settings(STANDARD_SECRET)).await;
    let t = unix_now();

    let stripe = stripe_event("evt_signed", "charge.succeeded", 700);
    let signed = [("Stripe-Signature", stripe_signature(STRIPE_SECRET, t, &stripe))];
    let first = receiver.post_with("/webhooks/stripe", &signed, stripe.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.replayed());
    let replay = receiver.post_with("/webhooks/stripe", &signed, stripe).await;
    assert!(replay.replayed(), "a signed duplicate is a replay: {replay:?}");
    assert_eq!(replay.body, first.body);

    // While Stripe rolls a secret, the header lists a v1 per secret.
    let rolled = stripe_event("evt_rolled", "charge.succeeded", 1);
    let header = format!(
        "{},v1={}",
        stripe_signature(STRIPE_SECRET, t, &rolled),
        hex::encode(hmac_sha256(
            b"whsec_next",
            &[t.to_string().as_bytes(), b".", rolled.as_bytes()]
        ))
    );
    let reply = receiver
        .post_with("/webhooks/stripe", &[("Stripe-Signature", header)], rolled)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    let push = json!({"ref": "refs/heads/main"}).to_string();
    let reply = receiver
        .post_with(
            "/webhooks/github",
            &github_headers("d-signed", github_signature(GITHUB_SECRET, &push)),
            push,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    let invoice = json!({"type": "invoice.paid", "data": {}}).to_string();
    let listed = format!(
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {}",
        standard_signature(STANDARD_SECRET, "msg_signed", t, &invoice)
    );
    let reply = receiver
        .post_with(
            "/webhooks/standard",
            &standard_headers("msg_signed", t, listed),
            invoice,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    // A route without a secret is not affected.
    let payment = receiver
        .post(
            "/payments",
            &[("Idempotency-Key", "pay-signed")],
            json!({"amount": 1}).to_string(),
        )
        .await;
    assert_eq!(payment.status, StatusCode::CREATED, "{payment:?}");

    assert_eq!(
        schema.ledger_events().await,
        vec![
            ledger_event("stripe", "evt_signed", "charge.succeeded", 700),
            ledger_event("stripe", "evt_rolled", "charge.succeeded", 1),
            ledger_event("github", "d-signed", "push", 0),
            ledger_event("standard", "msg_signed", "invoice.paid", 0),
            ledger_event("payments", "pay-signed", "", 1),
        ]
    );
}

#[tokio::test]
async fn unverified_deliveries_are_refused_with_401_leaving_no_trace() {
    // The Standard Webhooks secret without its whsec_ prefix this time.
    let (schema, receiver) = start("forged", &signed_settings("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")).await;
    let t = unix_now();
    let stripe = stripe_event("evt_forged", "charge.succeeded", 700);
    let stripe_refused = [
        (
            "a wrong secret",
            Some(stripe_signature("whsec_guess", t, &stripe)),
            stripe.clone(),
        ),
        (
            "a stale timestamp",
            Some(stripe_signature(STRIPE_SECRET, t - 301, &stripe)),
            stripe.clone(),
        ),
        (
            "a future timestamp",
            Some(stripe_signature(STRIPE_SECRET, t + TOO_FAR_AHEAD, &stripe)),
            stripe.clone(),
        ),
        (
            "a tampered body",
            Some(stripe_signature(STRIPE_SECRET, t, &stripe)),
            stripe.replace("700", "70000"),
        ),
        ("no signature", None, stripe.clone()),
        ("a malformed signature", Some("v1=deadbeef".to_owned()), stripe.clone()),
    ];
    for (what, signature, body) in stripe_refused {
        let headers: Vec<_> = signature.into_iter().map(|s| ("Stripe-Signature", s)).collect();
        let reply = receiver.post_with("/webhooks/stripe", &headers, body).await;
        assert_invalid_signature(&reply, &format!("stripe: {what}"));
    }

    let push = json!({"ref": "refs/heads/main"}).to_string();
    let github_refused = [
        (
            "a wrong secret",
            github_headers("d-forged", github_signature("guess", &push)),
            push.clone(),
        ),
        (
            "a tampered body",
            github_headers("d-forged", github_signature(GITHUB_SECRET, &push)),
            push.replace("main", "evil"),
        ),
        (
            "no signature",
            github_headers("d-forged", String::new())[..2].to_vec(),
            push.clone(),
        ),
        (
            "a malformed signature",
            github_headers("d-forged", "sha256=zz".to_owned()),
            push.clone(),
        ),
    ];
    for (what, headers, body) in github_refused {
        let reply = receiver.post_with("/webhooks/github", &headers, body).await;
        assert_invalid_signature(&reply, &format!("github: {what}"));
    }

    let invoice = json!({"type": "invoice.paid", "data": {}}).to_string();
    let sign = |id: &str, timestamp: u64, body: &str| standard_signature(STANDARD_SECRET, id, timestamp, body);
    let standard_refused = [
        (
            "a wrong secret",
            standard_headers(
                "msg_forged",
                t,
                standard_signature("whsec_c2VjcmV0", "msg_forged", t, &invoice),
            ),
            invoice.clone(),
        ),
        (
            "a stale timestamp",
            standard_headers("msg_forged", t - 301, sign("msg_forged", t - 301, &invoice)),
            invoice.clone(),
        ),
        (
            "a future timestamp",
            standard_headers(
                "msg_forged",
                t + TOO_FAR_AHEAD,
                sign("msg_forged", t + TOO_FAR_AHEAD, &invoice),
            ),
            invoice.clone(),
        ),
        (
            "another message's signature",
            standard_headers("msg_forged", t, sign("msg_other", t, &invoice)),
            invoice.clone(),
        ),
        (
            "a tampered body",
            standard_headers("msg_forged", t, sign("msg_forged", t, &invoice)),
            invoice.replace("paid", "void"),
        ),
        (
            "no signature",
            standard_headers("msg_forged", t, String::new())[..2].to_vec(),
            invoice.clone(),
        ),
        (
            "a malformed signature",
            standard_headers("msg_forged", t, "v1,!!".to_owned()),
            invoice.clone(),
        ),
    ];
    for (what, headers, body) in standard_refused {
        let reply = receiver.post_with("/webhooks/standard", &headers, body).await;
        assert_invalid_signature(&reply, &format!("standard: {what}"));
    }

    assert_refusals_left_no_trace(&schema).await;

    // The genuine delivery of the id a forgery carried still runs.
    let genuine = receiver
        .post_with(
            "/webhooks/standard",
            &standard_headers("msg_forged", t, sign("msg_forged", t, &invoice)),
            invoice,
        )
        .await;
    assert_eq!(genuine.status, StatusCode::OK, "{genuine:?}");
    assert!(!genuine.replayed());
    assert_eq!(
        schema.records().await,
        vec![record("standard", "invoice.paid", "msg_forged", 2)]
    );
}

#[tokio::test]
async fn signed_webhook_checks_run_in_order_body_size_signature_json_key() {
    let settings = signed_settings(STANDARD_SECRET);
    let (schema, receiver) = start(
        "signed_check_order",
        &[settings[0], settings[1], settings[2], ("MAX_BODY_BYTES", "1024")],
    )
    .await;
    let t = unix_now();

    // Body size comes before the signature.
    let oversize = json!({"id": "evt_big", "pad": "x".repeat(2000)}).to_string();
    receiver
        .post("/webhooks/stripe", &[], oversize)
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
    // Signature before JSON: an unsigned malformed body is 401, not 400.
    let reply = receiver.post("/webhooks/stripe", &[], "{\"id\":").await;
    assert_invalid_signature(&reply, "stripe: malformed JSON, unsigned");
    // JSON and key after it.
    let malformed = "{\"id\":";
    let reply = receiver
        .post_with(
            "/webhooks/stripe",
            &[("Stripe-Signature", stripe_signature(STRIPE_SECRET, t, malformed))],
            malformed,
        )
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["type"], "urn:tower-idempotency:malformed-json");
    let no_id = json!({"type": "t"}).to_string();
    let reply = receiver
        .post_with(
            "/webhooks/stripe",
            &[("Stripe-Signature", stripe_signature(STRIPE_SECRET, t, &no_id))],
            no_id,
        )
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["type"], "urn:tower-idempotency:missing-key");

    assert_refusals_left_no_trace(&schema).await;
}

#[tokio::test]
async fn invalid_webhook_secrets_exit_with_code_2_without_echoing_them() {
    for (name, value) in [
        ("STANDARD_WEBHOOK_SECRET", "whsec_not base64 %%"),
        ("STANDARD_WEBHOOK_SECRET", "whsk_asymmetric"),
    ] {
        let stderr = assert_setting_refused("webhook_receiver", name, value).await;
        assert!(!stderr.contains(value), "the error must not echo the secret: {stderr}");
    }
}

// ---------------------------------------------------------------------------
// The ordering guard on the Stripe route: payment_states

fn payment_event(id: &str, status: &str, payment: &str) -> String {
    json!({
        "id": id,
        "type": format!("payment_intent.{status}"),
        "data": {"object": {"id": payment, "amount": 100}}
    })
    .to_string()
}

fn payment_state(payment: &str, status: &str) -> (String, String) {
    (payment.to_owned(), status.to_owned())
}

/// Two payments' events, late ones among them, one at a time: each event's
/// id and the answer to it.
async fn deliver_payment_events_in_order(receiver: &Receiver) -> Vec<(&'static str, Reply)> {
    let mut replies = Vec::new();
    for (id, status, payment) in [
        ("evt_1", "succeeded", "pi_a"),
        ("evt_2", "processing", "pi_a"), // late: the state stays succeeded
        ("evt_3", "created", "pi_a"),    // late
        ("evt_4", "canceled", "pi_a"),   // a terminal state never changes
        ("evt_5", "created", "pi_b"),
        ("evt_6", "processing", "pi_b"),
        ("evt_7", "processing", "pi_b"), // a repeat of the state: no-op
    ] {
        let reply = receiver
            .post("/webhooks/stripe", &[], payment_event(id, status, payment))
            .await;
        replies.push((id, reply));
    }
    // Not a payment intent event: no state.
    let charge = stripe_event("evt_charge", "charge.succeeded", 5);
    replies.push(("evt_charge", receiver.post("/webhooks/stripe", &[], charge).await));
    replies
}

#[tokio::test]
async fn payment_states_move_forward_only() {
    let (schema, receiver) = start("payment_states", &[]).await;
    assert_eq!(
        schema.payment_states().await,
        vec![],
        "payment_states is created at startup"
    );

    deliver_payment_events_in_order(&receiver).await;

    assert_eq!(
        schema.payment_states().await,
        vec![payment_state("pi_a", "succeeded"), payment_state("pi_b", "processing")]
    );
}

#[tokio::test]
async fn late_payment_events_still_run_their_handler() {
    let (schema, receiver) = start("late_payment_events", &[]).await;

    for (id, reply) in deliver_payment_events_in_order(&receiver).await {
        assert_eq!(reply.status, StatusCode::OK, "{id}: {reply:?}");
        assert!(!reply.replayed(), "{id}");
    }

    assert_eq!(
        schema.ledger().await.len(),
        8,
        "every event, late ones included, wrote its row"
    );
}

#[tokio::test]
async fn concurrent_shuffled_payment_events_end_in_the_terminal_state() {
    const PAYMENTS: usize = 5;
    let (schema, receiver) = start("payment_race", &[]).await;
    let mut events = Vec::new();
    for payment in 0..PAYMENTS {
        for (n, status) in ["created", "processing", "succeeded"].into_iter().enumerate() {
            let event = payment_event(&format!("evt_{payment}_{n}"), status, &format!("pi_{payment}"));
            events.push(event.clone());
            events.push(event); // a provider retry
        }
    }
    fastrand::Rng::with_seed(42).shuffle(&mut events);
    let barrier = Barrier::new(events.len());
    let (receiver_ref, barrier) = (&receiver, &barrier);
    let replies = join_all(events.iter().map(|event| async move {
        barrier.wait().await;
        receiver_ref.post("/webhooks/stripe", &[], event.clone()).await
    }))
    .await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    let expected: Vec<_> = (0..PAYMENTS)
        .map(|payment| payment_state(&format!("pi_{payment}"), "succeeded"))
        .collect();
    assert_eq!(schema.payment_states().await, expected);
    assert_eq!(schema.ledger().await.len(), PAYMENTS * 3, "each event ran once");
}

#[tokio::test]
async fn an_injected_failure_rolls_the_payment_state_back() {
    let (schema, receiver) = start("payment_failure", &[("DEMO_FAILURE_RATE", "1")]).await;
    let reply = receiver
        .post("/webhooks/stripe", &[], payment_event("evt_f", "succeeded", "pi_f"))
        .await;
    reply.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        schema.payment_states().await,
        vec![],
        "the state rolls back with the ledger row"
    );
}
