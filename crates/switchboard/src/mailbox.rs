//! The mailbox between a connection's handles and its driver task.
//!
//! One mutex guards three queues (info messages, frames to push, a close
//! request) and the driver's waker. Senders never wait: a full mailbox or an
//! outbound queue over its byte limit refuses at once, so a slow peer can cost
//! at most `max_outbound_bytes` of memory.
//!
//! Direct writes: while the driver waits with nothing queued or unwritten
//! ([`Mailbox::park`]), a prepared frame pushed to a plain TCP connection is
//! written to the socket by the pusher, under this mutex, without waking the
//! driver. The driver takes the mutex (in [`Mailbox::drain`]) before it writes
//! anything itself, so the two never write at once and frames keep their order.
//! A write the socket does not take whole is queued for the driver as usual.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use switchboard_proto::message::SharedFraming;
use switchboard_proto::{CloseCode, CloseReason, Message, PreparedMessage};
use tokio::net::TcpStream;

use crate::handle::{ConnId, Outbound, PushError, SendError};
use crate::options::{Options, SlowConsumerPolicy};
use crate::stats::Stats;

pub(crate) struct Mailbox<I> {
    id: ConnId,
    state: Mutex<State<I>>,
    /// Bytes pushed but not yet written to the socket.
    queued_bytes: AtomicUsize,
    /// Bytes of the application's work in flight for this connection (see
    /// [`crate::Outbox::hold`]).
    held_bytes: AtomicUsize,
    max_outbound_bytes: usize,
    /// Infos queued at most: 32 bits, which with the policy beside it keeps
    /// the mailbox within 192 bytes, one of jemalloc's size classes (see the
    /// size test below).
    mailbox_size: u32,
    slow_consumer: SlowConsumerPolicy,
}

struct State<I> {
    infos: Infos<I>,
    frames: VecDeque<Outbound>,
    /// Boxed, in the mailbox and in each [`Drained`]: a close is asked once
    /// at most, and every connection carries both.
    close: Option<Box<Close>>,
    /// The driver has sent its close frame or finished: refuse everything.
    closed: bool,
    /// The driver waits with nothing queued or unwritten: a prepared frame may
    /// be written straight to the socket.
    idle: bool,
    /// How much of the first queued frame a direct write already sent.
    partial: usize,
    /// The socket, for direct writes (plain TCP connections only). Inline
    /// rather than boxed: it is smaller than an allocation's overhead.
    direct: Option<Direct>,
    /// Frames written directly, and their bytes, for the connection's close
    /// event (the driver counts the rest).
    written_directly: (u64, u64),
    waker: Option<Waker>,
}

/// The infos queued for the driver: boxed, made with the first one, since
/// most connections never get one and every connection carries a mailbox
/// (8 bytes where a queue takes 32).
#[expect(
    clippy::box_collection,
    reason = "the box is the point: 8 bytes in every mailbox, not a queue's 32"
)]
struct Infos<I>(Option<Box<VecDeque<I>>>);

impl<I> Infos<I> {
    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |infos| infos.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn push_back(&mut self, info: I) {
        self.0.get_or_insert_default().push_back(info);
    }

    /// Swaps the queue with `other`, so that both keep their allocations.
    fn swap(&mut self, other: &mut VecDeque<I>) {
        match &mut self.0 {
            Some(infos) => std::mem::swap(&mut **infos, other),
            None if other.is_empty() => {}
            None => self.0 = Some(Box::new(std::mem::take(other))),
        }
    }

    fn clear(&mut self) {
        self.0 = None;
    }
}

/// What writing a prepared frame straight to the socket needs.
pub(crate) struct Direct {
    pub stream: Arc<TcpStream>,
    pub framing: SharedFraming,
    pub stats: Option<Stats>,
}

impl Direct {
    /// Writes `message`'s frame without blocking: `Ok(n)`, all its `n` bytes
    /// went out. `Err(n)`: only `n` bytes (perhaps none) did, and the frame
    /// must be queued.
    fn write(&self, message: &PreparedMessage) -> Result<usize, usize> {
        let (written, len) = self
            .framing
            .with_frame(message, |frame| (self.stream.try_write(frame), frame.len()));
        match written {
            Ok(n) if n == len => {
                if let Some(stats) = &self.stats {
                    stats.sent(n);
                }
                Ok(n)
            }
            Ok(n) => Err(n),
            // WouldBlock, or an error the driver will meet on its own write.
            Err(_) => Err(0),
        }
    }
}

/// A close asked of the driver, and who asked.
pub(crate) struct Close {
    pub reason: CloseReason,
    pub cause: CloseCause,
}

/// Why the mailbox asks the driver to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseCause {
    /// [`crate::ConnHandle::close`] or [`crate::Outbox::close`].
    Requested,
    /// A push would have taken the queue over `max_outbound_bytes`.
    SlowConsumer,
}

/// What the driver took out of the mailbox in one go.
pub(crate) struct Drained<I> {
    pub infos: VecDeque<I>,
    pub frames: VecDeque<Outbound>,
    /// How much of the first frame a direct write already sent.
    pub partial: usize,
    pub close: Option<Box<Close>>,
}

impl<I> Default for Drained<I> {
    fn default() -> Self {
        Self {
            infos: VecDeque::new(),
            frames: VecDeque::new(),
            partial: 0,
            close: None,
        }
    }
}

impl<I> Mailbox<I> {
    pub fn new(id: ConnId, options: &Options) -> Self {
        Self {
            id,
            state: Mutex::new(State {
                infos: Infos(None),
                frames: VecDeque::new(),
                close: None,
                closed: false,
                idle: false,
                partial: 0,
                direct: None,
                written_directly: (0, 0),
                waker: None,
            }),
            queued_bytes: AtomicUsize::new(0),
            held_bytes: AtomicUsize::new(0),
            max_outbound_bytes: options.max_outbound_bytes,
            mailbox_size: u32::try_from(options.mailbox_size).unwrap_or(u32::MAX),
            slow_consumer: options.slow_consumer,
        }
    }

    pub fn id(&self) -> ConnId {
        self.id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<I>> {
        // A panic while holding this lock cannot leave the queues inconsistent.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `f` on the state, then wakes the driver outside the lock.
    fn with_state<R>(&self, f: impl FnOnce(&mut State<I>) -> R) -> R {
        let (result, waker) = {
            let mut state = self.lock();
            let result = f(&mut state);
            (result, state.waker.take())
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        result
    }

    pub fn send_info(&self, info: I) -> Result<(), SendError<I>> {
        self.queue_info(info, true)
    }

    /// Queues `info` past `mailbox_size`: the connection's own messages
    /// (timers, answers to its own work), as many as its handler made.
    pub fn send_own_info(&self, info: I) -> Result<(), SendError<I>> {
        self.queue_info(info, false)
    }

    fn queue_info(&self, info: I, bounded: bool) -> Result<(), SendError<I>> {
        let mut state = self.lock();
        if state.closed {
            return Err(SendError::Closed(info));
        }
        if bounded && state.infos.len() >= self.mailbox_size as usize {
            return Err(SendError::Full(info));
        }
        state.infos.push_back(info);
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    pub fn push(&self, frame: Outbound) -> Result<(), PushError> {
        self.push_within(frame, true)
    }

    /// A frame that answers the peer's own message: queued whatever the
    /// budget, as the handler's own output is (reading pauses over it).
    pub fn reply(&self, frame: Outbound) -> Result<(), PushError> {
        self.push_within(frame, false)
    }

    /// Queues `frame`; with `budgeted`, one that would take what waits over
    /// `max_outbound_bytes` closes the connection as a slow consumer instead.
    fn push_within(&self, frame: Outbound, budgeted: bool) -> Result<(), PushError> {
        if let Outbound::Message(Message::Close(close)) = &frame {
            return self.push_close(close.as_ref());
        }
        let charge = frame.charge();
        let control = frame.is_control();
        let mut state = self.lock();
        if state.closed || state.close.is_some() {
            return Err(PushError::Closed);
        }
        let queued = self.queued_bytes.load(Ordering::Relaxed);
        let result = if budgeted && !control && queued + charge > self.max_outbound_bytes {
            state.close = Some(Box::new(Close {
                reason: self.slow_consumer_close(),
                cause: CloseCause::SlowConsumer,
            }));
            Err(PushError::SlowConsumer)
        } else {
            if std::mem::take(&mut state.idle)
                && let (Some(direct), Outbound::Prepared(message)) = (&state.direct, &frame)
            {
                match direct.write(message) {
                    Ok(written) => {
                        // Written whole: the driver may go on sleeping.
                        state.idle = true;
                        state.written_directly.0 += 1;
                        state.written_directly.1 += written as u64;
                        return Ok(());
                    }
                    Err(written) => state.partial = written,
                }
            }
            self.queued_bytes.fetch_add(charge, Ordering::Relaxed);
            state.frames.push_back(frame);
            Ok(())
        };
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        result
    }

    /// A close pushed is a close asked for: queued as a frame, it let frames
    /// pushed after it through, to be written after the close. Out of line:
    /// the push of every delivery checks for it.
    #[cold]
    fn push_close(&self, close: Option<&CloseReason>) -> Result<(), PushError> {
        let reason = close
            .cloned()
            .unwrap_or_else(|| CloseReason::new(CloseCode::NORMAL, ""));
        self.with_state(|state| {
            if state.closed || state.close.is_some() {
                return Err(PushError::Closed);
            }
            state.close = Some(Box::new(Close {
                reason,
                cause: CloseCause::Requested,
            }));
            Ok(())
        })
    }

    pub fn close(&self, reason: CloseReason) {
        self.with_state(|state| {
            if !state.closed && state.close.is_none() {
                state.close = Some(Box::new(Close {
                    reason,
                    cause: CloseCause::Requested,
                }));
            }
        });
    }

    /// Frames written directly so far, and their bytes.
    pub fn written_directly(&self) -> (u64, u64) {
        self.lock().written_directly
    }

    pub fn is_closed(&self) -> bool {
        let state = self.lock();
        state.closed || state.close.is_some()
    }

    /// Lets pushers write prepared frames straight to `direct`'s socket while
    /// the driver is parked (see [`Mailbox::park`]).
    pub fn attach(&self, direct: Direct) {
        self.lock().direct = Some(direct);
    }

    /// Moves everything queued into `into` (whose queues must be empty), swapping
    /// queues so that their allocations are reused. Registers the waker and
    /// returns `Pending` when nothing is queued. Either way, direct writes stop
    /// until the driver parks again: it may be about to write.
    pub fn drain(&self, cx: &mut Context<'_>, into: &mut Drained<I>) -> Poll<()> {
        let mut state = self.lock();
        state.idle = false;
        if state.infos.is_empty() && state.frames.is_empty() && state.close.is_none() {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        state.infos.swap(&mut into.infos);
        std::mem::swap(&mut state.frames, &mut into.frames);
        into.partial = std::mem::take(&mut state.partial);
        into.close = state.close.take();
        // The driver closes on it: refused from now, as before the drain.
        // Left open until the driver's own `refuse_new`, a push in between was
        // taken (and acked as delivered) by a connection already closing.
        state.closed |= into.close.is_some();
        Poll::Ready(())
    }

    /// Moves the frames queued (not the infos, nor a close) into `into`, whose
    /// frame queue must be empty: what the driver writes before it ends.
    pub fn take_frames(&self, into: &mut Drained<I>) {
        let mut state = self.lock();
        state.idle = false;
        std::mem::swap(&mut state.frames, &mut into.frames);
        into.partial = std::mem::take(&mut state.partial);
    }

    /// The driver has written everything and waits: pushers may write directly
    /// until its next [`Mailbox::drain`]. Returns `false`, and changes nothing,
    /// if something arrived since the last drain (the driver must drain again).
    pub fn park(&self) -> bool {
        let mut state = self.lock();
        if !(state.infos.is_empty() && state.frames.is_empty() && state.close.is_none()) {
            return false;
        }
        state.idle = !state.closed && state.direct.is_some();
        true
    }

    /// Whether the driver is parked, pushers writing to the socket: it must
    /// take no output until its next drain (see [`Mailbox::park`]). For the
    /// driver's debug assertions.
    pub(crate) fn is_parked(&self) -> bool {
        self.lock().idle
    }

    /// The driver hibernates: unless something arrived since the last drain,
    /// direct writes stop (the socket leaves tokio) and `waker` is woken by
    /// whatever comes next. Returns `false`, and changes nothing, if something
    /// did arrive or the mailbox is closed.
    pub fn hibernate(&self, waker: &Waker) -> bool {
        let mut state = self.lock();
        if !(state.infos.is_empty() && state.frames.is_empty() && state.close.is_none())
            || state.closed
        {
            return false;
        }
        state.idle = false;
        state.direct = None;
        state.waker = Some(waker.clone());
        true
    }

    /// The driver is closing: refuse what comes, keep what is queued.
    pub fn refuse_new(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.idle = false;
        // The driver owns the socket alone from here (it shuts it down).
        state.direct = None;
    }

    /// The driver has ended: drop what is queued and refuse what comes.
    pub fn shut(&self) {
        let mut state = self.lock();
        state.closed = true;
        state.idle = false;
        state.direct = None;
        state.infos.clear();
        state.frames.clear();
        state.waker = None;
    }

    /// Takes the queued infos and frames, for [`crate::testing::Harness`],
    /// which has no driver to drain them.
    pub fn take_for_test(&self) -> (VecDeque<I>, VecDeque<Outbound>) {
        let mut state = self.lock();
        let mut infos = VecDeque::new();
        state.infos.swap(&mut infos);
        (infos, std::mem::take(&mut state.frames))
    }

    /// Bytes waiting to be written, whoever queued them.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Holds `bytes` if what waits to be written and what is held, with
    /// them, stays within `within`; otherwise holds nothing. Atomic against
    /// other holders: two reservations cannot both take the same room.
    pub fn reserve(&self, bytes: usize, within: usize) -> bool {
        let queued = self.queued_bytes();
        self.held_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (queued + held + bytes <= within).then_some(held + bytes)
            })
            .is_ok()
    }

    /// Whether more than `max_outbound_bytes` waits to be written.
    pub fn over_budget(&self) -> bool {
        self.queued_bytes() > self.max_outbound_bytes
    }

    /// Whether the application holds more than `max_outbound_bytes` of work
    /// in flight for this connection: reading waits until it is done.
    pub fn holds_too_much(&self) -> bool {
        self.held_bytes.load(Ordering::Relaxed) > self.max_outbound_bytes
    }

    /// Counts `bytes` of work in flight.
    pub fn hold(&self, bytes: usize) {
        self.held_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Work done: wakes the driver, which may read again.
    pub fn unhold(&self, bytes: usize) {
        self.held_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.with_state(|_| {});
    }

    /// The close frame the slow-consumer policy sends.
    pub fn slow_consumer_close(&self) -> CloseReason {
        self.slow_consumer.close_reason()
    }

    /// Bytes handed to the writer count against the outbound budget.
    pub fn charge(&self, bytes: usize) {
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Bytes written to the socket leave the outbound budget.
    pub fn release(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use switchboard_proto::{CloseCode, CloseReason, Message};

    use super::Mailbox;
    use crate::handle::{ConnId, Outbound, PushError};
    use crate::options::Options;

    #[test]
    fn a_push_over_the_budget_closes_and_a_reply_is_queued_and_counted() {
        let options = Options::default().max_outbound_bytes(100);
        let frame = || Outbound::Message(Message::text("x".repeat(60)));
        let replied = Mailbox::<()>::new(ConnId::next(), &options);
        assert_eq!(replied.reply(frame()), Ok(()));
        assert_eq!(replied.reply(frame()), Ok(()));
        assert!(replied.over_budget(), "{}", replied.queued_bytes());
        assert!(!replied.is_closed());
        // A delivery the peer did not ask for is refused, and closes it.
        assert_eq!(replied.push(frame()), Err(PushError::SlowConsumer));
        assert!(replied.is_closed());
        assert_eq!(replied.reply(frame()), Err(PushError::Closed));
    }

    /// Regression: a relay's answer to its own subscribe, and its token's
    /// expiry, were dropped when others had filled its mailbox (the
    /// subscribe was never answered, the connection outlived its token).
    #[tokio::test]
    async fn the_connections_own_messages_pass_a_full_mailbox() {
        let mailbox = std::sync::Arc::new(Mailbox::<u32>::new(
            ConnId::next(),
            &Options::default().mailbox_size(1),
        ));
        let handle = crate::ConnHandle::new(mailbox.clone());
        assert!(handle.send(1).is_ok());
        assert!(matches!(handle.send(2), Err(crate::SendError::Full(2))));
        assert!(handle.send_own(3).is_ok());
        let _timer = handle.send_after(4, std::time::Duration::ZERO);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (infos, _) = mailbox.take_for_test();
        assert_eq!(infos, [1, 3, 4]);
        mailbox.shut();
        assert!(matches!(
            handle.send_own(5),
            Err(crate::SendError::Closed(5))
        ));
    }

    /// Regression: the drain that took a close left the mailbox open until
    /// the driver started its close, and a push in that moment was accepted
    /// (`test_a_compressed_receiver_that_never_reads_is_closed_as_a_slow_consumer`
    /// once saw a late message acked as delivered).
    #[test]
    fn a_close_taken_by_the_driver_still_refuses_what_comes() {
        let options = Options::default().max_outbound_bytes(100);
        let frame = || Outbound::Message(Message::text("x".repeat(60)));
        let mailbox = Mailbox::<()>::new(ConnId::next(), &options);
        assert_eq!(mailbox.push(frame()), Ok(()));
        assert_eq!(mailbox.push(frame()), Err(PushError::SlowConsumer));
        let mut drained = super::Drained::default();
        let waker = std::task::Waker::noop();
        let poll = mailbox.drain(&mut std::task::Context::from_waker(waker), &mut drained);
        assert!(poll.is_ready() && drained.close.is_some());
        assert!(mailbox.is_closed());
        assert_eq!(mailbox.push(frame()), Err(PushError::Closed));
    }

    /// Found by a review: a close frame pushed like any frame left the
    /// mailbox open, so a frame pushed after it was accepted (and acked as
    /// delivered by the server) and written after the close.
    #[test]
    fn a_close_pushed_refuses_what_comes_after_it() {
        let mailbox = Mailbox::<()>::new(ConnId::next(), &Options::default());
        let text = || Outbound::Message(Message::text("x"));
        assert_eq!(mailbox.push(text()), Ok(()));
        let close = CloseReason::new(CloseCode::NORMAL, "bye");
        assert_eq!(
            mailbox.push(Outbound::Message(Message::Close(Some(close)))),
            Ok(())
        );
        assert_eq!(mailbox.push(text()), Err(PushError::Closed));
        // The frame before it goes out, then the close.
        let mut drained = super::Drained::default();
        let waker = std::task::Waker::noop();
        let poll = mailbox.drain(&mut std::task::Context::from_waker(waker), &mut drained);
        assert!(poll.is_ready());
        assert_eq!(drained.frames.len(), 1);
        assert_eq!(
            drained.close.map(|c| c.reason.reason().to_owned()),
            Some("bye".into())
        );
    }

    #[test]
    fn a_reservation_is_all_or_nothing_within_what_is_queued_and_held() {
        let mailbox = Mailbox::<()>::new(ConnId::next(), &Options::default());
        mailbox.hold(30);
        let frame = Outbound::Message(Message::text("x".repeat(20)));
        assert_eq!(mailbox.reply(frame), Ok(()));
        // 30 held and 20 queued: 50 more fit within 100, 51 do not.
        assert!(!mailbox.reserve(51, 100));
        assert!(mailbox.reserve(50, 100));
        assert!(!mailbox.reserve(1, 100));
        mailbox.unhold(80);
        assert!(mailbox.reserve(80, 100));
    }

    #[test]
    fn reservations_made_at_once_never_share_the_room() {
        let mailbox = Mailbox::<()>::new(ConnId::next(), &Options::default());
        let granted = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..10_000 {
                        if mailbox.reserve(7, 70_000) {
                            granted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(granted.into_inner(), 10_000);
    }

    /// Every connection has a mailbox, in an `Arc` (two counts, 16 bytes):
    /// 176 + 16 = 192 bytes, one of jemalloc's size classes (the service's
    /// allocator); one byte more and it takes 224 (docs/performance.md,
    /// "Hibernation").
    #[test]
    fn the_mailbox_stays_within_its_size_class() {
        let size = std::mem::size_of::<Mailbox<String>>();
        assert!(size <= 176, "the mailbox grew to {size} bytes");
    }
}
