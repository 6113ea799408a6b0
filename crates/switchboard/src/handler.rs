//! The per-connection callbacks, mirroring Elixir's WebSock behaviour.
//!
//! A [`Handler`] is the state of one connection. The driver task calls it, one
//! callback at a time, so it needs no locks. Callbacks are synchronous, as in
//! WebSock: to do async work, spawn a task and send the result back to
//! [`Context::handle`] as an info message.

use switchboard_proto::{CloseCode, CloseReason, Message};

use crate::handle::{ConnHandle, Outbound};

/// What a callback asks the connection to do next.
#[derive(Debug)]
#[non_exhaustive]
pub enum Outcome {
    /// Keep going.
    Continue,
    /// Send these frames, in order, and keep going.
    Push(Vec<Outbound>),
    /// Send this one frame and keep going: what [`Outcome::push`] returns, so
    /// that the most common reply needs no list.
    PushOne(Outbound),
    /// Send these frames, then close with this code and reason.
    Stop {
        /// Frames to send before the close frame.
        push: Vec<Outbound>,
        /// The close frame's code and reason.
        close: CloseReason,
    },
    /// Something went wrong: send these frames, then close with this code and
    /// reason; [`Handler::terminate`] gets [`TerminateReason::Error`] with `error`.
    Fail {
        /// Frames to send before the close frame.
        push: Vec<Outbound>,
        /// The close frame's code and reason.
        close: CloseReason,
        /// What went wrong, for `terminate` (and logs); not sent to the peer.
        error: String,
    },
}

impl Outcome {
    /// Send one frame and keep going.
    pub fn push(frame: impl Into<Outbound>) -> Self {
        Self::PushOne(frame.into())
    }

    /// Close with `code` and `reason`: a normal end, as far as `terminate` is concerned.
    ///
    /// # Panics
    ///
    /// If `code` may not be sent (1005, 1006, 1015, or outside the registered
    /// ranges): see [`CloseReason::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// use switchboard::{CloseCode, Outcome};
    ///
    /// let done = Outcome::stop(CloseCode::NORMAL, "bye");
    /// ```
    #[track_caller]
    pub fn stop(code: CloseCode, reason: impl Into<String>) -> Self {
        Self::Stop {
            push: Vec::new(),
            close: CloseReason::new(code, reason),
        }
    }

    /// Close because of `error`: the peer gets `code` with `reason`, and
    /// [`Handler::terminate`] gets [`TerminateReason::Error`] with `error`.
    ///
    /// # Panics
    ///
    /// If `code` may not be sent: see [`CloseReason::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// use switchboard::{CloseCode, Outcome};
    ///
    /// let failed = Outcome::fail(
    ///     CloseCode::INTERNAL_ERROR,
    ///     "try again",
    ///     "the database did not answer",
    /// );
    /// ```
    #[track_caller]
    pub fn fail(code: CloseCode, reason: impl Into<String>, error: impl Into<String>) -> Self {
        Self::Fail {
            push: Vec::new(),
            close: CloseReason::new(code, reason),
            error: error.into(),
        }
    }
}

/// Why a connection ended, as passed to [`Handler::terminate`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TerminateReason {
    /// This side closed it: an [`Outcome::Stop`] or [`ConnHandle::close`].
    Normal(CloseReason),
    /// The peer sent a close frame (`None` when it had no code).
    Remote(Option<CloseReason>),
    /// The peer went away without a close frame (TCP reset or EOF).
    ConnectionLost,
    /// The server is shutting down ([`crate::Shutdown`]); the peer was sent
    /// this close frame (the shutdown's).
    Shutdown(CloseReason),
    /// Nothing arrived within the idle timeout; the peer was sent 1001.
    Timeout,
    /// The slow-consumer policy closed it, with this close frame: a push would
    /// have taken what waits to be written over `max_outbound_bytes`, or it stayed
    /// over that limit (reading paused) for `slow_consumer_timeout`.
    SlowConsumer(CloseReason),
    /// A protocol violation, an I/O error, a handler that panicked, or an
    /// [`Outcome::Fail`].
    Error(String),
}

impl TerminateReason {
    /// The close code of the connection's end: the one this side sent or the
    /// peer's, 1005 for a close frame without one (RFC 6455 §7.1.5), 1006 for a
    /// connection that ended without a close frame, and `None` for an error,
    /// where the code depends on the error (1002, 1007, 1009, 1011, or none).
    pub fn close_code(&self) -> Option<u16> {
        match self {
            Self::Normal(close)
            | Self::Remote(Some(close))
            | Self::SlowConsumer(close)
            | Self::Shutdown(close) => Some(close.code().0),
            Self::Remote(None) => Some(1005),
            Self::ConnectionLost => Some(1006),
            Self::Timeout => Some(1001),
            Self::Error(_) => None,
        }
    }

    /// Why, in words: the close frame's reason (empty when it had none),
    /// "connection lost", "idle timeout", or the error.
    pub fn reason(&self) -> &str {
        match self {
            Self::Normal(close)
            | Self::Remote(Some(close))
            | Self::SlowConsumer(close)
            | Self::Shutdown(close) => close.reason(),
            Self::Remote(None) => "",
            Self::ConnectionLost => "connection lost",
            Self::Timeout => "idle timeout",
            Self::Error(error) => error,
        }
    }
}

/// What a callback can reach: its own handle, and a queue of frames to send.
pub struct Context<'a, I> {
    pub(crate) handle: &'a ConnHandle<I>,
    pub(crate) staged: &'a mut Vec<Outbound>,
    pub(crate) protocol: Option<&'a str>,
}

impl<I: Send + 'static> Context<'_, I> {
    /// This connection's handle: clone it to let other code reach the connection.
    pub fn handle(&self) -> &ConnHandle<I> {
        self.handle
    }

    /// Queues a frame, sent after the callback returns, before its outcome's frames.
    pub fn push(&mut self, frame: impl Into<Outbound>) {
        self.staged.push(frame.into());
    }

    /// The subprotocol agreed in the handshake, if any.
    pub fn protocol(&self) -> Option<&str> {
        self.protocol
    }
}

/// The callbacks of one connection. `Self` is the connection's state, built from
/// the upgrade request (path, query, headers, auth result) before `init`.
pub trait Handler: Send + 'static {
    /// Messages other code sends to this connection through its [`ConnHandle`].
    type Info: Send + 'static;

    /// Called once the handshake is done, before any message.
    fn init(&mut self, ctx: &mut Context<'_, Self::Info>) -> Outcome {
        let _ = ctx;
        Outcome::Continue
    }

    /// A text or binary message arrived: fragments are already joined, the message
    /// inflated and, for text, checked to be UTF-8.
    fn handle_in(&mut self, message: Message, ctx: &mut Context<'_, Self::Info>) -> Outcome;

    /// A message sent with [`ConnHandle::send`] or [`ConnHandle::send_after`] arrived.
    fn handle_info(&mut self, info: Self::Info, ctx: &mut Context<'_, Self::Info>) -> Outcome {
        let _ = (info, ctx);
        Outcome::Continue
    }

    /// A ping or pong arrived. A ping has already been answered with a pong.
    fn handle_control(&mut self, message: Message, ctx: &mut Context<'_, Self::Info>) -> Outcome {
        let _ = (message, ctx);
        Outcome::Continue
    }

    /// The connection has ended; the close handshake, if any, is done and no
    /// more frames can be sent. Not called after a callback panicked.
    fn terminate(&mut self, reason: &TerminateReason) {
        let _ = reason;
    }
}
