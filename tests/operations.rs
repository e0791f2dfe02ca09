//! Operating the Postgres store: purge, figures, the record cache, and the
//! `idempotency-admin` command, against the real Postgres.

mod support;

#[cfg(feature = "admin")]
use std::process::Output;
use std::time::Duration;

use axum::Router;
use futures_util::future::join_all;
use http::StatusCode;
use support::{request, send, Probe, TestDb};
use tower_idempotency::{Deletion, IdempotencyLayer, InFlight, Mode, PostgresStore};

/// Inserts `count` records of each kind: expired completed, live completed,
/// and open claims with a live lease but a past `expires_at` (which must
/// survive a purge).
async fn seed(db: &TestDb, count: i64) {
    let client = db.client().await;
    seed_on(&client, count).await;
}

async fn seed_on(client: &tokio_postgres::Client, count: i64) {
    client
        .execute(
            "INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, locked_until,
                                              response_status, response_headers, created_at, completed_at, expires_at)
             SELECT 's', kind, n::text, '\\x00'::bytea, state, locked_until, status, '\\x01000000000000ffffffff'::bytea,
                    now() - interval '40 days', completed_at, expires_at
             FROM generate_series(1, $1::int8) AS n,
                  (VALUES ('expired', 2::int2, NULL::timestamptz, 200::int2, now() - interval '10 days', now() - interval '1 day'),
                          ('live', 2::int2, NULL, 200::int2, now(), now() + interval '1 day'),
                          ('leased', 1::int2, now() + interval '1 hour', NULL::int2, NULL, now() - interval '1 day'))
                  AS kinds(kind, state, locked_until, status, completed_at, expires_at)",
            &[&count],
        )
        .await
        .unwrap();
}

async fn count_kind(db: &TestDb, kind: &str) -> i64 {
    db.count(&format!(
        "SELECT count(*) FROM idempotency_records WHERE event_type = '{kind}'"
    ))
    .await
}

#[tokio::test]
async fn purge_removes_exactly_the_expired_records_and_no_open_claim() {
    let db = TestDb::new("purge_exact").await;
    let store = db.store().await;
    seed(&db, 250).await;

    assert_eq!(store.count_expired().await.unwrap(), 250);
    let deleted = store.purge_expired(100).await.unwrap();

    assert_eq!(deleted, 250);
    assert_eq!(count_kind(&db, "expired").await, 0);
    assert_eq!(count_kind(&db, "live").await, 250);
    assert_eq!(
        count_kind(&db, "leased").await,
        250,
        "an open claim with a live lease is never purged"
    );
    assert_eq!(store.purge_expired(100).await.unwrap(), 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn concurrent_purgers_split_the_work_without_double_counting() {
    let db = TestDb::new("purge_concurrent").await;
    let store = db.store().await;
    seed(&db, 5_000).await;

    let results = join_all((0..4).map(|_| {
        let store = store.clone();
        async move { store.purge_expired(500).await }
    }))
    .await;

    let total: u64 = results.into_iter().map(Result::unwrap).sum();
    assert_eq!(total, 5_000, "each expired record is deleted, and counted, once");
    assert_eq!(count_kind(&db, "expired").await, 0);
    db.drop_schema().await;
}

#[tokio::test]
async fn stats_count_records_by_state() {
    let db = TestDb::new("store_stats").await;
    let store = db.store().await;
    seed(&db, 3).await;
    db.client()
        .await
        .execute(
            "UPDATE idempotency_records SET locked_until = now() - interval '1 minute', expires_at = now() + interval '1 day'
             WHERE event_type = 'leased' AND key = '1'",
            &[],
        )
        .await
        .unwrap();

    let stats = store.stats().await.unwrap();

    assert_eq!(stats.completed, 3);
    assert_eq!(
        stats.expired_awaiting_purge, 3,
        "expired completed records; a running lease past its retention is live"
    );
    assert_eq!(stats.expired_awaiting_purge, store.count_expired().await.unwrap());
    assert_eq!(stats.in_flight, 2, "running leases, past their retention or not");
    assert_eq!(stats.leases_past_expiry, 1);
    assert!(stats.oldest_in_flight.is_some());
    db.drop_schema().await;
}

#[tokio::test]
async fn delete_record_refuses_a_live_claim_unless_forced() {
    let db = TestDb::new("delete_record").await;
    let store = db.store().await;
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(store.clone())
            .source("s")
            .mode(Mode::lease(Duration::from_secs(60))),
    );
    send(&app, request(Some("done"), "{}", &[])).await;
    probe.started().await;
    let running = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("busy"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;

    assert_eq!(
        store.delete_record("s", "", "busy", false).await.unwrap(),
        Deletion::InFlight
    );
    assert_eq!(
        store.delete_record("s", "", "missing", false).await.unwrap(),
        Deletion::NotFound
    );
    assert_eq!(
        store.delete_record("s", "", "done", false).await.unwrap(),
        Deletion::Deleted
    );
    let rerun = send(&app, request(Some("done"), "{}", &[])).await;
    assert!(!rerun.replayed(), "a released key runs again");
    assert_eq!(
        store.delete_record("s", "", "busy", true).await.unwrap(),
        Deletion::Deleted
    );
    probe.open_gate();
    running.await.unwrap();
    assert_eq!(probe.runs(), 3);
    db.drop_schema().await;
}

/// A store with a record cache, and the probe behind it in lease mode,
/// answering an in-flight duplicate with 409.
async fn cached_store(db: &TestDb) -> (PostgresStore, Probe, Router) {
    let store = db.store().await.with_cache(1 << 20, Duration::from_secs(60));
    let probe = Probe::default();
    let app = probe.app(
        IdempotencyLayer::new(store.clone())
            .source("s")
            .mode(Mode::lease(Duration::from_secs(60)))
            .in_flight(InFlight::Conflict),
    );
    (store, probe, app)
}

#[tokio::test]
async fn the_cache_answers_a_duplicate_of_a_completed_record_without_the_database() {
    let db = TestDb::new("record_cache").await;
    let (_store, probe, app) = cached_store(&db).await;

    send(&app, request(Some("k"), "{}", &[])).await;
    probe.started().await;
    // With the table gone, only the cache can answer.
    db.client()
        .await
        .batch_execute("ALTER TABLE idempotency_records RENAME TO hidden")
        .await
        .unwrap();
    let cached = send(&app, request(Some("k"), "{}", &[])).await;
    let uncached = send(&app, request(Some("other"), "{}", &[])).await;
    db.client()
        .await
        .batch_execute("ALTER TABLE hidden RENAME TO idempotency_records")
        .await
        .unwrap();

    assert!(cached.replayed(), "{cached:?}");
    assert_eq!(
        uncached.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a miss still goes to the database, and finds no table"
    );
    db.drop_schema().await;
}

#[tokio::test]
async fn the_cache_never_answers_for_an_open_claim() {
    let db = TestDb::new("record_cache_open_claim").await;
    let (_store, probe, app) = cached_store(&db).await;

    let running = tokio::spawn({
        let app = app.clone();
        async move { send(&app, request(Some("busy"), "{}", &[("x-test-block", "1")])).await }
    });
    probe.started().await;
    let duplicate = send(&app, request(Some("busy"), "{}", &[])).await;
    probe.open_gate();
    running.await.unwrap();

    // Its duplicate is 409.
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    db.drop_schema().await;
}

#[tokio::test]
async fn a_release_through_the_store_forgets_the_cached_record_at_once() {
    let db = TestDb::new("record_cache_release").await;
    let (store, _probe, app) = cached_store(&db).await;
    send(&app, request(Some("k"), "{}", &[])).await;

    assert_eq!(
        store.delete_record("s", "", "k", false).await.unwrap(),
        Deletion::Deleted
    );
    let rerun = send(&app, request(Some("k"), "{}", &[])).await;

    assert!(!rerun.replayed());
    db.drop_schema().await;
}

/// Completes `k` through `store`, hides its table, and sends `k` again:
/// only a record cache can answer that.
async fn duplicate_with_the_table_hidden(db: &TestDb, store: PostgresStore) -> support::Reply {
    store.migrate().await.unwrap();
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store).source("s"));
    send(&app, request(Some("k"), "{}", &[])).await;
    let client = db.client().await;
    client
        .batch_execute("ALTER TABLE cached RENAME TO hidden")
        .await
        .unwrap();
    let duplicate = send(&app, request(Some("k"), "{}", &[])).await;
    client.batch_execute("DROP TABLE hidden").await.unwrap();
    duplicate
}

#[tokio::test]
async fn store_builders_keep_each_others_settings_in_any_order() {
    let db = TestDb::new("builder_order").await;
    let ttl = Duration::from_secs(60);

    let cache_then_table = PostgresStore::new(db.pool.clone())
        .with_cache(1 << 20, ttl)
        .with_table("cached")
        .unwrap();
    let after_cache = duplicate_with_the_table_hidden(&db, cache_then_table).await;
    let table_then_cache = PostgresStore::new(db.pool.clone())
        .with_table("cached")
        .unwrap()
        .with_cache(1 << 20, ttl);
    let after_table = duplicate_with_the_table_hidden(&db, table_then_cache).await;

    assert!(after_cache.replayed(), "with_table kept the cache: {after_cache:?}");
    assert!(after_table.replayed(), "with_cache kept the table: {after_table:?}");
    db.drop_schema().await;
}

/// The table's sequential and index scans so far, as the statistics have
/// them.
async fn table_scans(db: &TestDb) -> (i64, i64) {
    let row = db
        .client()
        .await
        .query_one(
            "SELECT pg_stat_get_numscans(c.oid),
                    (SELECT coalesce(sum(pg_stat_get_numscans(i.indexrelid)), 0)::int8
                     FROM pg_index i WHERE i.indrelid = c.oid),
                    pg_stat_get_tuples_inserted(c.oid) + pg_stat_get_tuples_updated(c.oid)
             FROM pg_class c WHERE c.oid = 'idempotency_records'::regclass",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Waits until the statistics hold `writes` rows inserted or updated:
/// another session's statistics arrive once it has ended.
async fn statistics_hold_writes(db: &TestDb, writes: i64) {
    let query = "SELECT pg_stat_get_tuples_inserted(c.oid) + pg_stat_get_tuples_updated(c.oid)
                 FROM pg_class c WHERE c.oid = 'idempotency_records'::regclass";
    support::wait_until("the setup's statistics are in", Duration::from_secs(30), || async {
        db.count(query).await == writes
    })
    .await;
}

#[tokio::test]
async fn gauges_read_open_claims_and_expired_records_through_the_indexes_without_a_full_scan() {
    let db = TestDb::new("gauges_indexes").await;
    // The setup (building the indexes scans the table) runs in a session
    // of its own, which ends before the count of scans starts, so that its
    // statistics (which reach other sessions when it ends) are all in by
    // then.
    let setup = support::connect().await;
    setup
        .batch_execute(&format!("SET search_path = {}", db.schema))
        .await
        .unwrap();
    setup
        .batch_execute(&PostgresStore::migration_sql(tower_idempotency::DEFAULT_TABLE).unwrap())
        .await
        .unwrap();
    seed_on(&setup, 3).await;
    // One open claim whose lease ran out before its retention did.
    setup
        .execute(
            "UPDATE idempotency_records SET locked_until = now() - interval '1 minute', expires_at = now() + interval '1 day'
             WHERE event_type = 'leased' AND key = '1'",
            &[],
        )
        .await
        .unwrap();
    // Enough live records that reading them all would be the plan's cost.
    setup
        .execute(
            "INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, response_status,
                                              created_at, completed_at, expires_at)
             SELECT 's', 'bulk', n::text, '\\x00'::bytea, 2, 200, now(), now(), now() + interval '1 day'
             FROM generate_series(1, 20000) AS n",
            &[],
        )
        .await
        .unwrap();
    setup.batch_execute("ANALYZE idempotency_records").await.unwrap();
    drop(setup);
    statistics_hold_writes(&db, 9 + 1 + 20_000).await;
    let (seq_before, index_before) = table_scans(&db).await;
    let store = PostgresStore::new(support::pool(
        support::on_schema(support::database_config(), &db.schema, &db.schema),
        1,
        None,
    ));

    let gauges = store.gauges().await.unwrap();
    // The store's one session ends too, so that its statistics come in.
    store.pool().close();

    let (seq_after, index_after) = loop {
        let (seq, index) = table_scans(&db).await;
        if index > index_before {
            break (seq, index);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(seq_after, seq_before, "the gauges read no table in full");
    assert_eq!(index_after - index_before, 4, "four index scans: two of each index");
    // The seeded claims were taken 40 days ago; the expired records expired a day ago.
    let days = |age: Option<Duration>| age.map(|age| age.as_secs_f64() / 86_400.0);
    let oldest_open_claim = days(gauges.oldest_open_claim_age).expect("an open claim");
    assert!((39.99..40.01).contains(&oldest_open_claim), "{gauges:?}");
    assert_eq!(gauges.claims_past_lease, 1, "{gauges:?}");
    assert_eq!(gauges.expired_awaiting_purge, 3, "{gauges:?}");
    let oldest_expired = days(gauges.oldest_expired_age).expect("an expired record");
    assert!((0.99..1.01).contains(&oldest_expired), "{gauges:?}");
    let size = db.count("SELECT pg_total_relation_size('idempotency_records')").await;
    assert_eq!(gauges.table_bytes, size);

    let store = db.store().await;
    store.purge_expired(100).await.unwrap();
    let after_purge = store.gauges().await.unwrap();
    assert_eq!(after_purge.expired_awaiting_purge, 0);
    assert_eq!(after_purge.oldest_expired_age, None);
    db.drop_schema().await;
}

#[tokio::test]
async fn gauges_of_an_empty_table_say_nothing_is_open_or_expired() {
    let db = TestDb::new("gauges_empty").await;
    let store = db.store().await;

    let gauges = store.gauges().await.unwrap();

    assert_eq!(gauges.oldest_open_claim_age, None);
    assert_eq!(gauges.claims_past_lease, 0);
    assert_eq!(gauges.expired_awaiting_purge, 0);
    assert_eq!(gauges.oldest_expired_age, None);
    assert!(gauges.table_bytes > 0, "{gauges:?}");
    db.drop_schema().await;
}

#[tokio::test]
async fn gauges_count_expired_records_up_to_ten_thousand() {
    let db = TestDb::new("gauges_cap").await;
    let store = db.store().await;
    seed(&db, 10_050).await;

    let gauges = store.gauges().await.unwrap();

    assert_eq!(gauges.expired_awaiting_purge, 10_000);
    assert_eq!(store.stats().await.unwrap().expired_awaiting_purge, 10_050);
    db.drop_schema().await;
}

#[tokio::test]
async fn the_purge_task_deletes_expired_records_in_the_background() {
    let db = TestDb::new("purge_task").await;
    let store = db.store().await;
    seed(&db, 10).await;

    let task = store.spawn_purge_task(Duration::from_millis(10), 3);
    let emptied = tokio::time::timeout(Duration::from_secs(10), async {
        while count_kind(&db, "expired").await > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    task.abort();

    assert!(emptied.is_ok(), "the purge task never emptied the expired records");
    assert_eq!(count_kind(&db, "live").await, 10);
    db.drop_schema().await;
}

// ---------------------------------------------------------------------------
// The admin command, built with the `admin` feature

/// Runs `idempotency-admin` against the test's schema.
#[cfg(feature = "admin")]
fn admin(db: &TestDb, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_idempotency-admin"))
        .args(args)
        .env("DATABASE_URL", support::schema_url(&db.schema))
        .output()
        .expect("run idempotency-admin")
}

#[cfg(feature = "admin")]
fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[cfg(feature = "admin")]
fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_migrate_creates_the_table_it_is_given() {
    let db = TestDb::new("admin_migrate").await;
    let migrated = admin(&db, &["--table", "ops.records", "migrate"]);
    assert!(migrated.status.success(), "{}", stderr(&migrated));
    assert_eq!(db.count("SELECT count(*) FROM ops.records").await, 0);
    support::connect()
        .await
        .batch_execute("DROP SCHEMA ops CASCADE")
        .await
        .unwrap();
    db.drop_schema().await;
}

/// A migrated schema with 4 records of each kind (see [`seed`]).
#[cfg(feature = "admin")]
async fn seeded_with_4_of_each(name: &str) -> TestDb {
    let db = TestDb::new(name).await;
    db.store().await;
    seed(&db, 4).await;
    db
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_stats_counts_the_records_the_purge_would_delete() {
    let db = seeded_with_4_of_each("admin_stats").await;

    let stats = admin(&db, &["stats", "--json"]);

    assert!(stats.status.success(), "{}", stderr(&stats));
    let figures: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    assert_eq!(figures["completed"], 4);
    assert_eq!(figures["in_flight"], 4, "the open claims with a running lease");
    assert!(figures["oldest_in_flight"].is_string());
    assert_eq!(figures["expired_awaiting_purge"], 4, "what the purge deletes");
    let text = stdout(&admin(&db, &["stats"]));
    assert!(text.contains("expired awaiting purge  4"), "{text}");
    assert!(text.contains("in flight               4"), "{text}");
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_purge_dry_run_deletes_nothing() {
    let db = seeded_with_4_of_each("admin_purge_dry_run").await;

    let dry = admin(&db, &["purge", "--dry-run"]);

    assert_eq!(stdout(&dry).trim(), "4 expired records would be purged");
    assert_eq!(count_kind(&db, "expired").await, 4, "a dry run deletes nothing");
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_purge_deletes_the_expired_records_in_batches() {
    let db = seeded_with_4_of_each("admin_purge").await;

    let purged = admin(&db, &["purge", "--batch", "3"]);

    assert_eq!(stdout(&purged).trim(), "purged 4 expired records");
    assert_eq!(count_kind(&db, "expired").await, 0);
    db.drop_schema().await;
}

/// A schema holding a completed record (`stripe`/`evt_1`, answered 201 with
/// `run 1`) and an open claim (`stripe`/`busy`).
#[cfg(feature = "admin")]
async fn with_a_completed_record_and_an_open_claim(name: &str) -> TestDb {
    let db = TestDb::new(name).await;
    let store = db.store().await;
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store).source("stripe"));
    send(&app, request(Some("evt_1"), "{}", &[("x-test-status", "201")])).await;
    db.client()
        .await
        .execute(
            "INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, claim_token, locked_until, expires_at)
             VALUES ('stripe', '', 'busy', '\\x00', 1, gen_random_uuid(), now() + interval '1 hour', now() + interval '1 day')",
            &[],
        )
        .await
        .unwrap();
    db
}

#[cfg(feature = "admin")]
async fn records_with_key(db: &TestDb, key: &str) -> i64 {
    db.count(&format!("SELECT count(*) FROM idempotency_records WHERE key = '{key}'"))
        .await
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_show_prints_a_record_with_its_response() {
    let db = with_a_completed_record_and_an_open_claim("admin_show").await;

    let shown = admin(&db, &["show", "stripe", "", "evt_1", "--json"]);

    assert!(shown.status.success(), "{}", stderr(&shown));
    let record: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(record["state"], "completed");
    assert_eq!(record["response"]["status"], 201);
    assert_eq!(record["response"]["body"], "run 1");
    assert!(stdout(&admin(&db, &["show", "stripe", "", "evt_1"])).contains("response      201"));
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_show_names_an_open_claim_in_flight() {
    let db = with_a_completed_record_and_an_open_claim("admin_show_in_flight").await;

    let shown = admin(&db, &["show", "stripe", "", "busy", "--json"]);

    assert!(shown.status.success(), "{}", stderr(&shown));
    let record: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(record["state"], "in_flight");
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_show_of_a_missing_record_exits_with_code_3() {
    let db = with_a_completed_record_and_an_open_claim("admin_show_missing").await;
    assert_eq!(admin(&db, &["show", "stripe", "", "nope"]).status.code(), Some(3));
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_delete_of_an_open_claim_needs_force() {
    let db = with_a_completed_record_and_an_open_claim("admin_delete_open").await;

    let refused = admin(&db, &["delete", "stripe", "", "busy"]);
    assert_eq!(refused.status.code(), Some(4));
    assert!(stderr(&refused).contains("--force"));
    let forced = admin(&db, &["delete", "stripe", "", "busy", "--force", "--by", "alice"]);
    assert!(forced.status.success());
    assert!(stderr(&forced).contains("by alice at "), "{}", stderr(&forced));

    assert_eq!(records_with_key(&db, "busy").await, 0);
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_delete_deletes_a_completed_record_once() {
    let db = with_a_completed_record_and_an_open_claim("admin_delete").await;

    let deleted = admin(&db, &["delete", "stripe", "", "evt_1"]);
    assert!(deleted.status.success());
    assert_eq!(stdout(&deleted).trim(), "deleted");
    assert_eq!(admin(&db, &["delete", "stripe", "", "evt_1"]).status.code(), Some(3));

    assert_eq!(records_with_key(&db, "evt_1").await, 0);
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_release_is_the_former_name_of_delete() {
    let db = with_a_completed_record_and_an_open_claim("admin_release_alias").await;

    assert!(admin(&db, &["release", "stripe", "", "evt_1"]).status.success());

    assert_eq!(records_with_key(&db, "evt_1").await, 0);
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_help_covers_every_command() {
    let db = TestDb::new("admin_help").await;
    assert!(stdout(&admin(&db, &["--help"])).contains("Commands:"));
    for command in ["migrate", "stats", "purge", "show", "delete", "release"] {
        let help = admin(&db, &[command, "--help"]);
        assert!(
            help.status.success() && stdout(&help).starts_with("Usage:"),
            "{command}"
        );
    }
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[tokio::test]
async fn admin_usage_errors_exit_with_code_2() {
    let db = TestDb::new("admin_usage").await;
    assert_eq!(admin(&db, &["frobnicate"]).status.code(), Some(2));
    assert_eq!(admin(&db, &["show", "only-one-arg"]).status.code(), Some(2));
    assert_eq!(admin(&db, &["purge", "--batch", "0"]).status.code(), Some(2));
    assert_eq!(admin(&db, &["--table", "bad-name", "stats"]).status.code(), Some(2));
    db.drop_schema().await;
}

#[cfg(feature = "admin")]
#[test]
fn admin_with_an_unreachable_database_exits_with_code_1_without_a_panic() {
    let unreachable = std::process::Command::new(env!("CARGO_BIN_EXE_idempotency-admin"))
        .arg("stats")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/postgres")
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(!stderr(&unreachable).contains("panicked"));
}

#[tokio::test]
async fn a_store_without_its_table_says_to_migrate() {
    let db = TestDb::new("missing_table").await;
    let store = PostgresStore::new(db.pool.clone());
    let probe = Probe::default();
    let app = probe.app(IdempotencyLayer::new(store.clone()));
    let reply = send(&app, request(Some("k"), "{}", &[])).await;
    assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(reply.problem_type(), "urn:tower-idempotency:store-misconfigured");
    assert!(reply.text().contains("migrate()"), "{}", reply.text());
    assert_eq!(probe.runs(), 0);
    db.drop_schema().await;
}
