//! Black-box tests of `examples/grpc_payments.rs`: the compiled example runs
//! as a child process on a schema of its own and a generated tonic client
//! calls it, as a client in any language would.

mod process;
mod support;

use process::{Receiver, Schema};
use tonic::transport::Channel;
use tonic::{Code, Request};

#[allow(clippy::all, missing_docs, unreachable_pub, dead_code)]
mod payments {
    include!("../examples/proto/payments.v1.rs");
}

use payments::payments_client::PaymentsClient;
use payments::CreatePaymentRequest;

async fn client(receiver: &Receiver) -> PaymentsClient<Channel> {
    PaymentsClient::connect(format!("http://{}", receiver.address))
        .await
        .expect("connect to the example")
}

fn payment(key: Option<&str>, amount_cents: i64) -> Request<CreatePaymentRequest> {
    let mut request = Request::new(CreatePaymentRequest {
        amount_cents,
        currency: "EUR".into(),
    });
    if let Some(key) = key {
        request.metadata_mut().insert("idempotency-key", key.parse().unwrap());
    }
    request
}

#[tokio::test]
async fn a_retried_payment_runs_once_and_replays_the_first_answer() {
    let schema = Schema::new("grpc_example_replay").await;
    let receiver = Receiver::start_example("grpc_payments", &schema, &[]).await;
    let mut client = client(&receiver).await;

    let first = client.create_payment(payment(Some("order-1"), 1999)).await.unwrap();
    let replay = client.create_payment(payment(Some("order-1"), 1999)).await.unwrap();
    let mismatch = client.create_payment(payment(Some("order-1"), 2500)).await.unwrap_err();
    let missing = client.create_payment(payment(None, 1)).await.unwrap_err();
    let too_long = client
        .create_payment(payment(Some(&"k".repeat(256)), 1))
        .await
        .unwrap_err();

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
    assert_eq!(mismatch.code(), Code::FailedPrecondition);
    assert_eq!(missing.code(), Code::InvalidArgument);
    assert_eq!(too_long.code(), Code::InvalidArgument);
    assert_eq!(schema.ledger_rows_for("grpc", "order-1").await, 1);
    let row_id = schema.count("SELECT max(id) FROM {schema}.ledger_entries").await;
    assert_eq!(first.get_ref().ledger_entry_id, row_id);
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.ledger_entries").await,
        1,
        "refusals write nothing"
    );
}

#[tokio::test]
async fn an_injected_failure_is_unavailable_and_rolls_the_ledger_row_back() {
    let schema = Schema::new("grpc_example_failure").await;
    let receiver = Receiver::start_example("grpc_payments", &schema, &[("DEMO_FAILURE_RATE", "1")]).await;

    let failed = client(&receiver)
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
