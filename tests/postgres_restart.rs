//! The Postgres server itself is stopped and started again while the
//! example receiver is under load. Every answer must be a 200 or a 503 with
//! `Retry-After` (503s are seen while the server is down), the receiver
//! recovers by itself without a restart, and every event runs exactly once.
//!
//! It runs on both drivers (`DATABASE_DRIVER=sqlx` with the `sqlx`
//! feature) from the same body, one after the other.
//!
//! Ignored by default: stopping the server breaks every other test that
//! shares it, so CI runs this alone, after `cargo test --all-features`:
//!
//! ```text
//! cargo test --all-features --test postgres_restart -- --ignored --test-threads=1
//! ```
//!
//! It controls the local cluster with `pg_ctlcluster` (Debian's
//! postgresql-common), the one `DATABASE_URL` must point at; set
//! `PG_CLUSTER` to `<version>/<name>` if `/etc/postgresql` holds several.

mod process;
mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use process::{assert_fresh_events_run_at_the_first_try, event_ids, spawn_load, with_driver, Driver, Receiver, Schema};
use support::wait_until;

const EVENTS: usize = 600;
const CONCURRENCY: usize = 8;

// Ignored: it stops the shared Postgres server; run alone (see above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared Postgres server: run alone with --ignored --test-threads=1"]
async fn a_postgres_restart_under_load_gives_only_503s_and_every_event_runs_once() {
    restart_under_load(Driver::TokioPostgres).await;
}

// Ignored: it stops the shared Postgres server; run alone (see above).
#[cfg(feature = "sqlx")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "stops the shared Postgres server: run alone with --ignored --test-threads=1"]
async fn on_sqlx_a_postgres_restart_under_load_gives_only_503s_and_every_event_runs_once() {
    restart_under_load(Driver::Sqlx).await;
}

async fn restart_under_load(driver: Driver) {
    let mut schema = Schema::new(&format!("pg_restart{}", driver.suffix())).await;
    let mut receiver = Receiver::start(&schema, &with_driver(driver, &[("DEMO_HANDLER_DELAY_MS", "10")])).await;
    let events = Arc::new(event_ids("evt_restart", EVENTS));
    let (progress, load) = spawn_load(receiver.http(), events.clone(), CONCURRENCY, Duration::from_secs(120));

    progress.reaches(EVENTS / 3, Duration::from_secs(60)).await;
    let (stopped_at, unavailable_before) = (progress.done(), progress.unavailable());
    pg_ctlcluster("stop").await;
    // The outage is seen: the receiver answers 503 while the server is down.
    wait_until(
        "the receiver answers 503s during the outage",
        Duration::from_secs(30),
        || async { progress.unavailable() >= unavailable_before + 20 },
    )
    .await;
    let done_while_down = progress.done() - stopped_at;
    pg_ctlcluster("start").await;
    let report = load.await.expect("the load");
    eprintln!(
        "answers by status: {:?}; {done_while_down} events completed between the stop command and the 20th 503",
        report.statuses
    );

    report.assert_only_200s_and_503s_and_every_event_done();
    assert!(receiver.is_running(), "the receiver recovered without a restart");
    schema.db = support::connect().await;
    assert_eq!(
        schema.events_not_run_once("stripe", &events).await,
        vec![],
        "every event ran exactly once"
    );

    // Recovered: fresh events go through at the first try.
    assert_fresh_events_run_at_the_first_try(&receiver, &schema, "evt_after_restart", 20).await;
    schema.assert_no_idle_transactions().await;
}

/// Runs `pg_ctlcluster <version> <name> <action>` off the runtime (the load
/// goes on meanwhile) and, after a start, waits until the server accepts
/// connections.
async fn pg_ctlcluster(action: &'static str) {
    tokio::task::spawn_blocking(move || pg_ctlcluster_blocking(action))
        .await
        .expect("pg_ctlcluster");
}

fn pg_ctlcluster_blocking(action: &str) {
    let cluster = std::env::var("PG_CLUSTER").ok().unwrap_or_else(|| {
        let versions: Vec<_> = std::fs::read_dir("/etc/postgresql")
            .expect("this test controls a local cluster through pg_ctlcluster: /etc/postgresql is missing")
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(
            versions.len(),
            1,
            "several clusters in /etc/postgresql: set PG_CLUSTER=<version>/<name>"
        );
        format!("{}/main", versions[0])
    });
    let (version, name) = cluster.split_once('/').expect("PG_CLUSTER is <version>/<name>");
    let mut command = Command::new("pg_ctlcluster");
    command.args(["--skip-systemctl-redirect", version, name, action]);
    if action == "stop" {
        command.args(["-m", "fast"]);
    }
    let status = command.status().expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster {action} failed: {status}");
    if action == "start" {
        let ready = (0..300).any(|_| {
            let ok = Command::new("pg_isready")
                .args(["-q", "-h", "127.0.0.1", "-p", "5432"])
                .status()
                .is_ok_and(|status| status.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        });
        assert!(ready, "Postgres did not come back within 30 s");
    }
}
