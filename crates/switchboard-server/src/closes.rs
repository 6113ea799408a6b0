//! The node's latest connection closes, for the admin dashboard: who, when,
//! with what code and why. The counts by code are the metrics'.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError, TryLockError};

use serde::Serialize;
use switchboard::{ClientId, TerminateReason};

/// How many closes are kept.
pub const KEPT: usize = 20;

/// One connection's end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Close {
    /// When, in milliseconds since the Unix epoch.
    pub at: u64,
    /// The connection's client id.
    pub client: String,
    /// Its close code; `None` for an error without one.
    pub code: Option<u16>,
    /// Why, in words (see [`TerminateReason::reason`]).
    pub reason: String,
}

/// The last [`KEPT`] closes, newest last (some may be missing: see `push`).
#[derive(Debug, Default)]
pub struct RecentCloses(Mutex<VecDeque<Close>>);

impl RecentCloses {
    /// Notes that a connection of `client` ended for `reason`.
    pub fn record(&self, client: &ClientId, reason: &TerminateReason) {
        self.push(client, reason.close_code(), reason.reason());
    }

    /// Notes a close whose handler was not told why (it panicked): 1011.
    pub fn record_code(&self, client: &ClientId, code: u16) {
        self.push(client, Some(code), "handler panicked");
    }

    /// A close that finds the ring in use by another thread is not kept:
    /// when many connections close at once (a restart, a network blip) they
    /// must not queue on one lock across every core. The counts by code (the
    /// metrics') miss none.
    fn push(&self, client: &ClientId, code: Option<u16>, reason: &str) {
        let mut ring = match self.0.try_lock() {
            Ok(ring) => ring,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        let close = Close {
            at: crate::streams::now_ms(),
            client: client.to_string(),
            code,
            reason: reason.to_owned(),
        };
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(close);
    }

    /// The closes kept, newest first.
    pub fn latest(&self) -> Vec<Close> {
        let ring = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ring.iter().rev().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use switchboard::{CloseCode, CloseReason};

    use super::*;

    #[test]
    fn keeps_the_latest_newest_first() {
        let closes = RecentCloses::default();
        for n in 0..KEPT + 3 {
            let reason = CloseReason::new(CloseCode(4000 + n as u16), "bye");
            closes.record(
                &ClientId::from(n.to_string()),
                &TerminateReason::Normal(reason),
            );
        }
        closes.record(&ClientId::from("lost"), &TerminateReason::ConnectionLost);
        let latest = closes.latest();
        assert_eq!(latest.len(), KEPT);
        assert_eq!(
            (
                latest[0].client.as_str(),
                latest[0].code,
                latest[0].reason.as_str()
            ),
            ("lost", Some(1006), "connection lost")
        );
        assert_eq!(latest[1].code, Some(4000 + KEPT as u16 + 2));
        assert_eq!(latest[KEPT - 1].client, "4");
    }
}
