//! The examples shut down gracefully: on SIGTERM or Ctrl-C they stop
//! accepting, let in-flight handlers finish up to `SHUTDOWN_GRACE_MS`, cut
//! off what is left and release its claims, and exit 0. Each test signals a
//! real child process while a handler sleeps (`DEMO_HANDLER_DELAY_MS`),
//! then restarts it and redelivers the event.
//!
//! Synchronisation is by observation only: the signal is sent once Postgres
//! shows the handler's ledger write (its session idle in the request's
//! transaction after the `INSERT`, or the committed row and claim in lease
//! mode).

mod payments;
mod process;
mod support;

use std::time::Duration;

use http::StatusCode;
use payments::payment;
use process::{Receiver, Schema, REQUEST_TIMEOUT};
use support::wait_until;

const OBSERVE: Duration = Duration::from_secs(20);
/// A handler delay the grace period easily covers, yet long enough for the
/// signal to land while the handler sleeps.
const SHORT_DELAY_MS: &str = "2000";
const LONG_GRACE_MS: &str = "60000";
/// A handler that would outlive any test, and a grace that cuts it off.
const ENDLESS_DELAY_MS: &str = "600000";
const SHORT_GRACE_MS: &str = "500";
/// How long a process cut off after [`SHORT_GRACE_MS`] may take to exit:
/// generous, yet well below the clients' own 30 s timeout, whose giving up
/// would close the connection and let a server that waits for it exit too.
const PROMPT_EXIT: Duration = Duration::from_secs(10);

async fn records(schema: &Schema, key: &str, state: i16) -> i64 {
    let sql = format!(
        "SELECT count(*) FROM {}.idempotency_records WHERE key = $1 AND state = $2",
        schema.name
    );
    schema
        .db
        .query_one(&sql, &[&key, &state])
        .await
        .expect("idempotency_records")
        .get(0)
}

#[tokio::test]
async fn on_sigterm_a_handler_within_the_grace_finishes_and_commits_and_the_process_exits_0() {
    let schema = Schema::new("shutdown_in_grace").await;
    let settings = [
        ("DEMO_HANDLER_DELAY_MS", SHORT_DELAY_MS),
        ("SHUTDOWN_GRACE_MS", LONG_GRACE_MS),
    ];
    let receiver = Receiver::start(&schema, &settings).await;
    let http = receiver.http();
    let delivery = tokio::spawn(async move { http.deliver("evt_graceful").await });
    schema.wait_for_the_ledger_write(OBSERVE).await;

    let exit = receiver.stop_with("TERM", REQUEST_TIMEOUT).await;

    assert!(exit.success(), "{exit:?}");
    let answer = delivery.await.expect("the delivery task").expect("an answer");
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(records(&schema, "evt_graceful", 2).await, 1, "committed");
    let receiver = Receiver::start(&schema, &[]).await;
    let redelivered = receiver.deliver("evt_graceful").await;
    assert!(redelivered.replayed(), "{redelivered:?}");
    assert_eq!(redelivered.body, answer.body);
    assert_eq!(schema.ledger_rows_for("stripe", "evt_graceful").await, 1);
}

#[tokio::test]
async fn on_sigterm_past_the_grace_the_handler_is_rolled_back_and_its_redelivery_runs_at_once() {
    let schema = Schema::new("shutdown_cut_off_tx").await;
    let settings = [
        ("DEMO_HANDLER_DELAY_MS", ENDLESS_DELAY_MS),
        ("SHUTDOWN_GRACE_MS", SHORT_GRACE_MS),
    ];
    let receiver = Receiver::start(&schema, &settings).await;
    let http = receiver.http();
    let delivery = tokio::spawn(async move { http.deliver("evt_cut_off").await });
    schema.wait_for_the_ledger_write(OBSERVE).await;

    // Far below the handler's delay: the process does not wait for it.
    let exit = receiver.stop_with("TERM", PROMPT_EXIT).await;

    assert!(exit.success(), "{exit:?}");
    let answer = delivery.await.expect("the delivery task");
    assert!(
        answer.as_ref().map_or(true, |reply| reply.status != StatusCode::OK),
        "the cut-off delivery cannot have succeeded: {answer:?}"
    );
    assert_eq!(schema.ledger_rows_for("stripe", "evt_cut_off").await, 0, "rolled back");
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.idempotency_records").await,
        0
    );
    let receiver = Receiver::start(&schema, &[]).await;
    let redelivered = receiver.deliver("evt_cut_off").await;
    assert_eq!(redelivered.status, StatusCode::OK, "{redelivered:?}");
    assert!(!redelivered.replayed());
    assert_eq!(schema.ledger_rows_for("stripe", "evt_cut_off").await, 1);
}

#[tokio::test]
async fn in_lease_mode_past_the_grace_the_claim_is_deleted_and_the_redelivery_is_not_blocked_by_its_lease() {
    let schema = Schema::new("shutdown_cut_off_lease").await;
    let lease = [("RECORD_MODE", "lease"), ("LEASE_SECS", "600")];
    let mut settings = lease.to_vec();
    settings.extend([
        ("DEMO_HANDLER_DELAY_MS", ENDLESS_DELAY_MS),
        ("SHUTDOWN_GRACE_MS", SHORT_GRACE_MS),
    ]);
    let receiver = Receiver::start(&schema, &settings).await;
    let http = receiver.http();
    let delivery = tokio::spawn(async move { http.deliver("evt_leased").await });
    wait_until(
        "the claim and the handler's ledger row are committed",
        OBSERVE,
        || async {
            schema.ledger_rows_for("stripe", "evt_leased").await == 1 && records(&schema, "evt_leased", 1).await == 1
        },
    )
    .await;

    let exit = receiver.stop_with("TERM", PROMPT_EXIT).await;

    assert!(exit.success(), "{exit:?}");
    let _ = delivery.await.expect("the delivery task");
    assert_eq!(records(&schema, "evt_leased", 1).await, 0, "the claim was deleted");
    // The webhook route would wait 10 s for a claim left to its 600 s
    // lease, then answer 409.
    let receiver = Receiver::start(&schema, &lease).await;
    let redelivered = receiver.deliver("evt_leased").await;
    assert_eq!(redelivered.status, StatusCode::OK, "{redelivered:?}");
    assert!(!redelivered.replayed());
    assert_eq!(
        schema.ledger_rows_for("stripe", "evt_leased").await,
        2,
        "lease mode is at-least-once: the cut-off run's row stays and the redelivery runs again"
    );
}

#[tokio::test]
async fn on_ctrl_c_a_grpc_call_within_the_grace_finishes_and_commits() {
    let schema = Schema::new("grpc_shutdown_in_grace").await;
    let settings = [
        ("DEMO_HANDLER_DELAY_MS", SHORT_DELAY_MS),
        ("SHUTDOWN_GRACE_MS", LONG_GRACE_MS),
    ];
    let receiver = Receiver::start_example("grpc_payments", &schema, &settings).await;
    let mut client = payments::client(receiver.address).await;
    let call = tokio::spawn(async move { client.create_payment(payment(Some("order-graceful"), 700)).await });
    schema.wait_for_the_ledger_write(OBSERVE).await;

    let exit = receiver.stop_with("INT", REQUEST_TIMEOUT).await;

    assert!(exit.success(), "{exit:?}");
    let first = call.await.expect("the call task").expect("the call succeeds");
    assert_eq!(schema.ledger_rows_for("grpc", "order-graceful").await, 1);
    let receiver = Receiver::start_example("grpc_payments", &schema, &[]).await;
    let replay = payments::client(receiver.address)
        .await
        .create_payment(payment(Some("order-graceful"), 700))
        .await
        .expect("the retry");
    assert_eq!(replay.get_ref(), first.get_ref());
    assert_eq!(
        replay
            .metadata()
            .get("idempotent-replayed")
            .and_then(|v| v.to_str().ok()),
        Some("true")
    );
    assert_eq!(schema.ledger_rows_for("grpc", "order-graceful").await, 1);
}

#[tokio::test]
async fn on_ctrl_c_a_grpc_call_past_the_grace_is_rolled_back_and_its_retry_runs_at_once() {
    let schema = Schema::new("grpc_shutdown_cut_off").await;
    let settings = [
        ("DEMO_HANDLER_DELAY_MS", ENDLESS_DELAY_MS),
        ("SHUTDOWN_GRACE_MS", SHORT_GRACE_MS),
    ];
    let receiver = Receiver::start_example("grpc_payments", &schema, &settings).await;
    let mut client = payments::client(receiver.address).await;
    let call = tokio::spawn(async move { client.create_payment(payment(Some("order-cut-off"), 700)).await });
    schema.wait_for_the_ledger_write(OBSERVE).await;

    let exit = receiver.stop_with("INT", PROMPT_EXIT).await;

    assert!(exit.success(), "{exit:?}");
    assert!(
        call.await.expect("the call task").is_err(),
        "the cut-off call cannot have succeeded"
    );
    assert_eq!(schema.ledger_rows_for("grpc", "order-cut-off").await, 0, "rolled back");
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.idempotency_records").await,
        0
    );
    let receiver = Receiver::start_example("grpc_payments", &schema, &[]).await;
    let retried = payments::client(receiver.address)
        .await
        .create_payment(payment(Some("order-cut-off"), 700))
        .await
        .expect("the retry runs");
    assert!(retried.metadata().get("idempotent-replayed").is_none());
    assert_eq!(schema.ledger_rows_for("grpc", "order-cut-off").await, 1);
}

#[tokio::test]
async fn the_shutdown_grace_setting_is_documented_with_its_default() {
    for example in ["webhook_receiver", "grpc_payments"] {
        let help = process::help(example).await;
        let setting = help
            .split_once("SHUTDOWN_GRACE_MS")
            .map(|(_, rest)| rest.split("[default:").nth(1).unwrap_or_default())
            .unwrap_or_else(|| panic!("{example} --help shows SHUTDOWN_GRACE_MS: {help}"));
        assert!(setting.starts_with(" 10000]"), "{example} --help: {help}");
    }
}

#[tokio::test]
async fn an_invalid_shutdown_grace_exits_with_code_2() {
    for example in ["webhook_receiver", "grpc_payments"] {
        process::assert_setting_refused(example, "SHUTDOWN_GRACE_MS", "soon").await;
    }
}
