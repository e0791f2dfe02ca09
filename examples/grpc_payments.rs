//! An idempotent gRPC payments service: a retried `CreatePayment` with the
//! same `idempotency-key` metadata runs once, backed by Postgres.
//!
//! ```text
//! cargo run --release --example grpc_payments
//! cargo run --release --example grpc_payments -- --help
//! ```
//!
//! The service is `payments.v1.Payments` from `examples/proto/payments.proto`
//! (the Rust code generated from it is committed beside it, so no `protoc` is
//! needed). One `IdempotencyLayer` on the tonic server protects the unary
//! `CreatePayment` method; reflection and any other RPC pass through. Each
//! run writes one `ledger_entries` row through the request's transaction,
//! which commits together with the idempotency record. With server
//! reflection enabled, a generic client can call it:
//!
//! ```text
//! grpcurl -plaintext -H 'idempotency-key: order-42' -d '{"amount_cents": 1999, "currency": "EUR"}' \
//!     127.0.0.1:50051 payments.v1.Payments/CreatePayment
//! ```
//!
//! A replay returns the first `Payment` with `idempotent-replayed: true` in
//! its initial metadata; an in-flight duplicate is `ABORTED`, a reused key
//! with another request `FAILED_PRECONDITION`, a missing or invalid key
//! `INVALID_ARGUMENT`, an unavailable database `UNAVAILABLE`.
//!
//! On SIGTERM or Ctrl-C it stops accepting, lets in-flight calls finish for
//! up to `SHUTDOWN_GRACE_MS`, then cuts off what is left, rolls their
//! transactions back (so their retries run at once) and exits 0.

#[path = "common/mod.rs"]
mod common;

/// The code generated from `proto/payments.proto`.
#[allow(clippy::all, missing_docs, unreachable_pub)]
mod payments {
    include!("proto/payments.v1.rs");

    /// The encoded `FileDescriptorSet`, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("proto/payments_descriptor.bin");
}

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;

use common::{Demo, DEFAULT_POOL_SIZE, DEFAULT_SHUTDOWN_GRACE_MS};
use payments::payments_server::{Payments, PaymentsServer};
use payments::{CreatePaymentRequest, Payment};
use tonic::{Request, Response, Status};
use tower_idempotency::{IdempotencyLayer, IdempotencyTx, InFlight, PoolMode, RecordKey};

const DEFAULT_BIND: &str = "127.0.0.1:50051";
/// The one method the layer protects; streaming RPCs must never be listed.
const CREATE_PAYMENT: &str = "/payments.v1.Payments/CreatePayment";

fn usage() -> String {
    format!(
        "grpc_payments: an idempotent gRPC payments service backed by Postgres

Usage: grpc_payments [--help]

Service payments.v1.Payments (examples/proto/payments.proto), with server
reflection (v1 and v1alpha):
  CreatePayment   keyed by the `idempotency-key` metadata (required)

Environment (all optional; an empty value counts as unset):
  DATABASE_URL           Postgres for the idempotency records and the ledger
                         [default: {database}]
{pool_mode}  BIND                   listen address, IP:port (port 0 picks a free one)
                         [default: {DEFAULT_BIND}]
  DEMO_FAILURE_RATE      probability (0 to 1) that a call fails UNAVAILABLE
                         after writing its ledger row (rolled back) [default: 0]
  DEMO_HANDLER_DELAY_MS  how long a call sleeps after writing its ledger row
                         [default: 0]
  POOL_SIZE              database connections in the pool; every in-flight
                         protected call holds one for its duration
                         [default: {DEFAULT_POOL_SIZE}]
  SHUTDOWN_GRACE_MS      on SIGTERM or Ctrl-C, how long in-flight calls may take
                         to finish; past it they are cut off, their transactions
                         rolled back so that retries run at once, and the
                         process exits 0 [default: {DEFAULT_SHUTDOWN_GRACE_MS}]
",
        database = common::DEFAULT_DATABASE_URL,
        pool_mode = common::POOL_MODE_HELP,
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("-h" | "--help") => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Some(other) => {
            eprintln!(
                "grpc_payments: unexpected argument `{other}`; it is configured by environment variables, see --help"
            );
            return ExitCode::from(2);
        }
    }
    let settings = match Settings::from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("grpc_payments: {error}\nrun with --help for the list of settings");
            return ExitCode::from(2);
        }
    };
    // Logs go to stderr: stdout carries only the `listening on` line.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(tracing::Level::INFO)
        .init();
    match run(settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("grpc_payments: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Everything read from the environment, checked before anything starts.
struct Settings {
    database: tokio_postgres::Config,
    /// `DATABASE_POOL_MODE`.
    pool_mode: PoolMode,
    bind: SocketAddr,
    pool_size: usize,
    demo: Demo,
    shutdown_grace: std::time::Duration,
}

impl Settings {
    fn from_env() -> Result<Self, String> {
        let database = common::database_setting()?;
        Ok(Self {
            pool_mode: common::pool_mode_setting(&database)?,
            database,
            bind: common::setting("BIND", DEFAULT_BIND, |text| {
                text.parse()
                    .map_err(|_| "expected an IP address and port, such as 127.0.0.1:50051".to_owned())
            })?,
            pool_size: common::setting("POOL_SIZE", DEFAULT_POOL_SIZE, common::positive)?,
            demo: Demo::from_env()?,
            shutdown_grace: common::shutdown_grace_setting()?,
        })
    }
}

async fn run(settings: Settings) -> Result<(), String> {
    let target = common::describe_database(&settings.database);
    let pool_mode = settings.pool_mode;
    let pool = common::connection_pool(settings.database, settings.pool_size, pool_mode)?;
    let unusable = |error: &dyn std::error::Error| {
        format!(
            "cannot use the database {target} named by DATABASE_URL: {}",
            common::error_chain(error)
        )
    };
    let store = common::postgres_store(pool.clone(), pool_mode);
    store.migrate().await.map_err(|error| unusable(&error))?;
    common::create_ledger(&pool, pool_mode)
        .await
        .map_err(|error| unusable(&*error))?;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(payments::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|error| format!("cannot build reflection: {error}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(payments::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|error| format!("cannot build reflection: {error}"))?;
    let idempotency = IdempotencyLayer::new(store)
        .source("grpc")
        .grpc_unary_methods([CREATE_PAYMENT])
        .in_flight(InFlight::Conflict);
    let shutdown = idempotency.shutdown_handle();

    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .map_err(|error| format!("cannot listen on BIND={}: {error}", settings.bind))?;
    let address = listener
        .local_addr()
        .map_err(|error| format!("cannot read the bound address: {error}"))?;
    println!(
        "listening on {address} ({})",
        common::pool_summary(settings.pool_size, pool_mode)
    );
    std::io::stdout()
        .flush()
        .map_err(|error| format!("cannot write to stdout: {error}"))?;

    let server = tonic::transport::Server::builder()
        .layer(idempotency)
        .add_service(PaymentsServer::new(PaymentsService {
            demo: settings.demo,
            pool_mode,
        }))
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let serve = |stop| server.serve_with_incoming_shutdown(incoming, stop);
    common::serve_until_shutdown(serve, &shutdown, settings.shutdown_grace)
        .await
        .map_err(|error| format!("server error: {error}"))
}

struct PaymentsService {
    demo: Demo,
    pool_mode: PoolMode,
}

#[tonic::async_trait]
impl Payments for PaymentsService {
    async fn create_payment(&self, request: Request<CreatePaymentRequest>) -> Result<Response<Payment>, Status> {
        // The layer hands over the key it claimed and the transaction that
        // will commit the record.
        let record = request.extensions().get::<RecordKey>().cloned();
        let transaction = request.extensions().get::<IdempotencyTx>().cloned();
        let (Some(record), Some(transaction)) = (record, transaction) else {
            return Err(Status::internal("the idempotency layer is not in front of this method"));
        };
        let tx = transaction
            .lock()
            .await
            .map_err(|error| Status::internal(error.to_string()))?;
        let payment = request.into_inner();
        let ledger_entry_id =
            common::insert_ledger_entry(&tx, self.pool_mode, "grpc", record.key(), "", payment.amount_cents)
                .await
                .map_err(|error| Status::unavailable(format!("database error: {error}")))?;
        if self.demo.after_write().await {
            // Not OK: the layer rolls the ledger row back with the claim.
            return Err(Status::unavailable("injected failure (DEMO_FAILURE_RATE)"));
        }
        Ok(Response::new(Payment {
            ledger_entry_id,
            amount_cents: payment.amount_cents,
            currency: payment.currency,
        }))
    }
}
