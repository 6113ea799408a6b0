//! `Idempotency-Key` for `POST /api/v1/send` and `/publish`: a retry with the
//! same key, within the window, gets the first result again and appends
//! nothing, so a backend that lost an answer (a timeout, a dropped
//! connection) can send again without a message going out twice.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::OnceCell;

/// How long a key is remembered.
pub const WINDOW: Duration = Duration::from_secs(300);
/// The most keys remembered, for send and publish together; past it the
/// oldest are forgotten first.
pub const MAX_KEYS: usize = 10_000;
/// The most bytes of results remembered (a send to 1,000 targets answers with
/// tens of kilobytes), counted as held: the JSON text, the key twice and
/// [`KEY_OVERHEAD`]; past it the oldest are forgotten first.
pub const MAX_BYTES: usize = 16 << 20;
/// Bytes counted for a key beyond its text and result: its map slot, its
/// place in the order and its cell.
const KEY_OVERHEAD: usize = 128;
/// The longest key, in bytes.
pub const MAX_KEY_LEN: usize = 128;

/// The results of recent requests, by key.
#[derive(Debug, Default)]
pub struct Idempotency {
    state: Mutex<State>,
}

/// A key's result, as JSON text (it is held as sent, and counts what it
/// holds): set once, by the first request that completes.
type Cell = Arc<OnceCell<Arc<RawValue>>>;

#[derive(Debug, Default)]
struct State {
    /// Each result, and the bytes it counts (0 until set).
    results: HashMap<String, (Cell, usize)>,
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
    /// A retry that arrives while the first request runs waits for its
    /// result instead of running again. A run that fails stores nothing: the
    /// next request with the key runs (in the cluster a run whose answer was
    /// lost may have been done: Redis keeps the key's first answer too).
    pub async fn run<E>(
        &self,
        route: &str,
        key: &str,
        run: impl Future<Output = Result<Value, E>>,
    ) -> Result<Arc<RawValue>, E> {
        let scoped = format!("{route}\n{key}");
        let cell = self.cell(&scoped);
        let mut ran = false;
        let result = cell
            .get_or_try_init(|| {
                ran = true;
                async {
                    let value = run.await?;
                    let text = serde_json::value::to_raw_value(&value).expect("a Value serialises");
                    Ok(Arc::from(text))
                }
            })
            .await?
            .clone();
        if ran {
            let mut state = self.lock();
            let size = 2 * scoped.len() + result.get().len() + KEY_OVERHEAD;
            if let Some((held, stored)) = state.results.get_mut(&scoped)
                && Arc::ptr_eq(held, &cell)
            {
                *stored = size;
                state.bytes += size;
            }
        }
        Ok(result)
    }

    /// The cell for `scoped`, made if new, after forgetting what is too old
    /// or past the caps.
    fn cell(&self, scoped: &str) -> Cell {
        let mut state = self.lock();
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
        if let Some((cell, _)) = state.results.get(scoped) {
            return cell.clone();
        }
        let cell = Cell::default();
        state.results.insert(scoped.to_owned(), (cell.clone(), 0));
        state.order.push_back((now, scoped.to_owned()));
        cell
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_runs_once_per_route_and_the_oldest_are_forgotten() {
        let keys = Idempotency::default();
        let mut runs = 0;
        let mut run = async |route: &str, key: &str| {
            runs += 1;
            let value = Value::from(runs);
            let text = keys.run(route, key, async { Ok::<_, ()>(value) });
            text.await.unwrap().get().parse::<i64>().unwrap()
        };
        assert_eq!(run("send", "a").await, 1);
        assert_eq!(
            run("send", "a").await,
            1,
            "the first result, not a second run"
        );
        assert_eq!(run("publish", "a").await, 3, "another route, another key");
        for i in 0..MAX_KEYS {
            run("send", &i.to_string()).await;
        }
        assert_eq!(
            run("send", "a").await,
            3 + MAX_KEYS as i64 + 1,
            "forgotten past MAX_KEYS"
        );
    }

    #[tokio::test]
    async fn a_retry_during_the_first_run_waits_for_it_and_other_keys_do_not() {
        let keys = Idempotency::default();
        let (release, held) = tokio::sync::oneshot::channel::<()>();
        let first = keys.run("send", "k", async {
            held.await.unwrap();
            Ok::<_, ()>(Value::from(1))
        });
        let retry = keys.run("send", "k", async { Ok::<_, ()>(Value::from(2)) });
        let other = keys.run("send", "other", async { Ok::<_, ()>(Value::from(3)) });
        let (mut first, mut retry) = (Box::pin(first), Box::pin(retry));
        // The first holds its key; the other key runs meanwhile.
        assert!(futures_util::poll!(&mut first).is_pending());
        assert_eq!(other.await.unwrap().get(), "3");
        assert!(
            futures_util::poll!(&mut retry).is_pending(),
            "the retry waits"
        );
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap().get(), "1");
        assert_eq!(retry.await.unwrap().get(), "1", "the first's result");
    }

    #[tokio::test]
    async fn a_failed_run_stores_nothing() {
        let keys = Idempotency::default();
        let failed = keys.run("send", "k", async { Err::<Value, _>("down") });
        assert_eq!(failed.await.unwrap_err(), "down");
        let again = keys.run("send", "k", async { Ok::<_, &str>(Value::from(7)) });
        assert_eq!(again.await.unwrap().get(), "7", "the retry runs");
    }

    #[tokio::test]
    async fn big_results_are_forgotten_past_the_byte_cap() {
        let keys = Idempotency::default();
        let big = Value::from("x".repeat(1 << 20));
        for i in 0..40 {
            let key = i.to_string();
            let stored = keys.run("send", &key, async { Ok::<_, ()>(big.clone()) });
            stored.await.unwrap();
            assert!(
                keys.lock().bytes <= MAX_BYTES + (2 << 20),
                "{}",
                keys.lock().bytes
            );
        }
        let kept = keys.lock().results.len();
        assert!((15..=17).contains(&kept), "{kept} of 1 MiB each");
    }

    #[test]
    fn keys_are_visible_ascii() {
        assert!(is_valid("order-42:retry"));
        for bad in ["", "has space", "é", &"k".repeat(129)] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }
}
