//! The addresses of a connection.
//!
//! [`ConnHandle`] is what Elixir calls a pid: clone it, keep it anywhere, and use
//! it to send the connection `handle_info` messages, push frames, schedule a
//! message ([`ConnHandle::send_after`]) or close it. [`Outbox`] is the part that
//! does not depend on the handler's message type (push and close), which is what
//! a [`crate::Registry`] stores.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use switchboard_proto::{CloseReason, Message, PreparedMessage};
use tokio::task::AbortHandle;

use crate::mailbox::Mailbox;

/// A process-unique connection number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl ConnId {
    pub(crate) fn next() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A frame to send: a message for this connection, or one prepared once for many.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Encoded for this connection when written.
    Message(Message),
    /// Encoded once and shared with every other recipient.
    Prepared(PreparedMessage),
}

impl Outbound {
    /// Bytes charged against the outbound limit.
    pub(crate) fn charge(&self) -> usize {
        match self {
            Self::Message(Message::Text(t)) => t.len(),
            Self::Message(Message::Binary(b) | Message::Ping(b) | Message::Pong(b)) => b.len(),
            Self::Message(Message::Close(_)) => 0,
            Self::Prepared(p) => p.payload().len(),
        }
    }

    pub(crate) fn is_control(&self) -> bool {
        matches!(
            self,
            Self::Message(Message::Ping(_) | Message::Pong(_) | Message::Close(_))
        )
    }
}

impl From<Message> for Outbound {
    fn from(message: Message) -> Self {
        Self::Message(message)
    }
}

impl From<PreparedMessage> for Outbound {
    fn from(message: PreparedMessage) -> Self {
        Self::Prepared(message)
    }
}

/// Why a `handle_info` message was not delivered; the message comes back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SendError<I> {
    /// The mailbox holds `mailbox_size` messages already.
    #[error("mailbox full")]
    Full(I),
    /// The connection has ended.
    #[error("connection closed")]
    Closed(I),
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PushError {
    /// The connection has ended or is closing.
    #[error("connection closed")]
    Closed,
    /// The outbound buffer is full: the connection is being closed by the
    /// slow-consumer policy.
    #[error("slow consumer: outbound buffer full")]
    SlowConsumer,
}

/// A cloneable address of one connection, typed by its handler's info messages.
pub struct ConnHandle<I> {
    mailbox: Arc<Mailbox<I>>,
}

impl<I> Clone for ConnHandle<I> {
    fn clone(&self) -> Self {
        Self {
            mailbox: self.mailbox.clone(),
        }
    }
}

impl<I> std::fmt::Debug for ConnHandle<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ConnHandle")
            .field(&self.mailbox.id())
            .finish()
    }
}

impl<I> ConnHandle<I> {
    /// The mailbox behind this handle.
    pub(crate) fn mailbox(&self) -> &Arc<Mailbox<I>> {
        &self.mailbox
    }
}

impl<I: Send + 'static> ConnHandle<I> {
    pub(crate) fn new(mailbox: Arc<Mailbox<I>>) -> Self {
        Self { mailbox }
    }

    /// The connection's number.
    pub fn id(&self) -> ConnId {
        self.mailbox.id()
    }

    /// Sends a message to the handler's `handle_info`. It never waits.
    ///
    /// # Errors
    ///
    /// [`SendError::Full`] when the mailbox holds `mailbox_size` messages
    /// already, and [`SendError::Closed`] when the connection has ended or is
    /// closing; either way the message comes back.
    ///
    /// # Examples
    ///
    /// ```
    /// use switchboard::testing::Harness;
    /// use switchboard::{Context, Handler, Message, Outcome};
    ///
    /// struct Counter(u32);
    ///
    /// impl Handler for Counter {
    ///     type Info = u32;
    ///     fn handle_in(&mut self, _m: Message, _ctx: &mut Context<'_, u32>) -> Outcome {
    ///         Outcome::Continue
    ///     }
    ///     fn handle_info(&mut self, add: u32, _ctx: &mut Context<'_, u32>) -> Outcome {
    ///         self.0 += add;
    ///         Outcome::Continue
    ///     }
    /// }
    ///
    /// let mut harness = Harness::new(Counter(0));
    /// let handle = harness.handle().clone();
    /// handle.send(2).unwrap();
    /// harness.deliver_infos();
    /// assert_eq!(harness.handler().0, 2);
    /// ```
    pub fn send(&self, info: I) -> Result<(), SendError<I>> {
        self.mailbox.send_info(info)
    }

    /// Sends `info` as [`Self::send`] does, but never refuses it for a full
    /// mailbox: for the connection's own follow-ups (a store's answer to a
    /// request of its peer), which must not be lost. `mailbox_size` bounds
    /// what others send; the caller bounds how many of these there can be
    /// (holding what each stands for with [`Outbox::hold`], for instance).
    ///
    /// # Errors
    ///
    /// [`SendError::Closed`] when the connection has ended.
    pub fn send_own(&self, info: I) -> Result<(), SendError<I>> {
        self.mailbox.send_own_info(info)
    }

    /// Sends `info` after `delay` (Elixir's `Process.send_after`). Dropping the
    /// [`TimerRef`] does not cancel it; [`TimerRef::cancel`] does. A message
    /// that finds the connection gone is dropped; one that finds its mailbox
    /// full is not (the handler set the timer: a token's expiry must come,
    /// however busy the connection). A pending timer does not keep an ended
    /// connection's mailbox alive.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (it spawns the timer's task).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchboard::{Context, Handler, Message, Outcome};
    ///
    /// /// Says "tick" every second (the `connection_timer` example does the same).
    /// struct Ticker;
    ///
    /// impl Handler for Ticker {
    ///     type Info = ();
    ///     fn init(&mut self, ctx: &mut Context<'_, ()>) -> Outcome {
    ///         ctx.handle().send_after((), Duration::from_secs(1));
    ///         Outcome::Continue
    ///     }
    ///     fn handle_in(&mut self, _m: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
    ///         Outcome::Continue
    ///     }
    ///     fn handle_info(&mut self, (): (), ctx: &mut Context<'_, ()>) -> Outcome {
    ///         ctx.handle().send_after((), Duration::from_secs(1));
    ///         Outcome::push(Message::text("tick"))
    ///     }
    /// }
    /// ```
    pub fn send_after(&self, info: I, delay: Duration) -> TimerRef {
        // Weak: a timer must not keep an ended connection's mailbox, and what
        // waits in it, alive until it fires (a token's expiry may be hours away).
        let mailbox = Arc::downgrade(&self.mailbox);
        let task = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // The connection may be gone by now; then the message has no one to go to.
            if let Some(mailbox) = mailbox.upgrade() {
                let _ = mailbox.send_own_info(info);
            }
        });
        TimerRef(task.abort_handle())
    }

    /// Queues a frame to be written, bypassing the handler. It never waits.
    /// A close frame is taken as [`ConnHandle::close`]: frames pushed after it
    /// are refused.
    ///
    /// # Errors
    ///
    /// [`PushError::Closed`] when the connection has ended or is closing, and
    /// [`PushError::SlowConsumer`] when the frame would take what waits to be
    /// written over `max_outbound_bytes`: the connection is then closed under
    /// the slow-consumer policy.
    pub fn push(&self, frame: impl Into<Outbound>) -> Result<(), PushError> {
        self.mailbox.push(frame.into())
    }

    /// Closes the connection with `code` and `reason`.
    pub fn close(&self, reason: CloseReason) {
        self.mailbox.close(reason);
    }

    /// Whether the connection has ended or is closing.
    pub fn is_closed(&self) -> bool {
        self.mailbox.is_closed()
    }

    /// The untyped part of this handle: push and close.
    pub fn outbox(&self) -> Outbox {
        Outbox(self.mailbox.clone())
    }
}

/// A mailbox with its handler's info type erased: what an [`Outbox`] holds.
trait ErasedMailbox: Send + Sync {
    fn id(&self) -> ConnId;
    fn push(&self, frame: Outbound) -> Result<(), PushError>;
    fn reply(&self, frame: Outbound) -> Result<(), PushError>;
    fn close(&self, reason: CloseReason);
    fn is_closed(&self) -> bool;
    fn hold(&self, bytes: usize);
    fn unhold(&self, bytes: usize);
    fn reserve(&self, bytes: usize, within: usize) -> bool;
}

impl<I: Send> ErasedMailbox for Mailbox<I> {
    fn id(&self) -> ConnId {
        Mailbox::id(self)
    }
    fn push(&self, frame: Outbound) -> Result<(), PushError> {
        Mailbox::push(self, frame)
    }
    fn reply(&self, frame: Outbound) -> Result<(), PushError> {
        Mailbox::reply(self, frame)
    }
    fn close(&self, reason: CloseReason) {
        Mailbox::close(self, reason)
    }
    fn is_closed(&self) -> bool {
        Mailbox::is_closed(self)
    }
    fn hold(&self, bytes: usize) {
        Mailbox::hold(self, bytes)
    }
    fn unhold(&self, bytes: usize) {
        Mailbox::unhold(self, bytes)
    }
    fn reserve(&self, bytes: usize, within: usize) -> bool {
        Mailbox::reserve(self, bytes, within)
    }
}

/// The untyped address of a connection: push frames to it, or close it.
#[derive(Clone)]
pub struct Outbox(Arc<dyn ErasedMailbox>);

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Outbox").field(&self.0.id()).finish()
    }
}

impl Outbox {
    /// The connection's number.
    pub fn id(&self) -> ConnId {
        self.0.id()
    }

    /// Queues a frame to be written.
    ///
    /// # Errors
    ///
    /// As [`ConnHandle::push`].
    pub fn push(&self, frame: impl Into<Outbound>) -> Result<(), PushError> {
        self.0.push(frame.into())
    }

    /// Queues a frame that answers the peer's own message, from outside the
    /// handler (an answer that waited for a store): like the handler's own
    /// output, it is never refused for `max_outbound_bytes`. A peer that asks
    /// faster than it reads is not read meanwhile (what waits counts against
    /// the budget) and is closed by the slow-consumer timeout if it stays over
    /// it; closing it at once would punish it for answers it has not yet had
    /// the time to read. Deliveries it did not ask for go through [`Self::push`].
    ///
    /// # Errors
    ///
    /// [`PushError::Closed`] when the connection has ended or is closing.
    pub fn reply(&self, frame: impl Into<Outbound>) -> Result<(), PushError> {
        self.0.reply(frame.into())
    }

    /// Closes the connection.
    pub fn close(&self, reason: CloseReason) {
        self.0.close(reason)
    }

    /// Whether the connection has ended or is closing.
    pub fn is_closed(&self) -> bool {
        self.0.is_closed()
    }

    /// Holds `bytes`, as [`Self::hold`] does, only if what waits to be
    /// written and what is held, with them, stays within `within` bytes; `None`
    /// otherwise. For work that must be queued whole or not be done (a
    /// replay): reservations made at once never share the same room.
    pub fn reserve(&self, bytes: usize, within: usize) -> Option<Held> {
        self.0.reserve(bytes, within).then(|| Held {
            mailbox: self.0.clone(),
            bytes,
        })
    }

    /// Counts `bytes` of work the application has in flight for this
    /// connection (a message waiting for a store's answer) until the
    /// returned guard is dropped. While more than `max_outbound_bytes` is
    /// held, the connection reads nothing more: a peer that sends faster
    /// than the work completes meets TCP's backpressure instead of growing
    /// the server's memory.
    pub fn hold(&self, bytes: usize) -> Held {
        self.0.hold(bytes);
        Held {
            mailbox: self.0.clone(),
            bytes,
        }
    }
}

/// Work in flight for a connection; dropping it lets the connection read
/// again (see [`Outbox::hold`]).
#[must_use = "the work counts as done as soon as this is dropped"]
pub struct Held {
    mailbox: Arc<dyn ErasedMailbox>,
    bytes: usize,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("bytes", &self.bytes).finish()
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.mailbox.unhold(self.bytes);
    }
}

/// A scheduled [`ConnHandle::send_after`] message.
#[derive(Debug)]
pub struct TimerRef(AbortHandle);

impl TimerRef {
    /// Cancels the message if it has not been sent yet.
    pub fn cancel(self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Options;

    /// Regression: the timer's task held a clone of the handle, so a
    /// connection that ended kept its mailbox (and what waited in it) until
    /// the timer fired: the relay sets one for its token's expiry, often
    /// hours away.
    #[tokio::test]
    async fn a_pending_timer_does_not_keep_an_ended_connection_s_mailbox() {
        let mailbox = Arc::new(Mailbox::<()>::new(ConnId::next(), &Options::default()));
        let handle = ConnHandle::new(mailbox);
        let kept = Arc::downgrade(&handle.mailbox);
        let timer = handle.send_after((), Duration::from_secs(3600));
        drop(handle);
        assert!(kept.upgrade().is_none(), "the timer kept the mailbox");
        // The timer still fires into nothing, and can still be cancelled.
        timer.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_still_reaches_a_live_connection() {
        let mailbox = Arc::new(Mailbox::<u8>::new(ConnId::next(), &Options::default()));
        let handle = ConnHandle::new(mailbox.clone());
        let _timer = handle.send_after(7, Duration::from_secs(3600));
        tokio::time::sleep(Duration::from_secs(3601)).await;
        let mut drained = crate::mailbox::Drained::default();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        assert!(mailbox.drain(&mut cx, &mut drained).is_ready());
        assert_eq!(drained.infos.drain(..).collect::<Vec<_>>(), [7]);
    }
}
