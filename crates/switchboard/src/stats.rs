//! Traffic counters shared by many connections.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Counts data messages and bytes in and out, for every connection whose
/// [`crate::Options::stats`] points here. Cheap to clone; the counts are shared.
#[derive(Debug, Clone, Default)]
pub struct Stats(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    messages_in: AtomicU64,
    bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
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
}

impl Stats {
    /// Fresh counters at zero.
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn received(&self, bytes: usize) {
        self.0.messages_in.fetch_add(1, Ordering::Relaxed);
        self.0.bytes_in.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn sent(&self, bytes: usize) {
        self.0.messages_out.fetch_add(1, Ordering::Relaxed);
        self.0.bytes_out.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// The current counts.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            messages_in: self.0.messages_in.load(Ordering::Relaxed),
            bytes_in: self.0.bytes_in.load(Ordering::Relaxed),
            messages_out: self.0.messages_out.load(Ordering::Relaxed),
            bytes_out: self.0.bytes_out.load(Ordering::Relaxed),
        }
    }
}
