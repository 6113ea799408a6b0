//! What a connection logs of itself, inside its span (see
//! [`crate::WebSocketUpgrade::span`]): one info event when it opens, one when
//! it closes (code, reason, duration, messages and bytes each way), and each
//! received message at debug. Payloads are never logged.

use tokio::time::Instant;

use crate::handler::TerminateReason;

/// A connection's own traffic, for its close event: data messages and their
/// bytes (payload bytes in, wire bytes out, as [`crate::Stats`] counts them).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub messages_in: u64,
    pub bytes_in: u64,
    pub messages_out: u64,
    pub bytes_out: u64,
}

impl Counts {
    pub fn received(&mut self, bytes: usize) {
        self.messages_in += 1;
        self.bytes_in += bytes as u64;
        tracing::debug!(bytes, "message received");
    }

    pub fn sent(&mut self, messages: u64, bytes: u64) {
        self.messages_out += messages;
        self.bytes_out += bytes;
    }
}

pub(crate) fn opened() {
    tracing::info!("connection opened");
}

pub(crate) fn closed(reason: &TerminateReason, opened: Instant, counts: Counts) {
    tracing::info!(
        code = reason.close_code(),
        reason = reason.reason(),
        duration_ms = opened.elapsed().as_millis() as u64,
        messages_in = counts.messages_in,
        bytes_in = counts.bytes_in,
        messages_out = counts.messages_out,
        bytes_out = counts.bytes_out,
        "connection closed"
    );
}
