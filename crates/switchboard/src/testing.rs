//! Unit tests for handlers, without a socket.
//!
//! A [`Harness`] drives a [`Handler`] through its callbacks as the driver
//! would, and records what each callback pushed and whether it asked to close:
//! a handler is tested as a plain value, as WebSock handlers are plain
//! functions. Messages sent to the connection's [`ConnHandle`] (by the handler
//! itself, or by code it handed the handle to) wait until
//! [`Harness::deliver_infos`].
//!
//! # Examples
//!
//! ```
//! use switchboard::testing::Harness;
//! use switchboard::{Context, Handler, Message, Outcome};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     type Info = ();
//!     fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
//!         Outcome::push(message)
//!     }
//! }
//!
//! let mut harness = Harness::new(Echo);
//! harness.receive(Message::text("hi"));
//! assert_eq!(harness.take_pushed(), vec![Message::text("hi")]);
//! assert!(harness.closed().is_none());
//! ```

use std::sync::Arc;

use switchboard_proto::{CloseReason, Message};

use crate::handle::{ConnHandle, ConnId, Outbound};
use crate::handler::{Context, Handler, Outcome, TerminateReason};
use crate::mailbox::Mailbox;
use crate::options::Options;

/// A handler, driven by hand.
pub struct Harness<H: Handler> {
    handler: H,
    handle: ConnHandle<H::Info>,
    mailbox: Arc<Mailbox<H::Info>>,
    protocol: Option<String>,
    pushed: Vec<Message>,
    closed: Option<(CloseReason, Option<String>)>,
}

impl<H: Handler> Harness<H> {
    /// Runs `handler`'s `init`, with no subprotocol.
    pub fn new(handler: H) -> Self {
        Self::with_protocol(handler, None)
    }

    /// Runs `handler`'s `init`, as if `protocol` had been agreed in the handshake.
    pub fn with_protocol(handler: H, protocol: Option<&str>) -> Self {
        let mailbox = Arc::new(Mailbox::new(ConnId::next(), &Options::default()));
        let mut harness = Self {
            handler,
            handle: ConnHandle::new(mailbox.clone()),
            mailbox,
            protocol: protocol.map(str::to_owned),
            pushed: Vec::new(),
            closed: None,
        };
        harness.call(|handler, ctx| handler.init(ctx));
        harness
    }

    /// The connection's handle, as the handler's `ctx.handle()` gives it.
    pub fn handle(&self) -> &ConnHandle<H::Info> {
        &self.handle
    }

    /// The handler, to look at its state.
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// A text or binary message arrives: runs `handle_in`.
    pub fn receive(&mut self, message: Message) {
        self.call(|handler, ctx| handler.handle_in(message, ctx));
    }

    /// A ping or pong arrives: runs `handle_control` (the driver's automatic
    /// pong is not recorded).
    pub fn control(&mut self, message: Message) {
        self.call(|handler, ctx| handler.handle_control(message, ctx));
    }

    /// Runs `handle_info` with `info` directly.
    pub fn info(&mut self, info: H::Info) {
        self.call(|handler, ctx| handler.handle_info(info, ctx));
    }

    /// Runs `handle_info` for every message sent to the handle so far, in order,
    /// and pushes what was pushed to the handle; returns how many infos ran.
    pub fn deliver_infos(&mut self) -> usize {
        let (infos, frames) = self.mailbox.take_for_test();
        for frame in frames {
            self.record(frame);
        }
        let count = infos.len();
        for info in infos {
            self.info(info);
        }
        count
    }

    /// Ends the connection: runs `terminate` with `reason`.
    pub fn terminate(mut self, reason: &TerminateReason) -> H {
        self.handler.terminate(reason);
        self.handler
    }

    /// The messages pushed since the last call, in order (prepared messages as
    /// their plain message).
    pub fn take_pushed(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.pushed)
    }

    /// The close a callback asked for, if any, and with [`Outcome::Fail`] its error.
    pub fn closed(&self) -> Option<&(CloseReason, Option<String>)> {
        self.closed.as_ref()
    }

    fn record(&mut self, frame: Outbound) {
        self.pushed.push(match frame {
            Outbound::Message(message) => message,
            Outbound::Prepared(prepared) => prepared.to_message(),
        });
    }

    fn call(&mut self, callback: impl FnOnce(&mut H, &mut Context<'_, H::Info>) -> Outcome) {
        assert!(
            self.closed.is_none(),
            "the handler asked to close: the driver calls it no more"
        );
        let mut staged = Vec::new();
        let outcome = {
            let mut ctx = Context {
                handle: &self.handle,
                staged: &mut staged,
                protocol: self.protocol.as_deref(),
            };
            callback(&mut self.handler, &mut ctx)
        };
        staged.into_iter().for_each(|frame| self.record(frame));
        match outcome {
            Outcome::Continue => {}
            Outcome::Push(frames) => frames.into_iter().for_each(|frame| self.record(frame)),
            Outcome::PushOne(frame) => self.record(frame),
            Outcome::Stop { push, close } => {
                push.into_iter().for_each(|frame| self.record(frame));
                self.closed = Some((close, None));
            }
            Outcome::Fail { push, close, error } => {
                push.into_iter().for_each(|frame| self.record(frame));
                self.closed = Some((close, Some(error)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use switchboard_proto::CloseCode;

    use super::*;

    /// Counts messages, replies through its handle, and stops on "bye".
    struct Counter(usize);

    impl Handler for Counter {
        type Info = usize;

        fn init(&mut self, ctx: &mut Context<'_, usize>) -> Outcome {
            ctx.push(Message::text("welcome"));
            Outcome::Continue
        }

        fn handle_in(&mut self, message: Message, ctx: &mut Context<'_, usize>) -> Outcome {
            self.0 += 1;
            match message {
                Message::Text(text) if &*text == "bye" => {
                    Outcome::fail(CloseCode::POLICY, "bye", "asked to leave")
                }
                _ => {
                    let _ = ctx.handle().send(self.0);
                    Outcome::Continue
                }
            }
        }

        fn handle_info(&mut self, count: usize, _ctx: &mut Context<'_, usize>) -> Outcome {
            Outcome::push(Message::text(format!("seen {count}")))
        }
    }

    #[test]
    fn a_harness_runs_each_callback_and_shows_what_it_pushed() {
        let mut harness = Harness::new(Counter(0));
        assert_eq!(harness.take_pushed(), vec![Message::text("welcome")]);
        harness.receive(Message::text("a"));
        harness.receive(Message::binary(vec![1]));
        // Infos wait in the mailbox, as they would for the driver.
        assert!(harness.take_pushed().is_empty());
        assert_eq!(harness.deliver_infos(), 2);
        assert_eq!(
            harness.take_pushed(),
            vec![Message::text("seen 1"), Message::text("seen 2")]
        );
        harness.receive(Message::text("bye"));
        let (close, error) = harness.closed().unwrap();
        assert_eq!(close.code(), CloseCode::POLICY);
        assert_eq!(error.as_deref(), Some("asked to leave"));
        assert_eq!(harness.handler().0, 3);
    }
}
