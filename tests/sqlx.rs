//! What only the sqlx store has to show, beyond the shared behaviour tests
//! (`both_stores.rs`, `model.rs`, `round_trips.rs`, and the crash, outage
//! and restart tests, which run it from the same bodies): the two drivers
//! on one table, the record's unique key as the arbiter past the advisory
//! lock, dead pooled connections, the ordering guard on an `SqlxTx`, and
//! `axum-sqlx-tx` beside the layer.
#![cfg(feature = "sqlx")]

mod support;

use axum::routing::post;
use axum::Router;
use futures_util::future::join_all;
use http::StatusCode;
use support::{request, send, Probe, TestDb};
use tower_idempotency::{IdempotencyLayer, InFlight, Mode, OrderingGuard, SqlxTx, Transition};

#[tokio::test]
async fn both_drivers_on_one_table_share_records_and_locks() {
    let db = TestDb::new("sqlx_both_drivers").await;
    let probe = Probe::default();
    let wait = InFlight::Wait(std::time::Duration::from_secs(10));
    let tokio_postgres = probe.app(IdempotencyLayer::new(db.store().await).source("test").in_flight(wait));
    let sqlx = probe.app(
        IdempotencyLayer::new(db.sqlx_store().await)
            .source("test")
            .in_flight(wait),
    );

    // Completed by one driver, replayed by the other, either way round.
    let first = send(&tokio_postgres, request(Some("a"), "{}", &[])).await;
    let replay = send(&sqlx, request(Some("a"), "{}", &[])).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(replay.replayed() && replay.body == first.body, "{replay:?}");
    let first = send(&sqlx, request(Some("b"), "{}", &[])).await;
    let replay = send(&tokio_postgres, request(Some("b"), "{}", &[])).await;
    assert!(replay.replayed() && replay.body == first.body, "{replay:?}");

    // Concurrent first deliveries, one per driver: the advisory lock is the
    // same, so one runs and the other waits for its record, then replays it.
    let sent: Vec<_> = [tokio_postgres.clone(), sqlx.clone()]
        .into_iter()
        .map(|app| tokio::spawn(async move { send(&app, request(Some("c"), "{}", &[("x-test-block", "1")])).await }))
        .collect();
    probe.started().await;
    probe.open_gate();
    let replies: Vec<_> = join_all(sent).await.into_iter().map(Result::unwrap).collect();
    assert!(
        replies.iter().all(|reply| reply.status == StatusCode::OK),
        "{replies:?}"
    );
    assert_eq!(probe.runs(), 3, "a, b and c each ran once");
    assert_eq!((db.records().await, db.ledger_rows().await), (3, 3));
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn past_the_lock_concurrent_first_deliveries_on_sqlx_commit_one_record_and_replay_it() {
    let db = TestDb::new("sqlx_arbiter").await;
    let probe = Probe::default();
    let store = db.sqlx_store().await.without_advisory_locks_for_tests_only();
    let layer = || IdempotencyLayer::new(store.clone()).source("test");
    let apps = [probe.app(layer()), probe.app(layer())];

    let sent: Vec<_> = apps
        .iter()
        .map(|app| {
            let app = app.clone();
            tokio::spawn(async move { send(&app, request(Some("k"), "{}", &[("x-test-block", "1")])).await })
        })
        .collect();
    probe.started().await;
    probe.started().await;
    probe.open_gate();
    let replies: Vec<_> = join_all(sent).await.into_iter().map(Result::unwrap).collect();

    assert_eq!(probe.runs(), 2, "both handlers ran: the lock did not exclude");
    assert_eq!(
        (db.records().await, db.ledger_rows().await),
        (1, 1),
        "one commit, one rollback"
    );
    assert!(replies.iter().all(|r| r.status == StatusCode::OK), "{replies:?}");
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 1, "{replies:?}");
    assert_eq!(
        replies[0].body, replies[1].body,
        "both clients get the committed response"
    );
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn dead_pooled_sqlx_connections_are_forgotten_and_the_next_request_succeeds() {
    let db = TestDb::new("sqlx_dead_connections").await;
    let probe = Probe::default();
    let store = db.sqlx_store().await;
    let pool = store.pool().clone();
    let app = probe.app(IdempotencyLayer::new(store).source("test"));
    let warm: Vec<_> = join_all((0..4).map(|_| pool.acquire())).await;
    drop(warm);
    support::wait_until(
        "the warmed connections are idle",
        std::time::Duration::from_secs(5),
        || async { pool.num_idle() >= 4 },
    )
    .await;
    let admin = support::connect().await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&db.schema],
        )
        .await
        .unwrap();

    // The first request meets a dead connection (the pool does not ping):
    // it is refused as unavailable, the idle ones are forgotten, and the
    // retry gets a fresh connection.
    let first = send(&app, request(Some("k"), "{}", &[])).await;
    let reply = if first.status == StatusCode::OK {
        first
    } else {
        assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE, "{first:?}");
        send(&app, request(Some("k"), "{}", &[])).await
    };

    assert_eq!(reply.status, StatusCode::OK, "{reply:?}");
    assert_eq!(probe.runs(), 1);
    db.drop_schema().await;
}

#[tokio::test]
async fn the_ordering_guard_moves_state_forward_inside_the_requests_sqlx_transaction() {
    let db = TestDb::new("sqlx_ordering").await;
    let store = db.sqlx_store().await;
    let guard = OrderingGuard::new("payment_states", "payment_id")
        .unwrap()
        .then(["created"])
        .then(["processing"])
        .terminal(["succeeded"]);
    let mut connection = store.pool().acquire().await.unwrap();
    guard.create_table_sqlx(&mut connection).await.unwrap();
    drop(connection);
    let handler_guard = guard.clone();
    let app = Router::new()
        .route(
            "/r",
            post(move |mut tx: SqlxTx, body: String| {
                let guard = handler_guard.clone();
                async move {
                    let (status, code) = body.split_once(' ').unwrap_or((body.as_str(), "200"));
                    let transition = guard.advance_sqlx(&mut tx, "pi_1", status).await.unwrap();
                    (code.parse::<StatusCode>().unwrap(), format!("{transition:?}"))
                }
            }),
        )
        .route_layer(IdempotencyLayer::new(store).source("test"));
    let state = || async {
        db.count("SELECT count(*) FROM payment_states WHERE status = 'succeeded'")
            .await
    };

    let failed = send(&app, request(Some("e1"), "succeeded 503", &[])).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(state().await, 0, "a released request's state change rolled back");
    let done = send(&app, request(Some("e2"), "succeeded", &[])).await;
    assert_eq!(done.text(), format!("{:?}", Transition::Inserted));
    let late = send(&app, request(Some("e3"), "processing", &[])).await;
    assert_eq!(
        late.text(),
        format!(
            "{:?}",
            Transition::Ignored {
                current: "succeeded".into()
            }
        )
    );
    assert_eq!(state().await, 1);
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

/// axum-sqlx-tx's request transaction beside the layer's: a handler takes
/// both. A first delivery commits both; a duplicate runs nothing, so it
/// writes through neither; a failing status rolls both back.
#[tokio::test]
async fn axum_sqlx_tx_and_the_layers_transaction_combine_in_one_handler() {
    type OtherTx = axum_sqlx_tx::Tx<sqlx::Postgres>;

    let db = TestDb::new("sqlx_axum_sqlx_tx").await;
    let store = db.sqlx_store().await;
    let (state, other_layer) = OtherTx::setup(db.sqlx_pool(4));
    db.client()
        .await
        .batch_execute("CREATE TABLE audit (body text NOT NULL)")
        .await
        .unwrap();
    let app = Router::new()
        .route(
            "/r",
            post(|mut tx: SqlxTx, mut other: OtherTx, body: String| async move {
                sqlx::query("INSERT INTO ledger (body) VALUES ($1)")
                    .bind(body.as_bytes())
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO audit (body) VALUES ($1)")
                    .bind(&body)
                    .execute(&mut other)
                    .await
                    .unwrap();
                if body == "fail" {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::OK
                }
            }),
        )
        .route_layer(IdempotencyLayer::new(store).source("test").mode(Mode::Transaction))
        .layer(other_layer)
        .with_state(state);
    let audit = || async { db.count("SELECT count(*) FROM audit").await };

    let first = send(&app, request(Some("k"), "ok", &[])).await;
    let duplicate = send(&app, request(Some("k"), "ok", &[])).await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert!(duplicate.replayed(), "{duplicate:?}");
    assert_eq!((db.ledger_rows().await, audit().await), (1, 1), "both committed once");

    let failed = send(&app, request(Some("f"), "fail", &[])).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!((db.ledger_rows().await, audit().await), (1, 1), "both rolled back");
    db.assert_no_idle_transactions().await;
    db.drop_schema().await;
}

#[tokio::test]
async fn purge_and_gauges_on_sqlx_see_expired_records_and_keep_live_ones() {
    let db = TestDb::new("sqlx_purge").await;
    let store = db.sqlx_store().await;
    let app = Probe::default().app(IdempotencyLayer::new(store.clone()).source("test"));
    for key in ["live", "old-1", "old-2", "old-3"] {
        assert_eq!(send(&app, request(Some(key), "{}", &[])).await.status, StatusCode::OK);
    }
    db.client()
        .await
        .batch_execute("UPDATE idempotency_records SET expires_at = now() - interval '1 hour' WHERE key LIKE 'old-%'")
        .await
        .unwrap();

    let gauges = store.gauges().await.unwrap();
    assert_eq!(gauges.expired_awaiting_purge, 3, "{gauges:?}");
    assert!(
        gauges.oldest_expired_age.is_some_and(|age| age.as_secs() >= 3599),
        "{gauges:?}"
    );
    assert!(gauges.table_bytes > 0, "{gauges:?}");
    assert_eq!(store.count_expired().await.unwrap(), 3);
    assert_eq!(
        store.purge_expired(2).await.unwrap(),
        3,
        "in batches of 2, until none is left"
    );
    assert_eq!(store.count_expired().await.unwrap(), 0);
    assert_eq!(db.records().await, 1, "the live record stays");
    db.drop_schema().await;
}
