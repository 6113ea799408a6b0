//! `Idempotency-Key` for `POST /api/v1/send` and `/publish`: a retry with the
//! same key, within the window, gets the first result again and appends
//! nothing, so a backend that lost an answer (a timeout, a dropped
//! connection) can send again without a message going out twice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a key is remembered.
pub const WINDOW: Duration = Duration::from_secs(300);
/// The most keys remembered, for send and publish together; past it the
/// oldest are forgotten first.
pub const MAX_KEYS: usize = 10_000;
/// The most bytes of results remembered (a send to 1,000 targets answers with
/// tens of kilobytes); past it the oldest are forgotten first.
pub const MAX_BYTES: usize = 16 << 20;
/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// The results of recent requests, by key.
#[derive(Debug, Default)]
pub struct Idempotency {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Each result, and its size as JSON text with its key.
    results: HashMap<String, (Value, usize)>,
    /// Keys in the order they were stored, for forgetting the oldest.
    order: VecDeque<(Instant, String)>,
    bytes: usize,
}

/// Whether `key` may be used: 1 to 128 visible ASCII characters.
pub fn is_valid(key: &str) -> bool {
    (1..=MAX_KEY_LEN).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

impl Idempotency {
    /// The result stored for `key` (scoped by `route`), or `run`'s, stored.
    /// `run` is called under the lock, so a retry that arrives while the
    /// first request runs waits for its result instead of running again. The
    /// lock is one for the server: requests with keys run one at a time (the
    /// memory engine's sends and publishes take microseconds).
    pub fn run(&self, route: &str, key: &str, run: impl FnOnce() -> Value) -> Value {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        while let Some((at, _)) = state.order.front() {
            let full = state.order.len() >= MAX_KEYS || state.bytes > MAX_BYTES;
            if now.duration_since(*at) < WINDOW && !full {
                break;
            }
            let (_, old) = state.order.pop_front().expect("checked");
            if let Some((_, size)) = state.results.remove(&old) {
                state.bytes -= size;
            }
        }
        let scoped = format!("{route}\n{key}");
        if let Some((result, _)) = state.results.get(&scoped) {
            return result.clone();
        }
        let result = run();
        let size = scoped.len() + result.to_string().len();
        state.bytes += size;
        state.results.insert(scoped.clone(), (result.clone(), size));
        state.order.push_back((now, scoped));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_runs_once_per_route_and_the_oldest_are_forgotten() {
        let keys = Idempotency::default();
        let mut runs = 0;
        let mut run = |route: &str, key: &str| {
            keys.run(route, key, || {
                runs += 1;
                Value::from(runs)
            })
        };
        assert_eq!(run("send", "a"), 1);
        assert_eq!(run("send", "a"), 1, "the first result, not a second run");
        assert_eq!(run("publish", "a"), 2, "another route, another key");
        for i in 0..MAX_KEYS {
            run("send", &i.to_string());
        }
        assert_eq!(
            run("send", "a"),
            2 + MAX_KEYS as i64 + 1,
            "forgotten past MAX_KEYS"
        );
    }

    #[test]
    fn keys_are_visible_ascii() {
        assert!(is_valid("order-42:retry"));
        for bad in ["", "has space", "é", &"k".repeat(129)] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }
}
