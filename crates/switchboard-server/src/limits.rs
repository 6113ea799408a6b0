//! Per-connection rate limits: token buckets for messages and bytes.

use std::time::Instant;

use crate::hub::ClientLimits;

/// The message and byte buckets of one connection, and its strikes: token
/// buckets refilled at the configured rate, holding two seconds' worth. A
/// refused message is charged too, down to two seconds' worth of debt: it
/// was read all the same, and a client that sends over the rate must not get
/// its reading for free while small messages in between reset its strikes.
/// Only accepted text messages (not pings, pongs or the binary messages the
/// relay refuses) reset the strikes. The rates live once in [`ClientLimits`];
/// each connection keeps only its levels (40 bytes of every connection, idle
/// or not).
#[derive(Debug, Clone)]
pub struct RateLimiter {
    /// Tokens in the message bucket.
    messages: f64,
    /// Tokens in the byte bucket.
    bytes: f64,
    /// When both buckets were last refilled.
    last: Instant,
    /// Refusals since the last accepted message.
    strikes: u32,
}

/// What is being checked: a message the relay acts on, or a frame it does
/// not (a ping, a pong, a binary message it refuses), which counts against
/// the rates but, accepted, does not reset the strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A text message.
    Message,
    /// A ping, a pong or a binary message.
    Other,
}

/// What to do with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Within the limits.
    Accept,
    /// Over a limit: answer with `rate_limited`.
    Refuse,
    /// Over a limit too many times in a row: close the connection.
    Disconnect,
}

/// Refills `tokens` for `elapsed` seconds at `rate` a second (at most `2 × rate`)
/// and says whether `cost` fits. A rate of 0 is unlimited.
fn refill(tokens: &mut f64, rate: f64, elapsed: f64, cost: f64) -> bool {
    if rate <= 0.0 {
        return true;
    }
    *tokens = (*tokens + elapsed * rate).min(rate * 2.0);
    *tokens >= cost
}

/// Takes `cost`, accepted or not, down to a debt of `2 × rate`.
fn charge(tokens: &mut f64, rate: f64, cost: f64) {
    if rate > 0.0 {
        *tokens = (*tokens - cost).max(-rate * 2.0);
    }
}

impl RateLimiter {
    /// Full buckets for `limits` (`messages_per_sec` and `bytes_per_sec`, 0 unlimited).
    pub fn new(limits: &ClientLimits) -> Self {
        Self {
            messages: f64::from(limits.messages_per_sec) * 2.0,
            bytes: limits.bytes_per_sec as f64 * 2.0,
            last: Instant::now(),
            strikes: 0,
        }
    }

    /// Accounts for one frame of `len` bytes; `strikes` refusals in a row
    /// disconnect.
    pub fn check(&mut self, limits: &ClientLimits, frame: Frame, len: usize) -> Verdict {
        if limits.messages_per_sec == 0 && limits.bytes_per_sec == 0 {
            return Verdict::Accept;
        }
        // One clock read for both buckets: this runs for every message.
        self.check_at(limits, frame, len, Instant::now())
    }

    fn check_at(
        &mut self,
        limits: &ClientLimits,
        frame: Frame,
        len: usize,
        now: Instant,
    ) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let (messages, bytes) = (
            f64::from(limits.messages_per_sec),
            limits.bytes_per_sec as f64,
        );
        let message = refill(&mut self.messages, messages, elapsed, 1.0);
        let fits = refill(&mut self.bytes, bytes, elapsed, len as f64);
        charge(&mut self.messages, messages, 1.0);
        charge(&mut self.bytes, bytes, len as f64);
        if message && fits {
            if frame == Frame::Message {
                self.strikes = 0;
            }
            return Verdict::Accept;
        }
        self.strikes += 1;
        if self.strikes >= limits.strikes {
            Verdict::Disconnect
        } else {
            Verdict::Refuse
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(messages_per_sec: u32, bytes_per_sec: u64, strikes: u32) -> ClientLimits {
        ClientLimits {
            max_targets: 1,
            max_topics: 1,
            max_connections: 1,
            messages_per_sec,
            bytes_per_sec,
            strikes,
        }
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let limits = limits(10, 0, u32::MAX);
        let mut limiter = RateLimiter::new(&limits);
        let start = limiter.last;
        let accepts = |limiter: &mut RateLimiter, at| {
            (0..100)
                .take_while(|_| limiter.check_at(&limits, Frame::Message, 1, at) == Verdict::Accept)
                .count()
        };
        assert_eq!(accepts(&mut limiter, start), 20);
        // Five refilled, less the one refused that ended the burst.
        assert_eq!(accepts(&mut limiter, start + Duration::from_millis(500)), 4);
    }

    #[test]
    fn the_byte_bucket_limits_on_its_own() {
        let limits = limits(0, 100, u32::MAX);
        let mut limiter = RateLimiter::new(&limits);
        let start = limiter.last;
        let check =
            |limiter: &mut RateLimiter, len, at| limiter.check_at(&limits, Frame::Message, len, at);
        assert_eq!(check(&mut limiter, 150, start), Verdict::Accept);
        assert_eq!(check(&mut limiter, 60, start), Verdict::Refuse);
        // The refused 60 were read, and charged: 50 left less 60.
        assert_eq!(check(&mut limiter, 5, start), Verdict::Refuse);
        let later = start + Duration::from_millis(200);
        assert_eq!(check(&mut limiter, 5, later), Verdict::Accept);
    }

    #[test]
    fn refused_messages_are_charged_down_to_a_debt_of_the_burst() {
        let limits = limits(0, 100, u32::MAX);
        let mut limiter = RateLimiter::new(&limits);
        let start = limiter.last;
        for _ in 0..100 {
            limiter.check_at(&limits, Frame::Message, 1000, start);
        }
        assert_eq!(limiter.bytes, -200.0, "at most two seconds of debt");
        let later = start + Duration::from_secs(3);
        assert_eq!(
            limiter.check_at(&limits, Frame::Message, 100, later),
            Verdict::Accept
        );
    }

    #[test]
    fn pings_and_pongs_accepted_do_not_reset_the_strikes() {
        let limits = limits(0, 100, 3);
        let mut limiter = RateLimiter::new(&limits);
        let start = limiter.last;
        let mut check = |frame, len, ms| {
            limiter.check_at(&limits, frame, len, start + Duration::from_millis(ms))
        };
        assert_eq!(check(Frame::Message, 150, 0), Verdict::Accept);
        assert_eq!(check(Frame::Message, 150, 0), Verdict::Refuse);
        assert_eq!(check(Frame::Other, 0, 1000), Verdict::Accept);
        assert_eq!(check(Frame::Message, 150, 1000), Verdict::Refuse);
        assert_eq!(check(Frame::Other, 0, 2500), Verdict::Accept);
        assert_eq!(check(Frame::Message, 250, 2500), Verdict::Disconnect);
    }

    #[test]
    fn persistent_abuse_escalates_to_disconnect() {
        let limits = limits(1, 0, 3);
        let mut limiter = RateLimiter::new(&limits);
        let mut check = || limiter.check(&limits, Frame::Message, 10);
        assert_eq!(check(), Verdict::Accept);
        assert_eq!(check(), Verdict::Accept);
        assert_eq!(check(), Verdict::Refuse);
        assert_eq!(check(), Verdict::Refuse);
        assert_eq!(check(), Verdict::Disconnect);
    }

    #[test]
    fn zero_means_unlimited() {
        let limits = limits(0, 0, 1);
        let mut limiter = RateLimiter::new(&limits);
        assert!(
            (0..10_000).all(|_| limiter.check(&limits, Frame::Message, 1 << 20) == Verdict::Accept)
        );
    }
}
