//! The examples' gRPC payments service (`examples/proto/payments.proto`, its
//! generated code committed beside it), a client and the requests the tests
//! send: included with `mod payments;` by the test files that speak gRPC.
#![allow(dead_code)]

use std::net::SocketAddr;

use tonic::transport::Channel;
use tonic::Request;

#[allow(clippy::all, missing_docs, unreachable_pub, dead_code)]
mod generated {
    include!("../../examples/proto/payments.v1.rs");
}

pub use generated::*;

use payments_client::PaymentsClient;

/// A client of the payments service at `address`.
pub async fn client(address: SocketAddr) -> PaymentsClient<Channel> {
    PaymentsClient::connect(format!("http://{address}"))
        .await
        .expect("connect to the payments service")
}

/// A payment in euros, with an `idempotency-key` if `key` is given.
pub fn payment(key: Option<&str>, amount_cents: i64) -> Request<CreatePaymentRequest> {
    let mut request = Request::new(CreatePaymentRequest {
        amount_cents,
        currency: "EUR".into(),
    });
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().expect("an ASCII key"));
    }
    request
}
