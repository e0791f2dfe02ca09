//! Behaviour both stores share, each test body run against Postgres and
//! against the memory store.

mod support;

use std::time::Duration;

use axum::Router;
use futures_util::future::join_all;
use http::StatusCode;
use support::{request, send, Ctx, Probe, Reply};
use tokio::sync::{mpsc, Barrier};
use tower_idempotency::{Extractor, Fingerprint, InFlight, KeyField, MissingKey, Mode};

/// Sends one request per key with `body`, all released at once by a
/// barrier; a handler that runs waits at the probe's gate, which opens once
/// one has started. The replies, in the keys' order.
async fn all_at_once_behind_the_gate(app: &Router, probe: &Probe, keys: Vec<String>, body: &'static str) -> Vec<Reply> {
    let barrier = std::sync::Arc::new(Barrier::new(keys.len()));
    let tasks: Vec<_> = keys
        .into_iter()
        .map(|key| {
            let (app, barrier) = (app.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, request(Some(&key), body, &[("x-test-block", "1")])).await
            })
        })
        .collect();
    probe.started().await;
    probe.open_gate();
    join_all(tasks).await.into_iter().map(Result::unwrap).collect()
}

async fn duplicate_is_replayed_without_running_the_handler(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer());

    let first = send(&app, request(Some("k1"), "{}", &[("x-test-status", "201")])).await;
    let second = send(&app, request(Some("k1"), "{}", &[("x-test-status", "201")])).await;

    assert_eq!(probe.runs(), 1);
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed(), "the first response is not a replay");
    assert_eq!(second.status, StatusCode::CREATED);
    assert!(second.replayed());
    assert_eq!(second.body, first.body);
    assert_eq!(second.headers["content-type"], first.headers["content-type"]);
    let replayable: Vec<_> = second.headers.get_all("x-replayable").iter().collect();
    assert_eq!(replayable, ["a", "b"], "repeated allow-listed headers keep their order");
    assert!(second.headers.get("set-cookie").is_none(), "set-cookie is never stored");
    assert!(
        second.headers.get("x-not-listed").is_none(),
        "headers not allow-listed are not replayed"
    );
    assert!(
        first.headers.get("set-cookie").is_some(),
        "the first response is sent whole"
    );
    assert_eq!(ctx.ledger_rows().await.unwrap_or(1), 1);
    ctx.finish().await;
}
both_stores!(duplicate_is_replayed_without_running_the_handler);

async fn concurrent_duplicates_run_the_handler_once_with_conflict(ctx: Ctx) {
    const REQUESTS: usize = 50;
    let probe = Probe::default();
    let app = probe.app(ctx.layer().in_flight(InFlight::Conflict));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let barrier = std::sync::Arc::new(Barrier::new(REQUESTS));
    for _ in 0..REQUESTS {
        let (app, done_tx, barrier) = (app.clone(), done_tx.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            let reply = send(&app, request(Some("same"), "{}", &[("x-test-block", "1")])).await;
            let _ = done_tx.send(reply);
        });
    }
    // The handler that won holds the gate shut, so every other request must
    // answer on its own, and with 409.
    let mut replies = Vec::new();
    for _ in 0..REQUESTS - 1 {
        replies.push(done_rx.recv().await.expect("a reply"));
    }
    assert!(replies.iter().all(|r| r.status == StatusCode::CONFLICT), "{replies:?}");
    assert!(replies.iter().all(|r| r.headers.contains_key("retry-after")));
    assert_eq!(replies[0].problem_type(), "urn:tower-idempotency:in-flight");
    probe.open_gate();
    let winner = done_rx.recv().await.expect("the winner's reply");
    assert_eq!(winner.status, StatusCode::OK);
    assert_eq!(probe.runs(), 1);
    assert_eq!(ctx.ledger_rows().await.unwrap_or(1), 1);
    ctx.finish().await;
}
both_stores!(concurrent_duplicates_run_the_handler_once_with_conflict);

async fn concurrent_duplicates_run_the_handler_once_with_wait(ctx: Ctx) {
    const REQUESTS: usize = 50;
    let probe = Probe::default();
    let app = probe.app(ctx.layer().in_flight(InFlight::Wait(Duration::from_secs(30))));
    let keys = vec!["same".to_owned(); REQUESTS];
    let replies = all_at_once_behind_the_gate(&app, &probe, keys, "{}").await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK), "{replies:?}");
    assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
    assert!(replies.iter().all(|r| r.body == replies[0].body));
    assert_eq!(probe.runs(), 1);
    assert_eq!(ctx.ledger_rows().await.unwrap_or(1), 1);
    ctx.finish().await;
}
both_stores!(concurrent_duplicates_run_the_handler_once_with_wait);

async fn a_non_committing_status_releases_the_key(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer());

    let failed = send(&app, request(Some("k"), "{}", &[("x-test-status", "500")])).await;
    let retried = send(&app, request(Some("k"), "{}", &[])).await;
    let replayed = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(failed.text(), "run 1", "a released response is passed through as it is");
    assert_eq!(retried.status, StatusCode::OK);
    assert!(!retried.replayed());
    assert!(replayed.replayed());
    assert_eq!(probe.runs(), 2);
    // The failed run's ledger row rolled back with its claim.
    assert_eq!(ctx.ledger_rows().await.unwrap_or(1), 1);
    ctx.finish().await;
}
both_stores!(a_non_committing_status_releases_the_key);

async fn a_panicking_handler_gets_500_and_releases_the_key(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer());

    let panicked = send(&app, request(Some("k"), "{}", &[("x-test-panic", "1")])).await;
    let retried = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(panicked.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(panicked.problem_type(), "urn:tower-idempotency:handler-failed");
    assert_eq!(retried.status, StatusCode::OK);
    assert!(!retried.replayed(), "the panicked run left the key unprocessed");
    assert_eq!(probe.runs(), 2);
    assert_eq!(ctx.ledger_rows().await.unwrap_or(1), 1);
    ctx.finish().await;
}
both_stores!(a_panicking_handler_gets_500_and_releases_the_key);

async fn the_same_key_with_another_payload_is_422(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer());

    send(&app, request(Some("k"), r#"{"amount":1}"#, &[])).await;
    let other_body = send(&app, request(Some("k"), r#"{"amount":2}"#, &[])).await;
    let same_body = send(&app, request(Some("k"), r#"{"amount":1}"#, &[])).await;

    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other_body.problem_type(), "urn:tower-idempotency:fingerprint-mismatch");
    assert!(same_body.replayed());
    assert_eq!(probe.runs(), 1);
    ctx.finish().await;
}
both_stores!(the_same_key_with_another_payload_is_422);

async fn canonical_json_fingerprints_ignore_key_order(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer().fingerprint(Fingerprint::canonical_json()));

    send(&app, request(Some("k"), r#"{"a":1,"b":[1,2]}"#, &[])).await;
    let reordered = send(&app, request(Some("k"), "{ \"b\": [1, 2], \"a\": 1 }", &[])).await;

    assert!(reordered.replayed(), "{reordered:?}");
    assert_eq!(probe.runs(), 1);
    ctx.finish().await;
}
both_stores!(canonical_json_fingerprints_ignore_key_order);

async fn expired_records_count_as_absent(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer().retention(Duration::ZERO));

    send(&app, request(Some("k"), "{}", &[])).await;
    let again = send(&app, request(Some("k"), "{}", &[])).await;
    // An expired record does not block another payload either.
    let other = send(&app, request(Some("k"), r#"{"x":1}"#, &[])).await;

    assert!(!again.replayed());
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(probe.runs(), 3);
    ctx.finish().await;
}
both_stores!(expired_records_count_as_absent);

/// The probe behind a layer that records every answer but a server error.
fn committing_all_but_server_errors(ctx: &Ctx, probe: &Probe) -> Router {
    probe.app(ctx.layer().commit_when(|status| !status.is_server_error()))
}

async fn the_commit_predicate_chooses_what_is_recorded(ctx: Ctx) {
    let probe = Probe::default();
    let app = committing_all_but_server_errors(&ctx, &probe);

    // A client error is recorded under this predicate.
    send(&app, request(Some("a"), "{}", &[("x-test-status", "404")])).await;
    let replayed_404 = send(&app, request(Some("a"), "{}", &[])).await;

    assert_eq!(
        (replayed_404.status, replayed_404.replayed()),
        (StatusCode::NOT_FOUND, true)
    );
    assert_eq!(probe.runs(), 1);
    ctx.finish().await;
}
both_stores!(the_commit_predicate_chooses_what_is_recorded);

async fn a_response_decision_overrides_the_commit_predicate(ctx: Ctx) {
    let probe = Probe::default();
    let app = committing_all_but_server_errors(&ctx, &probe);

    // A success the handler marks `Release` is not recorded...
    send(&app, request(Some("b"), "{}", &[("x-test-decision", "release")])).await;
    let rerun = send(&app, request(Some("b"), "{}", &[])).await;
    // ...and a server error the handler marks `Commit` is.
    send(
        &app,
        request(
            Some("c"),
            "{}",
            &[("x-test-status", "502"), ("x-test-decision", "commit")],
        ),
    )
    .await;
    let replayed_502 = send(&app, request(Some("c"), "{}", &[])).await;

    assert!(!rerun.replayed());
    assert_eq!(
        (replayed_502.status, replayed_502.replayed()),
        (StatusCode::BAD_GATEWAY, true)
    );
    assert_eq!(probe.runs(), 3);
    ctx.finish().await;
}
both_stores!(a_response_decision_overrides_the_commit_predicate);

async fn bad_input_never_reaches_the_handler(ctx: Ctx) {
    let probe = Probe::default();
    let layer = ctx
        .layer()
        .key(Extractor::header("idempotency-key").or(Extractor::json("/id").unwrap()))
        .event_type(Extractor::json("/type").unwrap())
        .max_request_bytes(64);
    let app = probe.app(layer);
    let long_key = "k".repeat(256);
    let cases: Vec<(Option<&str>, String, StatusCode, &str)> = vec![
        (None, "{}".into(), StatusCode::BAD_REQUEST, "missing-key"),
        (Some(""), "{}".into(), StatusCode::BAD_REQUEST, "invalid-key"),
        (Some(&long_key), "{}".into(), StatusCode::BAD_REQUEST, "invalid-key"),
        (Some("a\tb"), "{}".into(), StatusCode::BAD_REQUEST, "invalid-key"),
        (None, r#"{"id": 1.5}"#.into(), StatusCode::BAD_REQUEST, "invalid-key"),
        (None, r#"{"id": true}"#.into(), StatusCode::BAD_REQUEST, "invalid-key"),
        (None, r#"{"id": null}"#.into(), StatusCode::BAD_REQUEST, "invalid-key"),
        (
            None,
            r#"{"id": {"x": 1}}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid-key",
        ),
        (
            Some("k"),
            r#"{"type": 7}"#.into(),
            StatusCode::BAD_REQUEST,
            "invalid-key",
        ),
        (
            Some("k"),
            r#"{"id": "#.into(),
            StatusCode::BAD_REQUEST,
            "malformed-json",
        ),
        (
            Some("k"),
            format!(r#"{{"pad": "{}"}}"#, "x".repeat(64)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
        ),
    ];
    for (key, body, status, kind) in cases {
        let reply = send(&app, request(key, &body, &[])).await;
        assert_eq!(reply.status, status, "key {key:?} body {body}: {reply:?}");
        assert_eq!(
            reply.problem_type(),
            format!("urn:tower-idempotency:{kind}"),
            "key {key:?} body {body}"
        );
    }
    // A key that is not UTF-8.
    let mut not_utf8 = request(None, "{}", &[]);
    not_utf8
        .headers_mut()
        .insert("idempotency-key", http::HeaderValue::from_bytes(b"\xffk").unwrap());
    assert_eq!(send(&app, not_utf8).await.status, StatusCode::BAD_REQUEST);
    // A header sent twice.
    let mut twice = request(Some("a"), "{}", &[]);
    twice
        .headers_mut()
        .append("idempotency-key", http::HeaderValue::from_static("b"));
    assert_eq!(send(&app, twice).await.status, StatusCode::BAD_REQUEST);

    assert_eq!(probe.runs(), 0);
    assert_eq!(ctx.ledger_rows().await.unwrap_or(0), 0);
    // A JSON integer id is its decimal text, and a 255-byte key is fine.
    assert_eq!(
        send(&app, request(None, r#"{"id": 12345}"#, &[])).await.status,
        StatusCode::OK
    );
    assert_eq!(
        send(&app, request(Some(&"k".repeat(255)), "{}", &[])).await.status,
        StatusCode::OK
    );
    ctx.finish().await;
}
both_stores!(bad_input_never_reaches_the_handler);

async fn missing_key_policies_hash_the_body_or_pass_through(ctx: Ctx) {
    let hashed = Probe::default();
    let app = hashed.app(ctx.layer().source("hashed").missing_key(MissingKey::BodyHash));
    send(&app, request(None, r#"{"n":1}"#, &[])).await;
    let same = send(&app, request(None, r#"{"n":1}"#, &[])).await;
    let different = send(&app, request(None, r#"{"n":2}"#, &[])).await;
    assert!(same.replayed());
    assert!(!different.replayed());
    assert_eq!(hashed.runs(), 2);

    let open = Probe::default();
    let app = open.app(ctx.layer().source("open").missing_key(MissingKey::PassThrough));
    send(&app, request(None, "{}", &[])).await;
    let unprotected = send(&app, request(None, "{}", &[])).await;
    assert!(!unprotected.replayed());
    assert_eq!(open.runs(), 2);
    ctx.finish().await;
}
both_stores!(missing_key_policies_hash_the_body_or_pass_through);

async fn sources_and_event_types_separate_keys(ctx: Ctx) {
    let probe = Probe::default();
    let tenant_layer = ctx
        .layer()
        .event_type(Extractor::header("x-event"))
        .source_fn(|parts| parts.headers.get("x-tenant")?.to_str().ok().map(str::to_owned));
    let app = probe.app(tenant_layer);

    send(&app, request(Some("k"), "{}", &[("x-tenant", "a"), ("x-event", "e1")])).await;
    let other_tenant = send(&app, request(Some("k"), "{}", &[("x-tenant", "b"), ("x-event", "e1")])).await;
    let other_event = send(&app, request(Some("k"), "{}", &[("x-tenant", "a"), ("x-event", "e2")])).await;
    let same = send(&app, request(Some("k"), "{}", &[("x-tenant", "a"), ("x-event", "e1")])).await;
    let no_tenant = send(&app, request(Some("k"), "{}", &[("x-event", "e1")])).await;

    assert!(!other_tenant.replayed(), "tenants never replay each other's responses");
    assert!(!other_event.replayed());
    assert!(same.replayed());
    assert_eq!(no_tenant.status, StatusCode::BAD_REQUEST);
    assert_eq!(probe.runs(), 3);
    ctx.finish().await;
}
both_stores!(sources_and_event_types_separate_keys);

async fn max_key_bytes_bounds_every_part_of_the_record_key(ctx: Ctx) {
    let probe = Probe::default();
    let layer = ctx
        .layer()
        .max_key_bytes(8)
        .event_type(Extractor::header("x-event"))
        .source_fn(|parts| parts.headers.get("x-tenant")?.to_str().ok().map(str::to_owned));
    let app = probe.app(layer);
    let parts =
        |key: &str, event: &str, tenant: &str| request(Some(key), "{}", &[("x-event", event), ("x-tenant", tenant)]);

    let at_the_bound = send(&app, parts("12345678", "12345678", "12345678")).await;
    let long_key = send(&app, parts("123456789", "e", "t")).await;
    let long_event_type = send(&app, parts("k", "123456789", "t")).await;
    let long_source = send(&app, parts("k", "e", "123456789")).await;

    assert_eq!(at_the_bound.status, StatusCode::OK);
    for (what, reply) in [
        ("key", long_key),
        ("event type", long_event_type),
        ("source", long_source),
    ] {
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "a {what} over the bound");
        assert_eq!(reply.headers["content-type"], "application/problem+json");
    }
    assert_eq!(probe.runs(), 1, "nothing over the bound reaches the handler");
    ctx.finish().await;
}
both_stores!(max_key_bytes_bounds_every_part_of_the_record_key);

async fn a_key_over_selected_fields_replays_a_resend_with_other_noise(ctx: Ctx) {
    let probe = Probe::default();
    let fields = Extractor::fields_sha256([
        KeyField::json("/order/id").unwrap(),
        KeyField::json("/order/amount").unwrap(),
        KeyField::header("x-shop"),
    ]);
    let app = probe.app(
        ctx.layer()
            .key(fields)
            .fingerprint(Fingerprint::json_fields(["/order"]).unwrap()),
    );
    let shop = [("x-shop", "acme")];

    let first = send(
        &app,
        request(None, r#"{"order": {"id": "o1", "amount": 5}, "sent_at": 1}"#, &shop),
    )
    .await;
    let resent = send(
        &app,
        request(None, r#"{"sent_at": 2, "order": {"amount": 5, "id": "o1"}}"#, &shop),
    )
    .await;
    let other_amount = send(&app, request(None, r#"{"order": {"id": "o1", "amount": 6}}"#, &shop)).await;
    let other_shop = send(&app, request(None, r#"{"order": {"id": "o1", "amount": 5}}"#, &[])).await;
    let not_json = send(&app, request(None, "{not json", &shop)).await;

    assert!(!first.replayed());
    assert!(resent.replayed(), "the same fields are the same event");
    assert_eq!(resent.body, first.body);
    assert!(!other_amount.replayed());
    assert!(
        !other_shop.replayed(),
        "an absent header counts as null, not as the shop"
    );
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
    assert_eq!(probe.runs(), 3);
    ctx.finish().await;
}
both_stores!(a_key_over_selected_fields_replays_a_resend_with_other_noise);

async fn a_dropped_request_lets_the_detached_handler_finish_and_commit(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer().in_flight(InFlight::Wait(Duration::from_secs(30))));

    let abandoned = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    abandoned.abort(); // the client goes away mid-handler
    let _ = abandoned.await;
    probe.open_gate();
    // The duplicate waits for the detached run and replays its response.
    let retry = send(&app, request(Some("k"), "{}", &[])).await;

    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.text(), "run 1");
    assert_eq!(probe.runs(), 1);
    assert_eq!(ctx.ledger_rows().await.unwrap_or(1), 1);
    ctx.finish().await;
}
both_stores!(a_dropped_request_lets_the_detached_handler_finish_and_commit);

async fn a_dropped_request_releases_the_key_when_not_detached(ctx: Ctx) {
    let probe = Probe::default();
    let layer = ctx
        .layer()
        .detach_on_disconnect(false)
        .in_flight(InFlight::Wait(Duration::from_secs(30)));
    let app = probe.app(layer);

    let abandoned = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    abandoned.abort();
    let _ = abandoned.await;
    probe.open_gate();
    let retry = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(retry.status, StatusCode::OK);
    assert!(!retry.replayed(), "the cut-off run must not count as processed");
    assert_eq!(probe.runs(), 2);
    assert_eq!(
        ctx.ledger_rows().await.unwrap_or(1),
        1,
        "the cut-off run's write rolled back"
    );
    ctx.finish().await;
}
both_stores!(a_dropped_request_releases_the_key_when_not_detached);

async fn a_large_response_is_sent_whole_but_its_body_is_not_kept(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer().max_stored_response_bytes(100));

    let first = send(&app, request(Some("k"), "{}", &[("x-test-body-bytes", "5000")])).await;
    let replay = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(first.body.len(), 5000);
    assert_eq!(replay.status, StatusCode::OK);
    assert!(replay.replayed());
    assert!(replay.body.is_empty(), "the body over the storage limit was not kept");
    assert_eq!(probe.runs(), 1);
    ctx.finish().await;
}
both_stores!(a_large_response_is_sent_whole_but_its_body_is_not_kept);

async fn a_stale_lease_holder_cannot_overwrite_the_new_owner(ctx: Ctx) {
    // A lease that has run out as soon as it is taken, never renewed: the
    // first claimant is still running when the second, on another instance
    // (a layer of its own), takes over. On one instance the local in-flight
    // table keeps a live handler's key from being taken over at all.
    let mode = Mode::Lease {
        lease: Duration::ZERO,
        renew_every: Duration::ZERO,
    };
    let probe = Probe::default();
    let instance_a = probe.app(ctx.layer().mode(mode));
    let app = probe.app(ctx.layer().mode(mode));

    let stale = tokio::spawn({
        let app = instance_a.clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    let owner = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    probe.open_gate();
    let (stale, owner) = (stale.await.unwrap(), owner.await.unwrap());
    let replay = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(
        stale.status,
        StatusCode::OK,
        "the fenced-out run still answers its client"
    );
    assert_eq!(owner.status, StatusCode::OK);
    assert_eq!(probe.runs(), 2, "lease mode is at-least-once once a lease runs out");
    assert!(replay.replayed());
    assert_eq!(replay.body, owner.body, "the record holds the new owner's response");
    ctx.finish().await;
}
both_stores!(a_stale_lease_holder_cannot_overwrite_the_new_owner);

async fn in_lease_mode_another_payload_is_422_while_in_flight(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer().mode(Mode::lease(Duration::from_secs(60))));

    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), r#"{"a":1}"#, &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    let other = send(&app, request(Some("k"), r#"{"a":2}"#, &[])).await;
    let same = send(&app, request(Some("k"), r#"{"a":1}"#, &[])).await;
    probe.open_gate();
    let first = first.await.unwrap();

    assert_eq!(other.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(same.status, StatusCode::CONFLICT);
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(probe.runs(), 1);
    ctx.finish().await;
}
both_stores!(in_lease_mode_another_payload_is_422_while_in_flight);

fn lease_mode(ctx: &Ctx, probe: &Probe) -> Router {
    probe.app(ctx.layer().mode(Mode::lease(Duration::from_secs(60))))
}

async fn lease_mode_releases_a_key_whose_handler_failed(ctx: Ctx) {
    let probe = Probe::default();
    let app = lease_mode(&ctx, &probe);

    send(&app, request(Some("k"), "{}", &[("x-test-status", "503")])).await;
    send(&app, request(Some("k"), "{}", &[("x-test-panic", "1")])).await;
    let ran = send(&app, request(Some("k"), "{}", &[])).await;

    assert!(!ran.replayed());
    assert_eq!(probe.runs(), 3);
    ctx.finish().await;
}
both_stores!(lease_mode_releases_a_key_whose_handler_failed);

async fn lease_mode_replays_a_completed_key(ctx: Ctx) {
    let probe = Probe::default();
    let app = lease_mode(&ctx, &probe);

    let ran = send(&app, request(Some("k"), "{}", &[])).await;
    let replay = send(&app, request(Some("k"), "{}", &[])).await;

    assert!(!ran.replayed());
    assert!(replay.replayed());
    assert_eq!(replay.body, ran.body);
    assert_eq!(probe.runs(), 1);
    ctx.finish().await;
}
both_stores!(lease_mode_replays_a_completed_key);

async fn a_lease_running_past_retention_is_neither_taken_over_nor_purged(ctx: Ctx) {
    // Retention ends as soon as the claim is taken; the lease, renewed while
    // the handler runs, has not. The second delivery comes through another
    // instance, whose local in-flight table knows nothing of the first.
    let mode = Mode::Lease {
        lease: Duration::from_secs(60),
        renew_every: Duration::from_millis(10),
    };
    let probe = Probe::default();
    let running_on = probe.app(ctx.layer().mode(mode).retention(Duration::ZERO));
    let other_instance = probe.app(ctx.layer().mode(mode).retention(Duration::ZERO));
    let first = tokio::spawn({
        let app = running_on.clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;

    let second = send(&other_instance, request(Some("k"), "{}", &[])).await;
    let purged = match &ctx.db {
        Some(db) => Some(
            tower_idempotency::PostgresStore::new(db.pool.clone())
                .purge_expired(100)
                .await
                .unwrap(),
        ),
        None => None,
    };
    probe.open_gate();
    let first = first.await.unwrap();

    assert_eq!(second.status, StatusCode::CONFLICT, "{second:?}");
    assert_eq!(probe.runs(), 1);
    assert_eq!(purged.unwrap_or(0), 0, "the purge left the live claim alone");
    assert_eq!(first.status, StatusCode::OK);
    ctx.finish().await;
}
both_stores!(a_lease_running_past_retention_is_neither_taken_over_nor_purged);

async fn with_the_body_hash_guard_a_body_resent_under_a_fresh_key_is_a_duplicate(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer().body_hash_guard(true));

    let first = send(&app, request(Some("delivery-1"), r#"{"event":1}"#, &[])).await;
    let resent = send(&app, request(Some("delivery-2"), r#"{"event":1}"#, &[])).await;
    let other_body = send(&app, request(Some("delivery-3"), r#"{"event":2}"#, &[])).await;

    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.replayed());
    assert!(resent.replayed(), "the body's record answers: {resent:?}");
    assert_eq!(resent.body, first.body);
    assert!(!other_body.replayed());
    assert_eq!(probe.runs(), 2);
    assert_eq!(ctx.ledger_rows().await.unwrap_or(2), 2);
    ctx.finish().await;
}
both_stores!(with_the_body_hash_guard_a_body_resent_under_a_fresh_key_is_a_duplicate);

async fn without_the_body_hash_guard_a_body_resent_under_a_fresh_key_runs_again(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer());

    send(&app, request(Some("delivery-1"), r#"{"event":1}"#, &[])).await;
    let resent = send(&app, request(Some("delivery-2"), r#"{"event":1}"#, &[])).await;

    assert!(!resent.replayed());
    assert_eq!(probe.runs(), 2);
    ctx.finish().await;
}
both_stores!(without_the_body_hash_guard_a_body_resent_under_a_fresh_key_runs_again);

async fn a_released_claim_releases_the_body_record_with_the_key(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer().body_hash_guard(true));

    let failed = send(
        &app,
        request(Some("delivery-1"), r#"{"event":1}"#, &[("x-test-status", "500")]),
    )
    .await;
    let resent = send(&app, request(Some("delivery-2"), r#"{"event":1}"#, &[])).await;
    let again = send(&app, request(Some("delivery-1"), r#"{"event":1}"#, &[])).await;

    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(resent.status, StatusCode::OK);
    assert!(!resent.replayed(), "the failed run kept neither record: {resent:?}");
    assert!(
        again.replayed(),
        "the first key released too, and the resend's body record answers it"
    );
    assert_eq!(probe.runs(), 2);
    // The failed run's ledger row rolled back with its claim.
    assert_eq!(ctx.ledger_rows().await.unwrap_or(1), 1);
    ctx.finish().await;
}
both_stores!(a_released_claim_releases_the_body_record_with_the_key);

async fn concurrent_resends_of_one_body_under_fresh_keys_run_the_handler_once(ctx: Ctx) {
    const REQUESTS: usize = 10;
    let probe = Probe::default();
    let app = probe.app(
        ctx.layer()
            .body_hash_guard(true)
            .in_flight(InFlight::Wait(Duration::from_secs(30))),
    );
    let keys = (0..REQUESTS).map(|n| format!("delivery-{n}")).collect();
    let replies = all_at_once_behind_the_gate(&app, &probe, keys, r#"{"event":1}"#).await;

    assert!(replies.iter().all(|r| r.status == StatusCode::OK), "{replies:?}");
    assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
    assert!(replies.iter().all(|r| r.body == replies[0].body));
    assert_eq!(probe.runs(), 1);
    assert_eq!(ctx.ledger_rows().await.unwrap_or(1), 1);
    ctx.finish().await;
}
both_stores!(concurrent_resends_of_one_body_under_fresh_keys_run_the_handler_once);

async fn keys_that_look_like_sql_are_stored_byte_exact_and_replayed(ctx: Ctx) {
    let probe = Probe::default();
    let app = probe.app(ctx.layer());
    let keys = [
        "it's",
        r"back\slash\",
        r"\'); DROP TABLE idempotency_records; --",
        "$1 $2 $10",
        r"E'\\x00'",
        "ünïcødé ✓",
        "'",
    ];

    for key in keys {
        let first = send(&app, request(Some(key), "{}", &[])).await;
        let again = send(&app, request(Some(key), "{}", &[])).await;
        assert_eq!(first.status, StatusCode::OK, "{key}: {first:?}");
        assert!(again.replayed(), "{key}: {again:?}");
        assert_eq!(again.body, first.body, "{key}");
    }

    assert_eq!(probe.runs(), keys.len());
    if let Some(db) = &ctx.db {
        let stored: Vec<String> = db
            .client()
            .await
            .query("SELECT key FROM idempotency_records ORDER BY key", &[])
            .await
            .expect("the records")
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut expected: Vec<String> = keys.iter().map(|key| key.to_string()).collect();
        expected.sort();
        assert_eq!(stored, expected, "every key stored as it was sent");
    }
    ctx.finish().await;
}
both_stores!(keys_that_look_like_sql_are_stored_byte_exact_and_replayed);
