//! Provider presets with signature verification, through the layer on a
//! real Postgres: signed requests run once, and every forged, stale,
//! tampered or unsigned one is refused with 401 before any claim, leaving
//! no idempotency record and no ledger row.
//!
//! The schemes' published test vectors are checked beside each scheme in
//! `src/signature/`; here requests are signed at run time, because the
//! layer judges timestamps by the real clock.

mod support;

use axum::body::Body;
use axum::Router;
use hmac::Hmac;
use http::{Request, StatusCode};
use serde_json::json;
use sha1::Sha1;
use sha2::{Sha256, Sha512};
use support::signing::{
    base64, github_headers, github_signature, hmac_sha256, mac, standard_headers, standard_public_key,
    standard_signature, standard_v1a_signature, stripe_signature, unix_now, INVALID_SIGNATURE, STANDARD_SECRET,
    TOO_FAR_AHEAD,
};
use support::{send, Probe, Reply, TestDb};
use tower_idempotency::signature::{
    FlutterwaveSignature, GitHubSignature, PaystackSignature, ShopifySignature, SlackSignature,
    StandardWebhooksSignature, StripeSignature, TwilioSignature,
};
use tower_idempotency::{Extractor, IdempotencyLayer, Preset};

const STRIPE_SECRET: &str = "whsec_test_secret";

fn webhook(path: &str, headers: &[(&str, String)], body: &str) -> Request<Body> {
    let mut builder = Request::post(path);
    for (name, value) in headers {
        builder = builder.header(*name, value);
    }
    builder.body(Body::from(body.to_owned())).expect("request")
}

/// A delivery of `body` signed as Stripe signs with `secret` at
/// `timestamp`.
fn stripe_delivery(secret: &str, timestamp: u64, body: &str) -> Request<Body> {
    webhook(
        "/r",
        &[("stripe-signature", stripe_signature(secret, timestamp, body))],
        body,
    )
}

fn stripe_event(id: &str) -> String {
    json!({"id": id, "type": "payment_intent.succeeded", "data": {"object": {"amount": 500}}}).to_string()
}

/// The probe handler behind a layer with `preset` on the test's store.
async fn probe_app(db: &TestDb, preset: Preset) -> (Probe, Router) {
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(db.store().await).preset(preset));
    (probe, app)
}

fn stripe_preset(verifier: StripeSignature) -> Preset {
    Preset::stripe().verify_signature(verifier)
}

// ---------------------------------------------------------------------------
// Assertions

async fn assert_refused(db: &TestDb, reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{what}: {reply:?}");
    assert_eq!(reply.problem_type(), INVALID_SIGNATURE, "{what}");
    assert_eq!(db.records().await, 0, "{what}: a refused request leaves no record");
    assert_eq!(db.ledger_rows().await, 0, "{what}: a refused request runs nothing");
}

/// Sends each `(what, headers, body)` request: every one is refused, and
/// the handler never runs.
async fn assert_all_refused<B: AsRef<str>>(
    db: &TestDb,
    probe: &Probe,
    app: &Router,
    requests: impl IntoIterator<Item = (&'static str, Vec<(&'static str, String)>, B)>,
) {
    for (what, headers, body) in requests {
        let reply = send(app, webhook("/r", &headers, body.as_ref())).await;
        assert_refused(db, &reply, what).await;
    }
    assert_eq!(probe.runs(), 0);
}

fn assert_ran(reply: &Reply, what: &str) {
    assert_eq!(reply.status, StatusCode::OK, "{what}: {reply:?}");
    assert!(!reply.replayed(), "{what}: a first delivery runs: {reply:?}");
}

async fn record_keys(db: &TestDb) -> Vec<(String, String, String)> {
    let rows = db
        .client()
        .await
        .query(
            "SELECT source, event_type, key FROM idempotency_records ORDER BY source, event_type, key",
            &[],
        )
        .await
        .expect("read the records");
    rows.iter().map(|row| (row.get(0), row.get(1), row.get(2))).collect()
}

fn record(source: &str, event_type: &str, key: &str) -> (String, String, String) {
    (source.to_owned(), event_type.to_owned(), key.to_owned())
}

// ---------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn unverified_stripe_requests_are_refused_leaving_no_trace() {
    let db = TestDb::new("sig_stripe_refused").await;
    let (probe, app) = probe_app(&db, stripe_preset(StripeSignature::new(STRIPE_SECRET).unwrap())).await;
    let body = stripe_event("evt_1");
    let t = unix_now();
    let signed = stripe_signature(STRIPE_SECRET, t, &body);
    let header = |signature: String| vec![("stripe-signature", signature)];
    let another_timestamp = signed.replace(&format!("t={t}"), &format!("t={}", t - 1));
    let tampered = body.replace("500", "50000");

    let refused = [
        (
            "a wrong secret",
            header(stripe_signature("whsec_forged", t, &body)),
            &body,
        ),
        (
            "a stale timestamp",
            header(stripe_signature(STRIPE_SECRET, t - 301, &body)),
            &body,
        ),
        (
            "a future timestamp",
            header(stripe_signature(STRIPE_SECRET, t + TOO_FAR_AHEAD, &body)),
            &body,
        ),
        ("a tampered body", header(signed), &tampered),
        ("no signature", vec![], &body),
        ("a malformed signature", header("v1=abc".to_owned()), &body),
        ("a signature for another timestamp", header(another_timestamp), &body),
    ];
    assert_all_refused(&db, &probe, &app, refused).await;
    db.drop_schema().await;
}

#[tokio::test]
async fn a_signed_stripe_duplicate_is_replayed() {
    let db = TestDb::new("sig_stripe_replay").await;
    let (probe, app) = probe_app(&db, stripe_preset(StripeSignature::new(STRIPE_SECRET).unwrap())).await;
    let body = stripe_event("evt_1");
    let signed = stripe_signature(STRIPE_SECRET, unix_now(), &body);

    let first = send(&app, webhook("/r", &[("stripe-signature", signed.clone())], &body)).await;
    assert_ran(&first, "the signed event");
    let replay = send(&app, webhook("/r", &[("stripe-signature", signed)], &body)).await;
    assert_eq!(replay.status, StatusCode::OK, "{replay:?}");
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(probe.runs(), 1);
    assert_eq!(
        record_keys(&db).await,
        vec![record("stripe", "payment_intent.succeeded", "evt_1")]
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_forged_request_cannot_claim_a_genuine_event_id_first() {
    let db = TestDb::new("sig_forged_first").await;
    let (probe, app) = probe_app(&db, stripe_preset(StripeSignature::new(STRIPE_SECRET).unwrap())).await;
    let genuine = stripe_event("evt_genuine");
    // The attacker knows the id but not the secret, and sends first.
    let forged = genuine.replace("500", "1");
    let forged_reply = send(&app, stripe_delivery("whsec_guess", unix_now(), &forged)).await;
    assert_refused(&db, &forged_reply, "the forged event").await;

    let reply = send(&app, stripe_delivery(STRIPE_SECRET, unix_now(), &genuine)).await;
    assert_ran(&reply, "the genuine event after a forgery with its id");
    assert_eq!(probe.runs(), 1);
    assert_eq!(db.ledger_rows().await, 1);
    db.drop_schema().await;
}

/// A Stripe verifier rotating from `whsec_old` to `whsec_new`.
fn rotating_stripe_verifier() -> StripeSignature {
    StripeSignature::new("whsec_old").unwrap().secret("whsec_new").unwrap()
}

#[tokio::test]
async fn stripe_verifies_against_every_secret_it_holds() {
    let db = TestDb::new("sig_stripe_rotation").await;
    let (probe, app) = probe_app(&db, stripe_preset(rotating_stripe_verifier())).await;
    let t = unix_now();

    let old = stripe_event("evt_old");
    let reply = send(&app, stripe_delivery("whsec_old", t, &old)).await;
    assert_ran(&reply, "signed with the old secret");

    let new = stripe_event("evt_new");
    let reply = send(&app, stripe_delivery("whsec_new", t, &new)).await;
    assert_ran(&reply, "signed with the new secret");

    let retired = stripe_event("evt_retired");
    let reply = send(&app, stripe_delivery("whsec_retired", t, &retired)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");
    assert_eq!(probe.runs(), 2);
    assert_eq!(db.records().await, 2);
    db.drop_schema().await;
}

#[tokio::test]
async fn stripe_accepts_a_header_listing_an_unknown_and_a_known_signature() {
    let db = TestDb::new("sig_stripe_listed").await;
    let (probe, app) = probe_app(&db, stripe_preset(rotating_stripe_verifier())).await;
    let t = unix_now();

    // While Stripe rolls a secret it signs with both: one v1 per secret.
    let both = stripe_event("evt_both");
    let unknown = stripe_signature("whsec_unknown", t, &both);
    let new_sig = stripe_signature("whsec_new", t, &both);
    let header = format!("{unknown},{}", new_sig.split_once(',').expect("t=,v1=").1);
    let reply = send(&app, webhook("/r", &[("stripe-signature", header)], &both)).await;
    assert_ran(&reply, "a header listing an unknown and a known signature");
    assert_eq!(probe.runs(), 1);
    assert_eq!(db.records().await, 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn checks_run_in_order_body_size_signature_json_key() {
    let db = TestDb::new("sig_check_order").await;
    let probe = Probe::default();
    let verifier = StripeSignature::new(STRIPE_SECRET).unwrap();
    let layer = IdempotencyLayer::new(db.store().await)
        .preset(stripe_preset(verifier))
        .max_request_bytes(256);
    let app = probe.app(layer);

    // Oversize and unsigned: the body size is checked first.
    let oversize = json!({"id": "evt_big", "pad": "x".repeat(300)}).to_string();
    let reply = send(&app, webhook("/r", &[], &oversize)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{reply:?}");

    // Malformed JSON, unsigned: the signature comes before the JSON.
    let reply = send(&app, webhook("/r", &[], "{\"id\":")).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "{reply:?}");

    // Malformed JSON, signed: 400.
    let malformed = "{\"id\":";
    let reply = send(&app, stripe_delivery(STRIPE_SECRET, unix_now(), malformed)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:malformed-json");

    // Signed JSON without an id: the key is checked last.
    let no_id = json!({"type": "t"}).to_string();
    let reply = send(&app, stripe_delivery(STRIPE_SECRET, unix_now(), &no_id)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{reply:?}");
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:missing-key");

    assert_eq!(probe.runs(), 0);
    assert_eq!(db.records().await, 0);
    assert_eq!(db.ledger_rows().await, 0);
    db.drop_schema().await;
}

/// GitHub's documented test values: its secret, delivery and signature of
/// `Hello, World!`.
const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const GITHUB_DELIVERY: &str = "72d3162e-cc78-11e3-81ab-4c9367dc0958";
const GITHUB_SIGNATURE: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

fn github_preset() -> Preset {
    Preset::github().verify_signature(GitHubSignature::new(GITHUB_SECRET).unwrap())
}

#[tokio::test]
async fn unverified_github_deliveries_are_refused_leaving_no_trace() {
    let db = TestDb::new("sig_github_refused").await;
    let (probe, app) = probe_app(&db, github_preset()).await;
    let headers = |signature: &str| github_headers(GITHUB_DELIVERY, signature.to_owned());

    let refused = [
        ("a tampered body", headers(GITHUB_SIGNATURE), "Hello, World?"),
        (
            "a wrong secret",
            headers(&github_signature("guess", "Hello, World!")),
            "Hello, World!",
        ),
        ("no signature", headers(GITHUB_SIGNATURE)[..2].to_vec(), "Hello, World!"),
        (
            "a SHA-1 signature",
            headers("sha1=0a0d4d52c6b3a2ef2b5f1d0b1d8b9d9e2e4f6a7b"),
            "Hello, World!",
        ),
    ];
    assert_all_refused(&db, &probe, &app, refused).await;
    db.drop_schema().await;
}

#[tokio::test]
async fn a_verified_github_delivery_is_keyed_by_delivery_and_event() {
    let db = TestDb::new("sig_github").await;
    let (_probe, app) = probe_app(&db, github_preset()).await;
    let headers = github_headers(GITHUB_DELIVERY, GITHUB_SIGNATURE.to_owned());

    let reply = send(&app, webhook("/r", &headers, "Hello, World!")).await;

    assert_ran(&reply, "GitHub's documented delivery");
    assert_eq!(record_keys(&db).await, vec![record("github", "push", GITHUB_DELIVERY)]);
    db.drop_schema().await;
}

/// A Standard Webhooks verifier with the secret without its prefix.
fn standard_preset() -> Preset {
    Preset::standard_webhooks()
        .verify_signature(StandardWebhooksSignature::new("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap())
}

fn invoice() -> String {
    json!({"type": "invoice.paid", "data": {"id": "in_1"}}).to_string()
}

#[tokio::test]
async fn unverified_standard_webhooks_are_refused_leaving_no_trace() {
    let db = TestDb::new("sig_standard_refused").await;
    let (probe, app) = probe_app(&db, standard_preset()).await;
    let body = invoice();
    let t = unix_now();
    let tampered = body.replace("in_1", "in_2");
    // msg_1's headers at `timestamp`, signed with `secret` as `signed_id`.
    let headers = |secret: &str, signed_id: &str, timestamp: u64| {
        standard_headers(
            "msg_1",
            timestamp,
            standard_signature(secret, signed_id, timestamp, &body),
        )
    };

    let refused = [
        ("a wrong secret", headers("whsec_c2VjcmV0", "msg_1", t), &body),
        ("a stale timestamp", headers(STANDARD_SECRET, "msg_1", t - 301), &body),
        (
            "a future timestamp",
            headers(STANDARD_SECRET, "msg_1", t + TOO_FAR_AHEAD),
            &body,
        ),
        (
            "another message's signature",
            headers(STANDARD_SECRET, "msg_2", t),
            &body,
        ),
        ("a tampered body", headers(STANDARD_SECRET, "msg_1", t), &tampered),
        (
            "a malformed signature",
            standard_headers("msg_1", t, "v1,???".to_owned()),
            &body,
        ),
        (
            "no signature",
            standard_headers("msg_1", t, String::new())[..2].to_vec(),
            &body,
        ),
    ];
    assert_all_refused(&db, &probe, &app, refused).await;
    db.drop_schema().await;
}

#[tokio::test]
async fn standard_webhooks_accept_a_list_of_signatures_holding_a_good_one() {
    let db = TestDb::new("sig_standard").await;
    let (_probe, app) = probe_app(&db, standard_preset()).await;
    let body = invoice();
    let t = unix_now();

    let listed = format!(
        "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {}",
        standard_signature(STANDARD_SECRET, "msg_1", t, &body)
    );
    let reply = send(&app, webhook("/r", &standard_headers("msg_1", t, listed), &body)).await;

    assert_ran(&reply, "a list of signatures holding a good one");
    assert_eq!(
        record_keys(&db).await,
        vec![record("standard-webhooks", "invoice.paid", "msg_1")]
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn a_v1a_signed_standard_webhook_runs_once_and_a_forged_one_is_refused() {
    const SENDER: [u8; 32] = [7; 32];
    const FORGER: [u8; 32] = [9; 32];
    let db = TestDb::new("sig_standard_v1a").await;
    let verifier = StandardWebhooksSignature::new(&standard_public_key(SENDER)).unwrap();
    let (probe, app) = probe_app(&db, Preset::standard_webhooks().verify_signature(verifier)).await;
    let body = invoice();
    let t = unix_now();
    let signed = standard_headers("msg_1", t, standard_v1a_signature(SENDER, "msg_1", t, &body));

    let forged = standard_headers("msg_1", t, standard_v1a_signature(FORGER, "msg_1", t, &body));
    let refused = send(&app, webhook("/r", &forged, &body)).await;
    assert_refused(&db, &refused, "a v1a signature by another key").await;
    let first = send(&app, webhook("/r", &signed, &body)).await;
    let again = send(&app, webhook("/r", &signed, &body)).await;

    assert_ran(&first, "the v1a-signed delivery");
    assert!(again.replayed(), "{again:?}");
    assert_eq!(probe.runs(), 1);
    assert_eq!(
        record_keys(&db).await,
        vec![record("standard-webhooks", "invoice.paid", "msg_1")]
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn svix_verifies_its_own_headers_with_a_prefixed_secret() {
    // Svix: the same scheme under svix-* headers, its secret with the prefix.
    let svix_db = TestDb::new("sig_svix").await;
    let svix = StandardWebhooksSignature::svix(STANDARD_SECRET).unwrap();
    let (_probe, svix_app) = probe_app(&svix_db, Preset::svix().verify_signature(svix)).await;
    let body = invoice();
    let t = unix_now();

    let svix_headers = vec![
        ("svix-id", "msg_svix".to_owned()),
        ("svix-timestamp", t.to_string()),
        (
            "svix-signature",
            standard_signature(STANDARD_SECRET, "msg_svix", t, &body),
        ),
    ];
    let reply = send(&svix_app, webhook("/r", &svix_headers, &body)).await;
    assert_ran(&reply, "a Svix delivery");
    let unbranded = send(
        &svix_app,
        webhook(
            "/r",
            &standard_headers("msg_1", t, standard_signature(STANDARD_SECRET, "msg_1", t, &body)),
            &body,
        ),
    )
    .await;
    assert_eq!(
        unbranded.status,
        StatusCode::UNAUTHORIZED,
        "the Svix preset reads svix-* headers: {unbranded:?}"
    );

    assert_eq!(
        record_keys(&svix_db).await,
        vec![record("svix", "invoice.paid", "msg_svix")]
    );
    svix_db.drop_schema().await;
}

/// A provider's signed request and a forgery of it.
struct Case {
    name: &'static str,
    layer: fn(IdempotencyLayer) -> IdempotencyLayer,
    signed: Request<Body>,
    forged: Request<Body>,
    record: (String, String, String),
}

fn other_providers() -> Vec<Case> {
    let t = unix_now();
    let mut cases = Vec::new();

    let slack_body =
        json!({"type": "event_callback", "event_id": "Ev0PV52K21", "event": {"type": "app_mention"}}).to_string();
    let slack_sig = |secret: &[u8], timestamp: u64| {
        let timestamp = timestamp.to_string();
        let message: [&[u8]; 4] = [b"v0:", timestamp.as_bytes(), b":", slack_body.as_bytes()];
        format!("v0={}", hex::encode(hmac_sha256(secret, &message)))
    };
    cases.push(Case {
        name: "slack",
        layer: |layer| layer.preset(Preset::slack().verify_signature(SlackSignature::new("slack-secret").unwrap())),
        signed: webhook(
            "/r",
            &[
                ("X-Slack-Request-Timestamp", t.to_string()),
                ("X-Slack-Signature", slack_sig(b"slack-secret", t)),
            ],
            &slack_body,
        ),
        forged: webhook(
            "/r",
            &[
                ("X-Slack-Request-Timestamp", (t - 600).to_string()),
                ("X-Slack-Signature", slack_sig(b"slack-secret", t - 600)),
            ],
            &slack_body,
        ),
        record: record("slack", "app_mention", "Ev0PV52K21"),
    });

    let shopify_body = json!({"id": 820982911946154508_u64, "email": "jon@example.com"}).to_string();
    let shopify_sig = |secret: &[u8]| base64(&hmac_sha256(secret, &[shopify_body.as_bytes()]));
    let shopify_headers = |signature: String| {
        vec![
            (
                "X-Shopify-Webhook-Id",
                "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043".to_owned(),
            ),
            ("X-Shopify-Topic", "orders/create".to_owned()),
            ("X-Shopify-Hmac-Sha256", signature),
        ]
    };
    cases.push(Case {
        name: "shopify",
        layer: |layer| {
            layer.preset(Preset::shopify().verify_signature(ShopifySignature::new("client-secret").unwrap()))
        },
        signed: webhook("/r", &shopify_headers(shopify_sig(b"client-secret")), &shopify_body),
        forged: webhook("/r", &shopify_headers(shopify_sig(b"guessed")), &shopify_body),
        record: record("shopify", "orders/create", "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043"),
    });

    let paystack_body =
        json!({"event": "charge.success", "data": {"id": 302961, "reference": "qTPrJoy9Bx"}}).to_string();
    let paystack_sig = |secret: &[u8], body: &str| hex::encode(mac::<Hmac<Sha512>>(secret, &[body.as_bytes()]));
    cases.push(Case {
        name: "paystack",
        layer: |layer| {
            layer.preset(Preset::paystack().verify_signature(PaystackSignature::new("sk_test_key").unwrap()))
        },
        signed: webhook(
            "/r",
            &[("x-paystack-signature", paystack_sig(b"sk_test_key", &paystack_body))],
            &paystack_body,
        ),
        // Signed, then the amount changed on the way.
        forged: webhook(
            "/r",
            &[("x-paystack-signature", paystack_sig(b"sk_test_key", &paystack_body))],
            &paystack_body.replace("302961", "302962"),
        ),
        record: record("paystack", "charge.success", "302961"),
    });

    let flutterwave_body =
        json!({"type": "charge.completed", "data": {"id": "chg_1", "status": "succeeded"}}).to_string();
    let flutterwave_sig = |secret: &[u8]| base64(&hmac_sha256(secret, &[flutterwave_body.as_bytes()]));
    cases.push(Case {
        name: "flutterwave",
        layer: |layer| {
            layer.preset(Preset::flutterwave().verify_signature(FlutterwaveSignature::new("secret-hash").unwrap()))
        },
        signed: webhook(
            "/r",
            &[("flutterwave-signature", flutterwave_sig(b"secret-hash"))],
            &flutterwave_body,
        ),
        // The legacy header is refused unless enabled.
        forged: webhook("/r", &[("verif-hash", "secret-hash".to_owned())], &flutterwave_body),
        record: record("flutterwave", "charge.completed", "chg_1"),
    });

    let twilio_form = "AccountSid=AC123&Body=Hello&From=%2B14158675309&MessageSid=SM123&To=%2B18005551212";
    let twilio_sig = |token: &[u8]| {
        let signed = "https://example.com/rAccountSidAC123BodyHelloFrom+14158675309MessageSidSM123To+18005551212";
        base64(&mac::<Hmac<Sha1>>(token, &[signed.as_bytes()]))
    };
    let twilio_headers = |signature: String| {
        vec![
            ("content-type", "application/x-www-form-urlencoded".to_owned()),
            ("I-Twilio-Idempotency-Token", "tok-1".to_owned()),
            ("X-Twilio-Signature", signature),
        ]
    };
    cases.push(Case {
        name: "twilio",
        layer: |layer| {
            layer.preset(
                Preset::twilio().verify_signature(TwilioSignature::new("auth-token", "https://example.com").unwrap()),
            )
        },
        signed: webhook("/r", &twilio_headers(twilio_sig(b"auth-token")), twilio_form),
        forged: webhook(
            "/r",
            &twilio_headers(twilio_sig(b"auth-token")),
            &twilio_form.replace("Hello", "Bye"),
        ),
        record: record("twilio", "", "tok-1"),
    });
    cases
}

#[tokio::test]
async fn every_other_provider_verifies_its_signature() {
    for case in other_providers() {
        let db = TestDb::new(&format!("sig_{}", case.name)).await;
        let probe = Probe::default();
        let app = probe.app((case.layer)(IdempotencyLayer::new(db.store().await)));

        let forged = send(&app, case.forged).await;
        assert_refused(&db, &forged, case.name).await;
        let signed = send(&app, case.signed).await;
        assert_ran(&signed, case.name);
        assert_eq!(probe.runs(), 1, "{}", case.name);
        assert_eq!(record_keys(&db).await, vec![case.record], "{}", case.name);
        db.drop_schema().await;
    }
}

/// The probe handler behind a layer keyed by the common event id
/// extractor.
async fn common_event_id_app(db: &TestDb) -> (Probe, Router) {
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(db.store().await)
            .source("acme")
            .key(Extractor::common_event_id()),
    );
    (probe, app)
}

/// Sends `body` twice: the first runs, the second replays it.
async fn assert_runs_once(app: &Router, body: &str) {
    let first = send(app, webhook("/r", &[], body)).await;
    assert_ran(&first, body);
    let again = send(app, webhook("/r", &[], body)).await;
    assert!(again.replayed(), "{body}: {again:?}");
}

#[tokio::test]
async fn the_common_event_id_extractor_keys_unsigned_senders_by_their_id_field() {
    let db = TestDb::new("common_event_id").await;
    let (probe, app) = common_event_id_app(&db).await;
    for body in [
        json!({"event_id": "e-1", "id": "obj_1"}).to_string(),
        json!({"data": {"id": 42}}).to_string(),
        json!({"id": {"nested": true}, "reference": "ref-9"}).to_string(),
    ] {
        assert_runs_once(&app, &body).await;
    }
    assert_eq!(
        record_keys(&db).await,
        vec![
            record("acme", "", "42"),
            record("acme", "", "e-1"),
            record("acme", "", "ref-9"),
        ]
    );
    assert_eq!(probe.runs(), 3);
    db.drop_schema().await;
}

#[tokio::test]
async fn the_common_event_id_extractor_falls_back_to_the_body_hash() {
    let db = TestDb::new("common_event_id_hash").await;
    let (probe, app) = common_event_id_app(&db).await;
    let form = "status=paid&amount=5";

    assert_runs_once(&app, form).await;

    let hash = hex::encode(<Sha256 as sha2::Digest>::digest(form.as_bytes()));
    assert_eq!(record_keys(&db).await, vec![record("acme", "", &hash)]);
    assert_eq!(probe.runs(), 1);
    db.drop_schema().await;
}

/// The probe handler behind the `Idempotency-Key` preset.
async fn idempotency_key_app(db: &TestDb) -> (Probe, Router) {
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(db.store().await)
            .preset(Preset::idempotency_key())
            .source("payments"),
    );
    (probe, app)
}

#[tokio::test]
async fn the_idempotency_key_preset_requires_the_header() {
    let db = TestDb::new("preset_idempotency_key_required").await;
    let (probe, app) = idempotency_key_app(&db).await;

    let missing = send(&app, support::request(None, "{}", &[])).await;

    assert_eq!(missing.status, StatusCode::BAD_REQUEST, "{missing:?}");
    assert_eq!(probe.runs(), 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn the_idempotency_key_preset_answers_409_to_a_duplicate_in_flight() {
    let db = TestDb::new("preset_idempotency_key").await;
    let (probe, app) = idempotency_key_app(&db).await;

    let blocked = tokio::spawn({
        let app = app.clone();
        async move { send(&app, support::request(Some("\"k-1\""), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    let duplicate = send(&app, support::request(Some("\"k-1\""), "{}", &[])).await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT, "{duplicate:?}");
    assert!(duplicate.headers.contains_key("retry-after"));
    probe.open_gate();
    let first = blocked.await.expect("the first request");
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    db.drop_schema().await;
}

#[tokio::test]
async fn the_idempotency_key_preset_takes_the_key_raw() {
    let db = TestDb::new("preset_idempotency_key_raw").await;
    let (_probe, app) = idempotency_key_app(&db).await;

    let reply = send(&app, support::request(Some("\"k-1\""), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    // The quotes of the structured-field form are part of the key.
    assert_eq!(record_keys(&db).await, vec![record("payments", "", "\"k-1\"")]);
    db.drop_schema().await;
}
