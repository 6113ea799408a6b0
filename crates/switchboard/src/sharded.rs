//! A string-keyed map split into independently locked shards, so that lookups
//! for different keys rarely wait on each other. Used by the registry and topics.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

const SHARDS: usize = 16;

type Map<V> = HashMap<Arc<str>, V>;

pub(crate) struct ShardedMap<V> {
    hasher: RandomState,
    shards: Box<[RwLock<Map<V>>]>,
}

impl<V> ShardedMap<V> {
    pub fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &str) -> &RwLock<Map<V>> {
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// The shard holding `key`, for reading. Every update is one call under the
    /// write lock, so a shard is consistent even if a holder panicked.
    pub fn read(&self, key: &str) -> RwLockReadGuard<'_, Map<V>> {
        self.shard(key).read().unwrap_or_else(|e| e.into_inner())
    }

    /// The shard holding `key`, for writing.
    pub fn write(&self, key: &str) -> RwLockWriteGuard<'_, Map<V>> {
        self.shard(key).write().unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `visit` with every entry, holding one shard's read lock at a time.
    pub fn for_each(&self, mut visit: impl FnMut(&Arc<str>, &V)) {
        for shard in &*self.shards {
            let shard = shard.read().unwrap_or_else(|e| e.into_inner());
            for (key, value) in shard.iter() {
                visit(key, value);
            }
        }
    }

    /// How many keys there are in all.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}
