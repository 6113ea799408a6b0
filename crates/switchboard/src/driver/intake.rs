//! What a peer can make its connection hold and do with the data it sends:
//! the connection's part of the [`ReceiveBudget`], and how fast it may make
//! us inflate.

use std::time::Duration;

use switchboard_proto::MessageDecoder;
use tokio::time::Instant;

use crate::budget::{Exceeded, Holding, ReceiveBudget};

/// The receive-side limits of one connection. Both parts are optional, and
/// cost nothing per message when absent.
#[derive(Debug, Default)]
pub(super) struct Intake {
    holding: Option<Holding>,
    // Boxed: only connections that negotiated compression have one.
    meter: Option<Box<InflateMeter>>,
}

impl Intake {
    /// Limits from `budget` and `inflate_rate` (bytes a second), the latter only
    /// when the peer may compress.
    pub(super) fn new(
        budget: Option<ReceiveBudget>,
        inflate_rate: Option<u64>,
        compressed: bool,
    ) -> Self {
        Self {
            holding: budget.map(Holding::new),
            meter: inflate_rate
                .filter(|_| compressed)
                .map(|rate| Box::new(InflateMeter::new(rate))),
        }
    }

    /// Holds `bytes` of partly received data from now on, if the budget allows.
    pub(super) fn hold(&mut self, bytes: usize) -> Result<(), Exceeded> {
        match &mut self.holding {
            Some(holding) => holding.set(bytes),
            None => Ok(()),
        }
    }

    /// Charges what `decoder` has inflated since the last call. When that
    /// overdraws the connection's rate, decoding and reading pause until
    /// [`Intake::resume_at`]: the next compressed frame is not inflated before
    /// the rate has paid for the last one.
    pub(super) fn charge(&mut self, decoder: &mut MessageDecoder) {
        // Taken even without a meter: a decoder holding an untaken count is
        // not at rest, and its connection would never hibernate.
        let fresh = decoder.take_inflated();
        if let Some(meter) = &mut self.meter {
            meter.charge(fresh);
        }
    }

    /// When decoding may go on, while it is paused.
    pub(super) fn resume_at(&self) -> Option<Instant> {
        self.meter.as_ref().and_then(|meter| meter.resume_at)
    }

    /// Whether decoding and reading are paused.
    pub(super) fn paused(&self) -> bool {
        self.resume_at().is_some()
    }

    /// Ends a pause that is due; true if one ended.
    pub(super) fn resume_if_due(&mut self, now: Instant) -> bool {
        match &mut self.meter {
            Some(meter) if meter.resume_at.is_some_and(|at| at <= now) => {
                meter.resume_at = None;
                true
            }
            _ => false,
        }
    }
}

/// A token bucket over inflated bytes: `rate` a second, a second's worth at
/// most saved up, and a debt allowed (one frame's output is only known once
/// inflated), paid off while decoding waits.
#[derive(Debug)]
struct InflateMeter {
    rate: f64,
    tokens: f64,
    last: Instant,
    resume_at: Option<Instant>,
}

impl InflateMeter {
    fn new(rate: u64) -> Self {
        let rate = rate.max(1) as f64;
        Self {
            rate,
            tokens: rate,
            last: Instant::now(),
            resume_at: None,
        }
    }

    /// Charges `fresh` bytes inflated.
    fn charge(&mut self, fresh: u64) {
        if fresh == 0 {
            return;
        }
        let now = Instant::now();
        let earned = now.saturating_duration_since(self.last).as_secs_f64() * self.rate;
        self.last = now;
        self.tokens = (self.tokens + earned).min(self.rate) - fresh as f64;
        if self.tokens < 0.0 {
            self.resume_at = Some(now + Duration::from_secs_f64(-self.tokens / self.rate));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_overdraft_pauses_until_the_rate_has_paid_for_it() {
        let mut meter = InflateMeter::new(1000);
        meter.charge(1000);
        assert_eq!(meter.resume_at, None, "a second's worth is saved up");
        let start = Instant::now();
        meter.charge(500);
        assert_eq!(meter.resume_at, Some(start + Duration::from_millis(500)));
        meter.resume_at = None;
        tokio::time::advance(Duration::from_millis(500)).await;
        meter.charge(0);
        assert_eq!(
            meter.resume_at, None,
            "nothing new inflated, nothing charged"
        );
        meter.charge(100);
        assert_eq!(
            meter.resume_at,
            Some(start + Duration::from_millis(600)),
            "the debt was paid; 100 more bytes owe 100 ms"
        );
    }
}
