//! Permanent faults are not answered as transient: a missing records table
//! or a handler that keeps its transaction is a 500 without `Retry-After`,
//! never a 503 that invites a retry; and a commit whose answer never came is
//! reported as of unknown outcome, because it may have committed.

mod support;

use std::time::Duration;

use axum::routing::post;
use axum::Router;
use http::StatusCode;
use support::{request, send, Probe, TestDb};
use tokio::sync::oneshot;
use tower_idempotency::{IdempotencyLayer, PostgresStore, Tx};

#[tokio::test]
async fn a_store_that_was_never_migrated_is_a_500_not_a_retry() {
    let db = TestDb::new("never_migrated").await;
    let probe = Probe::default();
    let store = PostgresStore::new(db.pool.clone());
    let app = probe.app(IdempotencyLayer::new(store).source("test").fail_open(true));

    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", reply.text());
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:store-misconfigured");
    assert!(!reply.headers.contains_key("retry-after"));
    assert_eq!(probe.runs(), 0, "fail-open covers outages, not a missing table");
    db.drop_schema().await;
}

#[tokio::test]
async fn a_records_table_dropped_while_serving_is_a_500_not_a_retry() {
    let db = TestDb::new("table_dropped").await;
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(db.store().await).source("test"));
    assert_eq!(send(&app, request(Some("a"), "{}", &[])).await.status, StatusCode::OK);

    db.client()
        .await
        .batch_execute("DROP TABLE idempotency_records")
        .await
        .unwrap();
    let reply = send(&app, request(Some("b"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", reply.text());
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:store-misconfigured");
    assert!(!reply.headers.contains_key("retry-after"));
    assert_eq!(probe.runs(), 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_handler_that_keeps_its_transaction_is_a_500_and_its_writes_roll_back() {
    let db = TestDb::new("handler_keeps_tx").await;
    let (keep_tx, kept) = tokio::sync::mpsc::unbounded_channel::<(Tx, oneshot::Receiver<()>)>();
    let (let_go_tx, let_go) = oneshot::channel();
    let let_go = std::sync::Arc::new(std::sync::Mutex::new(Some(let_go)));
    let app: Router = Router::new()
        .route(
            "/r",
            post(move |tx: Tx| {
                let keep_tx = keep_tx.clone();
                let let_go = let_go.clone().lock().unwrap().take();
                async move {
                    tx.execute("INSERT INTO ledger (body) VALUES ('kept')", &[])
                        .await
                        .unwrap();
                    // A bug: the transaction escapes into a task that outlives
                    // the response.
                    if let Some(let_go) = let_go {
                        keep_tx.send((tx, let_go)).unwrap();
                    }
                    "done"
                }
            }),
        )
        .route_layer(IdempotencyLayer::new(db.store().await).source("test"));
    let holder = tokio::spawn(async move {
        let mut kept = kept;
        let (tx, let_go) = kept.recv().await.expect("the escaped transaction");
        let _ = let_go.await;
        drop(tx);
    });

    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", reply.text());
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:transaction-held");
    assert!(!reply.headers.contains_key("retry-after"));
    let_go_tx.send(()).unwrap();
    holder.await.unwrap();
    db.assert_no_idle_transactions().await;
    assert_eq!(db.ledger_rows().await, 0, "the escaped transaction rolled back");
    assert_eq!(db.records().await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_commit_that_times_out_after_it_was_sent_is_of_unknown_outcome() {
    let db = TestDb::new("commit_outcome_unknown").await;
    // At COMMIT, a deferred trigger waits for an advisory lock the test
    // holds: the commit is sent and stays unanswered past the store timeout.
    let lock_holder = support::connect().await;
    let schema = &db.schema;
    lock_holder
        .batch_execute(&format!(
            "CREATE FUNCTION {schema}.wait_at_commit() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_advisory_xact_lock_shared(hashtext('{schema}')); RETURN NULL; END $$;
             CREATE CONSTRAINT TRIGGER wait_at_commit AFTER INSERT ON {schema}.ledger
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {schema}.wait_at_commit();
             SELECT pg_advisory_lock(hashtext('{schema}'));"
        ))
        .await
        .unwrap();
    let probe = Probe::default();
    let layer = IdempotencyLayer::new(db.store().await)
        .source("test")
        .store_timeout(Duration::from_millis(300));
    let app = probe.app(layer);

    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:commit-outcome-unknown");
    assert!(reply.headers.contains_key("retry-after"), "a retry finds out");
    assert!(reply.text().contains("may have committed"), "{}", reply.text());

    // The commit goes through once the lock is let go: the retry replays it.
    lock_holder
        .batch_execute(&format!("SELECT pg_advisory_unlock(hashtext('{schema}'))"))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while db.records().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the sent commit never landed");
        tokio::task::yield_now().await;
    }
    let retry = send(&app, request(Some("k"), "{}", &[])).await;
    assert!(retry.replayed(), "{}", retry.text());
    assert_eq!(probe.runs(), 1);
    assert_eq!(db.ledger_rows().await, 1);
    db.drop_schema().await;
}
