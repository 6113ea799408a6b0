//! A string-keyed map split into independently locked shards, so that lookups
//! for different keys rarely wait on each other. Used by the registry and topics.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

const SHARDS: usize = 16;

type Map<V> = HashMap<Arc<str>, V>;

pub(crate) struct ShardedMap<V> {
    spread: Spread,
    shards: Box<[RwLock<Map<V>>]>,
}

/// Picks a shard for a key: seeded FNV-1a, then the first step of MurmurHash3's
/// 64-bit finisher (plain FNV mixes the last bytes into few of the high bits:
/// it failed `keys_spread_over_every_shard`). Cheaper than SipHash, so that a
/// sharded map hashes a key with SipHash once, in the shard's own map, and not
/// a second time to find the shard.
///
/// It is no keyed function: keys chosen to land in one shard can be found by
/// someone who learns the seed. Use it only where that costs lock contention
/// and nothing worse, that is in front of maps that resist chosen keys
/// themselves (std's `HashMap`, each with its own SipHash key).
#[derive(Clone, Copy)]
pub struct Spread {
    seed: u64,
}

impl Spread {
    /// A spread with a random seed.
    pub fn new() -> Self {
        Self::with_seed(RandomState::new().hash_one(0x5eed_u64))
    }

    /// A spread with this seed: the same keys go to the same shards.
    pub fn with_seed(seed: u64) -> Self {
        Self { seed }
    }

    /// The shard of `key`, out of `shards`.
    pub fn shard(&self, key: &[u8], shards: usize) -> usize {
        let hash = key.iter().fold(self.seed, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        });
        let mixed = (hash ^ (hash >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        // The high bits are the best mixed.
        (mixed >> 32) as usize % shards
    }
}

impl Default for Spread {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Spread {
    /// Without the seed, which should stay secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Spread")
    }
}

impl<V> ShardedMap<V> {
    pub fn new() -> Self {
        Self::with_spread(Spread::new())
    }

    fn with_spread(spread: Spread) -> Self {
        Self {
            spread,
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    /// The shard of `key` (see [`Spread`]).
    fn shard(&self, key: &str) -> &RwLock<Map<V>> {
        &self.shards[self.spread.shard(key.as_bytes(), SHARDS)]
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
            let map = ShardedMap::<()>::with_spread(Spread::with_seed(seed));
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
