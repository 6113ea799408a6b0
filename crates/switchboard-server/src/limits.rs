//! Per-connection rate limits: token buckets for messages and bytes.

use std::time::Instant;

use crate::hub::ClientLimits;

/// The message and byte buckets of one connection, and its strikes: token
/// buckets refilled at the configured rate, holding two seconds' worth. The
/// rates live once in [`ClientLimits`]; each connection keeps only its levels
/// (40 bytes of every connection, idle or not).
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
/// and takes `cost` if that many are there. A rate of 0 is unlimited.
fn take(tokens: &mut f64, rate: f64, elapsed: f64, cost: f64) -> bool {
    if rate <= 0.0 {
        return true;
    }
    *tokens = (*tokens + elapsed * rate).min(rate * 2.0);
    if *tokens >= cost {
        *tokens -= cost;
        true
    } else {
        false
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

    /// Accounts for one message of `len` bytes; `strikes` refusals in a row disconnect.
    pub fn check(&mut self, limits: &ClientLimits, len: usize) -> Verdict {
        if limits.messages_per_sec == 0 && limits.bytes_per_sec == 0 {
            return Verdict::Accept;
        }
        // One clock read for both buckets: this runs for every message.
        self.check_at(limits, len, Instant::now())
    }

    fn check_at(&mut self, limits: &ClientLimits, len: usize, now: Instant) -> Verdict {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        let message = take(
            &mut self.messages,
            f64::from(limits.messages_per_sec),
            elapsed,
            1.0,
        );
        let bytes = take(
            &mut self.bytes,
            limits.bytes_per_sec as f64,
            elapsed,
            len as f64,
        );
        if message & bytes {
            self.strikes = 0;
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
                .take_while(|_| limiter.check_at(&limits, 1, at) == Verdict::Accept)
                .count()
        };
        assert_eq!(accepts(&mut limiter, start), 20);
        assert_eq!(accepts(&mut limiter, start + Duration::from_millis(500)), 5);
    }

    #[test]
    fn the_byte_bucket_limits_on_its_own() {
        let limits = limits(0, 100, u32::MAX);
        let mut limiter = RateLimiter::new(&limits);
        let start = limiter.last;
        assert_eq!(limiter.check_at(&limits, 150, start), Verdict::Accept);
        assert_eq!(limiter.check_at(&limits, 60, start), Verdict::Refuse);
        assert_eq!(limiter.check_at(&limits, 50, start), Verdict::Accept);
    }

    #[test]
    fn persistent_abuse_escalates_to_disconnect() {
        let limits = limits(1, 0, 3);
        let mut limiter = RateLimiter::new(&limits);
        assert_eq!(limiter.check(&limits, 10), Verdict::Accept);
        assert_eq!(limiter.check(&limits, 10), Verdict::Accept);
        assert_eq!(limiter.check(&limits, 10), Verdict::Refuse);
        assert_eq!(limiter.check(&limits, 10), Verdict::Refuse);
        assert_eq!(limiter.check(&limits, 10), Verdict::Disconnect);
    }

    #[test]
    fn zero_means_unlimited() {
        let limits = limits(0, 0, 1);
        let mut limiter = RateLimiter::new(&limits);
        assert!((0..10_000).all(|_| limiter.check(&limits, 1 << 20) == Verdict::Accept));
    }
}
