//! Black-box tests of `examples/grpc_payments.rs`: the compiled example runs
//! as a child process on a schema of its own and a generated tonic client
//! calls it, as a client in any language would.

mod payments;
mod process;
mod support;

use payments::payment;
use process::{Receiver, Schema};
use tonic::Code;

async fn start(name: &str, settings: &[(&str, &str)]) -> (Schema, Receiver) {
    process::start_on_a_new_schema("grpc_payments", name, settings).await
}

#[tokio::test]
async fn a_retried_payment_runs_once_and_replays_the_first_answer() {
    let (schema, receiver) = start("grpc_example_replay", &[]).await;
    let mut client = payments::client(receiver.address).await;

    let first = client.create_payment(payment(Some("order-1"), 1999)).await.unwrap();
    let replay = client.create_payment(payment(Some("order-1"), 1999)).await.unwrap();

    assert_eq!(first.get_ref().amount_cents, 1999);
    assert_eq!(first.get_ref().currency, "EUR");
    assert!(first.metadata().get("idempotent-replayed").is_none());
    assert_eq!(replay.get_ref(), first.get_ref());
    assert_eq!(
        replay
            .metadata()
            .get("idempotent-replayed")
            .map(|v| v.to_str().unwrap()),
        Some("true")
    );
    assert_eq!(schema.ledger_rows_for("grpc", "order-1").await, 1);
    let row_id = schema.count("SELECT max(id) FROM {schema}.ledger_entries").await;
    assert_eq!(first.get_ref().ledger_entry_id, row_id);
}

#[tokio::test]
async fn refused_payments_write_nothing() {
    let (schema, receiver) = start("grpc_example_refused", &[]).await;
    let mut client = payments::client(receiver.address).await;
    client.create_payment(payment(Some("order-1"), 1999)).await.unwrap();

    let mismatch = client.create_payment(payment(Some("order-1"), 2500)).await.unwrap_err();
    let missing = client.create_payment(payment(None, 1)).await.unwrap_err();
    let too_long = client
        .create_payment(payment(Some(&"k".repeat(256)), 1))
        .await
        .unwrap_err();

    assert_eq!(mismatch.code(), Code::FailedPrecondition);
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.ledger_entries").await,
        1,
        "refusals write nothing"
    );
}

#[tokio::test]
async fn an_injected_failure_is_unavailable_and_rolls_the_ledger_row_back() {
    let (schema, receiver) = start("grpc_example_failure", &[("DEMO_FAILURE_RATE", "1")]).await;

    let failed = payments::client(receiver.address)
        .await
        .create_payment(payment(Some("order-2"), 5))
        .await
        .unwrap_err();

    assert_eq!(failed.code(), Code::Unavailable);
    assert_eq!(schema.count("SELECT count(*) FROM {schema}.ledger_entries").await, 0);
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.idempotency_records").await,
        0
    );
}
