//! A string-keyed map split into independently locked shards, so that lookups
//! for different keys rarely wait on each other. Used by the registry and topics.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

const SHARDS: usize = 16;

type Map<V> = HashMap<Arc<str>, V>;

pub(crate) struct ShardedMap<V> {
    /// Where this map's keys start their walk to a shard.
    seed: u64,
    shards: Box<[RwLock<Map<V>>]>,
}

impl<V> ShardedMap<V> {
    pub fn new() -> Self {
        Self::with_seed(RandomState::new().hash_one(SHARDS))
    }

    fn with_seed(seed: u64) -> Self {
        Self {
            seed,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    /// The shard of `key`, by FNV-1a from a secret random seed, mixed: a lookup
    /// then hashes the key once with SipHash (the shard's map), not twice. The
    /// map's hash is the one that must resist chosen keys (ids are the clients'
    /// to pick), and each shard's map has its own SipHash key: keys driven into
    /// one shard (FNV is no keyed function) only make its lock the map's one lock.
    fn shard(&self, key: &str) -> &RwLock<Map<V>> {
        let hash = key.bytes().fold(self.seed, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
        });
        // FNV mixes the last bytes into few of the high bits: a shift and a
        // multiply more (the first step of MurmurHash3's 64-bit finisher)
        // spread them (plain FNV failed the test below).
        let mixed = (hash ^ (hash >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        &self.shards[(mixed >> 32) as usize % SHARDS]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_every_shard() {
        // Fixed seeds, so that a failure can be reproduced.
        for seed in [0, 1, 0x9e37_79b9_7f4a_7c15, u64::MAX] {
            let map = ShardedMap::<()>::with_seed(seed);
            for i in 0..4_000 {
                // Ids as clients pick them: numbers, and names sharing a prefix.
                for key in [i.to_string(), format!("user-{i}")] {
                    map.write(&key).insert(key.as_str().into(), ());
                }
            }
            let sizes: Vec<usize> = map.shards.iter().map(|s| s.read().unwrap().len()).collect();
            let (least, most) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            // 500 a shard on average.
            assert!(
                *least > 350 && *most < 650,
                "seed {seed}: shard sizes {sizes:?}"
            );
            assert_eq!(map.len(), 8_000);
        }
    }
}
