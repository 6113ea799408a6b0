//! The node's lease: a heartbeat to Redis each fifth of the lease, which
//! also reaps the nodes whose leases have lapsed (their connections and
//! subscriptions are taken off the counts, once, with their leave events).
//!
//! A node that cannot renew its lease for longer than the lease closes its
//! clients with 1012 (they reconnect to a node that can serve them) rather
//! than serve a split view; one that finds it was reaped closes them too,
//! and joins again under a new id.

use std::sync::Weak;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use switchboard::{CloseCode, CloseReason};

use super::{Core, args, millis};
use crate::engine::Unavailable;

/// A new node id: random, so a restarted node never takes over the
/// counts of its previous life (the reaper undoes those).
pub(super) fn new_node_id() -> std::sync::Arc<str> {
    crate::epochs::new_epoch()
}

/// When the lease was last renewed, and whether it has lapsed.
pub(super) struct Health {
    lease: Duration,
    started: Instant,
    /// Milliseconds after `started` of the last renewal (0: never).
    renewed_ms: AtomicU64,
    /// The links' connection counts (the heartbeats', the data's) at the
    /// last renewal: on a newer connection of either the node's place is
    /// unknown until it has renewed.
    renewed_on: [AtomicU64; 2],
    lapsed: AtomicBool,
}

impl Health {
    pub(super) fn new(lease: Duration) -> Self {
        Self {
            lease,
            started: Instant::now(),
            renewed_ms: AtomicU64::new(0),
            renewed_on: [AtomicU64::new(0), AtomicU64::new(0)],
            lapsed: AtomicBool::new(false),
        }
    }

    /// Why the node is not ready, as far as its lease goes, with the links
    /// on these `connections` to Redis (the heartbeats', the data's).
    pub(super) fn unready(&self, connections: [u64; 2]) -> Option<String> {
        let renewed_on = self
            .renewed_on
            .each_ref()
            .map(|c| c.load(Ordering::Relaxed));
        if self.renewed_ms.load(Ordering::Relaxed) == 0 {
            Some("not yet part of the cluster (no heartbeat has reached Redis)".into())
        } else if renewed_on != connections {
            Some("reconnected to Redis; renewing this node's place in the cluster".into())
        } else if self.lapsed.load(Ordering::Relaxed) {
            Some("the node's lease has lapsed: Redis has been unreachable too long".into())
        } else {
            None
        }
    }

    /// Milliseconds since `started` (at least 1: 0 means never).
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis().max(1)).unwrap_or(u64::MAX)
    }

    /// Renewed by a beat sent at `sent_ms`: Redis extended the lease after
    /// that, so counting from the send errs on the safe side.
    fn renewed(&self, connections: [u64; 2], sent_ms: u64) {
        for (on, count) in self.renewed_on.iter().zip(connections) {
            on.store(count, Ordering::Relaxed);
        }
        self.renewed_ms.fetch_max(sent_ms, Ordering::Relaxed);
        self.lapsed.store(false, Ordering::Relaxed);
    }

    /// The cluster forgot this node: not ready until it has joined again.
    fn reaped(&self) {
        self.lapsed.store(true, Ordering::Relaxed);
    }

    /// Whether the lease has run out since the last renewal (and had not
    /// already: the node closes its clients once).
    fn lapses_now(&self) -> bool {
        let renewed = Duration::from_millis(self.renewed_ms.load(Ordering::Relaxed));
        let out = self.started.elapsed().saturating_sub(renewed) >= self.lease;
        out && !self.lapsed.swap(true, Ordering::Relaxed)
    }
}

fn cut_off(why: &str) -> CloseReason {
    CloseReason::new(CloseCode::SERVICE_RESTART, why)
}

/// How a node's clients are closed once the cluster has reaped it.
pub(super) fn lost_place() -> CloseReason {
    cut_off("this node lost its place in the cluster")
}

/// Closes the node's clients once its lease has run out, checking a few
/// times a beat, whatever the beats are waiting for.
async fn watch(core: Weak<Core>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(core) = core.upgrade() else {
            return;
        };
        if core.lease.lapses_now() {
            tracing::error!("cannot renew this node's lease: closing its clients with 1012");
            core.feed
                .close_all(cut_off("this node cannot reach the cluster"));
        }
    }
}

/// Beats until the engine is dropped.
pub(super) async fn run(core: Weak<Core>) {
    let mut first = true;
    let beat = match core.upgrade() {
        Some(core) => core.lease.lease / 5,
        None => return,
    };
    tokio::spawn(watch(core.clone(), beat / 4));
    let mut ticks = tokio::time::interval(beat);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut rejoin, mut failing) = (false, false);
    loop {
        let Some(link) = core.upgrade().map(|core| core.beats.clone()) else {
            return;
        };
        let data = match core.upgrade() {
            Some(core) => core.link.clone(),
            None => return,
        };
        let mut made_again = false;
        if !std::mem::take(&mut rejoin) {
            // A new connection to Redis, of either link: this node may have
            // been forgotten (a restart without its data); check at once.
            tokio::select! {
                _ = ticks.tick() => {}
                () = link.reconnected() => made_again = link.connections() > 1,
                () = data.reconnected() => {}
            }
        }
        if made_again {
            // The data link, idle, may not know yet that its connection is
            // gone: it would fail the next call after the node says ready.
            // (Not the other way: the heartbeats' link is never idle long.)
            data.verify();
        }
        let Some(core) = core.upgrade() else {
            return;
        };
        let connections = [link.connections(), data.connections()];
        let node = core.node();
        let figures = (core.traffic)().figures().map(|f| f.to_string());
        let rest = args(
            [
                &*node,
                &millis(core.lease.lease),
                if first { "1" } else { "0" },
            ]
            .into_iter()
            .chain(figures.iter().map(String::as_str)),
        );
        // Half a lease before it counts as failed (the lease is checked
        // every beat regardless); on its own connection, behind no traffic.
        let sent_ms = core.lease.now_ms();
        let patience = core.lease.lease / 2;
        let answer = tokio::time::timeout(patience, link.call("heartbeat", rest)).await;
        match answer.unwrap_or_else(|_| Err(Unavailable("the heartbeat timed out".into()))) {
            Ok(_) => {
                first = false;
                failing = false;
                core.lease.renewed(connections, sent_ms);
            }
            Err(e) if e.0.contains("REAPED") => {
                tracing::warn!(node = %node, "this node's lease lapsed and the cluster reaped it; closing its clients and joining again");
                core.rejoin();
                core.lease.reaped();
                first = true;
                rejoin = true;
            }
            Err(e) => {
                // Warned once a run: a refusal Redis gives every beat (a
                // replica, a cluster-mode Redis) is why the closes follow.
                // Not before the link's first connection: every start's
                // first beats fail so, and the link warns if it cannot connect.
                if link.connections() == 0 || std::mem::replace(&mut failing, true) {
                    tracing::debug!(error = %e, "a heartbeat failed");
                } else {
                    tracing::warn!(error = %e, "a heartbeat failed");
                }
                if first {
                    // Not in the cluster yet: try again soon, not in a beat.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    rejoin = true;
                }
            }
        }
    }
}
