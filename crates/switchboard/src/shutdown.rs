//! Graceful shutdown for every connection started with the same [`Shutdown`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Context;
use std::time::Duration;

use switchboard_proto::{CloseCode, CloseReason};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::TaskTracker;

/// Tracks connection tasks and tells them to close.
///
/// [`Shutdown::trigger`] makes every connection send its close frame (1001,
/// "going away", unless made with [`Shutdown::closing_with`]);
/// [`Shutdown::drain`] waits until they have all ended, or a timeout passes.
#[derive(Debug, Clone)]
pub struct Shutdown {
    token: CancellationToken,
    state: Arc<State>,
    tracker: TaskTracker,
}

#[derive(Debug)]
struct State {
    /// Set before the token is cancelled. Connections read it on every wake-up
    /// instead of polling the token, whose every poll takes a mutex shared by
    /// all of them.
    triggered: AtomicBool,
    close: CloseReason,
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
            token: CancellationToken::new(),
            state: Arc::new(State {
                triggered: AtomicBool::new(false),
                close,
            }),
            tracker: TaskTracker::new(),
        }
    }

    /// Tells every connection to close.
    pub fn trigger(&self) {
        self.state.triggered.store(true, Ordering::Release);
        self.token.cancel();
    }

    /// Whether [`Self::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.state.triggered.load(Ordering::Acquire)
    }

    /// Connections still running.
    pub fn connections(&self) -> usize {
        self.tracker.len()
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
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
    }

    pub(crate) fn signal(&self) -> Signal {
        Signal {
            state: self.state.clone(),
            cancelled: Box::pin(self.token.clone().cancelled_owned()),
            registered: false,
        }
    }

    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }
}

/// One connection's view of a [`Shutdown`].
pub(crate) struct Signal {
    state: Arc<State>,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The first poll left the task's waker with the token.
    registered: bool,
}

impl Signal {
    /// Whether shutdown was triggered. The first call registers `cx`'s waker;
    /// later calls only read the flag, which is enough because a connection is
    /// always its own spawned task, whose waker stays the same across polls.
    pub(crate) fn poll_triggered(&mut self, cx: &mut Context<'_>) -> bool {
        if self.registered && !self.state.triggered.load(Ordering::Acquire) {
            return false;
        }
        self.registered = true;
        self.cancelled.as_mut().poll(cx).is_ready()
    }

    /// The close frame connections are sent.
    pub(crate) fn close(&self) -> &CloseReason {
        &self.state.close
    }
}
