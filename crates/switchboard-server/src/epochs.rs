//! The memory engine's epochs: which epoch a stream is made with, and which
//! one a stream never written reports.
//!
//! A stream's epoch is derived from the store's seed (random, kept across a
//! graceful restart by the snapshot), the stream's key and a count of the
//! drops in the key's bucket. So:
//! - two streams have different epochs (but for a chance of one in 36^8), and
//!   a position given for one client id is never recovered in another's inbox;
//! - a stream never written reports the epoch it will be made with, so a
//!   client that saw it empty resumes into the messages that came since;
//! - dropping a stream (the byte cap) counts a drop in its bucket, so the
//!   stream made again gets another epoch and no old position is recovered in
//!   it. Only the streams never written whose keys share that bucket (one in
//!   [`BUCKETS`]) change epoch with it and resume `recovered:false` once; a
//!   count per key would grow with every key ever dropped.
//!
//! The derivation is SHA-1, which is stable across builds and platforms: a
//! snapshot's seed and counts give the same epochs to the next binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha1::{Digest, Sha1};

use crate::streams::StreamRef;

/// Buckets of drop counts.
pub const BUCKETS: usize = 4096;
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// Epochs are eight characters of [`ALPHABET`]: 36^8 of them.
const SPAN: u64 = 36u64.pow(8);

/// What a snapshot keeps of [`Epochs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// The seed.
    pub seed: Arc<str>,
    /// The buckets that counted drops, and their counts.
    pub drops: Vec<(usize, u64)>,
}

/// The seed and the drop counts.
#[derive(Debug)]
pub struct Epochs {
    seed: Arc<str>,
    /// Drops per bucket. Relaxed is enough: a key's drop and its next epoch
    /// are taken under the lock of the key's shard.
    drops: Box<[AtomicU64]>,
}

impl Default for Epochs {
    fn default() -> Self {
        Self::new(new_epoch(), &[])
    }
}

impl Epochs {
    /// Epochs from `seed` and the drop counts per bucket (as [`Self::export`]
    /// gives them; buckets past [`BUCKETS`] are ignored).
    pub fn new(seed: Arc<str>, drops: &[(usize, u64)]) -> Self {
        let counts: Box<[AtomicU64]> = (0..BUCKETS).map(|_| AtomicU64::new(0)).collect();
        for &(bucket, count) in drops {
            if let Some(slot) = counts.get(bucket) {
                slot.store(count, Ordering::Relaxed);
            }
        }
        Self {
            seed,
            drops: counts,
        }
    }

    /// The epoch `key`'s stream is made with now (and reports while never
    /// written).
    pub fn of(&self, key: StreamRef<'_>) -> Arc<str> {
        let (bucket, base) = self.hash(key);
        let drops = self.drops[bucket].load(Ordering::Relaxed);
        // Each drop moves the key to the next epoch: none repeats before
        // 36^8 drops in one bucket.
        let mut n = (base + drops % SPAN) % SPAN;
        let mut text = [0u8; 8];
        for c in text.iter_mut().rev() {
            *c = ALPHABET[(n % 36) as usize];
            n /= 36;
        }
        std::str::from_utf8(&text).expect("ASCII").into()
    }

    /// Counts a drop of `key`'s stream: the stream made again gets another
    /// epoch.
    pub fn dropped(&self, key: StreamRef<'_>) {
        let (bucket, _) = self.hash(key);
        self.drops[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The seed and the buckets that counted drops, for a snapshot.
    pub fn export(&self) -> Kept {
        let drops = self
            .drops
            .iter()
            .enumerate()
            .map(|(bucket, count)| (bucket, count.load(Ordering::Relaxed)))
            .filter(|&(_, count)| count > 0)
            .collect();
        Kept {
            seed: self.seed.clone(),
            drops,
        }
    }

    /// The key's bucket and its epoch before any drop.
    fn hash(&self, key: StreamRef<'_>) -> (usize, u64) {
        let (kind, name) = match key {
            StreamRef::Inbox(name) => (b'i', name),
            StreamRef::Topic(name) => (b't', name),
        };
        let mut sha = Sha1::new();
        sha.update(self.seed.as_bytes());
        // The seed is letters and digits: the separator keeps (seed, key)
        // pairs from running into each other.
        sha.update([b'|', kind]);
        sha.update(name.as_bytes());
        let digest = sha.finalize();
        let bucket = usize::from(u16::from_be_bytes([digest[0], digest[1]])) % BUCKETS;
        let base = u64::from_be_bytes(digest[2..10].try_into().expect("eight bytes")) % SPAN;
        (bucket, base)
    }

    #[cfg(test)]
    pub(crate) fn bucket(&self, key: StreamRef<'_>) -> usize {
        self.hash(key).0
    }
}

/// Eight random characters of `a-z0-9`.
pub fn new_epoch() -> Arc<str> {
    let bytes = [
        switchboard::proto::mask::random_key(),
        switchboard::proto::mask::random_key(),
    ]
    .concat();
    let epoch: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    epoch.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_has_its_own_epoch_and_a_drop_moves_it_on() {
        let epochs = Epochs::default();
        let (a, b) = (StreamRef::Inbox("a"), StreamRef::Inbox("b"));
        assert_ne!(epochs.of(a), epochs.of(b));
        assert_ne!(epochs.of(a), epochs.of(StreamRef::Topic("a")));
        let before = epochs.of(a);
        assert_eq!(before.len(), 8);
        assert!(before.bytes().all(|c| ALPHABET.contains(&c)));
        epochs.dropped(a);
        assert_ne!(epochs.of(a), before);
    }

    #[test]
    fn a_drop_moves_only_the_keys_of_its_bucket() {
        let epochs = Epochs::default();
        let dropped = StreamRef::Inbox("dropped");
        let names: Vec<String> = (0..200).map(|i| format!("idle-{i}")).collect();
        let before: Vec<_> = names
            .iter()
            .map(|n| epochs.of(StreamRef::Inbox(n)))
            .collect();
        epochs.dropped(dropped);
        for (name, before) in names.iter().zip(&before) {
            let key = StreamRef::Inbox(name);
            let same_bucket = epochs.bucket(key) == epochs.bucket(dropped);
            assert_eq!(epochs.of(key) != *before, same_bucket, "{name}");
        }
    }

    #[test]
    fn the_seed_and_counts_give_the_same_epochs_again() {
        let epochs = Epochs::default();
        let key = StreamRef::Topic("news");
        epochs.dropped(key);
        epochs.dropped(key);
        let kept = epochs.export();
        assert_eq!(kept.drops, [(epochs.bucket(key), 2)]);
        let again = Epochs::new(kept.seed.clone(), &kept.drops);
        assert_eq!(again.of(key), epochs.of(key));
        assert_ne!(Epochs::new(kept.seed, &[]).of(key), epochs.of(key));
    }
}
