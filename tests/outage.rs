//! Database outages under load, against the example receiver as a real
//! process: its Postgres sessions are terminated (`pg_terminate_backend`)
//! again and again while deliveries are in flight. Every answer must be a
//! 200 or a 503 with `Retry-After` (never a 500, never a hung or dropped
//! connection), the receiver recovers by itself without a restart, and every
//! event runs exactly once.
//!
//! The same outage also hits the receiver behind PgBouncer in transaction
//! mode, where the terminated sessions are PgBouncer's server connections.
//!
//! It runs on both drivers (`DATABASE_DRIVER=sqlx` with the `sqlx`
//! feature) from the same body.
//!
//! The restart of the Postgres server itself is in `postgres_restart.rs`,
//! which runs alone (see the README's "Testing and CI").

mod process;
mod support;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use process::{assert_fresh_events_run_at_the_first_try, event_ids, spawn_load, with_driver, Driver, Receiver, Schema};

const EVENTS: usize = 600;
const CONCURRENCY: usize = 8;
const TERMINATIONS: usize = 5;

#[tokio::test]
async fn terminated_database_sessions_under_load_give_only_503s_and_every_event_runs_once() {
    terminated_sessions_under_load(Driver::TokioPostgres, Schema::new("outage_terminate").await).await;
}

#[tokio::test]
async fn terminated_server_sessions_behind_pgbouncer_give_only_503s_and_every_event_runs_once() {
    let schema = Schema::behind_pgbouncer("outage_pgbouncer").await;
    terminated_sessions_under_load(Driver::TokioPostgres, schema).await;
}

#[cfg(feature = "sqlx")]
#[tokio::test]
async fn on_sqlx_terminated_database_sessions_under_load_give_only_503s_and_every_event_runs_once() {
    terminated_sessions_under_load(Driver::Sqlx, Schema::new("outage_terminate_sqlx").await).await;
}

#[cfg(feature = "sqlx")]
#[tokio::test]
async fn on_sqlx_terminated_server_sessions_behind_pgbouncer_give_only_503s_and_every_event_runs_once() {
    let schema = Schema::behind_pgbouncer("outage_pgbouncer_sqlx").await;
    terminated_sessions_under_load(Driver::Sqlx, schema).await;
}

async fn terminated_sessions_under_load(driver: Driver, schema: Schema) {
    // A short delay keeps transactions open, so that terminations land in
    // the middle of handlers and commits as well as on idle connections.
    let mut receiver = Receiver::start(&schema, &with_driver(driver, &[("DEMO_HANDLER_DELAY_MS", "10")])).await;
    let events = Arc::new(event_ids("evt_outage", EVENTS));
    let (progress, load) = spawn_load(receiver.http(), events.clone(), CONCURRENCY, Duration::from_secs(60));

    let mut terminated = 0;
    for round in 1..=TERMINATIONS {
        progress
            .reaches(EVENTS * round / (TERMINATIONS + 1), Duration::from_secs(60))
            .await;
        terminated += schema.terminate_sessions().await;
    }
    let report = load.await.expect("the load");
    eprintln!(
        "terminated {terminated} sessions; answers by status: {:?}",
        report.statuses
    );

    assert!(terminated > 0, "the outage must have hit some sessions");
    report.assert_only_200s_and_503s_and_every_event_done();
    assert_eq!(
        schema.events_not_run_once("stripe", &events).await,
        vec![],
        "every event ran exactly once"
    );
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.idempotency_records WHERE source = 'stripe' AND state = 2")
            .await,
        EVENTS as i64
    );

    // Recovered without a restart: a fresh round of events goes through at
    // the first try, and /healthz is green.
    assert_fresh_events_run_at_the_first_try(&receiver, &schema, "evt_after", 20).await;
    let health = receiver.get("/healthz").await;
    assert_eq!(health.status, StatusCode::OK, "{health:?}");
    assert!(receiver.is_running(), "the receiver recovered without a restart");
    schema.assert_no_idle_transactions().await;
}
