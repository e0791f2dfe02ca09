//! A bounded in-process cache of completed records, so that a hot duplicate
//! costs no database round trip.
//!
//! Only completed records enter it, and a completed record changes only by
//! expiring or by an operator's release; so an entry is served until the
//! earlier of its time-to-live and its record's expiry. After a release on
//! another instance, this instance may still replay the released key for up
//! to the time-to-live.

use std::time::{Duration, Instant};

use quick_cache::sync::Cache;
use quick_cache::Weighter;

use super::Completed;
use crate::key::RecordKey;

/// Completed records by key, bounded by their total size in bytes.
pub(super) struct RecordCache {
    entries: Cache<RecordKey, Entry, EntryWeight>,
    ttl: Duration,
}

#[derive(Clone)]
struct Entry {
    completed: Completed,
    fresh_until: Instant,
}

/// Weighs an entry by the bytes it holds, so a few large responses cannot
/// exceed the bound that many small ones respect.
#[derive(Clone)]
struct EntryWeight;

impl Weighter<RecordKey, Entry> for EntryWeight {
    fn weight(&self, key: &RecordKey, entry: &Entry) -> u64 {
        let response = &entry.completed.response;
        let headers: usize = response
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len())
            .sum();
        let body = response.body.as_ref().map_or(0, |body| body.len());
        (key.source.len() + key.event_type.len() + key.key.len() + headers + body + 128) as u64
    }
}

impl RecordCache {
    /// At most `max_bytes` of records, each served for at most `ttl`.
    pub(super) fn new(max_bytes: u64, ttl: Duration) -> Self {
        // Sized for records of about 1 KiB; the weigher enforces the bound.
        let estimated_items = usize::try_from(max_bytes / 1024).unwrap_or(usize::MAX).max(16);
        Self {
            entries: Cache::with_weighter(estimated_items, max_bytes, EntryWeight),
            ttl,
        }
    }

    pub(super) fn get(&self, key: &RecordKey) -> Option<Completed> {
        let entry = self.entries.get(key)?;
        if entry.fresh_until > Instant::now() {
            return Some(entry.completed);
        }
        self.entries.remove(key);
        None
    }

    /// Keeps a completed record that stays valid for `valid_for`.
    pub(super) fn insert(&self, key: &RecordKey, completed: Completed, valid_for: Duration) {
        let fresh_until = Instant::now() + valid_for.min(self.ttl);
        self.entries.insert(key.clone(), Entry { completed, fresh_until });
    }

    pub(super) fn remove(&self, key: &RecordKey) {
        self.entries.remove(key);
    }

    #[cfg(test)]
    fn weight(&self) -> u64 {
        self.entries.weight()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::StoredResponse;
    use bytes::Bytes;
    use http::StatusCode;

    fn key(name: &str) -> RecordKey {
        RecordKey::for_tests(name)
    }

    fn completed(body_bytes: usize) -> Completed {
        Completed {
            fingerprint: [0; 32],
            response: StoredResponse {
                status: StatusCode::OK,
                headers: Vec::new(),
                body: Some(Bytes::from(vec![b'x'; body_bytes])),
                trailers: None,
            },
        }
    }

    #[test]
    fn entries_are_served_until_their_ttl() {
        let cache = RecordCache::new(1 << 20, Duration::from_secs(60));
        cache.insert(&key("a"), completed(10), Duration::from_secs(3600));
        cache.insert(&key("b"), completed(10), Duration::ZERO);
        assert!(cache.get(&key("a")).is_some());
        assert!(cache.get(&key("b")).is_none(), "an expired record is never served");
    }

    #[test]
    fn the_total_size_stays_under_the_bound() {
        let cache = RecordCache::new(64 * 1024, Duration::from_secs(60));
        for n in 0..1000 {
            cache.insert(&key(&n.to_string()), completed(1024), Duration::from_secs(60));
        }
        assert!(cache.weight() <= 64 * 1024, "{}", cache.weight());
    }
}
