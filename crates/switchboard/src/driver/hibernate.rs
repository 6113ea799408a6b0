//! Hibernation: a connection quiet for `hibernate_after` gives up its task.
//!
//! An idle connection's task is most of its memory: the task cell (tokio's
//! header, the driver, the handler), tokio's readiness record for the socket
//! and the socket's shared pointer. A hibernating connection keeps one record
//! instead ([`Asleep`]: the handler, its decoder, deadlines and counters, the
//! bare socket), inside the waker that brings it back ([`Sleeper`]). That
//! waker is left with the mailbox, the shutdown signal and the process's
//! [`crate::lot`], which watches the socket and the next deadline. The first
//! of them to fire spawns a task that rebuilds the driver around the record.
//!
//! A connection hibernates only when nothing is in flight: no partial frame or
//! message, nothing queued or half-written, open, not paused, and no
//! compression state of its own (the server's compressor is shared when it
//! keeps no context; a peer that keeps its context keeps an inflater).
//!
//! Pings do not wake it: the lot's thread sends a due ping on the bare socket
//! and takes the peer's pong ([`Dormant::tend`]), one per ping, so that
//! hibernation fits the service's default pings. Those pongs are not passed
//! to [`Handler::handle_control`]; anything else the peer sends wakes it.

use std::io::{self, Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::num::NonZeroU32;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Wake, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use switchboard_proto::deflate::PeerContext;
use switchboard_proto::frame::{FrameDecoder, encode_header};
use switchboard_proto::message::MessageEncoder;
use switchboard_proto::{Limits, MessageDecoder, OpCode, Role};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{Instrument, Span};

use super::close::Phase;
use super::intake::Intake;
use super::timers::{Due, Resting, after, millis};
use super::writer::Writer;
use super::{Connection, Driver, conclude};
use crate::handle::ConnHandle;
use crate::handler::{Handler, TerminateReason};
use crate::lot::{Dormant, Tended, Ticket, lot};
use crate::mailbox::Drained;
use crate::shutdown::Signal;
use crate::socket::Socket;
use crate::stats::Stats;
use crate::telemetry::Counts;

/// What a hibernating connection keeps.
pub(crate) struct Asleep<H: Handler> {
    stream: StdTcpStream,
    handler: H,
    handle: ConnHandle<H::Info>,
    /// The decoder's limits and the peer's compression: a decoder at rest is
    /// made again from them.
    limits: Limits,
    peer_context: Option<PeerContext>,
    /// A subprotocol, compression: what most connections do not have.
    extras: Option<Box<Extras>>,
    timers: Resting,
    stats: Option<Stats>,
    shutdown: Option<Signal>,
    intake: Intake,
    counts: Counts,
    /// Its watch for quiet, which wakes with it.
    quiet: QuietRest,
    /// The connection's span, which its next task runs in.
    span: Span,
    runtime: tokio::runtime::Handle,
    /// Its place in the lot.
    ticket: Ticket,
    /// The lot's thread wrote only the first byte of a ping: the task
    /// writes the second before anything else.
    ping_tail: bool,
    /// The lot's thread sent a ping whose pong it has not taken: it takes
    /// one reply per ping, so a client that floods pongs wakes the
    /// connection, whose handler sees them (the service's counts them
    /// against its rate limit), instead of keeping the lot's thread busy.
    pong_due: bool,
}

/// What only some hibernating connections keep, in one box: 8 bytes of the
/// record where the two would take 32, which keeps the record (with the
/// service's handler) in jemalloc's 448-byte size class.
struct Extras {
    protocol: Option<Box<str>>,
    /// Compressing, it keeps no state of its own between messages (see
    /// `may_hibernate`): only its settings.
    encoder: MessageEncoder,
}

impl Extras {
    fn of(protocol: Option<Box<str>>, encoder: MessageEncoder) -> Option<Box<Self>> {
        (protocol.is_some() || encoder.compresses()).then(|| Box::new(Self { protocol, encoder }))
    }

    fn into_parts(extras: Option<Box<Self>>) -> (Option<Box<str>>, MessageEncoder) {
        match extras {
            Some(extras) => (extras.protocol, extras.encoder),
            None => (None, MessageEncoder::new(Role::Server, None)),
        }
    }
}

/// The waker of a hibernating connection: its first wake spawns the task.
struct Sleeper<H: Handler> {
    asleep: Mutex<Option<Asleep<H>>>,
}

impl<H: Handler> Sleeper<H> {
    fn lock(&self) -> MutexGuard<'_, Option<Asleep<H>>> {
        self.asleep.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A ping as the server sends it while the connection sleeps: empty, unmasked.
const PING_LEN: usize = 2;

fn ping_frame() -> [u8; PING_LEN] {
    let mut frame = [0; PING_LEN];
    encode_header(&mut &mut frame[..], true, false, OpCode::Ping, 0, None);
    frame
}

/// How much of what a peer sent the lot looks at: one byte more than the
/// reply to its ping (an empty masked pong, 6 bytes), so that anything after
/// the reply shows.
const PEEK: usize = 7;

/// Whether `bytes` are the reply to the lot's ping and nothing else: one
/// whole pong, masked as a client sends it, empty as the ping was. A second
/// pong, or one with a payload, answers something else: for the task (and
/// the handler's `handle_control`, and the service's rate limit).
fn only_its_pong(bytes: &[u8]) -> bool {
    let mut decoder = FrameDecoder::new(Role::Server, 0, false);
    let mut buf = BytesMut::from(bytes);
    matches!(
        decoder.decode(&mut buf),
        Ok(Some(frame)) if frame.opcode == OpCode::Pong && frame.payload.is_empty()
    ) && buf.is_empty()
}

impl<H: Handler> Asleep<H> {
    /// Its deadline passed at `now`: sends a due ping itself; the idle
    /// timeout, and a ping the socket will not take whole, need the task.
    fn tend_deadline(&mut self, now: Instant) -> Tended {
        match self.timers.due(now) {
            Due::Nothing => {}
            Due::Ping => match (&self.stream).write(&ping_frame()) {
                Ok(PING_LEN) => {
                    self.timers.pinged(now);
                    self.pong_due = true;
                }
                Ok(1) => {
                    self.timers.pinged(now);
                    self.ping_tail = true;
                    return Tended::Wake;
                }
                // Full (or failing): the task pings as an awake connection does.
                _ => return Tended::Wake,
            },
            Due::Idle | Due::SlowConsumer => return Tended::Wake,
        }
        Tended::Asleep(self.timers.wake_at().map(Instant::into_std))
    }

    /// Its socket is readable at `now`: takes the reply to its ping, if it
    /// is all the socket holds.
    fn tend_readable(&mut self, now: Instant) -> Tended {
        let mut peeked = [0; PEEK];
        match self.stream.peek(&mut peeked) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Tended::Asleep(None),
            Ok(n) if self.pong_due && only_its_pong(&peeked[..n]) => {
                // The peeked bytes are in the socket: reading them cannot fall short.
                if self.stream.read_exact(&mut peeked[..n]).is_err() {
                    return Tended::Wake;
                }
                self.timers.read(now);
                self.pong_due = false;
                // Readiness is reported on edges: what came with the pong (the
                // end of the stream, a message since the peek) may bring no
                // event of its own, so the socket is looked at again. No pong
                // is due now: anything there wakes the task.
                self.tend_readable(now)
            }
            // Data, the end of the stream, an error: for the task.
            _ => Tended::Wake,
        }
    }
}

impl<H: Handler> Dormant for Sleeper<H> {
    fn tend(&self, readable: bool, now: std::time::Instant) -> Tended {
        let mut asleep = self.lock();
        let Some(asleep) = asleep.as_mut() else {
            // Woken already.
            return Tended::Asleep(None);
        };
        let now = Instant::from_std(now);
        if readable {
            asleep.tend_readable(now)
        } else {
            asleep.tend_deadline(now)
        }
    }

    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
}

impl<H: Handler> Wake for Sleeper<H> {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(asleep) = self.lock().take() else {
            // Woken already.
            return;
        };
        if let Ok(lot) = lot() {
            lot.remove(asleep.ticket);
        }
        let span = asleep.span.clone();
        let runtime = asleep.runtime.clone();
        let task = Connection::Waking(asleep).instrument(span);
        // A runtime that has shut down drops the task, and the connection
        // with it, as it dropped every task it had.
        drop(runtime.spawn(task));
    }
}

/// How soon a new connection is first looked at, unless its period is shorter.
///
/// One whose peer has sent no message by then hibernates without a whole
/// period awake (what the connection sent as it opened, a greeting or a
/// replay, does not keep it awake): connections that open and wait hold their
/// tasks for milliseconds, not a period, so a burst of them never holds all
/// its tasks at once, to give them back together as holes between what stays
/// (see docs/performance.md, "Hibernation"). Not at once: a connection that
/// hibernated between its handshake and its client's first frame would pay a
/// sleep and a wake, which made handshakes cost 1.6 times as much CPU.
const FIRST_LOOK: Duration = Duration::from_millis(5);

/// Whether a connection has been quiet: no message in or out (pings and
/// pongs are not messages) from one look to the next, a period apart (the
/// first one sooner: [`FIRST_LOOK`]).
pub(super) struct Quiet {
    /// The period in whole milliseconds (see [`millis`]): the watch is
    /// 32 bytes, and what a hibernating connection keeps of it 16.
    period: NonZeroU32,
    next_look: Instant,
    /// Messages in and out at the last look.
    mark: u64,
    /// Found quiet at the last look: hibernate once nothing is in flight.
    sleepy: bool,
    /// The next look is the first (see [`FIRST_LOOK`]).
    first: bool,
}

impl Quiet {
    /// Looks first [`FIRST_LOOK`] from now, or a period if that is shorter.
    pub(super) fn new(period: Duration) -> Self {
        Self {
            period: millis(period),
            next_look: Instant::now() + period.min(FIRST_LOOK),
            mark: 0,
            sleepy: false,
            first: true,
        }
    }

    /// What a hibernating connection keeps of its watch.
    fn rest(&self) -> QuietRest {
        QuietRest {
            period: self.period,
            mark: self.mark,
        }
    }

    pub(super) fn next_look(&self) -> Instant {
        self.next_look
    }

    /// The look, at `now`: `activity` is the count of messages in and out
    /// now, `heard` of those in, which alone count at the first look.
    pub(super) fn look(&mut self, activity: u64, heard: u64, now: Instant) {
        self.sleepy = if std::mem::take(&mut self.first) {
            heard == 0
        } else {
            activity == self.mark
        };
        self.mark = activity;
        self.next_look = after(now, self.period);
    }
}

/// What a hibernating connection keeps of its watch for quiet: its period
/// and the count at the last look, without the watch's own allocation.
struct QuietRest {
    period: NonZeroU32,
    mark: u64,
}

impl QuietRest {
    /// The watch again, looking at once: a connection woken for a ping, a
    /// pong or a deadline goes back to sleep without waiting a whole period.
    fn wake(self) -> Box<Quiet> {
        Box::new(Quiet {
            period: self.period,
            next_look: Instant::now(),
            mark: self.mark,
            sleepy: false,
            first: false,
        })
    }
}

impl<H: Handler, S: AsyncRead + AsyncWrite + Unpin> Driver<H, S> {
    /// Whether the connection may hibernate now: it has been quiet for a
    /// whole period and holds nothing in flight.
    pub(super) fn may_hibernate(&mut self) -> bool {
        let Some(quiet) = self.quiet.as_mut() else {
            return false;
        };
        if !std::mem::take(&mut quiet.sleepy) {
            return false;
        }
        let mark = quiet.mark;
        self.direct
            && self.phase == Phase::Open
            && !self.poisoned
            && self.writer.is_idle()
            && self.read_buf.is_empty()
            && self.staged.is_empty()
            && self.decoder.at_rest()
            && !self.intake.paused()
            && !self.timers.busy()
            // Reading waits for the application: woken at once by the readable
            // socket, it could not read, and would sleep and wake again and again.
            && !self.handle.mailbox().holds_too_much()
            && self.activity() == mark
    }
}

impl<H: Handler> Driver<H, Socket> {
    /// Hibernates the connection: its task may end. Gives the driver back
    /// when something arrived in the mailbox meanwhile.
    pub(super) fn hibernate(mut self) -> Option<Self> {
        let Socket::Tcp(stream) = &self.io else {
            return Some(self);
        };
        let sleeper = Arc::new(Sleeper {
            asleep: Mutex::new(None),
        });
        let waker = Waker::from(sleeper.clone());
        // Held until the record is in place: whoever wakes it meanwhile waits.
        let mut slot = sleeper.lock();
        if !self.handle.mailbox().hibernate(&waker) {
            return Some(self);
        }
        // The mailbox dropped its pointer to the socket: it is ours alone.
        // The socket joins the lot while tokio still watches it (an fd may be
        // in two epoll sets), so that a failure leaves the driver as it was:
        // it stays awake until the next period, and its first drain replaces
        // the sleeper's waker in the mailbox.
        let timers = self.timers.rest();
        let deadline = timers.wake_at().map(Instant::into_std);
        let dormant: Arc<dyn Dormant> = sleeper.clone();
        let joined = lot().and_then(|lot| lot.add(stream.as_raw_fd(), deadline, dormant));
        let ticket = match joined {
            Ok(ticket) if Arc::strong_count(stream) == 1 => ticket,
            joined => {
                if let Err(error) = joined {
                    tracing::warn!(%error, "cannot hibernate; staying awake");
                } else if let (Ok(ticket), Ok(lot)) = (joined, lot()) {
                    lot.remove(ticket);
                }
                let stream = stream.clone();
                self.allow_direct_writes(stream);
                return Some(self);
            }
        };
        let Self {
            io,
            handler,
            handle,
            decoder,
            writer,
            protocol,
            stats,
            mut shutdown,
            intake,
            counts,
            quiet,
            ..
        } = self;
        let Some(quiet) = quiet else {
            unreachable!("only a watched connection is found quiet")
        };
        let wake_now = shutdown.as_mut().is_some_and(|signal| {
            signal.unregister();
            signal.poll_triggered(&mut TaskContext::from_waker(&waker))
        });
        let Socket::Tcp(stream) = io else {
            unreachable!("matched above")
        };
        let stream = Arc::into_inner(stream).expect("counted above").into_std();
        let asleep = Asleep {
            stream: match stream {
                Ok(stream) => stream,
                Err(e) => {
                    // tokio closed the socket when it could not deregister
                    // it, which also took it out of the lot's set.
                    if let Ok(lot) = lot() {
                        lot.forget(ticket);
                    }
                    // A wake the lot gave meanwhile finds no record, instead
                    // of holding up the lot's thread through `terminate`.
                    drop(slot);
                    end(
                        handler,
                        &handle,
                        timers.opened(),
                        counts,
                        format!("hibernation failed: {e}"),
                    );
                    return None;
                }
            },
            handler,
            handle,
            limits: decoder.limits(),
            peer_context: decoder.peer_context(),
            extras: Extras::of(protocol, writer.into_encoder()),
            timers,
            stats,
            shutdown,
            intake,
            counts,
            quiet: quiet.rest(),
            span: Span::current(),
            runtime: tokio::runtime::Handle::current(),
            ticket,
            ping_tail: false,
            pong_due: false,
        };
        if let Some(stats) = &asleep.stats {
            stats.hibernated();
        }
        *slot = Some(asleep);
        drop(slot);
        if wake_now {
            waker.wake();
        }
        None
    }
}

impl<H: Handler> Asleep<H> {
    /// The driver again, around a socket registered with this task's runtime;
    /// `None` if that failed (the connection has ended).
    pub(super) fn into_driver(self) -> Option<Driver<H, Socket>> {
        let Self {
            stream,
            handler,
            handle,
            limits,
            peer_context,
            extras,
            timers,
            stats,
            mut shutdown,
            intake,
            counts,
            quiet,
            ping_tail,
            ..
        } = self;
        let timers = timers.wake();
        let (protocol, encoder) = Extras::into_parts(extras);
        if let Some(stats) = &stats {
            stats.woke();
        }
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(stream) => Arc::new(stream),
            Err(e) => {
                end(
                    handler,
                    &handle,
                    timers.opened(),
                    counts,
                    format!("waking failed: {e}"),
                );
                return None;
            }
        };
        if let Some(signal) = shutdown.as_mut() {
            // The slot holds the sleeper's waker; this task leaves its own.
            signal.unregister();
        }
        let mut driver = Driver {
            io: Socket::Tcp(stream.clone()),
            handler,
            handle,
            decoder: MessageDecoder::new(Role::Server, limits, peer_context),
            writer: Writer::new(encoder),
            protocol,
            read_buf: BytesMut::new(),
            staged: Vec::new(),
            inbox: Drained::default(),
            phase: Phase::Open,
            reason: None,
            poisoned: false,
            timers,
            stats,
            shutdown,
            direct: false,
            held_back: false,
            mailed: false,
            client: false,
            intake,
            counts,
            quiet: Some(quiet.wake()),
        };
        if ping_tail {
            let tail = Bytes::copy_from_slice(&ping_frame()[1..]);
            driver.writer.push_encoded(tail, driver.handle.mailbox());
        }
        driver.allow_direct_writes(stream);
        Some(driver)
    }
}

/// Ends a connection whose socket was lost on its way into or out of the lot.
fn end<H: Handler>(
    mut handler: H,
    handle: &ConnHandle<H::Info>,
    opened: Instant,
    counts: Counts,
    why: String,
) {
    let reason = TerminateReason::Error(why);
    conclude(&mut handler, handle, reason, opened, counts, false);
}
