//! Where hibernating connections wait: one thread, one epoll set, and a
//! deadline list, shared by every runtime in the process.
//!
//! A hibernating connection has no task (see `driver::hibernate`). Its socket
//! is watched here instead of by tokio's reactor, which would keep 256 bytes of
//! readiness state per socket, and its next deadline (a ping, the idle
//! timeout) waits in a heap. When the socket becomes readable (data, a close,
//! an error) or the deadline passes, the connection is first asked to tend to
//! it without a task ([`Dormant::tend`]: a due ping is sent, the peer's pong
//! taken); what it cannot do that way, it is woken for: the entry is removed
//! and the connection gets a task again. Its mailbox and the shutdown signal
//! wake it directly; whichever comes first wins, and the others find the
//! entry gone.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::RawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};

/// The token that interrupts the thread's wait when an earlier deadline arrives.
const WAKE: Token = Token(usize::MAX);
/// Readiness events taken per wait.
const EVENTS: usize = 256;

/// A hibernating connection, as the lot sees it.
pub(crate) trait Dormant: Send + Sync {
    /// Does what needs no task at `now`: its socket is `readable`, or
    /// (if not) its deadline has passed. Runs on the lot's thread, which
    /// every hibernating connection waits on: it must not block.
    fn tend(&self, readable: bool, now: Instant) -> Tended;

    /// Gives the connection a task again.
    fn wake(self: Arc<Self>);
}

/// What [`Dormant::tend`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Tended {
    /// It sleeps on; with a new deadline, if it has one (a deadline that
    /// passed is gone, an earlier one stays).
    Asleep(Option<Instant>),
    /// It needs its task.
    Wake,
}

/// A connection's place in the lot: its slot and the slot's generation, so
/// that a stale event or deadline for a slot since reused is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Ticket {
    slot: u32,
    generation: u32,
}

impl Ticket {
    // On a 32-bit target the generation does not fit and is lost (see `of`).
    fn token(self) -> Token {
        Token((u64::from(self.generation) << 32 | u64::from(self.slot)) as usize)
    }

    /// The ticket an event's token names. On a 32-bit target the token holds
    /// only the slot, and the event goes to the slot's current connection: a
    /// stale one then wakes it for nothing (it finds nothing to read and
    /// sleeps again), where matching generation 0 would drop its own events.
    fn of(token: Token, inner: &Inner) -> Self {
        let token = token.0 as u64;
        let slot = token as u32;
        let generation = if usize::BITS < 64 {
            inner.slots.get(slot as usize).map_or(0, |s| s.generation)
        } else {
            (token >> 32) as u32
        };
        Self { slot, generation }
    }
}

/// The lot: the registry of its epoll set and the waiting connections.
pub(crate) struct Lot {
    registry: Registry,
    interrupt: mio::Waker,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// By slot: the waiting connection's socket and waker.
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Deadlines by time; an entry whose ticket no longer waits is skipped.
    deadlines: BinaryHeap<Reverse<(Instant, Ticket)>>,
    /// What the thread's current wait is bounded by.
    waiting_until: Option<Instant>,
}

impl Inner {
    /// Drops the deadlines of connections that woke before them once they are
    /// more than half the heap: a connection woken by its peer's pings would
    /// otherwise leave one behind per wake until its idle timeout.
    fn forget_stale_deadlines(&mut self) {
        let waiting = self.slots.len() - self.free.len();
        if self.deadlines.len() <= 2 * waiting + 64 {
            return;
        }
        let slots = &self.slots;
        self.deadlines.retain(|Reverse((_, ticket))| {
            let slot = &slots[ticket.slot as usize];
            slot.generation == ticket.generation && slot.waiting.is_some()
        });
    }
}

/// Frees `ticket`'s slot if it still holds that connection; returns what it held.
fn vacate(inner: &mut Inner, ticket: Ticket) -> Option<(RawFd, Arc<dyn Dormant>)> {
    let slot = inner.slots.get_mut(ticket.slot as usize)?;
    if slot.generation != ticket.generation {
        return None;
    }
    let waiting = slot.waiting.take()?;
    slot.generation = slot.generation.wrapping_add(1);
    inner.free.push(ticket.slot);
    Some(waiting)
}

#[derive(Default)]
struct Slot {
    generation: u32,
    waiting: Option<(RawFd, Arc<dyn Dormant>)>,
}

impl Inner {
    /// The connection `ticket` names, if it still waits.
    fn waiting(&self, ticket: Ticket) -> Option<&Arc<dyn Dormant>> {
        let slot = self.slots.get(ticket.slot as usize)?;
        let (_, dormant) = slot.waiting.as_ref()?;
        (slot.generation == ticket.generation).then_some(dormant)
    }

    /// Keeps `at` as a deadline of `ticket`'s connection.
    fn schedule(&mut self, ticket: Ticket, at: Instant) {
        self.deadlines.push(Reverse((at, ticket)));
        self.forget_stale_deadlines();
    }
}

/// The process's lot, its thread started on first use.
pub(crate) fn lot() -> io::Result<&'static Lot> {
    static LOT: OnceLock<Result<&'static Lot, String>> = OnceLock::new();
    LOT.get_or_init(|| start().map_err(|e| e.to_string()))
        .as_ref()
        .copied()
        .map_err(|e| io::Error::other(e.clone()))
}

fn start() -> io::Result<&'static Lot> {
    let poll = Poll::new()?;
    let lot: &'static Lot = Box::leak(Box::new(Lot {
        registry: poll.registry().try_clone()?,
        interrupt: mio::Waker::new(poll.registry(), WAKE)?,
        inner: Mutex::new(Inner::default()),
    }));
    std::thread::Builder::new()
        .name("switchboard-lot".into())
        .spawn(move || lot.run(poll))?;
    Ok(lot)
}

impl Lot {
    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every change to the slots is completed before anything can panic.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches `fd` for reading, and `deadline`, for `dormant` to tend to.
    /// If `fd` is readable already, that is reported at once.
    pub(crate) fn add(
        &self,
        fd: RawFd,
        deadline: Option<Instant>,
        dormant: Arc<dyn Dormant>,
    ) -> io::Result<Ticket> {
        let mut inner = self.inner();
        let slot = match inner.free.pop() {
            Some(slot) => slot,
            None => {
                inner.slots.push(Slot::default());
                u32::try_from(inner.slots.len() - 1).expect("fewer than 2^32 connections")
            }
        };
        let ticket = Ticket {
            slot,
            generation: inner.slots[slot as usize].generation,
        };
        if let Err(e) =
            self.registry
                .register(&mut SourceFd(&fd), ticket.token(), Interest::READABLE)
        {
            inner.free.push(slot);
            return Err(e);
        }
        inner.slots[slot as usize].waiting = Some((fd, dormant));
        if let Some(at) = deadline {
            inner.schedule(ticket, at);
            if inner.waiting_until.is_none_or(|until| at < until) {
                // The thread sleeps past this deadline: make it look again.
                inner.waiting_until = Some(at);
                drop(inner);
                if let Err(error) = self.interrupt.wake() {
                    // Only a broken eventfd fails; the deadline is still kept,
                    // and met when the thread next wakes.
                    tracing::error!(%error, "cannot wake the hibernation thread");
                }
            }
        }
        Ok(ticket)
    }

    /// Stops watching `ticket`'s socket; returns whether it was still waiting
    /// (false when an event or its deadline took it first).
    pub(crate) fn remove(&self, ticket: Ticket) -> bool {
        self.take(&mut self.inner(), ticket).is_some()
    }

    /// Drops `ticket`'s entry whose socket is already closed, without
    /// deregistering it: closing took it out of the set, and its fd number
    /// may name another socket by now.
    pub(crate) fn forget(&self, ticket: Ticket) {
        vacate(&mut self.inner(), ticket);
    }

    /// Takes `ticket`'s entry out of `inner`, deregistering its socket.
    fn take(&self, inner: &mut Inner, ticket: Ticket) -> Option<Arc<dyn Dormant>> {
        let (fd, dormant) = vacate(inner, ticket)?;
        // Fails only if the socket is gone, which also took it out of the set.
        let _ = self.registry.deregister(&mut SourceFd(&fd));
        Some(dormant)
    }

    /// The thread: waits for readiness or the next deadline, has the
    /// connections whose turn it is tend to it, and wakes those that need a
    /// task. Connections' code runs outside the lock: a connection waking
    /// meanwhile takes the lock to leave.
    fn run(&self, mut poll: Poll) {
        let mut events = Events::with_capacity(EVENTS);
        let (mut turns, mut tended, mut due) = (Vec::new(), Vec::new(), Vec::new());
        loop {
            let timeout = {
                let mut inner = self.inner();
                let next = inner.deadlines.peek().map(|Reverse((at, _))| *at);
                inner.waiting_until = next;
                next.map(|at| at.saturating_duration_since(Instant::now()))
            };
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "hibernation wait failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            let now = Instant::now();
            {
                let mut inner = self.inner();
                for event in events.iter().filter(|event| event.token() != WAKE) {
                    let ticket = Ticket::of(event.token(), &inner);
                    if let Some(dormant) = inner.waiting(ticket) {
                        turns.push((ticket, true, dormant.clone()));
                    }
                }
                while let Some(Reverse((at, ticket))) = inner.deadlines.peek().copied() {
                    if at > now {
                        break;
                    }
                    inner.deadlines.pop();
                    if let Some(dormant) = inner.waiting(ticket) {
                        turns.push((ticket, false, dormant.clone()));
                    }
                }
            }
            tended.extend(turns.drain(..).map(|(ticket, readable, dormant)| {
                // A panic must not end the thread every hibernating
                // connection waits on: the connection is woken instead.
                let done = catch_unwind(AssertUnwindSafe(|| dormant.tend(readable, now)));
                (ticket, done.unwrap_or(Tended::Wake))
            }));
            {
                let mut inner = self.inner();
                for (ticket, tended) in tended.drain(..) {
                    match tended {
                        Tended::Asleep(None) => {}
                        Tended::Asleep(Some(at)) => {
                            if inner.waiting(ticket).is_some() {
                                inner.schedule(ticket, at);
                            }
                        }
                        Tended::Wake => due.extend(self.take(&mut inner, ticket)),
                    }
                }
            }
            for dormant in due.drain(..) {
                // A connection's code runs here too (dropping a task the
                // runtime refuses runs its handler's `Drop`).
                if catch_unwind(AssertUnwindSafe(|| dormant.wake())).is_err() {
                    tracing::error!("panic while waking a hibernating connection");
                }
            }
        }
    }
}
