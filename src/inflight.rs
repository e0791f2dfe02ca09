//! Keys in flight on this instance, so that local duplicates wait in
//! process (holding no pooled connection) instead of queueing on Postgres.
//!
//! An entry lives only while its request holds the key, so the map is bounded
//! by the number of requests in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::key::RecordKey;

#[derive(Debug, Default)]
pub(crate) struct LocalInFlight {
    holders: Mutex<HashMap<RecordKey, watch::Receiver<()>>>,
}

/// The result of entering a key.
pub(crate) enum Entry {
    /// This request holds the key locally until the guard drops.
    Holder(HolderGuard),
    /// Another local request holds it; `changed()` resolves (with an error)
    /// when that request finishes.
    Waiter(watch::Receiver<()>),
}

impl LocalInFlight {
    pub(crate) fn enter(self: &Arc<Self>, key: &RecordKey) -> Entry {
        let mut holders = self.holders.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(receiver) = holders.get(key) {
            return Entry::Waiter(receiver.clone());
        }
        let (sender, receiver) = watch::channel(());
        holders.insert(key.clone(), receiver);
        Entry::Holder(HolderGuard {
            registry: Arc::clone(self),
            key: key.clone(),
            _sender: sender,
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.holders.lock().map(|holders| holders.len()).unwrap_or(0)
    }
}

/// Removes its key when dropped; dropping the sender wakes every waiter.
pub(crate) struct HolderGuard {
    registry: Arc<LocalInFlight>,
    key: RecordKey,
    _sender: watch::Sender<()>,
}

impl Drop for HolderGuard {
    fn drop(&mut self) {
        let mut holders = self
            .registry
            .holders
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        holders.remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> RecordKey {
        RecordKey::for_tests(name)
    }

    #[tokio::test]
    async fn waiters_wake_when_the_holder_finishes_and_the_entry_goes() {
        let registry = Arc::new(LocalInFlight::default());
        let Entry::Holder(holder) = registry.enter(&key("a")) else {
            panic!("first must hold")
        };
        let Entry::Waiter(mut waiter) = registry.enter(&key("a")) else {
            panic!("second must wait")
        };
        assert!(matches!(registry.enter(&key("b")), Entry::Holder(_)));
        drop(holder);
        assert!(waiter.changed().await.is_err());
        assert_eq!(registry.len(), 0);
        assert!(matches!(registry.enter(&key("a")), Entry::Holder(_)));
    }
}
