//! Crash tests against real processes: the example receiver is SIGKILLed in
//! the middle of a handler (after it wrote its ledger row, before it
//! answered), restarted, and the event redelivered.
//!
//! - Transaction mode: the killed run's row never commits, the redelivery
//!   runs the handler, and the ledger shows exactly one run.
//! - Lease mode: the killed run's row was autocommitted (an effect outside
//!   the record's transaction), its lease stops being renewed and runs out,
//!   the redelivery takes the lease over and runs again: the documented
//!   at-least-once outcome, two rows, one completed record.
//!
//! Each runs on both drivers (`DATABASE_DRIVER=sqlx` with the `sqlx`
//! feature) from the same body.
//!
//! Synchronisation is by observation only: the test waits until Postgres
//! shows the handler's session idle in its transaction right after the
//! ledger `INSERT` (transaction mode), or the committed row and the claim
//! (lease mode).

mod process;
mod support;

use std::time::{Duration, SystemTime};

use http::StatusCode;
use process::{with_driver, Driver, Receiver, Schema};
use support::wait_until;

/// The handler sleeps this long after its ledger write: far longer than the
/// test, so the kill always lands mid-handler.
const HANDLER_DELAY_MS: &str = "600000";
const OBSERVE: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_receiver_killed_mid_handler_runs_the_event_exactly_once_after_restart() {
    killed_mid_handler_runs_once(Driver::TokioPostgres).await;
}

#[cfg(feature = "sqlx")]
#[tokio::test]
async fn a_receiver_on_sqlx_killed_mid_handler_runs_the_event_exactly_once_after_restart() {
    killed_mid_handler_runs_once(Driver::Sqlx).await;
}

async fn killed_mid_handler_runs_once(driver: Driver) {
    let schema = Schema::new(&format!("crash_tx{}", driver.suffix())).await;
    let receiver = Receiver::start(
        &schema,
        &with_driver(driver, &[("DEMO_HANDLER_DELAY_MS", HANDLER_DELAY_MS)]),
    )
    .await;
    let http = receiver.http();
    let cut_off = tokio::spawn(async move { http.deliver("evt_crash").await });

    schema.wait_for_the_ledger_write(OBSERVE).await;
    receiver.kill().await;
    let answer = cut_off.await.expect("the delivery task");
    assert!(answer.is_err(), "the killed receiver cannot have answered: {answer:?}");
    // The server notices the dead client and rolls its transaction back.
    wait_until("the killed receiver's sessions are gone", OBSERVE, || async {
        schema.sessions("%").await == 0
    })
    .await;
    assert_eq!(
        schema.ledger_rows_for("stripe", "evt_crash").await,
        0,
        "the cut-off run rolled back"
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.idempotency_records").await,
        0
    );

    let receiver = Receiver::start(&schema, &with_driver(driver, &[])).await;
    let redelivered = receiver.deliver("evt_crash").await;
    let again = receiver.deliver("evt_crash").await;

    assert_eq!(redelivered.status, StatusCode::OK, "{redelivered:?}");
    assert!(
        !redelivered.replayed(),
        "the crashed run never completed: {redelivered:?}"
    );
    assert!(again.replayed(), "{again:?}");
    assert_eq!(again.body, redelivered.body);
    assert_eq!(
        schema.ledger_rows_for("stripe", "evt_crash").await,
        1,
        "exactly one run"
    );
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.idempotency_records WHERE key = 'evt_crash' AND state = 2")
            .await,
        1
    );
}

#[tokio::test]
async fn in_lease_mode_a_killed_receivers_lease_runs_out_and_the_redelivery_takes_over() {
    killed_lease_runs_out_and_is_taken_over(Driver::TokioPostgres).await;
}

#[cfg(feature = "sqlx")]
#[tokio::test]
async fn in_lease_mode_on_sqlx_a_killed_receivers_lease_runs_out_and_the_redelivery_takes_over() {
    killed_lease_runs_out_and_is_taken_over(Driver::Sqlx).await;
}

async fn killed_lease_runs_out_and_is_taken_over(driver: Driver) {
    let schema = Schema::new(&format!("crash_lease{}", driver.suffix())).await;
    let lease = with_driver(driver, &[("RECORD_MODE", "lease"), ("LEASE_SECS", "2")]);
    let mut settings = lease.clone();
    settings.push(("DEMO_HANDLER_DELAY_MS", HANDLER_DELAY_MS));
    let receiver = Receiver::start(&schema, &settings).await;
    let http = receiver.http();
    let cut_off = tokio::spawn(async move { http.deliver("evt_lease").await });

    // Lease mode: the claim is a committed row, and the handler's ledger
    // row autocommits outside the record's transaction.
    wait_until(
        "the claim and the handler's ledger row are committed",
        OBSERVE,
        || async {
            schema.ledger_rows_for("stripe", "evt_lease").await == 1
                && schema
                    .count("SELECT count(*) FROM {schema}.idempotency_records WHERE key = 'evt_lease' AND state = 1")
                    .await
                    == 1
        },
    )
    .await;
    receiver.kill().await;
    assert!(cut_off.await.expect("the delivery task").is_err());
    // Nobody renews the lease any more: this is when it runs out.
    let crashed_lease_ends: SystemTime = schema
        .db
        .query_one(
            &format!(
                "SELECT locked_until FROM {}.idempotency_records WHERE key = 'evt_lease'",
                schema.name
            ),
            &[],
        )
        .await
        .expect("the crashed claim")
        .get(0);

    let receiver = Receiver::start(&schema, &lease).await;
    // The webhook route waits (up to 10 s) for an in-flight claim: this
    // delivery waits out the crashed claim's lease, then takes it over.
    let redelivered = receiver.deliver("evt_lease").await;
    let replay = receiver.deliver("evt_lease").await;

    assert_eq!(redelivered.status, StatusCode::OK, "{redelivered:?}");
    assert!(
        !redelivered.replayed(),
        "the crashed run never completed: {redelivered:?}"
    );
    assert!(replay.replayed(), "{replay:?}");
    assert_eq!(replay.body, redelivered.body);
    let rows = schema
        .db
        .query(
            &format!(
                "SELECT id, created_at FROM {}.ledger_entries WHERE event_id = 'evt_lease' ORDER BY id",
                schema.name
            ),
            &[],
        )
        .await
        .expect("ledger_entries");
    assert_eq!(
        rows.len(),
        2,
        "lease mode is at-least-once: the crashed run's effect stays and the takeover runs again"
    );
    let takeover_at: SystemTime = rows[1].get(1);
    assert!(
        takeover_at >= crashed_lease_ends,
        "the lease was taken over only once it had run out ({takeover_at:?} < {crashed_lease_ends:?})"
    );
    assert_eq!(
        redelivered.json()["ledger_entry_id"],
        rows[1].get::<_, i64>(0),
        "the record holds the takeover's response"
    );
    assert_eq!(
        schema
            .count(
                "SELECT count(*) FROM {schema}.idempotency_records
                 WHERE key = 'evt_lease' AND state = 2 AND claim_token IS NULL"
            )
            .await,
        1
    );
}

#[tokio::test]
async fn the_record_mode_settings_are_documented_with_their_defaults() {
    let help = process::help("webhook_receiver").await;
    for setting in ["RECORD_MODE", "[default: transaction]", "LEASE_SECS", "[default: 60]"] {
        assert!(help.contains(setting), "--help shows {setting}: {help}");
    }
}

#[tokio::test]
async fn invalid_record_mode_settings_exit_with_code_2() {
    for (name, value) in [("RECORD_MODE", "sometimes"), ("LEASE_SECS", "0")] {
        process::assert_setting_refused("webhook_receiver", name, value).await;
    }
}
