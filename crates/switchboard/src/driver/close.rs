//! The close handshake (RFC 6455 §7): the driver's phases from open to done,
//! and the ways a connection gets there.

use bytes::BytesMut;
use switchboard_proto::{CloseReason, Message, ProtocolError};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Driver;
use crate::handler::{Handler, TerminateReason};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Messages flow both ways.
    Open,
    /// We sent a close frame and wait for the peer's.
    Closing,
    /// We sent a close frame after a protocol error: flush it, half-close, and
    /// discard input until the peer closes or the close timeout passes, so that
    /// unread input does not turn our close frame into a TCP reset.
    Failing,
    /// A client's close handshake is over: flush, and read (discarding) until
    /// the server closes the TCP connection, so that the server, not the
    /// client, holds its TIME_WAIT (RFC 6455 §7.1.1); the close timeout
    /// bounds the wait.
    Lingering,
    /// The close handshake is over, or the connection failed: flush and end.
    Done,
}

impl<H, S> Driver<H, S>
where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// The peer sent its FIN: nothing more is accepted, and the frames the
    /// mailbox already took are queued before the connection ends. A pusher
    /// was told they were queued (the relay acks them as delivered): they
    /// must not be dropped because the FIN was read before the mailbox.
    pub(super) fn queue_accepted_frames(&mut self) {
        self.handle.mailbox().refuse_new();
        self.queue_mailed_frames();
    }

    pub(super) fn on_protocol_error(&mut self, error: ProtocolError) {
        let close = CloseReason::new(error.close_code(), error.to_string());
        self.fail_with_close(close, error.to_string());
    }

    /// Sends `close` and discards all further input: what was half-received
    /// is dropped at once, and given back to the receive budget.
    pub(super) fn fail_with_close(&mut self, close: CloseReason, error: String) {
        tracing::debug!(conn = %self.handle.id(), %error, "failing connection");
        if self.phase == Phase::Open {
            self.push_frame(Message::Close(Some(close)));
        }
        self.handle.mailbox().refuse_new();
        if self.reason.is_none() {
            self.reason = Some(Box::new(TerminateReason::Error(error)));
        }
        self.phase = Phase::Failing;
        self.read_buf = BytesMut::new();
        self.decoder.discard_partial();
        let _ = self.intake.hold(0);
        self.arm_close_deadline();
    }

    /// Ends the connection without a close handshake (keeping an earlier reason).
    pub(super) fn fail(&mut self, reason: TerminateReason) {
        self.handle.mailbox().refuse_new();
        if self.reason.is_none() {
            self.reason = Some(Box::new(reason));
        }
        self.phase = Phase::Done;
        self.arm_close_deadline();
    }

    /// Bounds how long the connection may take to end from here: past the close
    /// timeout, what is still queued is dropped (see `poll_timers`).
    pub(super) fn arm_close_deadline(&mut self) {
        self.timers.arm_close_deadline();
    }

    /// Sends a close frame and waits (up to the close timeout) for the peer's.
    pub(super) fn start_close(&mut self, close: CloseReason, reason: TerminateReason) {
        if self.phase != Phase::Open {
            return;
        }
        // What the mailbox accepted before now goes out before the close frame:
        // its pushers were told it was queued, and the relay acks it as delivered.
        self.queue_accepted_frames();
        self.push_frame(Message::Close(Some(close)));
        self.reason = Some(Box::new(reason));
        self.phase = Phase::Closing;
        self.arm_close_deadline();
    }
}
