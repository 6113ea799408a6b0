//! The connection's clocks. One timer serves them all: it is set to the
//! earliest of the idle deadline, the next ping, the slow-consumer deadline,
//! the close deadline, and one more the driver keeps (the end of an inflate
//! pause, the next look for quiet).

use std::future::Future;
use std::num::{NonZeroU32, NonZeroU64};
use std::pin::Pin;
use std::task::Context as TaskContext;
use std::time::Duration;

use tokio::time::{Instant, Sleep, sleep_until};

use crate::options::Options;

/// The deadlines of one connection, and the timer that waits for the next.
pub(super) struct Timers {
    /// When the connection opened: for the close event, and the zero of `last_read`.
    opened: Instant,
    /// When the peer last sent something, or reading last resumed after a
    /// pause for a full outbound queue, in milliseconds from `opened`: eight
    /// bytes where an `Instant` takes sixteen, which kept the connection's
    /// task within tokio's 128-byte rounding (see `Driver`'s size test).
    last_read: u64,
    next_ping: Option<Instant>,
    /// Past it, what is still queued is dropped and the connection ends.
    close_deadline: Option<Instant>,
    /// Since when more than `max_outbound_bytes` has waited to be written, and
    /// reading is paused; past the slow-consumer timeout the connection is closed.
    over_budget_since: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    periods: Periods,
}

/// What a hibernating connection keeps of its clocks: 48 bytes of the
/// timers' 96. It has no timer (a timer belongs to a task), and none of the
/// deadlines of a connection that is closing or paused over its budget (such
/// a connection stays awake).
pub(super) struct Resting {
    opened: Instant,
    last_read: u64,
    /// The next ping, in whole milliseconds from `opened`, rounded down (it
    /// comes at most a millisecond early).
    next_ping: Option<NonZeroU64>,
    periods: Periods,
}

impl Resting {
    /// When the connection opened.
    pub(super) fn opened(&self) -> Instant {
        self.opened
    }

    fn next_ping_at(&self) -> Option<Instant> {
        self.next_ping
            .map(|ms| self.opened + Duration::from_millis(ms.get()))
    }

    /// The earliest deadline the sleeping connection has: the next ping or
    /// the idle timeout (nothing else is pending while it sleeps).
    pub(super) fn wake_at(&self) -> Option<Instant> {
        let idle = self.periods.idle_deadline(self.opened, self.last_read);
        idle.into_iter().chain(self.next_ping_at()).min()
    }

    /// What is due at `now`. Unlike [`Timers::due`], a due ping is not
    /// counted as sent: whoever sends it says so with [`Self::pinged`].
    pub(super) fn due(&self, now: Instant) -> Due {
        let idle = self.periods.idle_deadline(self.opened, self.last_read);
        if idle.is_some_and(|at| at <= now) {
            Due::Idle
        } else if self.next_ping_at().is_some_and(|at| at <= now) {
            Due::Ping
        } else {
            Due::Nothing
        }
    }

    /// A ping went out at `now`: the next one is a period later.
    pub(super) fn pinged(&mut self, now: Instant) {
        let next = self.periods.ping.map(|period| after(now, period));
        self.next_ping = next.map(|at| rest_millis(self.opened, at));
    }

    /// The peer sent something at `now`: it is not idle.
    pub(super) fn read(&mut self, now: Instant) {
        self.last_read = since(self.opened, now);
    }

    /// The timers again, as they were.
    pub(super) fn wake(self) -> Timers {
        Timers {
            opened: self.opened,
            last_read: self.last_read,
            next_ping: self.next_ping_at(),
            close_deadline: None,
            over_budget_since: None,
            timer: None,
            periods: self.periods,
        }
    }
}

/// The options' periods in whole milliseconds, rounded up: four bytes each
/// rather than a `Duration`'s sixteen, since every connection carries them.
#[derive(Clone, Copy)]
struct Periods {
    idle: Option<NonZeroU32>,
    ping: Option<NonZeroU32>,
    close: NonZeroU32,
    slow_consumer: NonZeroU32,
}

/// `period` in milliseconds, rounded up to at least one, at most `u32::MAX`
/// (about 49 days).
pub(super) fn millis(period: Duration) -> NonZeroU32 {
    let ms = period.as_nanos().div_ceil(1_000_000);
    let ms = u32::try_from(ms).unwrap_or(u32::MAX);
    NonZeroU32::new(ms).unwrap_or(NonZeroU32::MIN)
}

/// `period` milliseconds after `at`.
pub(super) fn after(at: Instant, period: NonZeroU32) -> Instant {
    at + Duration::from_millis(period.get().into())
}

/// Whole milliseconds from `opened` to `at`.
fn since(opened: Instant, at: Instant) -> u64 {
    let since = at.saturating_duration_since(opened);
    since.as_secs() * 1000 + u64::from(since.subsec_millis())
}

/// `at` as a resting connection keeps it: whole milliseconds from `opened`,
/// rounded down, at least one (it comes at most a millisecond early).
fn rest_millis(opened: Instant, at: Instant) -> NonZeroU64 {
    NonZeroU64::new(since(opened, at)).unwrap_or(NonZeroU64::MIN)
}

impl Periods {
    /// When a peer last heard from `last_read` milliseconds after `opened`
    /// is idle, if there is an idle timeout.
    fn idle_deadline(&self, opened: Instant, last_read: u64) -> Option<Instant> {
        let last_read = opened + Duration::from_millis(last_read);
        self.idle.map(|period| after(last_read, period))
    }
}

/// What a fired timer found due, in the order it is acted on.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Due {
    /// The peer has not read for the slow-consumer timeout.
    SlowConsumer,
    /// The peer has sent nothing for the idle timeout.
    Idle,
    /// Time to ping the peer.
    Ping,
    Nothing,
}

impl Timers {
    pub(super) fn new(options: &Options) -> Self {
        let periods = Periods {
            idle: options.idle_timeout.map(millis),
            ping: options.ping_interval.map(millis),
            close: millis(options.close_timeout),
            slow_consumer: millis(options.slow_consumer_timeout),
        };
        let now = Instant::now();
        Self {
            opened: now,
            last_read: 0,
            next_ping: periods.ping.map(|period| after(now, period)),
            close_deadline: None,
            over_budget_since: None,
            timer: None,
            periods,
        }
    }

    /// The peer sent something: it is not idle. The timer is not touched
    /// (no timer-wheel work per read); it fires early and is set again then.
    pub(super) fn read(&mut self) {
        self.last_read = self.since_opened(Instant::now());
    }

    /// When the connection opened.
    pub(super) fn opened(&self) -> Instant {
        self.opened
    }

    /// Whole milliseconds from `opened` to `at`.
    fn since_opened(&self, at: Instant) -> u64 {
        since(self.opened, at)
    }

    /// When the peer counts as idle, if there is an idle timeout.
    fn idle_deadline(&self) -> Option<Instant> {
        self.periods.idle_deadline(self.opened, self.last_read)
    }

    /// Notes whether reading is paused because too much waits to be written.
    pub(super) fn over_budget(&mut self, over: bool) {
        match (over, self.over_budget_since) {
            (true, None) => self.over_budget_since = Some(Instant::now()),
            (false, Some(_)) => {
                self.over_budget_since = None;
                // The peer was not idle while we did not read.
                self.last_read = self.since_opened(Instant::now());
            }
            _ => {}
        }
    }

    /// Bounds how long the connection may take to end from now (an earlier
    /// bound stays).
    pub(super) fn arm_close_deadline(&mut self) {
        let close = self.periods.close;
        self.close_deadline
            .get_or_insert_with(|| after(Instant::now(), close));
    }

    /// When the timer must next fire: while `open`, the earliest of the idle
    /// deadline (not while reading is paused: the peer is not idle, we are not
    /// reading), the next ping and the slow-consumer deadline; otherwise the
    /// close deadline. `other` is the driver's own (the end of an inflate
    /// pause, the next look for quiet).
    fn next_deadline(&self, open: bool, other: Option<Instant>) -> Option<Instant> {
        if !open {
            return [self.close_deadline, other].into_iter().flatten().min();
        }
        let idle = match self.over_budget_since {
            Some(_) => None,
            None => self.idle_deadline(),
        };
        let slow = self
            .over_budget_since
            .map(|since| after(since, self.periods.slow_consumer));
        [idle, self.next_ping, slow, other]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the timer has fired. It is created only when `arm` is set, which
    /// the driver does just before its task yields: a timer earlier than any the
    /// runtime holds wakes the runtime's driver (a write to its eventfd, and one
    /// more epoll_wait), and a connection that ends within this poll, as one
    /// whose peer sent a close usually does, never needs its close deadline.
    ///
    /// The timer is polled once as it is made, and again after a reset, which
    /// leaves this task's waker with it; otherwise whether it fired is one
    /// atomic load. Polling it on every wake-up registered the waker again
    /// each time: about 550 instructions per relayed message with pings on
    /// (`bench/callgrind.sh relay`). The connection is its own task (the
    /// service's and the client's both are), so its waker never changes.
    pub(super) fn poll(
        &mut self,
        cx: &mut TaskContext<'_>,
        open: bool,
        other: Option<Instant>,
        arm: bool,
    ) -> bool {
        let Some(want) = self.next_deadline(open, other) else {
            self.timer = None;
            return false;
        };
        match &mut self.timer {
            Some(timer) if want < timer.deadline() => {
                timer.as_mut().reset(want);
                if register(timer.as_mut(), cx).is_pending() {
                    return false;
                }
            }
            Some(timer) => {
                if !timer.is_elapsed() {
                    return false;
                }
            }
            None if arm => {
                let mut timer = Box::pin(sleep_until(want));
                if register(timer.as_mut(), cx).is_pending() {
                    self.timer = Some(timer);
                    return false;
                }
            }
            None => return false,
        }
        // Fired: it is set again, from the new state, before the task next yields.
        self.timer = None;
        true
    }

    /// What is due at `now` on an open connection. A ping that is due is
    /// counted as sent, and the next one scheduled.
    pub(super) fn due(&mut self, now: Instant) -> Due {
        if let Some(since) = self.over_budget_since {
            if after(since, self.periods.slow_consumer) <= now {
                return Due::SlowConsumer;
            }
        } else if self.idle_deadline().is_some_and(|at| at <= now) {
            return Due::Idle;
        }
        if self.next_ping.is_some_and(|at| at <= now) {
            self.next_ping = self.periods.ping.map(|period| after(now, period));
            return Due::Ping;
        }
        Due::Nothing
    }

    /// Whether the connection is closing or paused over its budget: it stays awake.
    pub(super) fn busy(&self) -> bool {
        self.close_deadline.is_some() || self.over_budget_since.is_some()
    }

    /// What a hibernating connection keeps of the timers. Only one that is
    /// not [`Timers::busy`] hibernates.
    pub(super) fn rest(&self) -> Resting {
        debug_assert!(!self.busy(), "a busy connection stays awake");
        Resting {
            opened: self.opened,
            last_read: self.last_read,
            next_ping: self.next_ping.map(|at| rest_millis(self.opened, at)),
            periods: self.periods,
        }
    }

    /// Whether the close deadline has passed.
    pub(super) fn close_due(&self, now: Instant) -> bool {
        self.close_deadline.is_some_and(|at| at <= now)
    }
}

/// Polls `timer` so that it holds this task's waker, whatever is left of the
/// task's cooperative budget: a `Sleep` polled with the budget spent returns
/// `Pending` without taking the waker, or even making its timer, and is
/// never elapsed after that. The driver's I/O spends the budget, and the
/// timer is made just before the task yields, when it is most likely spent.
fn register(timer: Pin<&mut Sleep>, cx: &mut TaskContext<'_>) -> std::task::Poll<()> {
    std::pin::pin!(tokio::task::unconstrained(timer)).poll(cx)
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use super::*;

    /// Spends what is left of the task's cooperative budget, as a burst of
    /// reads and writes does before the driver arms its timer.
    fn spend_budget(cx: &mut TaskContext<'_>) {
        for _ in 0..10_000 {
            if std::pin::pin!(tokio::task::consume_budget())
                .poll(cx)
                .is_pending()
            {
                return;
            }
        }
        panic!("the budget never ran out");
    }

    #[tokio::test]
    async fn a_timer_made_or_moved_with_the_budget_spent_still_fires() {
        let mut timers = Timers::new(&Options::default());
        let early = Instant::now() + Duration::from_millis(20);
        let later = early + Duration::from_millis(30);
        let mut polls = 0;
        let fired = std::future::poll_fn(|cx| {
            polls += 1;
            // Made on the first poll, moved earlier on the second, each
            // time with the budget spent.
            let want = match polls {
                1 => later,
                _ => early,
            };
            if polls <= 2 {
                spend_budget(cx);
            }
            match timers.poll(cx, true, Some(want), true) {
                true => Poll::Ready(Instant::now()),
                false => Poll::Pending,
            }
        });
        let at = tokio::time::timeout(Duration::from_secs(5), fired)
            .await
            .expect("the timer fired and woke the task");
        // Not woken by the timer, the task would be polled only by the
        // timeout's own wake, 5 s on, and find the timer fired then.
        assert!(at >= early);
        assert!(
            at - early < Duration::from_secs(1),
            "woken {:?} late",
            at - early
        );
        assert!(polls >= 3, "polled {polls} times");
    }

    #[tokio::test(start_paused = true)]
    async fn resting_timers_wake_with_the_same_deadlines() {
        let options = Options::default()
            .idle_timeout(Some(Duration::from_secs(60)))
            .ping_interval(Some(Duration::from_secs(25)));
        let mut timers = Timers::new(&options);
        tokio::time::advance(Duration::from_millis(1_500)).await;
        timers.read();
        let opened = timers.opened();
        let next_ping = timers.next_ping.expect("pings are on");
        let resting = timers.rest();
        let wake_at = resting.wake_at().expect("pings are on");
        assert!(wake_at <= next_ping && next_ping - wake_at < Duration::from_millis(1));
        let woken = resting.wake();
        assert_eq!(woken.opened(), opened);
        assert_eq!(woken.last_read, 1_500);
        assert_eq!(woken.next_ping, Some(wake_at));
        assert!(!woken.busy());
    }

    #[tokio::test(start_paused = true)]
    async fn a_resting_connection_pings_on_time_and_goes_idle_without_reads() {
        let options = Options::default()
            .idle_timeout(Some(Duration::from_secs(60)))
            .ping_interval(Some(Duration::from_secs(25)));
        let mut resting = Timers::new(&options).rest();
        let opened = resting.opened();
        let at = |secs| opened + Duration::from_secs(secs);
        assert_eq!(resting.due(at(24)), Due::Nothing);
        let ping = resting.wake_at().expect("pings are on");
        assert!(at(25) - ping < Duration::from_millis(1));
        assert_eq!(resting.due(at(25)), Due::Ping, "not sent until it says so");
        assert_eq!(resting.due(at(25)), Due::Ping);
        resting.pinged(at(25));
        assert_eq!(resting.due(at(26)), Due::Nothing);
        assert_eq!(resting.wake_at(), Some(at(50)));
        // Pinged at 50 and answered: the idle deadline moves to a minute after the answer.
        resting.pinged(at(50));
        resting.read(at(51));
        assert_eq!(resting.wake_at(), Some(at(75)));
        resting.pinged(at(75));
        assert_eq!(resting.wake_at(), Some(at(100)));
        resting.pinged(at(100));
        assert_eq!(resting.wake_at(), Some(at(111)));
        assert_eq!(resting.due(at(111)), Due::Idle, "nothing read since 51 s");
    }

    #[test]
    fn periods_round_up_to_whole_milliseconds_and_saturate() {
        assert_eq!(millis(Duration::ZERO).get(), 1);
        assert_eq!(millis(Duration::from_micros(1)).get(), 1);
        assert_eq!(millis(Duration::from_micros(1_001)).get(), 2);
        assert_eq!(millis(Duration::from_secs(30)).get(), 30_000);
        assert_eq!(millis(Duration::from_secs(u64::MAX)).get(), u32::MAX);
    }
}
