//! Per-connection options, chosen at upgrade time.

use std::time::Duration;

use switchboard_proto::deflate::DeflateOptions;
use switchboard_proto::{CloseCode, CloseReason, Limits};

use crate::stats::Stats;

/// What to do with a connection whose peer reads slower than it is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumerPolicy {
    /// Close it with this code (1008 policy violation, or 1013 try again later).
    /// Pushes that would exceed the limit are refused, so memory stays bounded.
    Close(CloseCode),
}

impl SlowConsumerPolicy {
    /// The close frame a slow consumer is sent.
    pub(crate) fn close_reason(self) -> CloseReason {
        let Self::Close(code) = self;
        CloseReason::new(code, "slow consumer: outbound buffer full")
    }
}

/// Options for one connection.
#[derive(Debug, Clone)]
pub struct Options {
    /// Frame and message size limits for received data.
    pub limits: Limits,
    /// Close the connection (1001) when nothing arrives for this long; `None` never.
    pub idle_timeout: Option<Duration>,
    /// Send a ping this often, so idle peers answer and NATs keep the flow; `None` never.
    pub ping_interval: Option<Duration>,
    /// permessage-deflate, when the client offers it; `None` turns it off.
    pub compression: Option<DeflateOptions>,
    /// Most `handle_info` messages waiting in the mailbox; further sends get [`crate::SendError::Full`].
    pub mailbox_size: usize,
    /// Most bytes waiting to be written to the socket, pushed frames included.
    pub max_outbound_bytes: usize,
    /// What happens when `max_outbound_bytes` would be exceeded.
    pub slow_consumer: SlowConsumerPolicy,
    /// How long the queue may stay over `max_outbound_bytes` (reading paused)
    /// before the slow-consumer policy closes the connection.
    pub slow_consumer_timeout: Duration,
    /// How long to wait for the peer's close frame after sending ours.
    pub close_timeout: Duration,
    /// Counters to add this connection's traffic to, if any.
    pub stats: Option<Stats>,
}

impl Default for Options {
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
        }
    }
}

impl Options {
    /// Sets both the frame and the message size limit.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.limits.max_frame_size = bytes;
        self.limits.max_message_size = bytes;
        self
    }
}
