//! Bounded memory: 100,000 distinct events and as many duplicates through
//! the example receiver (a real process, transaction mode), its resident set
//! size (`VmRSS` of `/proc/<pid>/status`) sampled every 5,000 events. After
//! a warm-up of 10,000 events the RSS may not grow by more than
//! `GROWTH_BOUND_KIB`: nothing is kept per key in process memory.
//!
//! `MEMORY_EVENTS` lowers the event count for a quick local run.

mod process;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use process::{Receiver, Schema};

const DEFAULT_EVENTS: usize = 100_000;
const WARM_UP: usize = 10_000;
const SAMPLE_EVERY: usize = 5_000;
const CONCURRENCY: usize = 16;
/// Allowed RSS growth after the warm-up, in KiB.
const GROWTH_BOUND_KIB: u64 = 8 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_stays_flat_over_100k_events_and_their_duplicates() {
    let events: usize = std::env::var("MEMORY_EVENTS")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(DEFAULT_EVENTS);
    let schema = Schema::new("memory_bound").await;
    let receiver = Receiver::start(&schema, &[("POOL_SIZE", "16")]).await;
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (http, next, finished) = (receiver.http(), next.clone(), finished.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    if n >= events {
                        return;
                    }
                    let event = format!("evt_memory_{n:06}");
                    let first = http.deliver(&event).await.expect("a first delivery");
                    assert_eq!(first.status, StatusCode::OK, "{first:?}");
                    assert!(!first.replayed(), "{first:?}");
                    let duplicate = http.deliver(&event).await.expect("a duplicate");
                    assert!(duplicate.replayed(), "{duplicate:?}");
                    assert_eq!(duplicate.body, first.body);
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    // Sample the RSS as events complete.
    let mut samples: Vec<(usize, u64)> = Vec::new();
    let mut next_sample = WARM_UP.min(events);
    while next_sample <= events {
        support::wait_until("the next sampling point", Duration::from_secs(300), || async {
            finished.load(Ordering::SeqCst) >= next_sample
        })
        .await;
        samples.push((next_sample, receiver.rss_kib()));
        next_sample += SAMPLE_EVERY;
    }
    for worker in workers {
        worker.await.expect("a load worker");
    }
    let elapsed = started.elapsed();
    let baseline = samples[0].1;
    let peak = samples.iter().map(|&(_, rss)| rss).max().unwrap_or(baseline);
    eprintln!(
        "{events} events + {events} duplicates in {elapsed:?} ({:.0} requests/s); RSS after warm-up {baseline} KiB, \
         peak {peak} KiB, growth {} KiB; samples (events, KiB): {samples:?}",
        (2 * events) as f64 / elapsed.as_secs_f64(),
        peak.saturating_sub(baseline),
    );
    assert!(
        peak.saturating_sub(baseline) <= GROWTH_BOUND_KIB,
        "RSS grew by {} KiB after the warm-up (bound {GROWTH_BOUND_KIB} KiB): {samples:?}",
        peak - baseline
    );
    assert_eq!(
        schema
            .count("SELECT count(*) FROM {schema}.idempotency_records WHERE state = 2")
            .await,
        events as i64
    );
    assert_eq!(
        schema.count("SELECT count(*) FROM {schema}.ledger_entries").await,
        events as i64
    );
}
