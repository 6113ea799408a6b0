//! Per-connection options, chosen at upgrade time.

use std::time::Duration;

use switchboard_proto::deflate::DeflateOptions;
use switchboard_proto::{CloseCode, CloseReason, Limits};

use crate::budget::ReceiveBudget;
use crate::stats::Stats;

/// What to do with a connection whose peer reads slower than it is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SlowConsumerPolicy {
    /// Close it with this code (1008 policy violation, or 1013 try again later).
    /// Pushes that would exceed the limit are refused, so memory stays bounded.
    Close(CloseCode),
}

impl SlowConsumerPolicy {
    /// The close frame a slow consumer is sent.
    pub(crate) fn close_reason(self) -> CloseReason {
        match self {
            Self::Close(code) => CloseReason::new(code, "slow consumer: outbound buffer full"),
        }
    }
}

/// Options for one connection, built with methods from [`Options::default`].
///
/// The timeouts and the ping interval are kept in whole milliseconds, rounded
/// up (at least 1 ms, at most about 49 days), since every connection carries them.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use switchboard::Options;
///
/// let options = Options::default()
///     .max_message_size(64 * 1024)
///     .idle_timeout(Some(Duration::from_secs(30)))
///     .compression(None);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    pub(crate) limits: Limits,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) ping_interval: Option<Duration>,
    pub(crate) compression: Option<DeflateOptions>,
    pub(crate) mailbox_size: usize,
    pub(crate) max_outbound_bytes: usize,
    pub(crate) slow_consumer: SlowConsumerPolicy,
    pub(crate) slow_consumer_timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) stats: Option<Stats>,
    pub(crate) receive_budget: Option<ReceiveBudget>,
    pub(crate) max_inflate_rate: Option<u64>,
    pub(crate) hibernate_after: Option<Duration>,
}

impl Default for Options {
    /// 1 MiB messages, a 60 s idle timeout, a ping every 25 s, permessage-deflate
    /// when offered, 1,024 info messages and 4 MiB waiting to be written, slow
    /// consumers closed with 1013 (at once for a push over the limit, after 30 s
    /// over it otherwise), and 5 s for the peer's close frame. No receive
    /// budget and no cap on inflating: a server open to untrusted peers should
    /// set both ([`Options::receive_budget`], [`Options::max_inflate_rate`]).
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            idle_timeout: Some(Duration::from_secs(60)),
            ping_interval: Some(Duration::from_secs(25)),
            compression: Some(DeflateOptions::default()),
            mailbox_size: 1024,
            max_outbound_bytes: 4 << 20,
            slow_consumer: SlowConsumerPolicy::Close(CloseCode::TRY_AGAIN_LATER),
            slow_consumer_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(5),
            stats: None,
            receive_budget: None,
            max_inflate_rate: None,
            hibernate_after: None,
        }
    }
}

impl Options {
    /// Sets both the frame and the message size limit for received data.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.limits.max_frame_size = bytes;
        self.limits.max_message_size = bytes;
        self
    }

    /// Sets the frame and message size limits for received data apart.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Closes the connection (1001) when nothing arrives for this long; `None` never.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sends a ping this often, so idle peers answer and NATs keep the flow; `None` never.
    pub fn ping_interval(mut self, interval: Option<Duration>) -> Self {
        self.ping_interval = interval;
        self
    }

    /// permessage-deflate when the client offers it; `None` turns it off.
    pub fn compression(mut self, compression: Option<DeflateOptions>) -> Self {
        self.compression = compression;
        self
    }

    /// Most `handle_info` messages waiting in the mailbox; further sends get
    /// [`crate::SendError::Full`].
    pub fn mailbox_size(mut self, messages: usize) -> Self {
        self.mailbox_size = messages;
        self
    }

    /// Most bytes waiting to be written to the socket, whoever queued them:
    /// pushed frames, the handler's replies, pongs. Over it the connection stops
    /// reading from its peer, and a push that would exceed it closes the
    /// connection under the slow-consumer policy.
    pub fn max_outbound_bytes(mut self, bytes: usize) -> Self {
        self.max_outbound_bytes = bytes;
        self
    }

    /// How a slow consumer is closed.
    pub fn slow_consumer(mut self, policy: SlowConsumerPolicy) -> Self {
        self.slow_consumer = policy;
        self
    }

    /// How long the queue may stay over `max_outbound_bytes` (reading paused)
    /// before the slow-consumer policy closes the connection.
    pub fn slow_consumer_timeout(mut self, timeout: Duration) -> Self {
        self.slow_consumer_timeout = timeout;
        self
    }

    /// How long to wait for the peer's close frame after sending ours; past it,
    /// what is still queued is dropped and the connection ends.
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The budget this connection's partly received data counts against,
    /// shared with other connections: see [`ReceiveBudget`]. `None` bounds a
    /// connection by its own limits only (a frame and a message).
    pub fn receive_budget(mut self, budget: Option<ReceiveBudget>) -> Self {
        self.receive_budget = budget;
        self
    }

    /// Most bytes a second the peer may make us inflate (a second's worth may
    /// be saved up). Past it, the connection stops decoding and reading until
    /// the rate has paid for what was inflated, so TCP slows the peer down: a
    /// compressed message can inflate a thousandfold, and the bytes a peer
    /// sends say little about the work it asks for. `None` is no cap.
    pub fn max_inflate_rate(mut self, bytes_per_sec: Option<u64>) -> Self {
        self.max_inflate_rate = bytes_per_sec;
        self
    }

    /// Hibernates a connection that has sent and received no message for this
    /// long (a new connection is first looked at after 5 ms, or this long if
    /// shorter): its task ends and what it keeps (handler, deadlines, counters)
    /// waits in one record, its socket watched by one thread for the whole
    /// process instead of by tokio's reactor, until the peer sends something,
    /// the mailbox gets something, the idle timeout or shutdown comes. That is
    /// about 40% of an idle connection's resident memory with the service's
    /// allocator (jemalloc), for one new task (a few microseconds) when it
    /// wakes. Pings and pongs are not messages, and do not wake it: that
    /// thread sends its pings and takes the empty pong that answers each, when
    /// it comes alone, which then does not reach
    /// [`crate::Handler::handle_control`] (any other pong wakes it and does).
    /// Only connections served by [`crate::serve`] over plain TCP, whose
    /// frames need no compression state of their own (no compression, or
    /// neither side keeping a context and the server's window whole)
    /// hibernate. `None` (the default) never.
    ///
    /// A hibernating connection has no task for a dropped runtime to end:
    /// that thread keeps answering its pings until the peer sends or leaves.
    /// Drain with [`crate::Shutdown`] (which wakes every one) before dropping
    /// the runtime that served them.
    pub fn hibernate_after(mut self, after: Option<Duration>) -> Self {
        self.hibernate_after = after;
        self
    }

    /// Counters to add this connection's traffic to.
    pub fn stats(mut self, stats: Stats) -> Self {
        self.stats = Some(stats);
        self
    }
}
