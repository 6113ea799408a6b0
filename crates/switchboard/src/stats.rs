//! Traffic counters shared by many connections.
//!
//! Every delivery counts, so the counters must not be one cache line that
//! every core writes: each thread adds to a shard of its own, and a snapshot
//! sums the shards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// Shards per [`Stats`]: more than the worker threads a node runs, so that
/// threads rarely share one.
const SHARDS: usize = 16;

/// Counts data messages and bytes in and out, for every connection whose
/// [`crate::Options::stats`] points here. Cheap to clone; the counts are shared.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<[Shard; SHARDS]>);

/// One thread's counts, alone on its cache lines (128 bytes: two lines, as
/// the adjacent-line prefetcher of x86 pairs them).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
    hibernations: AtomicU64,
    wakes: AtomicU64,
}

/// The counts at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Text and binary messages received.
    pub messages_in: u64,
    /// Their payload bytes (after decompression).
    pub bytes_in: u64,
    /// Text and binary frames queued to clients.
    pub messages_out: u64,
    /// Their bytes on the wire (headers included, after compression).
    pub bytes_out: u64,
    /// Times a connection hibernated (see [`crate::Options::hibernate_after`]).
    pub hibernations: u64,
    /// Times a hibernating connection woke: `hibernations - wakes` hibernate now.
    pub wakes: u64,
}

/// The shard of the calling thread: threads are numbered as they first count.
pub(crate) fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    // Const-initialized, with a number not yet drawn: no lazy initialization
    // to check on each use, which is every frame written (fan-out through a
    // topic, `bench/callgrind.sh fanout`: 398 -> 394 instructions a delivery).
    thread_local! {
        static INDEX: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
    }
    INDEX.with(|index| match index.get() {
        usize::MAX => {
            let drawn = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
            index.set(drawn);
            drawn
        }
        drawn => drawn,
    })
}

impl Stats {
    /// Fresh counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self) -> &Shard {
        &self.0[shard_index()]
    }

    pub(crate) fn received(&self, bytes: usize) {
        let shard = self.shard();
        shard.messages_in.fetch_add(1, Ordering::Relaxed);
        shard.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, bytes: usize) {
        let shard = self.shard();
        shard.messages_out.fetch_add(1, Ordering::Relaxed);
        shard.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn hibernated(&self) {
        self.shard().hibernations.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn woke(&self) {
        self.shard().wakes.fetch_add(1, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> StatsSnapshot {
        self.0
            .iter()
            .fold(StatsSnapshot::default(), |sum, shard| StatsSnapshot {
                messages_in: sum.messages_in + shard.messages_in.load(Ordering::Relaxed),
                bytes_in: sum.bytes_in + shard.bytes_in.load(Ordering::Relaxed),
                messages_out: sum.messages_out + shard.messages_out.load(Ordering::Relaxed),
                bytes_out: sum.bytes_out + shard.bytes_out.load(Ordering::Relaxed),
                hibernations: sum.hibernations + shard.hibernations.load(Ordering::Relaxed),
                wakes: sum.wakes + shard.wakes.load(Ordering::Relaxed),
            })
    }
}

/// A counter for events on hot paths, sharded as [`Stats`] is. It serves as a
/// gauge too: [`ShardedCounter::sub`] takes away (one thread may add and
/// another take away, so a shard may go below zero).
#[derive(Debug, Clone, Default)]
pub struct ShardedCounter(Arc<[Cell; SHARDS]>);

#[derive(Debug, Default)]
#[repr(align(128))]
struct Cell(AtomicU64);

impl ShardedCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `n`, to the calling thread's shard.
    pub fn add(&self, n: u64) {
        self.0[shard_index()].0.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes `n` away, from the calling thread's shard.
    pub fn sub(&self, n: u64) {
        self.0[shard_index()].0.fetch_sub(n, Ordering::Relaxed);
    }

    /// The sum of every shard, read as signed numbers, and at least 0: shards
    /// are read one after another while they change, so a gauge near zero can
    /// sum below it (a take-away seen, its add not yet).
    pub fn get(&self) -> u64 {
        let sum = self.0.iter().fold(0i64, |sum, cell| {
            sum.wrapping_add(cell.0.load(Ordering::Relaxed) as i64)
        });
        sum.max(0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_many_threads_add_up() {
        let stats = Stats::new();
        let counter = ShardedCounter::new();
        // Added on one thread, taken on others: shards go negative, the sum does not.
        let gauge = ShardedCounter::new();
        gauge.add((SHARDS + 3) as u64 + 1);
        std::thread::scope(|scope| {
            for _ in 0..SHARDS + 3 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        stats.received(3);
                        stats.sent(5);
                        stats.hibernated();
                        counter.add(2);
                    }
                    gauge.sub(1);
                });
            }
        });
        let threads = (SHARDS + 3) as u64;
        let expected = StatsSnapshot {
            messages_in: threads * 1000,
            bytes_in: threads * 3000,
            messages_out: threads * 1000,
            bytes_out: threads * 5000,
            hibernations: threads * 1000,
            wakes: 0,
        };
        assert_eq!(stats.snapshot(), expected);
        assert_eq!(counter.get(), threads * 2000);
        assert_eq!(gauge.get(), 1);
    }
}
