//! Counting deliveries: every one is checked, and lost, duplicated and corrupted
//! ones are counted; deliveries inside the measured window also feed the rate and
//! the latency histogram.
//!
//! Duplicates are found per (receiver, sender) pair: a server delivers one
//! sender's messages to one receiver in order, so each must carry a larger
//! sequence number than the last. A repeat or a reordering counts as duplicated.
//! Losses are what was expected but never arrived by the end of the drain.

use std::time::Instant;

use crate::histogram::Histogram;
use crate::payload::Stamp;

/// Nanoseconds since the load generator started: the time base of payloads.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant);

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Self(Instant::now())
    }

    /// Nanoseconds since the start.
    pub fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// Delivery counts of one run.
#[derive(Debug)]
pub struct Tally {
    senders: usize,
    /// Last sequence number seen, per `receiver * senders + sender`.
    last_seq: Vec<u32>,
    /// Deliveries the messages sent so far should cause.
    pub expected: u64,
    /// Messages sent inside the measured window.
    pub window_sent: u64,
    /// Correct first deliveries.
    pub delivered: u64,
    /// Deliveries of a message the receiver already had (or out of order).
    pub duplicated: u64,
    /// Deliveries that failed the payload check or reached a non-target.
    pub corrupted: u64,
    measuring: bool,
    /// Correct deliveries inside the measured window.
    pub window_delivered: u64,
    /// Latency of the deliveries inside the window, in nanoseconds.
    pub latency: Histogram,
}

impl Tally {
    /// Counts for `receivers` receivers, each hearing from up to `senders` senders
    /// (numbered from 0 by the scenario).
    pub fn new(receivers: usize, senders: usize) -> Self {
        Self {
            senders,
            last_seq: vec![0; receivers * senders],
            expected: 0,
            window_sent: 0,
            delivered: 0,
            duplicated: 0,
            corrupted: 0,
            measuring: false,
            window_delivered: 0,
            latency: Histogram::default(),
        }
    }

    /// A message was sent that should reach `deliveries` receivers.
    pub fn sent(&mut self, deliveries: u64) {
        self.expected += deliveries;
        if self.measuring {
            self.window_sent += 1;
        }
    }

    /// Starts or stops counting into the window figures.
    pub fn set_measuring(&mut self, on: bool) {
        self.measuring = on;
    }

    /// A delivery whose payload failed its check.
    pub fn corrupt(&mut self) {
        self.corrupted += 1;
    }

    /// A delivery to `receiver` of a checked payload from `sender`, at `now_ns`.
    /// A sender outside the scenario's range means a corrupted delivery.
    pub fn deliver(&mut self, receiver: usize, sender: usize, stamp: &Stamp, now_ns: u64) {
        let slot = receiver * self.senders + sender;
        let Some(last) = self
            .last_seq
            .get_mut(slot)
            .filter(|_| sender < self.senders)
        else {
            self.corrupted += 1;
            return;
        };
        if stamp.seq <= *last {
            self.duplicated += 1;
            return;
        }
        *last = stamp.seq;
        self.delivered += 1;
        if self.measuring {
            self.window_delivered += 1;
            self.latency.record(now_ns.saturating_sub(stamp.sent_ns));
        }
    }

    /// Whether everything expected has arrived.
    pub fn settled(&self) -> bool {
        self.delivered >= self.expected
    }

    /// Expected deliveries that did not arrive.
    pub fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(seq: u32) -> Stamp {
        Stamp {
            from: 0,
            seq,
            sent_ns: 10,
        }
    }

    #[test]
    fn counts_losses_duplicates_and_window_latency() {
        let mut tally = Tally::new(2, 1);
        tally.sent(4);
        tally.deliver(0, 0, &stamp(1), 20);
        tally.set_measuring(true);
        tally.deliver(0, 0, &stamp(2), 30);
        tally.deliver(0, 0, &stamp(2), 30);
        tally.deliver(1, 0, &stamp(2), 40);
        assert_eq!(
            (tally.delivered, tally.duplicated, tally.window_delivered),
            (3, 1, 2)
        );
        assert_eq!(tally.latency.len(), 2);
        assert_eq!(tally.lost(), 1);
        assert!(!tally.settled());
        tally.deliver(1, 1, &stamp(3), 40);
        assert_eq!(tally.corrupted, 1);
    }
}
