//! Measures what `PostgresStore::gauges` (the read behind
//! `spawn_metrics_task`) costs the database on a large table, on the
//! Postgres at `DATABASE_URL`.
//!
//! ```text
//! cargo run --release --example gauges_cost          # 1,000,000 live records
//! LIVE=200000 cargo run --release --example gauges_cost
//! ```
//!
//! It works in a scratch schema `gauges_cost_<pid>`, dropped at the end:
//! seeds `LIVE` completed records, 100 open claims (10 of them past their
//! lease) and 10 expired records (a purge that keeps up), times `READS`
//! reads of the gauges, then adds 20,000 expired records (a purge behind:
//! the count stops at 10,000) and times them again.

#[path = "common/mod.rs"]
mod common;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use tower_idempotency::{PoolMode, PostgresStore};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("gauges_cost: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), String> {
    let live: i64 = common::setting("LIVE", "1000000", |text| text.parse().map_err(|_| "a count".into()))?;
    let reads: usize = common::setting("READS", "100", common::positive)?;
    let mut database = common::database_setting()?;
    let schema = format!("gauges_cost_{}", std::process::id());
    database.options(format!("-c search_path={schema}"));
    let pool = common::connection_pool(database, 2, PoolMode::Session)?;
    let client = pool
        .get()
        .await
        .map_err(|error| format!("cannot connect (DATABASE_URL): {error}"))?;
    let sql = |error: tokio_postgres::Error| format!("database error: {}", common::error_chain(&error));
    client
        .batch_execute(&format!("SET statement_timeout = 0; CREATE SCHEMA {schema}"))
        .await
        .map_err(sql)?;
    let store = PostgresStore::new(pool.clone());
    store.migrate().await.map_err(|error| error.to_string())?;

    println!("seeding {live} live records, 100 open claims (10 past their lease) and 10 expired records ...");
    client
        .batch_execute(&format!(
            "INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, response_status,
                                              response_headers, response_body, created_at, completed_at, expires_at)
             SELECT 'stripe', 'charge.succeeded', 'evt_' || n, sha256(n::text::bytea), 2, 200, '\\x01'::bytea,
                    convert_to('{{\"ledger_entry_id\":' || n || '}}', 'UTF8'),
                    now() - (n % 2592000) * interval '1 second', now() - (n % 2592000) * interval '1 second',
                    now() + interval '30 days' - (n % 2592000) * interval '1 second'
             FROM generate_series(1, {live}) AS n;
             INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, claim_token, locked_until,
                                              created_at, expires_at)
             SELECT 'stripe', 'leased', 'evt_' || n, sha256(n::text::bytea), 1, gen_random_uuid(),
                    now() + CASE WHEN n <= 10 THEN interval '-1 minute' ELSE interval '1 minute' END,
                    now() - n * interval '1 second', now() + interval '30 days' - n * interval '1 second'
             FROM generate_series(1, 100) AS n;
             INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, response_status,
                                              created_at, completed_at, expires_at)
             SELECT 'stripe', 'expired', 'evt_' || n, sha256(n::text::bytea), 2, 200,
                    now() - interval '31 days', now() - interval '31 days', now() - n * interval '1 second'
             FROM generate_series(1, 10) AS n"
        ))
        .await
        .map_err(sql)?;
    // Alone: VACUUM cannot run in the implicit transaction of several statements.
    client
        .batch_execute("VACUUM ANALYZE idempotency_records")
        .await
        .map_err(sql)?;
    time_reads(&store, reads, "a purge that keeps up (10 expired)").await?;

    client
        .batch_execute(
            "INSERT INTO idempotency_records (source, event_type, key, fingerprint, state, response_status,
                                              created_at, completed_at, expires_at)
             SELECT 'stripe', 'behind', 'evt_' || n, sha256(n::text::bytea), 2, 200,
                    now() - interval '31 days', now() - interval '31 days', now() - n * interval '1 millisecond'
             FROM generate_series(1, 20000) AS n",
        )
        .await
        .map_err(sql)?;
    client
        .batch_execute("VACUUM ANALYZE idempotency_records")
        .await
        .map_err(sql)?;
    time_reads(&store, reads, "a purge behind (20,010 expired)").await?;

    client
        .batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .await
        .map_err(sql)?;
    Ok(())
}

/// Reads the gauges `reads` times, one after another, and prints the
/// median and the slowest.
async fn time_reads(store: &PostgresStore, reads: usize, state: &str) -> Result<(), String> {
    let mut times = Vec::with_capacity(reads);
    let mut last = None;
    for _ in 0..reads {
        let started = Instant::now();
        last = Some(store.gauges().await.map_err(|error| error.to_string())?);
        times.push(started.elapsed());
    }
    times.sort();
    let ms = |time: Duration| time.as_secs_f64() * 1000.0;
    println!(
        "{state}: {reads} reads, median {:.2} ms, slowest {:.2} ms; last read {last:?}",
        ms(times[reads / 2]),
        ms(times[reads - 1]),
    );
    Ok(())
}
