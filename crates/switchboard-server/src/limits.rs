//! Per-connection rate limits: token buckets for messages and bytes.

use std::time::Instant;

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. A rate of 0 means unlimited.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Whether the bucket never runs out.
    pub fn is_unlimited(&self) -> bool {
        self.rate <= 0.0
    }

    /// Takes `cost` tokens if there are enough at `now`.
    pub fn try_take_at(&mut self, cost: f64, now: Instant) -> bool {
        if self.is_unlimited() {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// The message and byte buckets of one connection, and its strikes.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    messages: TokenBucket,
    bytes: TokenBucket,
    /// Refusals since the last accepted message.
    strikes: u32,
    max_strikes: u32,
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

impl RateLimiter {
    /// Limits of `messages_per_sec` and `bytes_per_sec` (0 is unlimited), with
    /// bursts of two seconds' worth, closing after `max_strikes` refusals in a row.
    pub fn new(messages_per_sec: u32, bytes_per_sec: u64, max_strikes: u32) -> Self {
        let messages = f64::from(messages_per_sec);
        let bytes = bytes_per_sec as f64;
        Self {
            messages: TokenBucket::new(messages, messages * 2.0),
            bytes: TokenBucket::new(bytes, bytes * 2.0),
            strikes: 0,
            max_strikes,
        }
    }

    /// Accounts for one message of `len` bytes.
    pub fn check(&mut self, len: usize) -> Verdict {
        if self.messages.is_unlimited() && self.bytes.is_unlimited() {
            return Verdict::Accept;
        }
        // One clock read for both buckets: this runs for every message.
        let now = Instant::now();
        let within = self.messages.try_take_at(1.0, now) & self.bytes.try_take_at(len as f64, now);
        if within {
            self.strikes = 0;
            return Verdict::Accept;
        }
        self.strikes += 1;
        if self.strikes >= self.max_strikes {
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

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10.0, 20.0);
        bucket.last = start;
        assert!((0..20).all(|_| bucket.try_take_at(1.0, start)));
        assert!(!bucket.try_take_at(1.0, start));
        let later = start + Duration::from_millis(500);
        assert!((0..5).all(|_| bucket.try_take_at(1.0, later)));
        assert!(!bucket.try_take_at(1.0, later));
    }

    #[test]
    fn persistent_abuse_escalates_to_disconnect() {
        let mut limiter = RateLimiter::new(1, 0, 3);
        assert_eq!(limiter.check(10), Verdict::Accept);
        assert_eq!(limiter.check(10), Verdict::Accept);
        assert_eq!(limiter.check(10), Verdict::Refuse);
        assert_eq!(limiter.check(10), Verdict::Refuse);
        assert_eq!(limiter.check(10), Verdict::Disconnect);
    }

    #[test]
    fn zero_means_unlimited() {
        let mut limiter = RateLimiter::new(0, 0, 1);
        assert!((0..10_000).all(|_| limiter.check(1 << 20) == Verdict::Accept));
    }
}
