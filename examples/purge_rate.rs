//! Measures how fast `PostgresStore::purge_expired` deletes expired records
//! while as many live records stay, on the Postgres at `DATABASE_URL`.
//!
//! ```text
//! cargo run --release --example purge_rate            # 1,000,000 expired records
//! RECORDS=200000 BATCH=5000 cargo run --release --example purge_rate
//! ```
//!
//! It works in a scratch schema `purge_rate_<pid>`, dropped at the end, and
//! prints the rate and how it compares with 10 million records a day.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::time::Instant;

use tower_idempotency::PostgresStore;

/// Records a day the purge must keep up with.
const DAILY_VOLUME: f64 = 10_000_000.0;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("purge_rate: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let records: i64 = common::setting("RECORDS", "1000000", |text| text.parse().map_err(|_| "a count".into()))?;
    let batch: u32 = common::setting("BATCH", "10000", |text| text.parse().map_err(|_| "a count".into()))?;
    let mut database = common::database_setting()?;
    let schema = format!("purge_rate_{}", std::process::id());
    database.options(format!("-c search_path={schema}"));
    let pool = common::connection_pool(database, 2, tower_idempotency::PoolMode::Session)?;
    let client = pool
        .get()
        .await
        .map_err(|error| format!("cannot connect (DATABASE_URL): {error}"))?;
    let sql = |error: tokio_postgres::Error| format!("database error: {}", common::error_chain(&error));
    // Seeding takes longer than the pool's statement timeout; each purge
    // batch does not.
    client
        .batch_execute(&format!("SET statement_timeout = 0; CREATE SCHEMA {schema}"))
        .await
        .map_err(sql)?;
    let store = PostgresStore::new(pool.clone());
    store.migrate().await.map_err(|error| error.to_string())?;

    println!("seeding {records} expired and {records} live records ...");
    client
        .execute(
            "INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, response_status,
                                              response_headers, response_body, created_at, completed_at, expires_at)
             SELECT 'stripe', 'payment_intent.succeeded', 'evt_' || n || '_' || live, sha256(n::text::bytea), 2, 200,
                    '\\x0100000001000c636f6e74656e742d74797065000000106170706c69636174696f6e2f6a736f6effffffff'::bytea,
                    convert_to('{\"ledger_entry_id\":' || n || '}', 'UTF8'),
                    now() - interval '31 days', now() - interval '31 days',
                    CASE WHEN live THEN now() + interval '1 day' ELSE now() - interval '1 day' END
             FROM generate_series(1, $1::int8) AS n, (VALUES (false), (true)) AS kinds(live)",
            &[&records],
        )
        .await
        .map_err(sql)?;
    client.batch_execute("ANALYZE idempotency_records").await.map_err(sql)?;

    let started = Instant::now();
    let deleted = store.purge_expired(batch).await.map_err(|error| error.to_string())?;
    let elapsed = started.elapsed().as_secs_f64();
    let rate = deleted as f64 / elapsed;
    println!(
        "purged {deleted} expired records in batches of {batch} in {elapsed:.1} s: {rate:.0} records/s, \
         {:.0} million a day, {:.1}x of {} million a day",
        rate * 86_400.0 / 1e6,
        rate * 86_400.0 / DAILY_VOLUME,
        DAILY_VOLUME / 1e6,
    );
    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .map_err(sql)?;
    Ok(())
}
