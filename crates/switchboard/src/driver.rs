//! The connection driver: one task per connection.
//!
//! The driver owns the socket and the [`Handler`]. Each time it is polled it
//! takes what the mailbox holds, reads and decodes what the socket has, runs
//! timers, and writes what is queued. It never parses bytes itself (that is
//! [`switchboard_proto`]'s job) and never awaits while holding a lock:
//! everything happens in one `poll` function, so reads, writes and the mailbox
//! make progress together without splitting the socket.
//!
//! Its parts live beside it: the write side in `writer`, the deadlines in
//! `timers`, the close handshake in `close`, the receive limits in `intake`.
//! Every idle connection carries a driver, so each field is kept small (rare
//! states are boxed, periods are milliseconds).

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use hyper::upgrade::OnUpgrade;
use switchboard_proto::deflate::{DeflateParams, PeerContext};
use switchboard_proto::message::MessageEncoder;
use switchboard_proto::{CloseCode, CloseReason, Message, MessageDecoder, Role};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use crate::handle::{ConnHandle, Outbound};
use crate::handler::{Context, Handler, Outcome, TerminateReason};
use crate::mailbox::{CloseCause, Direct, Drained, Mailbox};
use crate::options::Options;
use crate::shutdown::Signal;
use crate::socket::Socket;
use crate::stats::Stats;
use crate::telemetry::{self, Counts};
use crate::upgrade::{FailedUpgradeCallback, UpgradeFailed};

mod close;
mod hibernate;
mod intake;
mod timers;
mod writer;
use close::Phase;
use hibernate::Quiet;
use intake::Intake;
use timers::{Due, Timers};
use writer::Writer;

/// Size of the per-thread buffer that reads land in.
const LANDING_SIZE: usize = 16 * 1024;
/// With at least this much room left, a connection reads into its own buffer.
const MIN_IN_PLACE: usize = 4096;
/// Rounds of work before yielding to other tasks, so one busy peer cannot starve the rest.
const BUDGET: usize = 32;

/// Everything the driver needs besides the socket and the handler.
pub(crate) struct Setup {
    /// Server or client: which frames are masked.
    pub role: Role,
    pub options: Options,
    /// This side's compression, when permessage-deflate was agreed.
    pub deflate: Option<DeflateParams>,
    /// How the peer compresses, when it was.
    pub peer_context: Option<PeerContext>,
    pub protocol: Option<String>,
    pub shutdown: Option<Signal>,
    pub on_failed: Option<FailedUpgradeCallback>,
}

/// A connection's whole life as one task: waiting for hyper to hand over the
/// socket, then driving it. Written as a state machine rather than an `async`
/// block because the compiler lays out an async block's captured values and its
/// awaited future side by side: this way the task is as large as the driver
/// alone, about half of what each idle connection cost before. A connection
/// that hibernates ends its task and comes back in a new one, `Waking`.
#[expect(
    clippy::large_enum_variant,
    reason = "the task is as large as the driver whichever state it is in; \
              boxing the driver would add an allocation to every connection"
)]
pub(crate) enum Connection<H: Handler> {
    /// The 101 response is on its way; the socket is not ours yet.
    Upgrading {
        upgrade: OnUpgrade,
        start: Option<Start<H>>,
    },
    /// The handshake is done.
    Running(Driver<H, Socket>),
    /// Woken from hibernation: the driver is rebuilt on the first poll.
    Waking(hibernate::Asleep<H>),
    /// The connection has ended.
    Ended,
}

/// What a connection needs to start once its socket arrives.
pub(crate) struct Start<H: Handler> {
    handler: H,
    mailbox: Arc<Mailbox<H::Info>>,
    setup: Setup,
}

impl<H: Handler> Connection<H> {
    pub(crate) fn new(
        upgrade: OnUpgrade,
        handler: H,
        mailbox: Arc<Mailbox<H::Info>>,
        setup: Setup,
    ) -> Self {
        Self::Upgrading {
            upgrade,
            start: Some(Start {
                handler,
                mailbox,
                setup,
            }),
        }
    }
}

/// Runs a connection over `io`, whose handshake is done, until it ends; `early`
/// holds what the peer sent right behind its handshake. The client's task.
pub(crate) async fn run<H: Handler, S: AsyncRead + AsyncWrite + Unpin>(
    io: S,
    handler: H,
    mailbox: Arc<Mailbox<H::Info>>,
    setup: Setup,
    early: Bytes,
) {
    let mut driver = Driver::start(io, handler, mailbox, setup, None, &early);
    // A client never hibernates (it has no `Quiet`: see `Driver::start`).
    std::future::poll_fn(|cx| driver.poll_run(cx).map(drop)).await;
    driver.finish();
}

// Nothing inside is ever pinned in place: the driver is polled through `&mut`,
// and the upgrade future is `Unpin` itself.
impl<H: Handler> Unpin for Connection<H> {}

impl<H: Handler> Future for Connection<H> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        let this = self.get_mut();
        loop {
            match this {
                Self::Upgrading { upgrade, start } => match ready!(Pin::new(upgrade).poll(cx)) {
                    Ok(upgraded) => {
                        let Start {
                            handler,
                            mailbox,
                            setup,
                        } = start.take().expect("started once");
                        let (socket, early) = Socket::new(upgraded);
                        let shared = socket.shared();
                        let driver = Driver::start(socket, handler, mailbox, setup, shared, &early);
                        *this = Self::Running(driver);
                    }
                    Err(error) => {
                        let on_failed = start.take().and_then(|start| start.setup.on_failed);
                        match on_failed {
                            Some(callback) => callback(UpgradeFailed(error)),
                            None => {
                                tracing::debug!(%error, "upgrade failed after the 101 response")
                            }
                        }
                        *this = Self::Ended;
                        return Poll::Ready(());
                    }
                },
                Self::Running(driver) => {
                    if ready!(driver.poll_run(cx)) == Exit::Hibernate {
                        let Self::Running(driver) = std::mem::replace(this, Self::Ended) else {
                            unreachable!("matched above")
                        };
                        match driver.hibernate() {
                            // Something arrived meanwhile: run on.
                            Some(driver) => *this = Self::Running(driver),
                            None => return Poll::Ready(()),
                        }
                        continue;
                    }
                    driver.finish();
                    *this = Self::Ended;
                    return Poll::Ready(());
                }
                Self::Waking(_) => {
                    let Self::Waking(asleep) = std::mem::replace(this, Self::Ended) else {
                        unreachable!("matched above")
                    };
                    match asleep.into_driver() {
                        Some(driver) => *this = Self::Running(driver),
                        None => return Poll::Ready(()),
                    }
                }
                Self::Ended => return Poll::Ready(()),
            }
        }
    }
}

pub(crate) struct Driver<H: Handler, S> {
    io: S,
    handler: H,
    /// The connection's mailbox, behind the handle its callbacks see.
    handle: ConnHandle<H::Info>,
    decoder: MessageDecoder,
    writer: Writer,
    protocol: Option<Box<str>>,
    read_buf: BytesMut,
    /// What callbacks push through their context, reused between them. One
    /// vector per thread would save these 24 bytes, but its thread-local
    /// access cost 45 instructions per echoed message (3%, `bench/callgrind.sh echo`).
    staged: Vec<Outbound>,
    /// Reused between mailbox drains so their queues keep their allocations.
    inbox: Drained<H::Info>,
    phase: Phase,
    /// Boxed: it is set once, as the connection ends.
    reason: Option<Box<TerminateReason>>,
    /// A callback panicked: call the handler no more.
    poisoned: bool,
    timers: Timers,
    stats: Option<Stats>,
    shutdown: Option<Signal>,
    /// The mailbox may write prepared frames to the socket while we are parked.
    direct: bool,
    /// Messages read are waiting in `read_buf`, undecoded, because answers
    /// queued past the outbound budget: decoded before reading more.
    held_back: bool,
    /// A message was handled since the mailbox was last looked at: what its
    /// handling mailed there goes out before the next message's answer.
    mailed: bool,
    /// The client's end of a connection: it lets the server close TCP first.
    client: bool,
    /// What the peer may make us hold and inflate.
    intake: Intake,
    /// For the close event: its traffic (but for what the mailbox wrote
    /// directly, which it counts). When it opened is kept by the timers.
    counts: Counts,
    /// Watches for quiet, to hibernate (see `hibernate`): boxed, so that a
    /// connection without `hibernate_after` carries a null pointer.
    quiet: Option<Box<Quiet>>,
}

/// Why [`Driver::poll_run`] returned.
#[derive(Debug, PartialEq, Eq)]
enum Exit {
    /// The connection has ended: finish it.
    Ended,
    /// The connection has been quiet for `hibernate_after` and holds nothing
    /// in flight.
    Hibernate,
}

impl<H, S> Driver<H, S>
where
    H: Handler,
    S: AsyncRead + AsyncWrite + Unpin,
{
    /// A driver whose handler's `init` has run, with `early` bytes decoded;
    /// `direct` is the socket pushers may write to while it is parked.
    fn start(
        io: S,
        handler: H,
        mailbox: Arc<Mailbox<H::Info>>,
        setup: Setup,
        direct: Option<Arc<tokio::net::TcpStream>>,
        early: &[u8],
    ) -> Self {
        let hibernate_after = setup.options.hibernate_after;
        let mut driver = Self::new(io, handler, mailbox, setup);
        if let Some(stream) = direct {
            driver.allow_direct_writes(stream);
        }
        driver.init();
        // Only plain TCP connections whose frames need no compression state of
        // their own (those the mailbox may write to directly) hibernate: their
        // socket can be handed over and their state rebuilt. A peer that keeps
        // its compression context keeps its decoder from being at rest.
        if let Some(period) = hibernate_after.filter(|_| driver.direct) {
            driver.quiet = Some(Box::new(Quiet::new(period)));
        }
        if !early.is_empty() {
            driver.read_buf.extend_from_slice(early);
            driver.decode_messages();
            driver.account_received();
        }
        driver
    }

    fn new(io: S, handler: H, mailbox: Arc<Mailbox<H::Info>>, setup: Setup) -> Self {
        let options = setup.options;
        Self {
            io,
            handler,
            handle: ConnHandle::new(mailbox),
            decoder: MessageDecoder::new(setup.role, options.limits, setup.peer_context),
            writer: Writer::new(MessageEncoder::new(setup.role, setup.deflate)),
            protocol: setup.protocol.map(String::into_boxed_str),
            read_buf: BytesMut::new(),
            staged: Vec::new(),
            inbox: Drained::default(),
            phase: Phase::Open,
            reason: None,
            poisoned: false,
            timers: Timers::new(&options),
            shutdown: setup.shutdown,
            direct: false,
            held_back: false,
            mailed: false,
            client: setup.role == Role::Client,
            intake: Intake::new(
                options.receive_budget,
                options.max_inflate_rate,
                setup.peer_context.is_some(),
            ),
            stats: options.stats,
            counts: Counts::default(),
            quiet: None,
        }
    }

    /// Messages received and sent so far, written directly or not.
    fn activity(&self) -> u64 {
        let direct = self.handle.mailbox().written_directly().0;
        self.counts.messages_in + self.counts.messages_out + direct
    }

    /// Lets the mailbox write prepared frames straight to `stream` while this
    /// driver is parked, when this connection's frames need no state of its own
    /// (no compression, or compression without context takeover).
    fn allow_direct_writes(&mut self, stream: Arc<tokio::net::TcpStream>) {
        if let Some(framing) = self.writer.encoder().shared_framing() {
            self.handle.mailbox().attach(Direct {
                stream,
                framing,
                stats: self.stats.clone(),
            });
            self.direct = true;
        }
    }

    fn init(&mut self) {
        telemetry::opened();
        self.call(|handler, ctx| handler.init(ctx));
        // What it mailed (a welcome) goes before any answer.
        self.mailed = true;
    }

    fn finish(&mut self) {
        let reason = self
            .reason
            .take()
            .map_or(TerminateReason::ConnectionLost, |reason| *reason);
        conclude(
            &mut self.handler,
            &self.handle,
            reason,
            self.timers.opened(),
            self.counts,
            self.poisoned,
        );
    }

    fn poll_run(&mut self, cx: &mut TaskContext<'_>) -> Poll<Exit> {
        // A source that had nothing has registered this task's waker, so anything
        // new there wakes the task again: later rounds of this poll skip it
        // (registering again costs a lock in the mailbox and in tokio's reactor).
        let (mut mailbox_waiting, mut socket_waiting) = (false, false);
        for _ in 0..BUDGET {
            // The mailbox comes first: after a park, the rest of a frame that a
            // direct write sent only in part must be written before anything else.
            let mut progress = false;
            if !mailbox_waiting {
                let drained = self.poll_mailbox(cx);
                mailbox_waiting = !drained;
                progress |= drained;
            }
            progress |= self.poll_shutdown_signal(cx);
            if !socket_waiting && self.may_read() {
                let read = self.poll_read(cx);
                socket_waiting = !read;
                progress |= read;
            }
            progress |= self.poll_timers(cx, false);
            let written = self
                .writer
                .poll_write(&mut self.io, cx, self.handle.mailbox());
            if let Poll::Ready(Err(e)) = written {
                self.fail(TerminateReason::Error(format!("write failed: {e}")));
                return Poll::Ready(Exit::Ended);
            }
            // What was held back for a full queue goes on once the write has
            // drained it: nothing on the socket would wake this task for it.
            progress |= self.held_back && !self.outbound_full() && !self.intake.paused();
            if matches!(self.phase, Phase::Done | Phase::Failing) {
                progress |= self.writer.poll_shut(&mut self.io, cx);
            }
            if self.phase == Phase::Done && self.writer.is_shut() {
                return Poll::Ready(Exit::Ended);
            }
            if !progress {
                // Timers first: one already due runs now (a ping, a close), and
                // nothing may take output once parked, as pushers may then write
                // to the socket, and a frame of ours could land inside one of
                // theirs that went out in part.
                if self.poll_timers(cx, true) {
                    continue;
                }
                if self.can_park() && !self.handle.mailbox().park() {
                    // Something arrived since the mailbox was last drained.
                    mailbox_waiting = false;
                    continue;
                }
                if self.may_hibernate() {
                    return Poll::Ready(Exit::Hibernate);
                }
                return Poll::Pending;
            }
        }
        self.poll_timers(cx, true);
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Whether to read from the socket: not while more than `max_outbound_bytes`
    /// waits to be written, whoever queued it, so that a peer that sends without
    /// reading meets TCP's backpressure instead of growing our memory; nor
    /// while the application holds more than that of work in flight for it
    /// ([`crate::Outbox::hold`]). Notes when an outbound pause began, for the
    /// slow-consumer timeout.
    fn may_read(&mut self) -> bool {
        let over = self.handle.mailbox().over_budget();
        self.timers.over_budget(over);
        let holding = self.handle.mailbox().holds_too_much();
        (!over && !holding && !self.intake.paused())
            || matches!(self.phase, Phase::Failing | Phase::Lingering)
    }

    /// Whether what waits to be written, or the work held for this
    /// connection, is past `max_outbound_bytes` (see [`Self::may_read`]).
    fn outbound_full(&self) -> bool {
        let mailbox = self.handle.mailbox();
        mailbox.over_budget() || mailbox.holds_too_much()
    }

    /// Whether the mailbox may write to the socket while this task sleeps:
    /// nothing of ours is queued or half-written, and the connection is open.
    fn can_park(&self) -> bool {
        self.direct && self.phase == Phase::Open && self.writer.is_idle()
    }

    fn poll_shutdown_signal(&mut self, cx: &mut TaskContext<'_>) -> bool {
        let Some(signal) = self.shutdown.as_mut() else {
            return false;
        };
        if !signal.poll_triggered(cx) {
            return false;
        }
        let close = signal.close().clone();
        // Kept, not dropped: the signal counts the connection until it ends.
        signal.heard();
        self.start_close(close.clone(), TerminateReason::Shutdown(close));
        true
    }

    fn poll_mailbox(&mut self, cx: &mut TaskContext<'_>) -> bool {
        if matches!(self.phase, Phase::Done | Phase::Failing | Phase::Lingering) {
            return false;
        }
        // Empty now, or drained below.
        self.mailed = false;
        let mut drained = std::mem::take(&mut self.inbox);
        if self.handle.mailbox().drain(cx, &mut drained).is_pending() {
            self.inbox = drained;
            return false;
        }
        self.enqueue_drained_frames(&mut drained);
        for info in drained.infos.drain(..) {
            self.call(|handler, ctx| handler.handle_info(info, ctx));
        }
        if let Some(close) = drained.close.take() {
            let reason = match close.cause {
                CloseCause::Requested => TerminateReason::Normal(close.reason.clone()),
                CloseCause::SlowConsumer => TerminateReason::SlowConsumer(close.reason.clone()),
            };
            self.start_close(close.reason, reason);
        }
        self.inbox = drained;
        true
    }

    /// Moves the frames the mailbox holds now into the writer. Between the
    /// messages of one wake-up (one read or several): frames the handler's
    /// own calls queued there (a subscribe's replay, its join event, `init`'s
    /// welcome) go out before the answer to the next message, which the
    /// handler writes straight to the writer, and which would otherwise
    /// overtake them.
    pub(super) fn queue_mailed_frames(&mut self) {
        self.mailed = false;
        let mut drained = std::mem::take(&mut self.inbox);
        self.handle.mailbox().take_frames(&mut drained);
        self.enqueue_drained_frames(&mut drained);
        self.inbox = drained;
    }

    /// Hands frames taken from the mailbox to the writer.
    fn enqueue_drained_frames(&mut self, drained: &mut Drained<H::Info>) {
        let mut sent = std::mem::take(&mut drained.partial);
        for frame in drained.frames.drain(..) {
            let charge = frame.charge();
            self.enqueue(frame, std::mem::take(&mut sent));
            self.handle.mailbox().release(charge);
        }
    }

    fn poll_read(&mut self, cx: &mut TaskContext<'_>) -> bool {
        if std::mem::take(&mut self.held_back) {
            // What was read while the queue was full, before reading more (a
            // connection ending meanwhile decodes nothing more, and drops it).
            self.decode_messages();
            self.account_received();
            return true;
        }
        if self.phase == Phase::Done {
            return false;
        }
        // Whether a message was begun before this read (see below).
        let begun = self.holds_part();
        let read = poll_read_landing(&mut self.io, cx, &mut self.read_buf);
        if matches!(self.phase, Phase::Failing | Phase::Lingering) {
            self.read_buf.clear();
            if matches!(read, Poll::Ready(Ok(0) | Err(_))) {
                self.phase = Phase::Done;
            }
            return read.is_ready();
        }
        match read {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) => {
                // The peer will send no more, but may still read (a half-close):
                // what is queued is written first, within the close timeout.
                if self.phase == Phase::Open {
                    self.queue_accepted_frames();
                    self.fail(TerminateReason::ConnectionLost);
                } else {
                    self.phase = Phase::Done;
                }
                true
            }
            Poll::Ready(Ok(_)) => {
                let heard = self.counts.messages_in;
                self.decode_messages();
                self.account_received();
                // Bytes that only add to a message begun earlier are not
                // activity: it must come whole within the idle timeout of its
                // start, or a peer could hold its share of the receive budget
                // for ever with a byte (or a ping) now and then.
                if !begun || self.counts.messages_in != heard || !self.holds_part() {
                    self.timers.read();
                }
                true
            }
            Poll::Ready(Err(e)) => {
                self.fail(TerminateReason::Error(format!("read failed: {e}")));
                self.writer.discard();
                true
            }
        }
    }

    fn decode_messages(&mut self) {
        // A wake-up that brings one message, as most do, takes no mailbox lock.
        while matches!(self.phase, Phase::Open | Phase::Closing) && !self.intake.paused() {
            if self.phase == Phase::Open && self.outbound_full() {
                // One read can hold many small messages, each asking for a
                // big answer: the rest wait until the queue is back within
                // its budget (they count against the receive budget meanwhile).
                self.held_back = !self.read_buf.is_empty();
                break;
            }
            let decoded = self.decoder.next(&mut self.read_buf);
            self.intake.charge(&mut self.decoder);
            match decoded {
                Ok(Some(message)) => {
                    if matches!(message, Message::Text(_) | Message::Binary(_)) {
                        if self.mailed && self.phase == Phase::Open {
                            self.queue_mailed_frames();
                        }
                        self.mailed = true;
                    }
                    self.on_message(message);
                }
                Ok(None) => break,
                Err(error) => {
                    self.on_protocol_error(error);
                    break;
                }
            }
        }
    }

    /// Whether part of a frame or message has been received, and not the rest.
    fn holds_part(&self) -> bool {
        !self.read_buf.is_empty() || self.decoder.buffered() > 0
    }

    /// Counts what is left half-received against the receive budget, and
    /// fails the connection when the budget does not allow it.
    fn account_received(&mut self) {
        if self.read_buf.is_empty() {
            // Nothing half-received: hold no read memory while waiting.
            self.read_buf = BytesMut::new();
        }
        if self.phase == Phase::Failing {
            return;
        }
        let held = self.read_buf.len() + self.decoder.buffered();
        if let Err(exceeded) = self.intake.hold(held) {
            let close = exceeded.close_reason();
            let error = format!("not received: {}", close.reason());
            self.fail_with_close(close, error);
        }
    }

    fn on_message(&mut self, message: Message) {
        match message {
            Message::Text(_) | Message::Binary(_) => {
                let len = message_len(&message);
                self.counts.received(len);
                if let Some(stats) = &self.stats {
                    stats.received(len);
                }
                if self.phase == Phase::Open {
                    self.call(|handler, ctx| handler.handle_in(message, ctx));
                }
            }
            Message::Ping(ref payload) => {
                if self.phase == Phase::Open {
                    self.writer.answer_ping(payload, self.handle.mailbox());
                    self.call(|handler, ctx| handler.handle_control(message, ctx));
                }
            }
            Message::Pong(_) => self.call(|handler, ctx| handler.handle_control(message, ctx)),
            Message::Close(reason) => {
                if self.phase == Phase::Open {
                    // What the mailbox took goes out first, as on a FIN: its
                    // pushers were told it was queued (RFC 6455 §5.5.1 lets
                    // the answer wait for what is being sent).
                    self.queue_accepted_frames();
                    // Echo the peer's code (RFC 6455 §5.5.1); an empty close gets an empty one.
                    let echo = reason.as_ref().map(|r| CloseReason::new(r.code(), ""));
                    self.push_frame(Message::Close(echo));
                    self.reason = Some(Box::new(TerminateReason::Remote(reason)));
                }
                self.handle.mailbox().refuse_new();
                self.phase = if self.client {
                    Phase::Lingering
                } else {
                    Phase::Done
                };
                self.arm_close_deadline();
            }
        }
    }

    /// Fires the timer if it is due, and acts on what is (see [`Timers::poll`]).
    fn poll_timers(&mut self, cx: &mut TaskContext<'_>, arm: bool) -> bool {
        let open = self.phase == Phase::Open;
        // Only an open connection looks for quiet: a closing one would find
        // the look overdue on every wake-up.
        let look = self
            .quiet
            .as_ref()
            .filter(|_| open)
            .map(|quiet| quiet.next_look());
        let other = self.intake.resume_at().into_iter().chain(look).min();
        if !self.timers.poll(cx, open, other, arm) {
            return false;
        }
        let now = Instant::now();
        if self.intake.resume_if_due(now) {
            // What was read before the pause is decoded before reading more.
            self.decode_messages();
            self.account_received();
        }
        if look.is_some_and(|at| at <= now) {
            let (activity, heard) = (self.activity(), self.counts.messages_in);
            if let Some(quiet) = self.quiet.as_mut() {
                quiet.look(activity, heard, now);
            }
        }
        match self.phase {
            Phase::Open => match self.timers.due(now) {
                Due::SlowConsumer => {
                    let close = self.handle.mailbox().slow_consumer_close();
                    self.start_close(close.clone(), TerminateReason::SlowConsumer(close));
                }
                Due::Idle => self.start_close(
                    CloseReason::new(CloseCode::GOING_AWAY, "idle timeout"),
                    TerminateReason::Timeout,
                ),
                Due::Ping => {
                    self.push_frame(Message::Ping(Bytes::new()));
                }
                Due::Nothing => {}
            },
            _ if self.timers.close_due(now) => {
                // Whatever the peer has not taken by now it will not take: a peer
                // that stopped reading must not hold the connection open forever.
                self.phase = Phase::Done;
                self.writer.abandon();
            }
            _ => {}
        }
        true
    }

    /// Encodes a frame for the writer, charging it to the outbound budget.
    /// `sent` bytes of it already went out in a direct write.
    fn enqueue(&mut self, frame: Outbound, sent: usize) {
        // Nothing follows our close frame (RFC 6455 §5.5.1): not what a
        // handler pushes behind it. Only the rest of a frame a direct write
        // began would, which must go out whole, and is never pushed that late.
        if self.phase != Phase::Open && sent == 0 {
            return;
        }
        let data = !frame.is_control();
        let len = match frame {
            Outbound::Prepared(message) => {
                let mut bytes = self.writer.encoder().encode_prepared(&message);
                let len = bytes.len();
                bytes.advance(sent);
                self.writer.push_encoded(bytes, self.handle.mailbox());
                len
            }
            Outbound::Message(Message::Close(close)) => {
                let close = close.unwrap_or_else(|| CloseReason::new(CloseCode::NORMAL, ""));
                self.start_close(close.clone(), TerminateReason::Normal(close));
                return;
            }
            Outbound::Message(message) => self.push_frame(message),
        };
        if data {
            self.counts.sent(1, len as u64);
            if let Some(stats) = &self.stats {
                stats.sent(len);
            }
        }
    }

    /// Encodes a frame after those gathered for the next write; returns its length.
    fn push_frame(&mut self, message: Message) -> usize {
        self.writer.push_frame(&message, self.handle.mailbox())
    }

    /// Runs one callback, catching a panic so it closes only this connection (1011).
    fn call(&mut self, callback: impl FnOnce(&mut H, &mut Context<'_, H::Info>) -> Outcome) {
        if self.poisoned || self.phase != Phase::Open {
            return;
        }
        let mut staged = std::mem::take(&mut self.staged);
        let outcome = {
            let mut ctx = Context {
                handle: &self.handle,
                staged: &mut staged,
                protocol: self.protocol.as_deref(),
            };
            let handler = &mut self.handler;
            catch_unwind(AssertUnwindSafe(|| callback(handler, &mut ctx)))
        };
        for frame in staged.drain(..) {
            self.enqueue(frame, 0);
        }
        self.staged = staged;
        match outcome {
            Ok(Outcome::Continue) => {}
            Ok(Outcome::Push(frames)) => frames.into_iter().for_each(|f| self.enqueue(f, 0)),
            Ok(Outcome::PushOne(frame)) => self.enqueue(frame, 0),
            Ok(Outcome::Stop { push, close }) => {
                push.into_iter().for_each(|f| self.enqueue(f, 0));
                self.start_close(close.clone(), TerminateReason::Normal(close));
            }
            Ok(Outcome::Fail { push, close, error }) => {
                push.into_iter().for_each(|f| self.enqueue(f, 0));
                tracing::debug!(conn = %self.handle.id(), %error, "handler failed the connection");
                self.start_close(close, TerminateReason::Error(error));
            }
            Err(_) => {
                tracing::error!(conn = %self.handle.id(), "handler panicked; closing with 1011");
                self.poisoned = true;
                self.start_close(
                    CloseReason::new(CloseCode::INTERNAL_ERROR, "internal error"),
                    TerminateReason::Error("handler panicked".into()),
                );
            }
        }
    }
}

/// Ends a connection: the mailbox refuses what comes, the close event is
/// logged and, unless a callback panicked before, `terminate` runs.
fn conclude<H: Handler>(
    handler: &mut H,
    handle: &ConnHandle<H::Info>,
    reason: TerminateReason,
    opened: Instant,
    mut counts: Counts,
    poisoned: bool,
) {
    handle.mailbox().shut();
    let (messages, bytes) = handle.mailbox().written_directly();
    counts.sent(messages, bytes);
    telemetry::closed(&reason, opened, counts);
    if !poisoned && catch_unwind(AssertUnwindSafe(|| handler.terminate(&reason))).is_err() {
        tracing::error!(conn = %handle.id(), "handler panicked in terminate");
    }
}

/// The payload length of a data message.
fn message_len(message: &Message) -> usize {
    match message {
        Message::Text(text) => text.len(),
        Message::Binary(data) => data.len(),
        _ => 0,
    }
}

/// Reads without holding a buffer while idle. A connection with room in its own
/// buffer (in the middle of a large frame) reads in place; otherwise the bytes land
/// in a per-thread buffer and are copied over, so a connection that is waiting
/// for its peer owns no read memory at all.
fn poll_read_landing<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut TaskContext<'_>,
    buf: &mut BytesMut,
) -> Poll<std::io::Result<usize>> {
    thread_local! {
        static LANDING: std::cell::RefCell<Box<[u8]>> =
            std::cell::RefCell::new(vec![0; LANDING_SIZE].into_boxed_slice());
    }
    if buf.capacity() - buf.len() >= MIN_IN_PLACE {
        return tokio_util::io::poll_read_buf(Pin::new(io), cx, buf);
    }
    LANDING.with(|landing| {
        let mut landing = landing.borrow_mut();
        let mut read_buf = tokio::io::ReadBuf::new(&mut landing[..]);
        ready!(Pin::new(io).poll_read(cx, &mut read_buf))?;
        buf.extend_from_slice(read_buf.filled());
        Poll::Ready(Ok(read_buf.filled().len()))
    })
}

#[cfg(test)]
mod tests;
