//! What only the Postgres store does: transactions shared with the handler,
//! advisory locks, several instances on one database, failures of the
//! database itself.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sha2::{Digest, Sha256};
use support::wire::{self, Fault, FaultyProxy};
use support::{request, send, Probe, TestDb};
use tokio::sync::Barrier;
use tower::{service_fn, Layer, ServiceExt};
use tower_idempotency::{IdempotencyLayer, InFlight, MemoryStore, Mode, PostgresStore, RequestBody};

#[tokio::test]
async fn the_handlers_writes_and_the_record_commit_together_or_not_at_all() {
    let db = TestDb::new("commit_together").await;
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(db.store().await).source("test"));

    let failed = send(&app, request(Some("k"), "{}", &[("x-test-status", "503")])).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        (db.ledger_rows().await, db.records().await),
        (0, 0),
        "a release rolls back both"
    );

    let done = send(&app, request(Some("k"), "{}", &[])).await;
    assert_eq!(done.status, StatusCode::OK);
    assert_eq!((db.ledger_rows().await, db.records().await), (1, 1));
    let row = db
        .client()
        .await
        .query_one(
            "SELECT state, response_status, created_at <= completed_at, completed_at < expires_at,
                    expires_at > now() + interval '29 days'
             FROM idempotency_records WHERE source = 'test' AND event_type = '' AND key = 'k'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i16>(0), 2, "completed");
    assert_eq!(row.get::<_, i16>(1), 200);
    assert!(
        row.get::<_, bool>(2) && row.get::<_, bool>(3) && row.get::<_, bool>(4),
        "audit timestamps"
    );
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

/// Makes the commit of a request with the body `{}` fail: a deferred
/// constraint on the ledger, checked at COMMIT after the handler has
/// answered, and a row it will clash with.
async fn fail_commits_of_an_empty_body(db: &TestDb) {
    db.client()
        .await
        .batch_execute(
            "ALTER TABLE ledger ADD CONSTRAINT one_row_per_body UNIQUE (body) DEFERRABLE INITIALLY DEFERRED;
             INSERT INTO ledger (body) VALUES ('{}');",
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_failed_commit_persists_neither_the_handlers_write_nor_the_record() {
    let db = TestDb::new("failed_commit").await;
    fail_commits_of_an_empty_body(&db).await;
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(db.store().await).source("test"));

    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "never the handler's 200");
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:commit-failed");
    assert!(reply.headers.contains_key("retry-after"));
    assert_eq!(db.ledger_rows().await, 1, "only the row that was there before");
    assert_eq!(db.records().await, 0);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn with_the_body_hash_guard_a_failed_commit_keeps_neither_record() {
    let db = TestDb::new("guard_failed_commit").await;
    fail_commits_of_an_empty_body(&db).await;
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(db.store().await)
            .source("test")
            .body_hash_guard(true),
    );

    let failed = send(&app, request(Some("k1"), "{}", &[])).await;

    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(db.records().await, 0, "neither the key's record nor the body's");
    assert_eq!(db.ledger_rows().await, 1, "only the row that was there before");
    db.client().await.batch_execute("DELETE FROM ledger").await.unwrap();
    let resent = send(&app, request(Some("k2"), "{}", &[])).await;
    assert!(!resent.replayed(), "the body ran afresh under another key: {resent:?}");
    assert_eq!(
        db.records().await,
        2,
        "the key's record and the body's, committed together"
    );
    let body_record: (String, String) = {
        let row = db
            .client()
            .await
            .query_one("SELECT event_type, key FROM idempotency_records WHERE key <> 'k2'", &[])
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        body_record,
        (
            "\u{1}body-sha256".to_owned(),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a".to_owned()
        ),
        "the body's record: its SHA-256, under an event type no request can name"
    );
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn two_instances_with_separate_pools_never_both_run_a_key() {
    const PER_INSTANCE: usize = 25;
    let db = TestDb::new("two_instances").await;
    let probe = Probe::default();
    let wait = InFlight::Wait(Duration::from_secs(30));
    let instances = [
        probe.app(IdempotencyLayer::new(db.store().await).source("test").in_flight(wait)),
        probe.app(
            IdempotencyLayer::new(PostgresStore::new(db.another_pool()))
                .source("test")
                .in_flight(wait),
        ),
    ];
    let barrier = Arc::new(Barrier::new(2 * PER_INSTANCE));
    let tasks: Vec<_> = instances
        .iter()
        .flat_map(|app| std::iter::repeat_n(app.clone(), PER_INSTANCE))
        .map(|app| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                send(&app, request(Some("shared"), "{}", &[])).await
            })
        })
        .collect();
    let replies: Vec<_> = join_all(tasks).await.into_iter().map(Result::unwrap).collect();

    assert!(replies.iter().all(|r| r.status == StatusCode::OK), "{replies:?}");
    assert_eq!(replies.iter().filter(|r| !r.replayed()).count(), 1);
    assert_eq!(probe.runs(), 1);
    assert_eq!(db.ledger_rows().await, 1);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

/// The advisory lock id the store uses for a key in `schema`'s default table.
fn lock_id(schema: &str, source: &str, event_type: &str, key: &str) -> i64 {
    let mut hasher = Sha256::new();
    let namespace = format!("{schema}.idempotency_records");
    for part in [namespace.as_str(), source, event_type, key] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    i64::from_be_bytes(hasher.finalize()[..8].try_into().unwrap())
}

#[tokio::test]
async fn claims_take_the_keys_advisory_lock_and_replays_do_not() {
    let db = TestDb::new("advisory_lock").await;
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(db.store().await).source("test"));
    let other_session = db.another_pool().get().await.unwrap();
    let hold = "SELECT pg_advisory_lock($1)";
    let free = "SELECT pg_advisory_unlock($1)";
    let id = lock_id(&db.schema, "test", "", "k");

    other_session.execute(hold, &[&id]).await.unwrap();
    let blocked = send(&app, request(Some("k"), "{}", &[])).await;
    other_session.execute(free, &[&id]).await.unwrap();
    let first = send(&app, request(Some("k"), "{}", &[])).await;
    other_session.execute(hold, &[&id]).await.unwrap();
    let replay = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(blocked.status, StatusCode::CONFLICT, "a held lock means in flight");
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        replay.replayed(),
        "a completed key is answered by a plain read, without the lock"
    );
    assert_eq!(probe.runs(), 1);
    drop(other_session);
    db.drop_schema().await;
}

#[tokio::test]
async fn in_transaction_mode_another_payload_in_flight_gets_the_in_flight_answer() {
    let db = TestDb::new("tx_mismatch_in_flight").await;
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(db.store().await).source("test"));
    let first = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), r#"{"a":1}"#, &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    // Another instance cannot see the uncommitted claim, so it cannot compare
    // fingerprints yet: it answers 409 rather than 422.
    let other_instance = probe.app(IdempotencyLayer::new(db.store().await).source("test"));
    let other = send(&other_instance, request(Some("k"), r#"{"a":2}"#, &[])).await;
    probe.open_gate();
    first.await.unwrap();
    let after = send(&other_instance, request(Some("k"), r#"{"a":2}"#, &[])).await;

    assert_eq!(other.status, StatusCode::CONFLICT);
    assert_eq!(after.status, StatusCode::UNPROCESSABLE_ENTITY);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

fn unreachable_store() -> PostgresStore {
    let mut config = deadpool_postgres::Config::new();
    config.url = Some("postgres://postgres@127.0.0.1:1/postgres".into());
    config.connect_timeout = Some(Duration::from_secs(1));
    let pool = config
        .create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)
        .unwrap();
    PostgresStore::new(pool)
}

#[tokio::test]
async fn the_store_down_gives_503_and_the_handler_does_not_run() {
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(unreachable_store()));

    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:store-unavailable");
    assert_eq!(reply.headers["retry-after"], "2");
    assert_eq!(probe.runs(), 0);
}

#[tokio::test]
async fn fail_open_runs_the_handler_unprotected_when_the_store_is_down() {
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(unreachable_store()).fail_open(true));

    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(probe.runs(), 1);
}

#[tokio::test]
async fn a_store_that_does_not_answer_in_time_gives_503() {
    let db = TestDb::new("store_timeout").await;
    let store = db.store().await;
    // A pool of one whose only connection is taken: every store step waits.
    let mut config = deadpool_postgres::Config::new();
    config.url = Some(support::database_url());
    config.pool = Some(deadpool_postgres::PoolConfig::new(1));
    let tiny = config
        .create_pool(Some(deadpool_postgres::Runtime::Tokio1), tokio_postgres::NoTls)
        .unwrap();
    let busy = tiny.get().await.unwrap();
    let probe = Probe::default();
    let app =
        probe.app(IdempotencyLayer::new(PostgresStore::new(tiny.clone())).store_timeout(Duration::from_millis(200)));

    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(probe.runs(), 0);
    drop((busy, store));
    db.drop_schema().await;
}

#[tokio::test]
async fn dead_pooled_connections_are_replaced_without_a_failed_request() {
    let db = TestDb::new("dead_connections").await;
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(db.store().await).source("test"));
    // Fill the pool with idle connections, then kill them all server-side.
    let warm: Vec<_> = join_all((0..4).map(|_| db.pool.get())).await;
    drop(warm);
    let admin = support::connect().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&db.schema],
        )
        .await
        .unwrap();

    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(probe.runs(), 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn the_lease_is_renewed_while_the_handler_runs() {
    let db = TestDb::new("lease_renewal").await;
    let probe = Probe::default();
    let mode = Mode::Lease {
        lease: Duration::from_secs(60),
        renew_every: Duration::from_millis(20),
    };
    let app = probe.app(IdempotencyLayer::new(db.store().await).source("test").mode(mode));
    let running = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    let client = db.client().await;
    let locked_until = "SELECT locked_until FROM idempotency_records WHERE key = 'k'";
    let first: std::time::SystemTime = client.query_one(locked_until, &[]).await.unwrap().get(0);

    // Renewals happen on their own schedule: watch the column move.
    let renewed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let now: std::time::SystemTime = client.query_one(locked_until, &[]).await.unwrap().get(0);
            if now > first {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    probe.open_gate();
    let reply = running.await.unwrap();

    assert!(renewed.is_ok(), "locked_until never moved while the handler ran");
    assert_eq!(reply.status, StatusCode::OK);
    let state: i16 = client
        .query_one("SELECT state FROM idempotency_records WHERE key = 'k'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, 2);
    drop(client);
    db.drop_schema().await;
}

#[tokio::test]
async fn an_inner_service_error_releases_the_key() {
    let db = TestDb::new("inner_error").await;
    let calls = Arc::new(AtomicUsize::new(0));
    let service = IdempotencyLayer::new(db.store().await)
        .source("test")
        .layer(service_fn({
            let calls = calls.clone();
            move |_: Request<RequestBody<Full<Bytes>>>| {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    if call == 0 {
                        Err("the inner service failed")
                    } else {
                        Ok(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                }
            }
        }));
    let request = || {
        Request::post("/x")
            .header("idempotency-key", "k")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };

    let failed = service.clone().oneshot(request()).await;
    let retried = service.clone().oneshot(request()).await.unwrap();
    let replayed = service.clone().oneshot(request()).await.unwrap();

    assert_eq!(failed.unwrap_err(), "the inner service failed");
    assert!(!retried.headers().contains_key("idempotent-replayed"));
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
    assert_eq!(replayed.into_body().collect().await.unwrap().to_bytes(), "ok");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

/// A store on `schema.records`, with `schema` dropped first: `migrate` has
/// to create both.
async fn store_on_a_new_schema(db: &TestDb, schema: &str) -> PostgresStore {
    support::connect()
        .await
        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .await
        .unwrap();
    PostgresStore::new(db.pool.clone())
        .with_table(&format!("{schema}.records"))
        .unwrap()
}

/// Sends one request through `store`, checks that it recorded it in
/// `schema.records`, and drops `schema`.
async fn assert_store_works_then_drop(db: &TestDb, store: PostgresStore, schema: &str) {
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store));
    send(&app, request(Some("k"), "{}", &[])).await;
    assert_eq!(db.count(&format!("SELECT count(*) FROM {schema}.records")).await, 1);
    support::connect()
        .await
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .unwrap();
}

#[tokio::test]
async fn migrate_is_safe_from_many_instances_at_once() {
    let db = TestDb::new("migrate").await;
    let store = store_on_a_new_schema(&db, "migrated").await;

    let results = join_all((0..8).map(|_| {
        let store = store.clone();
        async move { store.migrate().await }
    }))
    .await;

    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_store_works_then_drop(&db, store, "migrated").await;
    db.drop_schema().await;
}

#[tokio::test]
async fn migrate_is_idempotent() {
    let db = TestDb::new("migrate_again").await;
    let store = store_on_a_new_schema(&db, "migrated_again").await;

    store.migrate().await.expect("the first time");
    store.migrate().await.expect("and once more");

    assert_store_works_then_drop(&db, store, "migrated_again").await;
    db.drop_schema().await;
}

#[tokio::test]
async fn a_handler_asking_for_a_transaction_without_one_gets_500() {
    let probe = Probe::default();
    let app = axum::Router::new()
        .route(
            "/r",
            axum::routing::post(|_tx: tower_idempotency::Tx| async { "unreachable" }),
        )
        .route_layer(IdempotencyLayer::new(MemoryStore::new(10)));
    let reply = send(&app, request(Some("k"), "{}", &[])).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:handler-failed");
    drop(probe);
}

#[tokio::test]
async fn same_named_tables_in_other_schemas_do_not_share_locks() {
    let (db_a, db_b) = (TestDb::new("lock_ns_a").await, TestDb::new("lock_ns_b").await);
    let probe_a = Probe::default();
    let app_a = probe_a.app(IdempotencyLayer::new(db_a.store().await).source("test"));
    let probe_b = Probe::default();
    let app_b = probe_b.app(IdempotencyLayer::new(db_b.store().await).source("test"));
    let in_flight_in_a = tokio::spawn({
        let app_a = app_a.clone();
        async move { send(&app_a, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe_a.started().await;

    let in_b = send(&app_b, request(Some("k"), "{}", &[])).await;
    probe_a.open_gate();

    assert_eq!(
        in_b.status,
        StatusCode::OK,
        "a key in flight in schema a must not block schema b"
    );
    assert_eq!(in_flight_in_a.await.unwrap().status, StatusCode::OK);
    db_a.drop_schema().await;
    db_b.drop_schema().await;
}

// ---------------------------------------------------------------------------
// The record's unique key as the final arbiter, where the advisory lock did
// not exclude a second claimant.

/// Two instances of a route on a store whose claims skip the advisory lock.
async fn instances_past_the_lock(db: &TestDb, probe: &Probe, mode: Mode) -> [axum::Router; 2] {
    let store = db.store().await.without_advisory_locks_for_tests_only();
    // Layers of their own: one instance's local in-flight table does not
    // see the other's request.
    let layer = || IdempotencyLayer::new(store.clone()).source("test").mode(mode);
    [probe.app(layer()), probe.app(layer())]
}

/// Sends two first deliveries of `k` with these bodies, one per instance,
/// and lets them finish only once both handlers are inside.
async fn both_inside_then_finish(
    probe: &Probe,
    apps: &[axum::Router; 2],
    bodies: [&'static str; 2],
) -> Vec<support::Reply> {
    let sent: Vec<_> = apps
        .iter()
        .zip(bodies)
        .map(|(app, body)| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, request(Some("k"), body, &[("x-test-block", "1")])).await })
        })
        .collect();
    probe.started().await;
    probe.started().await;
    probe.open_gate();
    join_all(sent).await.into_iter().map(Result::unwrap).collect()
}

#[tokio::test]
async fn past_the_lock_concurrent_first_deliveries_commit_one_record_and_replay_it() {
    let db = TestDb::new("arbiter_tx_same").await;
    let probe = Probe::default();
    let apps = instances_past_the_lock(&db, &probe, Mode::Transaction).await;

    let replies = both_inside_then_finish(&probe, &apps, ["{}", "{}"]).await;

    assert_eq!(probe.runs(), 2, "both handlers ran: the lock did not exclude");
    assert_eq!(
        (db.records().await, db.ledger_rows().await),
        (1, 1),
        "one commit, one rollback"
    );
    assert!(replies.iter().all(|r| r.status == StatusCode::OK), "{replies:?}");
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 1, "{replies:?}");
    let stored: Vec<u8> = db
        .client()
        .await
        .query_one("SELECT response_body FROM idempotency_records WHERE key = 'k'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        replies.iter().all(|r| r.body == stored),
        "every client gets the committed response: {replies:?}"
    );
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn past_the_lock_a_losing_delivery_with_another_payload_gets_422() {
    let db = TestDb::new("arbiter_tx_other").await;
    let probe = Probe::default();
    let apps = instances_past_the_lock(&db, &probe, Mode::Transaction).await;

    let replies = both_inside_then_finish(&probe, &apps, [r#"{"a":1}"#, r#"{"a":2}"#]).await;

    let statuses: Vec<_> = replies.iter().map(|r| r.status).collect();
    assert!(
        statuses.contains(&StatusCode::OK) && statuses.contains(&StatusCode::UNPROCESSABLE_ENTITY),
        "{replies:?}"
    );
    let loser = replies.iter().find(|r| r.status != StatusCode::OK).unwrap();
    assert_eq!(loser.problem_type(), "urn:tower-idempotency:fingerprint-mismatch");
    assert_eq!((db.records().await, db.ledger_rows().await), (1, 1));
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn past_the_lock_a_lease_claim_never_overwrites_a_claim_or_a_completed_record() {
    let db = TestDb::new("arbiter_lease").await;
    let probe = Probe::default();
    let apps = instances_past_the_lock(&db, &probe, Mode::lease(Duration::from_secs(60))).await;
    let first = tokio::spawn({
        let app = apps[0].clone();
        async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;

    let while_running = send(&apps[1], request(Some("k"), "{}", &[])).await;
    probe.open_gate();
    let first = first.await.unwrap();
    let completed_at = "SELECT completed_at FROM idempotency_records WHERE key = 'k'";
    let before: std::time::SystemTime = db.client().await.query_one(completed_at, &[]).await.unwrap().get(0);
    // A fresh instance claims at once rather than reading first.
    let fresh = probe.app(
        IdempotencyLayer::new(db.store().await.without_advisory_locks_for_tests_only())
            .source("test")
            .mode(Mode::lease(Duration::from_secs(60))),
    );
    let after = send(&fresh, request(Some("k"), "{}", &[])).await;
    let after_other_payload = send(&fresh, request(Some("k"), r#"{"a":2}"#, &[])).await;

    assert_eq!(while_running.status, StatusCode::CONFLICT);
    assert_eq!(first.status, StatusCode::OK);
    assert!(after.replayed() && after.body == first.body, "{after:?}");
    assert_eq!(after_other_payload.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(probe.runs(), 1);
    let now: std::time::SystemTime = db.client().await.query_one(completed_at, &[]).await.unwrap().get(0);
    assert_eq!(now, before, "the completed record was not written again");
    assert_eq!(db.records().await, 1);
    db.drop_schema().await;
}

// ---------------------------------------------------------------------------
// A lease claim whose answer was lost or late.

/// A lease-mode route whose store reaches Postgres through `proxy`, which
/// watches the lease claim.
async fn lease_route_through(proxy: &FaultyProxy, db: &TestDb, probe: &Probe, store_timeout: Duration) -> axum::Router {
    let store = PostgresStore::new(wire::pool_through(proxy.port, &db.schema, 4));
    store.migrate().await.unwrap();
    let app = probe.app(
        IdempotencyLayer::new(store)
            .source("test")
            .mode(Mode::lease(Duration::from_secs(60)))
            .store_timeout(store_timeout),
    );
    // Prepares the statements and resolves the lock namespace.
    let warm = send(&app, request(Some("warm-up"), "{}", &[])).await;
    assert_eq!(warm.status, StatusCode::OK, "{warm:?}");
    app
}

/// Text only the lease claim's SQL holds.
const LEASE_CLAIM_SQL: &str = "WITH claimed AS";

#[tokio::test]
async fn a_lease_claim_retried_after_its_answer_was_lost_runs_the_handler_once() {
    let db = TestDb::new("claim_answer_lost").await;
    let proxy = FaultyProxy::start(LEASE_CLAIM_SQL, Fault::CutBeforeAnswer).await;
    let probe = Probe::default();
    let app = lease_route_through(&proxy, &db, &probe, Duration::from_secs(10)).await;

    proxy.arm();
    let reply = send(&app, request(Some("k"), "{}", &[])).await;

    // The claim committed before its connection was cut; the retry on a
    // fresh connection finds it to be its own.
    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert!(!reply.replayed());
    assert_eq!(probe.runs(), 2, "the warm-up, then this key once");
    let state: i16 = db
        .client()
        .await
        .query_one("SELECT state FROM idempotency_records WHERE key = 'k'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(state, 2, "completed");
    db.drop_schema().await;
}

#[tokio::test]
async fn a_lease_claim_that_timed_out_is_released_in_the_background() {
    let db = TestDb::new("claim_timed_out").await;
    let proxy = FaultyProxy::start(LEASE_CLAIM_SQL, Fault::HoldAnswer).await;
    let probe = Probe::default();
    let app = lease_route_through(&proxy, &db, &probe, Duration::from_secs(1)).await;

    proxy.arm();
    let timed_out = send(&app, request(Some("k"), "{}", &[])).await;
    proxy.answered().await;
    let claims = "SELECT count(*) FROM idempotency_records WHERE key = 'k'";
    let released = tokio::time::timeout(Duration::from_secs(10), async {
        while db.count(claims).await > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    proxy.resume();
    let next = send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(timed_out.status, StatusCode::SERVICE_UNAVAILABLE, "{timed_out:?}");
    assert!(
        released.is_ok(),
        "the claim committed after its timeout was never released"
    );
    assert_eq!(next.status, StatusCode::OK, "{next:?}");
    assert_eq!(probe.runs(), 2, "the warm-up, then this key once");
    db.drop_schema().await;
}
