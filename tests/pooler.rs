//! The example servers behind PgBouncer in transaction mode, black box:
//! each test starts the compiled example with `DATABASE_POOL_MODE=transaction`
//! and a `DATABASE_URL` that reaches Postgres through PgBouncer (as a role
//! of the test's own, see `tests/support/pgbouncer.rs`), drives it with
//! concurrent requests, and reads the database directly afterwards.
//!
//! PgBouncer is `PGBOUNCER_URL`'s, or one the tests start from Debian's
//! `pgbouncer` package. `cargo test` builds the examples first; a filtered
//! run does not: `cargo build --examples && cargo test --test pooler`.

mod payments;
mod process;
mod support;

use futures_util::future::join_all;
use http::StatusCode;
use process::{run_to_exit, stripe_event, Receiver, Reply, Schema};
use support::signing::{stripe_signature, unix_now, INVALID_SIGNATURE};
use tokio::sync::Barrier;

/// Concurrent requests per burst: four times the example's pool of 8, so
/// that the deliveries queue for connections and PgBouncer hands each
/// transaction to whichever server connection is free.
const CONCURRENCY: usize = 32;

const STRIPE_SECRET: &str = "whsec_pooler_stripe_secret";

async fn start(name: &str, settings: &[(&str, &str)]) -> (Schema, Receiver) {
    let schema = Schema::behind_pgbouncer(name).await;
    let receiver = Receiver::start(&schema, settings).await;
    (schema, receiver)
}

/// Sends `count` requests at once (released together by a barrier) and
/// returns their answers in order.
async fn burst<F, Fut>(count: usize, send: F) -> Vec<Reply>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Reply> + Send + 'static,
{
    let barrier = std::sync::Arc::new(Barrier::new(count));
    let tasks: Vec<_> = (0..count)
        .map(|n| {
            let barrier = barrier.clone();
            let request = send(n);
            tokio::spawn(async move {
                barrier.wait().await;
                request.await
            })
        })
        .collect();
    join_all(tasks)
        .await
        .into_iter()
        .map(|reply| reply.expect("a request task"))
        .collect()
}

fn deliver(receiver: &Receiver, body: String) -> impl std::future::Future<Output = Reply> + Send + 'static {
    let http = receiver.http();
    async move {
        http.post("/webhooks/stripe", &[], body)
            .await
            .unwrap_or_else(|error| panic!("no answer: {error}"))
    }
}

#[tokio::test]
async fn concurrent_duplicates_of_one_event_write_one_ledger_row_and_replay_it() {
    let (schema, receiver) = start("pgb_duplicates", &[("DEMO_HANDLER_DELAY_MS", "20")]).await;
    let event = stripe_event("evt_pgb_dup", "charge.succeeded", 1234);

    let replies = burst(CONCURRENCY, |_| deliver(&receiver, event.clone())).await;

    assert!(
        replies.iter().all(|reply| reply.status == StatusCode::OK),
        "every duplicate gets the 200: {replies:?}"
    );
    assert_eq!(
        replies.iter().filter(|reply| !reply.replayed()).count(),
        1,
        "one first answer, every other one a replay: {replies:?}"
    );
    assert!(
        replies.iter().all(|reply| reply.body == replies[0].body),
        "every answer is the first's, byte for byte"
    );
    assert_eq!(schema.ledger_rows_for("stripe", "evt_pgb_dup").await, 1);
    let first_row = schema.count("SELECT max(id) FROM {schema}.ledger_entries").await;
    assert_eq!(replies[0].json()["ledger_entry_id"], first_row);
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.idempotency_records WHERE state = 2")
            .await,
        1
    );
    // And later duplicates, one at a time, replay it too.
    let late = receiver.post("/webhooks/stripe", &[], event).await;
    assert!(late.replayed(), "{late:?}");
    assert_eq!(late.body, replies[0].body);
    schema.assert_no_idle_transactions().await;
}

#[tokio::test]
async fn distinct_concurrent_events_each_write_one_ledger_row() {
    let (schema, receiver) = start("pgb_distinct", &[]).await;
    let events: Vec<String> = (0..2 * CONCURRENCY).map(|n| format!("evt_pgb_{n}")).collect();

    let replies = burst(events.len(), |n| {
        deliver(&receiver, stripe_event(&events[n], "charge.succeeded", n as i64))
    })
    .await;

    assert!(
        replies
            .iter()
            .all(|reply| reply.status == StatusCode::OK && !reply.replayed()),
        "every event runs, at the first try: {replies:?}"
    );
    assert_eq!(schema.events_not_run_once("stripe", &events).await, vec![]);
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.idempotency_records WHERE source = 'stripe' AND state = 2")
            .await,
        events.len() as i64
    );
    // A second round of the same events is all replays.
    let replays = burst(events.len(), |n| {
        deliver(&receiver, stripe_event(&events[n], "charge.succeeded", n as i64))
    })
    .await;
    for (reply, first) in replays.iter().zip(&replies) {
        assert!(reply.replayed(), "{reply:?}");
        assert_eq!(reply.body, first.body);
    }
    assert_eq!(schema.events_not_run_once("stripe", &events).await, vec![]);
    schema.assert_no_idle_transactions().await;
}

#[tokio::test]
async fn concurrent_payments_with_one_key_run_once_and_the_rest_conflict_or_replay() {
    let (schema, receiver) = start("pgb_payments", &[("DEMO_HANDLER_DELAY_MS", "20")]).await;

    let replies = burst(CONCURRENCY, |_| {
        let http = receiver.http();
        async move {
            http.post("/payments", &[("Idempotency-Key", "order-pgb")], r#"{"amount":1999}"#)
                .await
                .unwrap_or_else(|error| panic!("no answer: {error}"))
        }
    })
    .await;

    let created: Vec<_> = replies
        .iter()
        .filter(|reply| reply.status == StatusCode::CREATED)
        .collect();
    assert!(
        replies
            .iter()
            .all(|reply| reply.status == StatusCode::CREATED || reply.status == StatusCode::CONFLICT),
        "{replies:?}"
    );
    assert_eq!(
        created.iter().filter(|reply| !reply.replayed()).count(),
        1,
        "{replies:?}"
    );
    assert!(created.iter().all(|reply| reply.body == created[0].body));
    assert_eq!(schema.ledger_rows_for("payments", "order-pgb").await, 1);

    let reused = receiver
        .post("/payments", &[("Idempotency-Key", "order-pgb")], r#"{"amount":2500}"#)
        .await;
    reused.assert_problem(StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(schema.ledger_rows_for("payments", "order-pgb").await, 1);
}

#[tokio::test]
async fn refused_requests_write_nothing_behind_pgbouncer() {
    let (schema, receiver) = start(
        "pgb_refused",
        &[("STRIPE_WEBHOOK_SECRET", STRIPE_SECRET), ("MAX_BODY_BYTES", "4096")],
    )
    .await;
    let event = stripe_event("evt_pgb_signed", "charge.succeeded", 700);
    let signature = |body: &str| stripe_signature(STRIPE_SECRET, unix_now(), body);

    let forged = receiver
        .post_with(
            "/webhooks/stripe",
            &[("Stripe-Signature", stripe_signature("whsec_wrong", unix_now(), &event))],
            event.clone(),
        )
        .await;
    let malformed_body = "{not json";
    let malformed = receiver
        .post_with(
            "/webhooks/stripe",
            &[("Stripe-Signature", signature(malformed_body))],
            malformed_body,
        )
        .await;
    let keyless_body = r#"{"type":"charge.succeeded"}"#;
    let keyless = receiver
        .post_with(
            "/webhooks/stripe",
            &[("Stripe-Signature", signature(keyless_body))],
            keyless_body,
        )
        .await;
    let too_large = receiver
        .post("/payments", &[("Idempotency-Key", "big")], "x".repeat(8192))
        .await;
    let signed = receiver
        .post_with("/webhooks/stripe", &[("Stripe-Signature", signature(&event))], event)
        .await;

    assert_eq!(forged.status, StatusCode::UNAUTHORIZED, "{forged:?}");
    assert_eq!(forged.json()["type"], INVALID_SIGNATURE);
    malformed.assert_problem(StatusCode::BAD_REQUEST);
    keyless.assert_problem(StatusCode::BAD_REQUEST);
    too_large.assert_problem(StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(signed.status, StatusCode::OK, "{signed:?}");
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.ledger_entries").await,
        1,
        "only the signed delivery wrote a row"
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.idempotency_records").await,
        1
    );
}

#[tokio::test]
async fn out_of_order_payment_events_leave_the_furthest_state_behind_pgbouncer() {
    let (schema, receiver) = start("pgb_ordering", &[]).await;
    let event = |id: &str, status: &str| {
        serde_json::json!({
            "id": id,
            "type": format!("payment_intent.{status}"),
            "data": {"object": {"id": "pi_pgb", "amount": 100}},
        })
        .to_string()
    };
    // Every state at once, many times over: the terminal one must win,
    // whatever order the transactions commit in.
    let statuses = ["created", "processing", "succeeded", "processing", "created"];
    let replies = burst(CONCURRENCY, |n| {
        let status = statuses[n % statuses.len()];
        deliver(&receiver, event(&format!("evt_pgb_pi_{n}"), status))
    })
    .await;
    assert!(
        replies.iter().all(|reply| reply.status == StatusCode::OK),
        "{replies:?}"
    );
    let late = receiver
        .post("/webhooks/stripe", &[], event("evt_pgb_pi_late", "processing"))
        .await;
    assert_eq!(late.status, StatusCode::OK, "{late:?}");
    assert_eq!(
        schema.payment_states().await,
        vec![("pi_pgb".to_owned(), "succeeded".to_owned())]
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.ledger_entries").await,
        CONCURRENCY as i64 + 1,
        "every event wrote its row"
    );
}

#[tokio::test]
async fn lease_mode_behind_pgbouncer_runs_each_event_once() {
    let (schema, receiver) = start("pgb_lease", &[("RECORD_MODE", "lease"), ("LEASE_SECS", "30")]).await;
    let events: Vec<String> = (0..CONCURRENCY).map(|n| format!("evt_pgb_lease_{n}")).collect();

    let replies = burst(2 * CONCURRENCY, |n| {
        deliver(&receiver, stripe_event(&events[n % CONCURRENCY], "charge.succeeded", 1))
    })
    .await;

    assert!(
        replies.iter().all(|reply| reply.status == StatusCode::OK),
        "{replies:?}"
    );
    assert_eq!(schema.events_not_run_once("stripe", &events).await, vec![]);
}

#[tokio::test]
async fn healthz_answers_through_pgbouncer() {
    let (_schema, receiver) = start("pgb_healthz", &[]).await;
    let health = receiver.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "{health:?}");
}

#[tokio::test]
async fn grpc_payments_behind_pgbouncer_runs_a_retried_payment_once() {
    let schema = Schema::behind_pgbouncer("pgb_grpc").await;
    let receiver = Receiver::start_example("grpc_payments", &schema, &[]).await;
    let barrier = std::sync::Arc::new(Barrier::new(CONCURRENCY));
    let calls: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (barrier, address) = (barrier.clone(), receiver.address);
            tokio::spawn(async move {
                let mut client = payments::client(address).await;
                barrier.wait().await;
                client
                    .create_payment(payments::payment(Some("order-pgb-grpc"), 1999))
                    .await
            })
        })
        .collect();
    let answers: Vec<_> = join_all(calls)
        .await
        .into_iter()
        .map(|call| call.expect("a call"))
        .collect();

    let ok: Vec<_> = answers.iter().filter_map(|answer| answer.as_ref().ok()).collect();
    assert!(!ok.is_empty(), "{answers:?}");
    assert!(
        answers.iter().all(|answer| answer
            .as_ref()
            .map_or_else(|status| status.code() == tonic::Code::Aborted, |_| true)),
        "the others are in flight (ABORTED): {answers:?}"
    );
    assert!(ok.iter().all(|payment| payment.get_ref() == ok[0].get_ref()));
    let replay = payments::client(receiver.address)
        .await
        .create_payment(payments::payment(Some("order-pgb-grpc"), 1999))
        .await
        .expect("the replay");
    assert_eq!(replay.get_ref(), ok[0].get_ref());
    assert_eq!(schema.ledger_rows_for("grpc", "order-pgb-grpc").await, 1);
}

/// Session pool mode adds the statement timeout as a startup option, which
/// PgBouncer refuses: the example stops at once, saying what to set.
#[tokio::test]
async fn session_pool_mode_through_pgbouncer_stops_naming_database_pool_mode() {
    let schema = Schema::behind_pgbouncer("pgb_session").await;
    let output = run_to_exit(
        "webhook_receiver",
        &[],
        &[
            ("DATABASE_URL", schema.database_url().as_str()),
            ("DATABASE_POOL_MODE", "session"),
        ],
    )
    .await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("unsupported startup parameter: options"), "{stderr}");
    assert!(stderr.contains("DATABASE_POOL_MODE=transaction"), "{stderr}");
    assert!(!stderr.contains("panicked at"), "{stderr}");
}

#[tokio::test]
async fn database_pool_mode_is_checked_before_anything_starts() {
    for example in ["webhook_receiver", "grpc_payments"] {
        let stderr = process::assert_setting_refused(example, "DATABASE_POOL_MODE", "pgbouncer").await;
        assert!(stderr.contains("`session` or `transaction`"), "{stderr}");
        // A transaction-mode pooler refuses `options`, or drops what they set.
        let output = run_to_exit(
            example,
            &[],
            &[
                (
                    "DATABASE_URL",
                    "postgres://postgres@127.0.0.1:6432/postgres?options=-csearch_path%3Dapp",
                ),
                ("DATABASE_POOL_MODE", "transaction"),
            ],
        )
        .await;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{example}: {stderr}");
        assert!(stderr.contains("options"), "{example}: {stderr}");
        assert!(stderr.contains("DATABASE_POOL_MODE"), "{example}: {stderr}");
    }
}

#[tokio::test]
async fn help_documents_database_pool_mode() {
    for example in ["webhook_receiver", "grpc_payments"] {
        let help = process::help(example).await;
        assert!(help.contains("DATABASE_POOL_MODE"), "{example}: {help}");
        assert!(help.contains("[default: session]"), "{example}: {help}");
    }
}
