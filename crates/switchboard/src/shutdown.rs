//! Graceful shutdown for every connection started with the same [`Shutdown`].

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Waker};
use std::time::Duration;

use switchboard_proto::{CloseCode, CloseReason};
use tokio::sync::Notify;

/// Counts connections and tells them to close.
///
/// [`Shutdown::trigger`] makes every connection send its close frame (1001,
/// "going away", unless made with [`Shutdown::closing_with`]);
/// [`Shutdown::drain`] waits until they have all ended, or a timeout passes.
#[derive(Debug, Clone)]
pub struct Shutdown {
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    /// Set before the waiting connections are woken. Connections read it on
    /// every wake-up; only the first takes the lock, to leave their waker.
    triggered: AtomicBool,
    close: CloseReason,
    waiters: Mutex<Waiters>,
    /// Connections not yet ended: one per [`Signal`], which each connection
    /// keeps from its upgrade to its end, awake or hibernating. Counted by
    /// connection rather than by task: a connection that hibernates or wakes
    /// has two tasks for a moment, which `/healthz` once showed.
    open: AtomicUsize,
    /// Told when `open` falls to zero.
    ended: Notify,
}

/// The wakers of the connections waiting for the trigger. A connection keeps
/// only its slot's index, where a cancellation token's wait (boxed, as it must
/// stay pinned) cost every connection, idle or not, 72 bytes more. The list
/// keeps the size of its busiest moment, 20 bytes a connection.
#[derive(Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    /// Slots given back, to be reused.
    free: Vec<u32>,
}

impl std::fmt::Debug for Waiters {
    /// How many wait, not their wakers: `Shutdown`'s `Debug` should not list
    /// every connection.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let waiting = self.slots.len() - self.free.len();
        f.debug_struct("Waiters")
            .field("registered", &waiting)
            .finish()
    }
}

impl State {
    fn waiters(&self) -> MutexGuard<'_, Waiters> {
        // A waker list stays consistent even if a holder panicked.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::closing_with(CloseReason::new(
            CloseCode::GOING_AWAY,
            "server shutting down",
        ))
    }
}

impl Shutdown {
    /// A new, untriggered shutdown that closes connections with 1001.
    pub fn new() -> Self {
        Self::default()
    }

    /// A new, untriggered shutdown that closes connections with `close`: for
    /// example 1012 (service restart), which tells clients to come back.
    pub fn closing_with(close: CloseReason) -> Self {
        Self {
            state: Arc::new(State {
                triggered: AtomicBool::new(false),
                close,
                waiters: Mutex::default(),
                open: AtomicUsize::new(0),
                ended: Notify::new(),
            }),
        }
    }

    /// Tells every connection to close.
    pub fn trigger(&self) {
        self.state.triggered.store(true, Ordering::Release);
        // Taken under the lock, woken after it: a connection that wakes at once
        // and drops its signal must not wait here.
        let wakers: Vec<Waker> = self
            .state
            .waiters()
            .slots
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Whether [`Self::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.state.triggered.load(Ordering::Acquire)
    }

    /// Connections still running: upgraded (or upgrading) and not yet ended,
    /// hibernating ones included.
    pub fn connections(&self) -> usize {
        self.state.open.load(Ordering::Acquire)
    }

    /// Triggers shutdown and waits up to `timeout` for every connection to end.
    /// Returns whether they all did.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use switchboard::{Shutdown, WebSocketUpgrade};
    /// # use switchboard::{Context, Handler, Message, Outcome};
    /// # struct Echo;
    /// # impl Handler for Echo {
    /// #     type Info = ();
    /// #     fn handle_in(&mut self, m: Message, _: &mut Context<'_, ()>) -> Outcome { Outcome::push(m) }
    /// # }
    ///
    /// # async fn run(upgrade: WebSocketUpgrade) {
    /// let shutdown = Shutdown::new();
    /// // Each upgrade handler tracks its connection in the shutdown:
    /// let _response = upgrade.shutdown(&shutdown).on_upgrade(Echo);
    /// // At exit: close every connection with 1001 and wait up to 10 s.
    /// if !shutdown.drain(Duration::from_secs(10)).await {
    ///     eprintln!("{} connections did not close in time", shutdown.connections());
    /// }
    /// # }
    /// ```
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: the shutdown stays triggered, and the connections go on
    /// closing; a later `drain` waits for the rest.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.trigger();
        tokio::time::timeout(timeout, self.ended()).await.is_ok()
    }

    /// Returns once no connection is left.
    async fn ended(&self) {
        loop {
            let mut ended = std::pin::pin!(self.state.ended.notified());
            // Listening before the count is read: a last connection that ends
            // in between still reaches this wait.
            ended.as_mut().enable();
            if self.connections() == 0 {
                return;
            }
            ended.await;
        }
    }

    /// A new connection's signal: it counts the connection until dropped.
    pub(crate) fn signal(&self) -> Signal {
        self.state.open.fetch_add(1, Ordering::AcqRel);
        Signal {
            state: self.state.clone(),
            slot: Slot::Unregistered,
        }
    }
}

/// One connection's view of a [`Shutdown`], kept for its whole life: while
/// it exists, the connection is counted.
pub(crate) struct Signal {
    state: Arc<State>,
    slot: Slot,
}

/// Where a connection stands with the waiters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// No waker left yet.
    Unregistered,
    /// Its task's waker waits at this index (32 bits: fewer connections than
    /// that are open at once).
    At(u32),
    /// It has heard the trigger and is closing: nothing more to wait for.
    Heard,
}

impl Signal {
    /// Whether shutdown was triggered and not yet [`Self::heard`]. The first
    /// call registers `cx`'s waker; later calls only read the flag, which is
    /// enough because a connection is always its own spawned task, whose
    /// waker stays the same across polls.
    pub(crate) fn poll_triggered(&mut self, cx: &mut Context<'_>) -> bool {
        if self.slot == Slot::Heard {
            return false;
        }
        if self.state.triggered.load(Ordering::Acquire) {
            return true;
        }
        if self.slot == Slot::Unregistered {
            let mut waiters = self.state.waiters();
            // Read again under the lock: `trigger` sets the flag before it
            // takes the lock, so either it sees this waker or this sees the flag.
            if self.state.triggered.load(Ordering::Acquire) {
                return true;
            }
            let waker = Some(cx.waker().clone());
            let slot = match waiters.free.pop() {
                Some(slot) => {
                    waiters.slots[slot as usize] = waker;
                    slot
                }
                None => {
                    waiters.slots.push(waker);
                    u32::try_from(waiters.slots.len() - 1).expect("fewer than 2^32 connections")
                }
            };
            self.slot = Slot::At(slot);
        }
        false
    }

    /// The connection has started its close: later polls return `false`, and
    /// its waker leaves the list. It stays counted until it ends.
    pub(crate) fn heard(&mut self) {
        self.unregister();
        self.slot = Slot::Heard;
    }

    /// The close frame connections are sent.
    pub(crate) fn close(&self) -> &CloseReason {
        &self.state.close
    }

    /// Gives the slot back: the connection's task is changing (it hibernates
    /// or wakes), and the next [`Self::poll_triggered`] leaves the new waker.
    pub(crate) fn unregister(&mut self) {
        if let Slot::At(slot) = self.slot {
            self.slot = Slot::Unregistered;
            let mut waiters = self.state.waiters();
            waiters.slots[slot as usize] = None;
            waiters.free.push(slot);
        }
    }
}

impl Drop for Signal {
    /// The connection has ended.
    fn drop(&mut self) {
        self.unregister();
        if self.state.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.ended.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use super::*;

    /// Counts its wakes.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn drain_returns_at_once_with_no_connection_and_when_the_last_ends() {
        let shutdown = Shutdown::new();
        assert!(shutdown.drain(Duration::ZERO).await, "nothing to wait for");
        let signals: Vec<Signal> = (0..2).map(|_| shutdown.signal()).collect();
        assert_eq!(shutdown.connections(), 2);
        let drain = tokio::spawn({
            let shutdown = shutdown.clone();
            async move { shutdown.drain(Duration::from_secs(10)).await }
        });
        let mut signals = signals.into_iter();
        drop(signals.next());
        tokio::task::yield_now().await;
        assert!(!drain.is_finished(), "one connection is still open");
        drop(signals);
        assert!(drain.await.unwrap(), "the last connection ended");
        assert_eq!(shutdown.connections(), 0);
        // A connection that hears the trigger stays counted until it ends.
        let mut late = shutdown.signal();
        let waker = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        assert!(late.poll_triggered(&mut Context::from_waker(&waker)));
        late.heard();
        assert!(!late.poll_triggered(&mut Context::from_waker(&waker)));
        assert!(!shutdown.drain(Duration::from_millis(20)).await);
        drop(late);
        assert!(shutdown.drain(Duration::ZERO).await);
    }

    #[test]
    fn trigger_wakes_each_waiting_connection_once_and_slots_are_reused() {
        let shutdown = Shutdown::new();
        let counts: Vec<Arc<Count>> = (0..3)
            .map(|_| Arc::new(Count(AtomicUsize::new(0))))
            .collect();
        let wakers: Vec<Waker> = counts.iter().map(|c| Waker::from(c.clone())).collect();
        let mut signals: Vec<Signal> = (0..3).map(|_| shutdown.signal()).collect();
        for (signal, waker) in signals.iter_mut().zip(&wakers) {
            let mut cx = Context::from_waker(waker);
            assert!(!signal.poll_triggered(&mut cx));
            // A second poll only reads the flag.
            assert!(!signal.poll_triggered(&mut cx));
        }
        // A connection that ended gives its slot back, and is not woken.
        drop(signals.remove(0));
        let mut late = shutdown.signal();
        assert!(!late.poll_triggered(&mut Context::from_waker(&wakers[0])));
        assert_eq!(
            shutdown.state.waiters().slots.len(),
            3,
            "the freed slot is reused"
        );
        shutdown.trigger();
        let woken: Vec<usize> = counts.iter().map(|c| c.0.load(Ordering::SeqCst)).collect();
        assert_eq!(
            woken,
            [1, 1, 1],
            "the late signal took the first one's slot and waker"
        );
        for signal in signals.iter_mut().chain([&mut late]) {
            assert!(signal.poll_triggered(&mut Context::from_waker(&wakers[1])));
        }
        // After the trigger, a new connection sees it at once and leaves no waker.
        let mut after = shutdown.signal();
        assert!(after.poll_triggered(&mut Context::from_waker(&wakers[2])));
        assert_eq!(counts[2].0.load(Ordering::SeqCst), 1);
    }
}
