//! Keys this instance has recently seen completed: the hint that picks a
//! request's first database step.
//!
//! A likely duplicate is checked with one plain read (one statement); any
//! other request goes straight to its claim, whose own read, taken after the
//! advisory lock, answers a duplicate just as well, so a first delivery saves
//! the separate read's round trip. The hint is never trusted for an answer:
//! a wrong guess costs a few statements, never a double run or a wrong replay.
//!
//! Fixed size and lock-free: one 64-bit hash per slot, direct-mapped, so a
//! key is forgotten when another lands on its slot.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::key::RecordKey;

/// Slots in a store's table (64 KiB): enough for the keys of a retry storm.
const SLOTS: usize = 8192;

pub(super) struct RecentKeys {
    slots: Box<[AtomicU64]>,
    hasher: RandomState,
}

impl RecentKeys {
    pub(super) fn new() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
        }
    }

    /// The key's hash (never 0, which marks an empty slot) and its slot.
    fn locate(&self, key: &RecordKey) -> (u64, &AtomicU64) {
        let hash = self.hasher.hash_one(key) | 1;
        let slot = &self.slots[(hash >> 1) as usize % self.slots.len()];
        (hash, slot)
    }

    /// Remembers that `key` was seen completed.
    pub(super) fn insert(&self, key: &RecordKey) {
        let (hash, slot) = self.locate(key);
        slot.store(hash, Ordering::Relaxed);
    }

    /// Whether `key` was seen completed and not forgotten since.
    pub(super) fn contains(&self, key: &RecordKey) -> bool {
        let (hash, slot) = self.locate(key);
        slot.load(Ordering::Relaxed) == hash
    }

    /// Forgets `key` (its record was released).
    pub(super) fn remove(&self, key: &RecordKey) {
        let (hash, slot) = self.locate(key);
        let _ = slot.compare_exchange(hash, 0, Ordering::Relaxed, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> RecordKey {
        RecordKey::for_tests(name)
    }

    #[test]
    fn remembers_and_forgets_keys() {
        let recent = RecentKeys::new();
        assert!(!recent.contains(&key("a")));
        recent.insert(&key("a"));
        assert!(recent.contains(&key("a")));
        assert!(!recent.contains(&key("b")));
        recent.remove(&key("a"));
        assert!(!recent.contains(&key("a")));
    }

    #[test]
    fn memory_is_fixed_whatever_the_traffic() {
        let recent = RecentKeys::new();
        for n in 0..10 * SLOTS {
            recent.insert(&key(&n.to_string()));
        }
        assert_eq!(recent.slots.len(), SLOTS);
        let remembered = (0..10 * SLOTS)
            .filter(|n| recent.contains(&key(&n.to_string())))
            .count();
        assert!(remembered <= SLOTS, "{remembered}");
        assert!(
            recent.contains(&key(&(10 * SLOTS - 1).to_string())),
            "the latest key stays"
        );
    }
}
