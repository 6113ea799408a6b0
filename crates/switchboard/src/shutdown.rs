//! Graceful shutdown for every connection started with the same [`Shutdown`].

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Tracks connection tasks and tells them to close.
///
/// [`Shutdown::trigger`] makes every connection send close 1001 ("going away");
/// [`Shutdown::drain`] waits until they have all ended, or a timeout passes.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    /// A new, untriggered shutdown.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells every connection to close with 1001.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Whether [`Self::trigger`] was called.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Connections still running.
    pub fn connections(&self) -> usize {
        self.tracker.len()
    }

    /// Triggers shutdown and waits up to `timeout` for every connection to end.
    /// Returns whether they all did.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.trigger();
        self.tracker.close();
        tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
    }

    pub(crate) fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tracker.spawn(task);
    }
}
