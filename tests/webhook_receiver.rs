//! End-to-end tests of `examples/webhook_receiver.rs`, black box: each test
//! starts the compiled example as a child process on a port of its own and
//! a Postgres schema of its own, drives it over HTTP, and reads the
//! database afterwards.
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
//! schemas named `e2e_*` in it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::Barrier;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_postgres::NoTls;

const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long the server may take to print its `listening on` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound on every request and process wait, so that a hung server fails
/// the test instead of stalling the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The server's pool in these tests: several servers share one Postgres.
const TEST_POOL_SIZE: &str = "8";
/// Variables the tests set themselves; inherited values would skew them.
const SERVER_SETTINGS: [&str; 9] = [
    "BIND",
    "MAX_BODY_BYTES",
    "DEMO_FAILURE_RATE",
    "DEMO_HANDLER_DELAY_MS",
    "POOL_SIZE",
    "DATABASE_URL",
    "STRIPE_WEBHOOK_SECRET",
    "GITHUB_WEBHOOK_SECRET",
    "STANDARD_WEBHOOK_SECRET",
];

// ---------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn stripe_event_delivered_twice_runs_once() {
    let server = Server::start("twice", &[]).await;
    let event = stripe_event("evt_twice", "charge.succeeded", 4200);

    let first = server.post("/webhooks/stripe", &[], event.clone()).await;
    let second = server.post("/webhooks/stripe", &[], event).await;

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

    let ledger = server.ledger().await;
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
    let records = server.records().await;
    assert_eq!(records, vec![record("stripe", "charge.succeeded", "evt_twice", 2)]);
}

#[tokio::test]
async fn github_deliveries_are_keyed_by_delivery_id_and_event_type() {
    let server = Server::start("github", &[]).await;
    let push = [("X-GitHub-Delivery", "d-1"), ("X-GitHub-Event", "push")];
    let issues = [("X-GitHub-Delivery", "d-1"), ("X-GitHub-Event", "issues")];

    let first = server.post("/webhooks/github", &push, "{}").await;
    let replay = server.post("/webhooks/github", &push, "{}").await;
    let other_type = server.post("/webhooks/github", &issues, "{}").await;
    // The same id from another provider is another event.
    let stripe = server
        .post("/webhooks/stripe", &[], stripe_event("d-1", "push", 0))
        .await;
    let no_delivery = server
        .post("/webhooks/github", &[("X-GitHub-Event", "push")], "{}")
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
    no_delivery.assert_problem(StatusCode::BAD_REQUEST);

    let entries: Vec<_> = server
        .ledger()
        .await
        .into_iter()
        .map(|e| (e.source, e.event_id, e.event_type))
        .collect();
    assert_eq!(
        entries,
        vec![
            ("github".to_owned(), "d-1".to_owned(), "push".to_owned()),
            ("github".to_owned(), "d-1".to_owned(), "issues".to_owned()),
            ("stripe".to_owned(), "d-1".to_owned(), "push".to_owned()),
        ]
    );
    assert_eq!(
        server.records().await,
        vec![
            record("github", "issues", "d-1", 2),
            record("github", "push", "d-1", 2),
            record("stripe", "push", "d-1", 2)
        ]
    );
}

#[tokio::test]
async fn standard_webhooks_are_keyed_by_the_webhook_id_header() {
    let server = Server::start("standard", &[]).await;
    let event = json!({"type": "invoice.paid", "data": {}}).to_string();

    let first = server
        .post("/webhooks/standard", &[("webhook-id", "msg_1")], event.clone())
        .await;
    let replay = server
        .post("/webhooks/standard", &[("webhook-id", "msg_1")], event.clone())
        .await;
    let no_id = server.post("/webhooks/standard", &[], event).await;
    let malformed = server
        .post("/webhooks/standard", &[("webhook-id", "msg_2")], "{not json")
        .await;

    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.replayed());
    assert_eq!(first.json()["event_id"], "msg_1");
    assert_eq!(replay.status, StatusCode::OK, "{replay:?}");
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    no_id.assert_problem(StatusCode::BAD_REQUEST);
    malformed.assert_problem(StatusCode::BAD_REQUEST);

    let entries: Vec<_> = server
        .ledger()
        .await
        .into_iter()
        .map(|e| (e.source, e.event_id, e.event_type))
        .collect();
    assert_eq!(
        entries,
        vec![("standard".to_owned(), "msg_1".to_owned(), "invoice.paid".to_owned())]
    );
}

#[tokio::test]
async fn payments_require_a_valid_key_and_a_matching_payload() {
    let server = Server::start("payments", &[]).await;
    let payment = json!({"amount": 1999, "currency": "eur"}).to_string();
    let key_255 = "k".repeat(255);
    let key_256 = "k".repeat(256);

    let first = server
        .post("/payments", &[("Idempotency-Key", "pay-1")], payment.clone())
        .await;
    let replay = server
        .post("/payments", &[("Idempotency-Key", "pay-1")], payment.clone())
        .await;
    let changed = server
        .post(
            "/payments",
            &[("Idempotency-Key", "pay-1")],
            json!({"amount": 1}).to_string(),
        )
        .await;
    let no_key = server.post("/payments", &[], payment.clone()).await;
    let malformed = server
        .post("/payments", &[("Idempotency-Key", "pay-2")], "{\"amount\":")
        .await;
    let malformed_no_key = server.post("/payments", &[], "{\"amount\":").await;
    let too_long = server
        .post("/payments", &[("Idempotency-Key", &key_256)], payment.clone())
        .await;
    let empty = server
        .post("/payments", &[("Idempotency-Key", "")], payment.clone())
        .await;
    let control = server
        .post("/payments", &[("Idempotency-Key", "pay\t3")], payment.clone())
        .await;
    let longest = server
        .post("/payments", &[("Idempotency-Key", &key_255)], payment)
        .await;

    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    assert!(!first.replayed());
    assert_eq!(first.json()["event_id"], "pay-1");
    assert_eq!(replay.status, StatusCode::CREATED, "{replay:?}");
    assert!(replay.replayed());
    assert_eq!(replay.body, first.body);
    changed.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    no_key.assert_problem(StatusCode::BAD_REQUEST);
    malformed.assert_problem(StatusCode::BAD_REQUEST);
    // JSON is checked before the key.
    malformed_no_key.assert_problem(StatusCode::BAD_REQUEST);
    assert_eq!(malformed_no_key.json()["type"], "urn:tower-idempotency:malformed-json");
    too_long.assert_problem(StatusCode::BAD_REQUEST);
    empty.assert_problem(StatusCode::BAD_REQUEST);
    control.assert_problem(StatusCode::BAD_REQUEST);
    assert_eq!(
        longest.status,
        StatusCode::CREATED,
        "a 255-byte key is allowed: {longest:?}"
    );
    assert_eq!(longest.json()["event_id"], key_255.as_str());

    let entries: Vec<_> = server
        .ledger()
        .await
        .into_iter()
        .map(|e| (e.source, e.event_id, e.amount_cents))
        .collect();
    assert_eq!(
        entries,
        vec![
            ("payments".to_owned(), "pay-1".to_owned(), 1999),
            ("payments".to_owned(), key_255.clone(), 1999)
        ],
        "only the two accepted payments wrote rows"
    );
    assert_eq!(server.records().await.len(), 2);
}

#[tokio::test]
async fn stripe_refuses_bad_ids_malformed_json_and_oversize_bodies() {
    let server = Server::start("stripe_bad", &[("MAX_BODY_BYTES", "1024")]).await;
    let refused = [
        (
            "a float id",
            json!({"id": 1.5, "type": "t"}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a boolean id",
            json!({"id": true, "type": "t"}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a null id",
            json!({"id": null, "type": "t"}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "an object id",
            json!({"id": {"x": 1}, "type": "t"}).to_string(),
            StatusCode::BAD_REQUEST,
        ),
        ("no id", json!({"type": "t"}).to_string(), StatusCode::BAD_REQUEST),
        (
            "malformed JSON",
            "{\"id\": \"evt_1\"".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a body over MAX_BODY_BYTES",
            json!({"id": "evt_big", "type": "t", "pad": "x".repeat(2000)}).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
    ];
    for (what, body, status) in refused {
        let reply = server.post("/webhooks/stripe", &[], body).await;
        assert_eq!(reply.status, status, "{what}: {reply:?}");
        reply.assert_problem(status);
    }
    assert_eq!(
        server.ledger().await,
        vec![],
        "no refused request may write a ledger row"
    );

    let integer = server
        .post("/webhooks/stripe", &[], json!({"id": 12345, "type": "t"}).to_string())
        .await;
    assert_eq!(integer.status, StatusCode::OK, "{integer:?}");
    assert_eq!(integer.json()["event_id"], "12345");
    let ledger = server.ledger().await;
    assert_eq!(ledger.len(), 1, "{ledger:?}");
    assert_eq!(ledger[0].event_id, "12345");
    assert_eq!(server.records().await, vec![record("stripe", "t", "12345", 2)]);
}

#[tokio::test]
async fn injected_failure_rolls_back_protected_routes_but_not_baseline() {
    let server = Server::start("failure", &[("DEMO_FAILURE_RATE", "1")]).await;
    let event = stripe_event("evt_fail", "charge.succeeded", 100);

    let first = server.post("/webhooks/stripe", &[], event.clone()).await;
    first.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(first.header(RETRY_AFTER.as_str()).is_some(), "{first:?}");
    assert_eq!(server.ledger().await, vec![], "the layer rolls the handler's row back");
    assert_eq!(server.records().await, vec![], "a failed delivery leaves no record");

    // The key was released: the retry runs the handler again (and fails
    // again) instead of replaying or being refused as in flight.
    let retry = server.post("/webhooks/stripe", &[], event.clone()).await;
    retry.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(!retry.replayed());

    let baseline = server.post("/baseline", &[], event).await;
    baseline.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert!(baseline.header(RETRY_AFTER.as_str()).is_some(), "{baseline:?}");
    let ledger = server.ledger().await;
    assert_eq!(
        ledger.len(),
        1,
        "without the layer nothing rolls the row back: {ledger:?}"
    );
    assert_eq!(
        (ledger[0].source.as_str(), ledger[0].event_id.as_str()),
        ("baseline", "evt_fail")
    );
    assert_eq!(server.records().await, vec![]);
}

#[tokio::test]
async fn baseline_runs_every_delivery_without_the_layer() {
    let server = Server::start("baseline", &[("MAX_BODY_BYTES", "1024")]).await;
    let event = stripe_event("evt_base", "charge.succeeded", 700);

    let first = server.post("/baseline", &[], event.clone()).await;
    let second = server.post("/baseline", &[], event).await;
    let integer_id = server
        .post("/baseline", &[], json!({"id": 77, "type": "t"}).to_string())
        .await;
    let malformed = server.post("/baseline", &[], "{oops").await;
    let oversize = server
        .post(
            "/baseline",
            &[],
            json!({"id": "big", "pad": "x".repeat(2000)}).to_string(),
        )
        .await;

    for reply in [&first, &second, &integer_id] {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
        assert!(!reply.replayed());
        assert_eq!(reply.content_type(), Some("application/json"));
    }
    assert_ne!(first.json()["ledger_entry_id"], second.json()["ledger_entry_id"]);
    assert_eq!(integer_id.json()["event_id"], "77");
    malformed.assert_problem(StatusCode::BAD_REQUEST);
    oversize.assert_problem(StatusCode::PAYLOAD_TOO_LARGE);

    let entries: Vec<_> = server
        .ledger()
        .await
        .into_iter()
        .map(|e| (e.source, e.event_id, e.event_type, e.amount_cents))
        .collect();
    let base =
        |id: &str, event_type: &str, amount| ("baseline".to_owned(), id.to_owned(), event_type.to_owned(), amount);
    assert_eq!(
        entries,
        vec![
            base("evt_base", "charge.succeeded", 700),
            base("evt_base", "charge.succeeded", 700),
            base("77", "t", 0)
        ]
    );
    assert_eq!(server.records().await, vec![], "/baseline keeps no records");
}

#[tokio::test]
async fn concurrent_webhook_duplicates_wait_for_the_first_and_replay_it() {
    const DELIVERIES: usize = 20;
    let server = Server::start("wait", &[("DEMO_HANDLER_DELAY_MS", "300")]).await;
    let event = stripe_event("evt_race", "charge.succeeded", 1000);
    let barrier = Barrier::new(DELIVERIES);

    let (server, event, barrier) = (&server, &event, &barrier);
    let replies = join_all((0..DELIVERIES).map(|_| async move {
        barrier.wait().await;
        server.post("/webhooks/stripe", &[], event.clone()).await
    }))
    .await;

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
    assert_eq!(server.ledger().await.len(), 1, "the handler ran once");
    assert_eq!(
        server.records().await,
        vec![record("stripe", "charge.succeeded", "evt_race", 2)]
    );
}

#[tokio::test]
async fn concurrent_payment_duplicates_get_409_or_the_replay() {
    const REQUESTS: usize = 10;
    let server = Server::start("conflict", &[("DEMO_HANDLER_DELAY_MS", "300")]).await;
    let payment = json!({"amount": 500}).to_string();
    let barrier = Barrier::new(REQUESTS);

    let (server, payment, barrier) = (&server, &payment, &barrier);
    let replies = join_all((0..REQUESTS).map(|_| async move {
        barrier.wait().await;
        server
            .post("/payments", &[("Idempotency-Key", "pay-race")], payment.clone())
            .await
    }))
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
    assert_eq!(server.ledger().await.len(), 1, "the handler ran once");
    assert_eq!(server.records().await, vec![record("payments", "", "pay-race", 2)]);
}

#[tokio::test]
async fn healthz_answers_200_when_the_database_answers() {
    let server = Server::start("healthz", &[]).await;
    let reply = server.get("/healthz").await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
}

#[tokio::test]
async fn metrics_count_first_deliveries_and_replays() {
    let server = Server::start("metrics", &[]).await;
    let event = stripe_event("evt_metrics", "charge.succeeded", 1);
    server.post("/webhooks/stripe", &[], event.clone()).await;
    server.post("/webhooks/stripe", &[], event).await;

    let reply = server.get("/metrics").await;
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
    let output = run_to_exit(&[], &[("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres")]).await;
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
    ] {
        let output = run_to_exit(&[], &[(name, value)]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}={value}: {stderr}");
        assert!(stderr.contains(name), "the error names {name}: {stderr}");
        assert!(!stderr.contains("panicked at"), "{stderr}");
    }
}

#[tokio::test]
async fn help_lists_every_setting_with_its_default() {
    let output = run_to_exit(&["--help"], &[]).await;
    assert!(output.status.success(), "{output:?}");
    let help = String::from_utf8_lossy(&output.stdout);
    for setting in SERVER_SETTINGS {
        assert!(help.contains(setting), "--help lists {setting}: {help}");
    }
    for default in [DEFAULT_DATABASE_URL, "127.0.0.1:3000", "1048576", "[default: 32]"] {
        assert!(help.contains(default), "--help shows the default {default}: {help}");
    }
}

// ---------------------------------------------------------------------------
// Signatures: STRIPE_WEBHOOK_SECRET, GITHUB_WEBHOOK_SECRET,
// STANDARD_WEBHOOK_SECRET. Requests are signed here as each provider signs
// them (the schemes' published vectors are checked in src/signature/).

const STRIPE_SECRET: &str = "whsec_e2e_stripe_secret";
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const INVALID_SIGNATURE: &str = "urn:tower-idempotency:invalid-signature";

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

fn hmac_sha256(key: &[u8], message: &[&[u8]]) -> Vec<u8> {
    use hmac::{KeyInit, Mac};
    let mut mac = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key");
    for part in message {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

fn stripe_signature(secret: &str, timestamp: u64, body: &str) -> String {
    let timestamp = timestamp.to_string();
    let signature = hmac_sha256(secret.as_bytes(), &[timestamp.as_bytes(), b".", body.as_bytes()]);
    format!("t={timestamp},v1={}", hex::encode(signature))
}

fn github_signature(secret: &str, body: &str) -> String {
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(secret.as_bytes(), &[body.as_bytes()]))
    )
}

fn standard_signature(secret: &str, id: &str, timestamp: u64, body: &str) -> String {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(secret.trim_start_matches("whsec_"))
        .expect("a base64 secret");
    let timestamp = timestamp.to_string();
    let message: [&[u8]; 5] = [id.as_bytes(), b".", timestamp.as_bytes(), b".", body.as_bytes()];
    format!("v1,{}", engine.encode(hmac_sha256(&key, &message)))
}

/// The Standard Webhooks headers of a delivery.
fn standard_headers(id: &str, timestamp: u64, signature: String) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", id.to_owned()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ]
}

/// GitHub's headers of a delivery.
fn github_headers(delivery: &str, signature: String) -> Vec<(&'static str, String)> {
    vec![
        ("X-GitHub-Delivery", delivery.to_owned()),
        ("X-GitHub-Event", "push".to_owned()),
        ("X-Hub-Signature-256", signature),
    ]
}

fn signed_settings(standard_secret: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET),
        ("GITHUB_WEBHOOK_SECRET", GITHUB_SECRET),
        ("STANDARD_WEBHOOK_SECRET", standard_secret),
    ]
}

impl Server {
    async fn post_with(&self, path: &str, headers: &[(&str, String)], body: impl Into<Bytes>) -> Reply {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(name, value)| (*name, value.as_str())).collect();
        self.post(path, &headers, body).await
    }
}

impl Reply {
    fn assert_invalid_signature(&self, what: &str) {
        assert_eq!(self.status, StatusCode::UNAUTHORIZED, "{what}: {self:?}");
        self.assert_problem(StatusCode::UNAUTHORIZED);
        assert_eq!(self.json()["type"], INVALID_SIGNATURE, "{what}: {self:?}");
    }
}

#[tokio::test]
async fn signed_deliveries_are_accepted_on_every_verifying_route() {
    let server = Server::start("signed", &signed_settings(STANDARD_SECRET)).await;
    let t = unix_now();

    let stripe = stripe_event("evt_signed", "charge.succeeded", 700);
    let signed = [("Stripe-Signature", stripe_signature(STRIPE_SECRET, t, &stripe))];
    let first = server.post_with("/webhooks/stripe", &signed, stripe.clone()).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(!first.replayed());
    let replay = server.post_with("/webhooks/stripe", &signed, stripe).await;
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
    let reply = server
        .post_with("/webhooks/stripe", &[("Stripe-Signature", header)], rolled)
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    let push = json!({"ref": "refs/heads/main"}).to_string();
    let reply = server
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
    let reply = server
        .post_with(
            "/webhooks/standard",
            &standard_headers("msg_signed", t, listed),
            invoice,
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");

    // A route without a secret is not affected.
    let payment = server
        .post(
            "/payments",
            &[("Idempotency-Key", "pay-signed")],
            json!({"amount": 1}).to_string(),
        )
        .await;
    assert_eq!(payment.status, StatusCode::CREATED, "{payment:?}");

    let entries: Vec<_> = server
        .ledger()
        .await
        .into_iter()
        .map(|e| (e.source, e.event_id))
        .collect();
    assert_eq!(
        entries,
        vec![
            ("stripe".to_owned(), "evt_signed".to_owned()),
            ("stripe".to_owned(), "evt_rolled".to_owned()),
            ("github".to_owned(), "d-signed".to_owned()),
            ("standard".to_owned(), "msg_signed".to_owned()),
            ("payments".to_owned(), "pay-signed".to_owned()),
        ]
    );
}

#[tokio::test]
async fn forged_stale_tampered_and_unsigned_deliveries_leave_no_rows() {
    // The Standard Webhooks secret without its whsec_ prefix this time.
    let settings = signed_settings("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
    let server = Server::start(
        "forged",
        &[settings[0], settings[1], settings[2], ("MAX_BODY_BYTES", "1024")],
    )
    .await;
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
            Some(stripe_signature(STRIPE_SECRET, t + 301, &stripe)),
            stripe.clone(),
        ),
        (
            "a tampered body",
            Some(stripe_signature(STRIPE_SECRET, t, &stripe)),
            stripe.replace("700", "70000"),
        ),
        ("no signature", None, stripe.clone()),
        ("a malformed signature", Some("v1=deadbeef".to_owned()), stripe.clone()),
        // Signature before JSON: an unsigned malformed body is 401, not 400.
        ("malformed JSON, unsigned", None, "{\"id\":".to_owned()),
    ];
    for (what, signature, body) in stripe_refused {
        let headers: Vec<_> = signature.into_iter().map(|s| ("Stripe-Signature", s)).collect();
        server
            .post_with("/webhooks/stripe", &headers, body)
            .await
            .assert_invalid_signature(&format!("stripe: {what}"));
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
        server
            .post_with("/webhooks/github", &headers, body)
            .await
            .assert_invalid_signature(&format!("github: {what}"));
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
            standard_headers("msg_forged", t + 301, sign("msg_forged", t + 301, &invoice)),
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
        server
            .post_with("/webhooks/standard", &headers, body)
            .await
            .assert_invalid_signature(&format!("standard: {what}"));
    }

    // Body size comes before the signature; JSON and key after it.
    let oversize = json!({"id": "evt_big", "pad": "x".repeat(2000)}).to_string();
    server
        .post("/webhooks/stripe", &[], oversize)
        .await
        .assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
    let malformed = "{\"id\":";
    let reply = server
        .post_with(
            "/webhooks/stripe",
            &[("Stripe-Signature", stripe_signature(STRIPE_SECRET, t, malformed))],
            malformed,
        )
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["type"], "urn:tower-idempotency:malformed-json");
    let no_id = json!({"type": "t"}).to_string();
    let reply = server
        .post_with(
            "/webhooks/stripe",
            &[("Stripe-Signature", stripe_signature(STRIPE_SECRET, t, &no_id))],
            no_id,
        )
        .await;
    reply.assert_problem(StatusCode::BAD_REQUEST);
    assert_eq!(reply.json()["type"], "urn:tower-idempotency:missing-key");

    assert_eq!(
        server.ledger().await,
        vec![],
        "no refused request may write a ledger row"
    );
    assert_eq!(server.records().await, vec![], "no refused request may leave a record");

    // The genuine delivery of the id a forgery carried still runs.
    let genuine = server
        .post_with(
            "/webhooks/standard",
            &standard_headers("msg_forged", t, sign("msg_forged", t, &invoice)),
            invoice,
        )
        .await;
    assert_eq!(genuine.status, StatusCode::OK, "{genuine:?}");
    assert!(!genuine.replayed());
    assert_eq!(
        server.records().await,
        vec![record("standard", "invoice.paid", "msg_forged", 2)]
    );
}

#[tokio::test]
async fn invalid_webhook_secrets_exit_with_code_2_without_echoing_them() {
    for (name, value) in [
        ("STANDARD_WEBHOOK_SECRET", "whsec_not base64 %%"),
        ("STANDARD_WEBHOOK_SECRET", "whsk_asymmetric"),
    ] {
        let output = run_to_exit(&[], &[(name, value)]).await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{name}={value}: {stderr}");
        assert!(stderr.contains(name), "the error names {name}: {stderr}");
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

impl Server {
    /// Every payment's state, sorted by payment id.
    async fn payment_states(&self) -> Vec<(String, String)> {
        let sql = format!(
            "SELECT payment_id, status FROM {}.payment_states ORDER BY payment_id",
            self.schema
        );
        let rows = self.db.query(&sql, &[]).await.expect("payment_states is readable");
        rows.iter().map(|row| (row.get(0), row.get(1))).collect()
    }
}

fn payment_state(payment: &str, status: &str) -> (String, String) {
    (payment.to_owned(), status.to_owned())
}

#[tokio::test]
async fn payment_states_move_forward_only_and_late_events_still_answer_200() {
    let server = Server::start("payment_states", &[]).await;
    assert_eq!(
        server.payment_states().await,
        vec![],
        "payment_states is created at startup"
    );

    for (id, status, payment) in [
        ("evt_1", "succeeded", "pi_a"),
        ("evt_2", "processing", "pi_a"), // late: the state stays succeeded
        ("evt_3", "created", "pi_a"),    // late
        ("evt_4", "canceled", "pi_a"),   // a terminal state never changes
        ("evt_5", "created", "pi_b"),
        ("evt_6", "processing", "pi_b"),
        ("evt_7", "processing", "pi_b"), // a repeat of the state: no-op
    ] {
        let reply = server
            .post("/webhooks/stripe", &[], payment_event(id, status, payment))
            .await;
        assert_eq!(reply.status, StatusCode::OK, "{id}: {reply:?}");
        assert!(!reply.replayed(), "{id}");
    }
    // Not a payment intent event: no state.
    let charge = stripe_event("evt_charge", "charge.succeeded", 5);
    assert_eq!(
        server.post("/webhooks/stripe", &[], charge).await.status,
        StatusCode::OK
    );

    assert_eq!(
        server.payment_states().await,
        vec![payment_state("pi_a", "succeeded"), payment_state("pi_b", "processing")]
    );
    assert_eq!(
        server.ledger().await.len(),
        8,
        "every event, late ones included, wrote its row"
    );
}

#[tokio::test]
async fn concurrent_shuffled_payment_events_end_in_the_terminal_state() {
    const PAYMENTS: usize = 5;
    let server = Server::start("payment_race", &[]).await;
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
    let (server_ref, barrier) = (&server, &barrier);
    let replies = join_all(events.iter().map(|event| async move {
        barrier.wait().await;
        server_ref.post("/webhooks/stripe", &[], event.clone()).await
    }))
    .await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    }
    let expected: Vec<_> = (0..PAYMENTS)
        .map(|payment| payment_state(&format!("pi_{payment}"), "succeeded"))
        .collect();
    assert_eq!(server.payment_states().await, expected);
    assert_eq!(server.ledger().await.len(), PAYMENTS * 3, "each event ran once");
}

#[tokio::test]
async fn an_injected_failure_rolls_the_payment_state_back() {
    let server = Server::start("payment_failure", &[("DEMO_FAILURE_RATE", "1")]).await;
    let reply = server
        .post("/webhooks/stripe", &[], payment_event("evt_f", "succeeded", "pi_f"))
        .await;
    reply.assert_problem(StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        server.payment_states().await,
        vec![],
        "the state rolls back with the ledger row"
    );
}

// ---------------------------------------------------------------------------
// The server under test

/// A running example server with its own schema. Dropping it kills the
/// process and drops the schema, whether the test passed or not.
struct Server {
    address: SocketAddr,
    http: Client<HttpConnector, Full<Bytes>>,
    db: tokio_postgres::Client,
    schema: String,
    // Last, so that requests and queries above are done before it kills.
    _process: ProcessGuard,
}

impl Server {
    /// Starts the example in a fresh schema `e2e_<name>_<pid>` with the given
    /// settings added to the test defaults.
    async fn start(name: &str, settings: &[(&str, &str)]) -> Self {
        let db = connect_database().await;
        let schema = format!("e2e_{name}_{}", std::process::id());
        db.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .await
        .unwrap_or_else(|error| panic!("cannot create the schema {schema}: {error}"));

        let mut command = server_command(&[]);
        command
            .env("DATABASE_URL", with_search_path(&base_database_url(), &schema))
            .env("BIND", "127.0.0.1:0")
            .env("POOL_SIZE", TEST_POOL_SIZE);
        for (name, value) in settings {
            command.env(name, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start the example server: {error}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        let (stderr, stderr_done) = capture(child.stderr.take().expect("stderr is piped"));
        let mut process = ProcessGuard {
            child,
            stderr,
            schema: Some(schema.clone()),
        };

        let address = match timeout(STARTUP_TIMEOUT, listening_address(stdout)).await {
            Ok(Some(address)) => address,
            outcome => {
                let why = if outcome.is_ok() {
                    "exited before it was listening"
                } else {
                    "did not start in time"
                };
                // Let a dead server's last words arrive before quoting them.
                let _ = timeout(REQUEST_TIMEOUT, process.child.wait()).await;
                let _ = timeout(REQUEST_TIMEOUT, stderr_done).await;
                panic!("the example server {why}; its stderr:\n{}", process.take_stderr());
            }
        };
        let http = Client::builder(TokioExecutor::new()).build_http();
        Server {
            address,
            http,
            db,
            schema,
            _process: process,
        }
    }

    async fn post(&self, path: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Reply {
        self.send(Method::POST, path, headers, body.into()).await
    }

    async fn get(&self, path: &str) -> Reply {
        self.send(Method::GET, path, &[], Bytes::new()).await
    }

    async fn send(&self, method: Method, path: &str, headers: &[(&str, &str)], body: Bytes) -> Reply {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.address));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body)).expect("a valid request");
        let exchange = async {
            let response = self.http.request(request).await.map_err(|error| error.to_string())?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await.map_err(|error| error.to_string())?.to_bytes();
            Ok::<_, String>(Reply {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(error)) => panic!("{path}: request failed: {error}"),
            Err(_) => panic!("{path}: no answer within {REQUEST_TIMEOUT:?}"),
        }
    }

    /// Every ledger row, oldest first.
    async fn ledger(&self) -> Vec<LedgerEntry> {
        let sql = format!(
            "SELECT id, source, event_id, event_type, amount_cents FROM {}.ledger_entries ORDER BY id",
            self.schema
        );
        let rows = self.db.query(&sql, &[]).await.expect("ledger_entries is readable");
        rows.iter()
            .map(|row| LedgerEntry {
                id: row.get(0),
                source: row.get(1),
                event_id: row.get(2),
                event_type: row.get(3),
                amount_cents: row.get(4),
            })
            .collect()
    }

    /// Every idempotency record as (source, event type, key, state), sorted.
    async fn records(&self) -> Vec<(String, String, String, i16)> {
        let sql = format!(
            "SELECT source, event_type, key, state FROM {}.idempotency_records ORDER BY source, event_type, key",
            self.schema
        );
        let rows = self.db.query(&sql, &[]).await.expect("idempotency_records is readable");
        rows.iter()
            .map(|row| (row.get(0), row.get(1), row.get(2), row.get(3)))
            .collect()
    }
}

/// Kills the child and drops its schema on drop.
struct ProcessGuard {
    child: Child,
    stderr: Arc<Mutex<String>>,
    schema: Option<String>,
}

impl ProcessGuard {
    /// The server's stderr so far, which is then not shown again on drop.
    fn take_stderr(&self) -> String {
        self.stderr
            .lock()
            .map(|mut text| std::mem::take(&mut *text))
            .unwrap_or_default()
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        // A failing test shows what the server logged.
        let stderr = self.take_stderr();
        if std::thread::panicking() && !stderr.is_empty() {
            eprintln!("--- the example server's stderr ---\n{stderr}");
        }
        if let Some(schema) = self.schema.take() {
            drop_schema(schema);
        }
    }
}

/// Drops a schema from synchronous code (a `Drop`): on a thread of its own
/// with a runtime of its own. Failures are ignored: this is cleanup.
fn drop_schema(schema: String) {
    let cleanup = std::thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        runtime.block_on(async {
            let Ok((client, connection)) = tokio_postgres::connect(&base_database_url(), NoTls).await else {
                return;
            };
            tokio::spawn(connection);
            // The killed server's sessions may still hold locks for a moment.
            let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {schema} CASCADE");
            let _ = timeout(REQUEST_TIMEOUT, client.batch_execute(&sql)).await;
        });
    });
    let _ = cleanup.join();
}

/// One HTTP exchange, fully read.
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    fn content_type(&self) -> Option<&str> {
        self.header(CONTENT_TYPE.as_str())
    }

    fn replayed(&self) -> bool {
        self.header("idempotent-replayed") == Some("true")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {self:?}"))
    }

    /// An RFC 9457 problem with this status.
    fn assert_problem(&self, status: StatusCode) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.content_type(), Some("application/problem+json"), "{self:?}");
        let problem = self.json();
        assert_eq!(problem["status"], status.as_u16(), "{self:?}");
        assert!(problem["type"].is_string() && problem["title"].is_string(), "{self:?}");
    }
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("headers", &self.headers)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

#[derive(Debug, PartialEq, Eq)]
struct LedgerEntry {
    id: i64,
    source: String,
    event_id: String,
    event_type: String,
    amount_cents: i64,
}

fn record(source: &str, event_type: &str, key: &str, state: i16) -> (String, String, String, i16) {
    (source.to_owned(), event_type.to_owned(), key.to_owned(), state)
}

fn stripe_event(id: &str, event_type: &str, amount: i64) -> String {
    json!({"id": id, "type": event_type, "data": {"object": {"amount": amount}}}).to_string()
}

// ---------------------------------------------------------------------------
// Processes and the database

/// The compiled example: `target/<profile>/examples/webhook_receiver`, two
/// levels up from this test binary in `target/<profile>/deps/`.
fn example_binary() -> PathBuf {
    let test_binary = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test_binary
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let binary = profile_dir
        .join("examples")
        .join(format!("webhook_receiver{}", std::env::consts::EXE_SUFFIX));
    let rebuild = "run `cargo test` (which builds the examples), or `cargo build --example webhook_receiver` \
                   before `cargo test --test webhook_receiver`";
    let built = std::fs::metadata(&binary)
        .and_then(|metadata| metadata.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {rebuild}", binary.display()));
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/webhook_receiver.rs");
    if let Ok(edited) = std::fs::metadata(&source).and_then(|metadata| metadata.modified()) {
        assert!(
            edited <= built,
            "{} is older than its source: {rebuild}",
            binary.display()
        );
    }
    binary
}

/// The example with `args`, its settings cleared of inherited values, its
/// output piped, and killed if the test drops it.
fn server_command(args: &[&str]) -> Command {
    let mut command = Command::new(example_binary());
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for name in SERVER_SETTINGS {
        command.env_remove(name);
    }
    command
}

/// Runs the example to its exit; for runs that must not start serving.
async fn run_to_exit(args: &[&str], settings: &[(&str, &str)]) -> std::process::Output {
    let mut command = server_command(args);
    command.env("BIND", "127.0.0.1:0");
    for (name, value) in settings {
        command.env(name, value);
    }
    match timeout(REQUEST_TIMEOUT, command.output()).await {
        Ok(Ok(output)) => output,
        Ok(Err(error)) => panic!("cannot run the example: {error}"),
        Err(_) => panic!("the example did not exit within {REQUEST_TIMEOUT:?}"),
    }
}

/// Reads the child's stdout up to its `listening on ADDRESS` line; `None`
/// if stdout closes first. The rest of stdout is drained in the background
/// so the server never blocks on a full pipe.
async fn listening_address(stdout: ChildStdout) -> Option<SocketAddr> {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let address = line
            .split_once("listening on ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|address| address.parse().ok());
        if address.is_some() {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return address;
        }
    }
    None
}

/// Collects the child's stderr (its log) as it comes, so the pipe never
/// fills and a failing test can show it. The task ends at EOF.
fn capture(stderr: ChildStderr) -> (Arc<Mutex<String>>, JoinHandle<()>) {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = text.clone();
    let task = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Ok(mut text) = sink.lock() {
                text.push_str(&line);
                text.push('\n');
            }
        }
    });
    (text, task)
}

fn base_database_url() -> String {
    std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| !url.is_empty())
        .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
}

/// `url` with its sessions' search_path set to `schema`, so that the
/// server's unqualified tables land there.
fn with_search_path(url: &str, schema: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-csearch_path%3D{schema}")
}

async fn connect_database() -> tokio_postgres::Client {
    let url = base_database_url();
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap_or_else(|error| {
        panic!(
            "cannot reach Postgres at DATABASE_URL={url} (set DATABASE_URL to a Postgres these tests may \
             create schemas in): {error}"
        )
    });
    tokio::spawn(connection);
    client
}
