//! The connection driver: one task per connection.
//!
//! The driver owns the socket and the [`Handler`]. Each time it is polled it
//! takes what the mailbox holds, reads and decodes what the socket has, runs
//! timers, and writes queued frames with vectored writes. It never parses
//! bytes itself (that is [`switchboard_proto`]'s job) and never awaits while
//! holding a lock: everything happens in one `poll` function, so reads, writes
//! and the mailbox make progress together without splitting the socket.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use hyper::upgrade::OnUpgrade;
use switchboard_proto::deflate::{DeflateParams, PeerContext};
use switchboard_proto::message::MessageEncoder;
use switchboard_proto::{CloseCode, CloseReason, Message, MessageDecoder, ProtocolError, Role};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep, sleep_until};

use crate::handle::{ConnHandle, Outbound};
use crate::handler::{Context, Handler, Outcome, TerminateReason};
use crate::mailbox::{CloseCause, Direct, Drained, Mailbox};
use crate::options::Options;
use crate::shutdown::Signal;
use crate::socket::Socket;
use crate::stats::Stats;
use crate::telemetry::{self, Counts};
use crate::upgrade::{FailedUpgradeCallback, UpgradeFailed};

mod intake;
use intake::Intake;

/// Size of the per-thread buffer that reads land in.
const LANDING_SIZE: usize = 16 * 1024;
/// With at least this much room left, a connection reads into its own buffer.
const MIN_IN_PLACE: usize = 4096;
/// Most buffers handed to one vectored write.
const MAX_IOVECS: usize = 64;
/// Initial size of the buffer where the connection's own frames gather before a write.
const SCRATCH_START: usize = 1024;
/// Rounds of work before yielding to other tasks, so one busy peer cannot starve the rest.
const BUDGET: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Messages flow both ways.
    Open,
    /// We sent a close frame and wait for the peer's.
    Closing,
    /// We sent a close frame after a protocol error: flush it, half-close, and
    /// discard input until the peer closes or the close timeout passes, so that
    /// unread input does not turn our close frame into a TCP reset.
    Failing,
    /// The close handshake is over, or the connection failed: flush and end.
    Done,
}

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
/// alone, about half of what each idle connection cost before.
#[expect(
    clippy::large_enum_variant,
    reason = "the task is meant to be exactly as large as its running state, which it becomes in place"
)]
pub(crate) enum Connection<H: Handler> {
    /// The 101 response is on its way; the socket is not ours yet.
    Upgrading {
        upgrade: OnUpgrade,
        start: Option<Start<H>>,
    },
    /// The handshake is done.
    Running(Driver<H, Socket>),
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
    std::future::poll_fn(|cx| driver.poll_run(cx)).await;
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
                    ready!(driver.poll_run(cx));
                    driver.finish();
                    *this = Self::Ended;
                    return Poll::Ready(());
                }
                Self::Ended => return Poll::Ready(()),
            }
        }
    }
}

pub(crate) struct Driver<H: Handler, S> {
    io: S,
    handler: H,
    handle: ConnHandle<H::Info>,
    mailbox: Arc<Mailbox<H::Info>>,
    decoder: MessageDecoder,
    encoder: MessageEncoder,
    protocol: Option<String>,
    read_buf: BytesMut,
    write_queue: VecDeque<Bytes>,
    scratch: BytesMut,
    staged: Vec<Outbound>,
    /// Reused between mailbox drains so their queues keep their allocations.
    inbox: Drained<H::Info>,
    phase: Phase,
    reason: Option<TerminateReason>,
    /// A callback panicked: call the handler no more.
    poisoned: bool,
    last_read: Instant,
    idle_timeout: Option<Duration>,
    ping_interval: Option<Duration>,
    next_ping: Option<Instant>,
    /// One timer per connection, set to the earliest of the idle deadline, the
    /// next ping and the close deadline.
    timer: Option<Pin<Box<Sleep>>>,
    close_timeout: Duration,
    stats: Option<Stats>,
    close_deadline: Option<Instant>,
    shutdown: Option<Signal>,
    flushed: bool,
    /// Our side of the TCP connection is shut down.
    write_closed: bool,
    /// Since when more than `max_outbound_bytes` has waited to be written, and
    /// reading is paused; past the slow-consumer timeout the connection is closed.
    over_budget_since: Option<Instant>,
    slow_consumer_timeout: Duration,
    /// Bytes to write until our latest pong is out (those queued before it, and
    /// itself); 0 when it is.
    pong_unwritten: usize,
    /// A write began while that pong waited: it is stuck behind a full socket.
    pong_tried: bool,
    /// The latest ping that arrived while our pong to an earlier one was stuck
    /// unwritten: only it gets answered (RFC 6455 §5.5.3), so a ping flood
    /// queues one read's worth of pongs at most. Pings that arrive together,
    /// before a write, each get their pong, as peers (and Autobahn 2.10) expect.
    /// Boxed: it is rare, and every idle connection carries the field.
    pending_pong: Option<Box<Bytes>>,
    /// The mailbox may write prepared frames to the socket while we are parked.
    direct: bool,
    /// What the peer may make us hold and inflate.
    intake: Intake,
    /// For the close event: when it opened, and its traffic (but for what
    /// the mailbox wrote directly, which it counts).
    opened: Instant,
    counts: Counts,
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
        let mut driver = Self::new(io, handler, mailbox, setup);
        if let Some(stream) = direct {
            driver.allow_direct_writes(stream);
        }
        driver.init();
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
            handle: ConnHandle::new(mailbox.clone()),
            mailbox,
            decoder: MessageDecoder::new(setup.role, options.limits, setup.peer_context),
            encoder: MessageEncoder::new(setup.role, setup.deflate),
            protocol: setup.protocol,
            read_buf: BytesMut::new(),
            write_queue: VecDeque::new(),
            scratch: BytesMut::new(),
            staged: Vec::new(),
            inbox: Drained::default(),
            phase: Phase::Open,
            reason: None,
            poisoned: false,
            last_read: Instant::now(),
            idle_timeout: options.idle_timeout,
            ping_interval: options.ping_interval,
            next_ping: options.ping_interval.map(|period| Instant::now() + period),
            timer: None,
            close_timeout: options.close_timeout,
            stats: options.stats,
            close_deadline: None,
            shutdown: setup.shutdown,
            flushed: true,
            write_closed: false,
            over_budget_since: None,
            slow_consumer_timeout: options.slow_consumer_timeout,
            pong_unwritten: 0,
            pong_tried: false,
            pending_pong: None,
            direct: false,
            intake: Intake::new(
                options.receive_budget,
                options.max_inflate_rate,
                setup.peer_context.is_some(),
            ),
            opened: Instant::now(),
            counts: Counts::default(),
        }
    }

    /// Lets the mailbox write prepared frames straight to `stream` while this
    /// driver is parked, when this connection's frames need no state of its own
    /// (no compression, or compression without context takeover).
    fn allow_direct_writes(&mut self, stream: Arc<tokio::net::TcpStream>) {
        if let Some(framing) = self.encoder.shared_framing() {
            self.mailbox.attach(Direct {
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
    }

    fn finish(&mut self) {
        self.mailbox.shut();
        let reason = self
            .reason
            .take()
            .unwrap_or(TerminateReason::ConnectionLost);
        let (messages, bytes) = self.mailbox.written_directly();
        self.counts.sent(messages, bytes);
        telemetry::closed(&reason, self.opened, self.counts);
        if !self.poisoned {
            let handler = &mut self.handler;
            if catch_unwind(AssertUnwindSafe(|| handler.terminate(&reason))).is_err() {
                tracing::error!(conn = %self.handle.id(), "handler panicked in terminate");
            }
        }
    }

    fn poll_run(&mut self, cx: &mut TaskContext<'_>) -> Poll<()> {
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
            match self.poll_write(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    self.fail(TerminateReason::Error(format!("write failed: {e}")));
                    return Poll::Ready(());
                }
                Poll::Pending => {}
            }
            let ending = matches!(self.phase, Phase::Done | Phase::Failing);
            if ending && !self.write_closed && self.write_queue.is_empty() && self.flushed {
                // We close the TCP connection first, as RFC 6455 §7.1.1 asks of servers.
                if Pin::new(&mut self.io).poll_shutdown(cx).is_ready() {
                    self.write_closed = true;
                    progress = true;
                }
            }
            if self.phase == Phase::Done && self.write_closed {
                return Poll::Ready(());
            }
            if !progress {
                if self.can_park() && !self.mailbox.park() {
                    // Something arrived since the mailbox was last drained.
                    mailbox_waiting = false;
                    continue;
                }
                if self.poll_timers(cx, true) {
                    continue;
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
        let over = self.mailbox.over_budget();
        match (over, self.over_budget_since) {
            (true, None) => self.over_budget_since = Some(Instant::now()),
            (false, Some(_)) => {
                self.over_budget_since = None;
                // The peer was not idle while we did not read.
                self.last_read = Instant::now();
            }
            _ => {}
        }
        let holding = self.mailbox.holds_too_much();
        (!over && !holding && !self.intake.paused()) || self.phase == Phase::Failing
    }

    /// Whether the mailbox may write to the socket while this task sleeps:
    /// nothing of ours is queued or half-written, and the connection is open.
    fn can_park(&self) -> bool {
        self.direct
            && self.phase == Phase::Open
            && self.write_queue.is_empty()
            && self.scratch.is_empty()
            && self.flushed
    }

    fn poll_shutdown_signal(&mut self, cx: &mut TaskContext<'_>) -> bool {
        let Some(signal) = self.shutdown.as_mut() else {
            return false;
        };
        if !signal.poll_triggered(cx) {
            return false;
        }
        let close = signal.close().clone();
        self.shutdown = None;
        self.start_close(close.clone(), TerminateReason::Shutdown(close));
        true
    }

    fn poll_mailbox(&mut self, cx: &mut TaskContext<'_>) -> bool {
        if matches!(self.phase, Phase::Done | Phase::Failing) {
            return false;
        }
        let mut drained = std::mem::take(&mut self.inbox);
        if self.mailbox.drain(cx, &mut drained).is_pending() {
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

    /// Moves frames taken from the mailbox onto the write queue.
    fn enqueue_drained_frames(&mut self, drained: &mut Drained<H::Info>) {
        let mut sent = std::mem::take(&mut drained.partial);
        for frame in drained.frames.drain(..) {
            let charge = frame.charge();
            self.enqueue(frame, std::mem::take(&mut sent));
            self.mailbox.release(charge);
        }
    }

    /// The peer sent its FIN: nothing more is accepted, and the frames the
    /// mailbox already took are queued before the connection ends. A pusher
    /// was told they were queued (the relay acks them as delivered): they
    /// must not be dropped because the FIN was read before the mailbox.
    fn queue_accepted_frames(&mut self) {
        self.mailbox.refuse_new();
        let mut drained = std::mem::take(&mut self.inbox);
        self.mailbox.take_frames(&mut drained);
        self.enqueue_drained_frames(&mut drained);
        self.inbox = drained;
    }

    fn poll_read(&mut self, cx: &mut TaskContext<'_>) -> bool {
        if self.phase == Phase::Done {
            return false;
        }
        let read = poll_read_landing(&mut self.io, cx, &mut self.read_buf);
        if self.phase == Phase::Failing {
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
                self.last_read = Instant::now();
                self.decode_messages();
                self.account_received();
                true
            }
            Poll::Ready(Err(e)) => {
                self.fail(TerminateReason::Error(format!("read failed: {e}")));
                self.write_queue.clear();
                self.scratch.clear();
                true
            }
        }
    }

    fn decode_messages(&mut self) {
        while matches!(self.phase, Phase::Open | Phase::Closing) && !self.intake.paused() {
            let decoded = self.decoder.next(&mut self.read_buf);
            self.intake.charge(&self.decoder);
            match decoded {
                Ok(Some(message)) => self.on_message(message),
                Ok(None) => break,
                Err(error) => {
                    self.on_protocol_error(error);
                    break;
                }
            }
        }
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
                    if self.pong_unwritten > 0 && self.pong_tried {
                        self.pending_pong = Some(Box::new(payload.clone()));
                    } else {
                        self.push_pong(payload.clone());
                    }
                    self.call(|handler, ctx| handler.handle_control(message, ctx));
                }
            }
            Message::Pong(_) => self.call(|handler, ctx| handler.handle_control(message, ctx)),
            Message::Close(reason) => {
                if self.phase == Phase::Open {
                    // Echo the peer's code (RFC 6455 §5.5.1); an empty close gets an empty one.
                    let echo = reason.as_ref().map(|r| CloseReason::new(r.code(), ""));
                    self.push_frame(Message::Close(echo));
                    self.reason = Some(TerminateReason::Remote(reason));
                }
                self.mailbox.refuse_new();
                self.phase = Phase::Done;
                self.arm_close_deadline();
            }
        }
    }

    fn on_protocol_error(&mut self, error: ProtocolError) {
        let close = CloseReason::new(error.close_code(), error.to_string());
        self.fail_with_close(close, error.to_string());
    }

    /// Sends `close` and discards all further input: what was half-received
    /// is dropped at once, and given back to the receive budget.
    fn fail_with_close(&mut self, close: CloseReason, error: String) {
        tracing::debug!(conn = %self.handle.id(), %error, "failing connection");
        if self.phase == Phase::Open {
            self.push_frame(Message::Close(Some(close)));
        }
        self.mailbox.refuse_new();
        if self.reason.is_none() {
            self.reason = Some(TerminateReason::Error(error));
        }
        self.phase = Phase::Failing;
        self.read_buf = BytesMut::new();
        self.decoder.discard_partial();
        let _ = self.intake.hold(0);
        self.arm_close_deadline();
    }

    /// Ends the connection without a close handshake (keeping an earlier reason).
    fn fail(&mut self, reason: TerminateReason) {
        self.mailbox.refuse_new();
        if self.reason.is_none() {
            self.reason = Some(reason);
        }
        self.phase = Phase::Done;
        self.arm_close_deadline();
    }

    /// Bounds how long the connection may take to end from here: past the close
    /// timeout, what is still queued is dropped (see `poll_timers`).
    fn arm_close_deadline(&mut self) {
        self.close_deadline
            .get_or_insert_with(|| Instant::now() + self.close_timeout);
    }

    /// Sends a close frame and waits (up to the close timeout) for the peer's.
    fn start_close(&mut self, close: CloseReason, reason: TerminateReason) {
        if self.phase != Phase::Open {
            return;
        }
        // What the mailbox accepted before now goes out before the close frame:
        // its pushers were told it was queued, and the relay acks it as delivered.
        self.queue_accepted_frames();
        self.push_frame(Message::Close(Some(close)));
        self.reason = Some(reason);
        self.phase = Phase::Closing;
        self.arm_close_deadline();
    }

    fn push_pong(&mut self, payload: Bytes) {
        self.push_frame(Message::Pong(payload));
        self.pong_unwritten =
            self.write_queue.iter().map(Bytes::len).sum::<usize>() + self.scratch.len();
        self.pong_tried = false;
    }

    /// When the timer must next fire: the close deadline while closing, else the
    /// earliest of the idle deadline (not while reading is paused: the peer is
    /// not idle, we are not reading), the next ping and the slow-consumer deadline.
    fn next_deadline(&self) -> Option<Instant> {
        let resume = self.intake.resume_at();
        if self.phase != Phase::Open {
            return [self.close_deadline, resume].into_iter().flatten().min();
        }
        let idle = match self.over_budget_since {
            Some(_) => None,
            None => self.idle_timeout.map(|period| self.last_read + period),
        };
        let slow = self
            .over_budget_since
            .map(|since| since + self.slow_consumer_timeout);
        [idle, self.next_ping, slow, resume]
            .into_iter()
            .flatten()
            .min()
    }

    /// Fires the timer if it is due. It is created only when `arm` is set, which
    /// `poll_run` does just before the task yields: a timer earlier than any the
    /// runtime holds wakes the runtime's driver (a write to its eventfd, and one
    /// more epoll_wait), and a connection that ends within this poll, as one
    /// whose peer sent a close usually does, never needs its close deadline.
    fn poll_timers(&mut self, cx: &mut TaskContext<'_>, arm: bool) -> bool {
        let Some(want) = self.next_deadline() else {
            self.timer = None;
            return false;
        };
        match &mut self.timer {
            // Reads push the idle deadline later without touching the timer (no
            // timer-wheel work per read); it fires early and is set again then.
            Some(timer) if want < timer.deadline() => timer.as_mut().reset(want),
            Some(_) => {}
            None if arm => self.timer = Some(Box::pin(sleep_until(want))),
            None => return false,
        }
        let timer = self.timer.as_mut().expect("set above");
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        // Fired: it is set again, from the new state, before the task next yields.
        self.timer = None;
        let now = Instant::now();
        if self.intake.resume_if_due(now) {
            // What was read before the pause is decoded before reading more.
            self.decode_messages();
            self.account_received();
        }
        match self.phase {
            Phase::Open => {
                if self
                    .over_budget_since
                    .is_some_and(|since| since + self.slow_consumer_timeout <= now)
                {
                    let close = self.mailbox.slow_consumer_close();
                    self.start_close(close.clone(), TerminateReason::SlowConsumer(close));
                } else if self.over_budget_since.is_none()
                    && self
                        .idle_timeout
                        .is_some_and(|period| self.last_read + period <= now)
                {
                    self.start_close(
                        CloseReason::new(CloseCode::GOING_AWAY, "idle timeout"),
                        TerminateReason::Timeout,
                    );
                } else if self.next_ping.is_some_and(|at| at <= now) {
                    self.next_ping = self.ping_interval.map(|period| now + period);
                    self.push_frame(Message::Ping(Bytes::new()));
                }
            }
            _ if self.close_deadline.is_some_and(|at| at <= now) => {
                // Whatever the peer has not taken by now it will not take: a peer
                // that stopped reading must not hold the connection open forever.
                self.phase = Phase::Done;
                self.write_queue.clear();
                self.scratch.clear();
            }
            _ => {}
        }
        true
    }

    fn poll_write(&mut self, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        loop {
            // The pong held back for a later ping goes out once the one before it has.
            if self.pong_unwritten == 0
                && let Some(payload) = self.pending_pong.take()
            {
                self.push_pong(*payload);
            }
            self.queue_scratch();
            self.pong_tried |= self.pong_unwritten > 0;
            if self.write_queue.is_empty() {
                break;
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let count = self.write_queue.len().min(MAX_IOVECS);
            for (slice, bytes) in slices.iter_mut().zip(self.write_queue.iter()) {
                *slice = IoSlice::new(bytes);
            }
            let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]))?;
            if written == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.mailbox.release(written);
            self.pong_unwritten = self.pong_unwritten.saturating_sub(written);
            self.consume_written(written);
            self.flushed = false;
        }
        if !self.flushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.flushed = true;
            // Everything is written: give back what encoding and queueing held.
            self.scratch = BytesMut::new();
            if self.write_queue.capacity() > MAX_IOVECS {
                self.write_queue = VecDeque::new();
            }
        }
        Poll::Ready(Ok(()))
    }

    fn consume_written(&mut self, mut written: usize) {
        while written > 0 {
            let front = self
                .write_queue
                .front_mut()
                .expect("wrote more than was queued");
            if front.len() <= written {
                written -= front.len();
                self.write_queue.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }

    /// Encodes a frame onto the write queue, charging it to the outbound budget.
    /// `sent` bytes of it already went out in a direct write.
    fn enqueue(&mut self, frame: Outbound, sent: usize) {
        let data = !frame.is_control();
        let mut bytes = match frame {
            Outbound::Prepared(message) => self.encoder.encode_prepared(&message),
            Outbound::Message(Message::Close(close)) => {
                let close = close.unwrap_or_else(|| CloseReason::new(CloseCode::NORMAL, ""));
                self.start_close(close.clone(), TerminateReason::Normal(close));
                return;
            }
            Outbound::Message(message) => {
                let len = self.push_frame(message);
                if data {
                    self.counts.sent(1, len as u64);
                    if let Some(stats) = &self.stats {
                        stats.sent(len);
                    }
                }
                return;
            }
        };
        if data {
            self.counts.sent(1, bytes.len() as u64);
            if let Some(stats) = &self.stats {
                stats.sent(bytes.len());
            }
        }
        bytes.advance(sent);
        self.mailbox.charge(bytes.len());
        self.queue_scratch();
        self.write_queue.push_back(bytes);
    }

    /// Encodes a frame after those already in the scratch buffer, where frames
    /// gather until the next write (one buffer for a burst of replies, not one
    /// allocation each). Returns the frame's length.
    fn push_frame(&mut self, message: Message) -> usize {
        if self.scratch.capacity() == 0 {
            // Room for a burst of small frames without regrowing; it is given
            // back once written.
            self.scratch.reserve(SCRATCH_START);
        }
        let before = self.scratch.len();
        self.encoder.encode(&message, &mut self.scratch);
        let len = self.scratch.len() - before;
        self.mailbox.charge(len);
        len
    }

    /// Moves the frames gathered in the scratch buffer onto the write queue.
    fn queue_scratch(&mut self) {
        if !self.scratch.is_empty() {
            let frames = self.scratch.split().freeze();
            self.write_queue.push_back(frames);
        }
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
