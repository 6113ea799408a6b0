//! What the node's pub/sub connection has heard and its delivery task has not
//! handled yet, held within a bound.
//!
//! redis-rs reads the pub/sub connection as fast as Redis writes to it, and
//! hands each notice on without waiting (it must not hold up the
//! connection). Unbounded, that queue would keep everything published while
//! the delivery task is behind: it waits for every gap it reads from Redis,
//! and a paused or starved node falls behind by whatever was sent meanwhile.
//!
//! This one keeps at most `limit` bytes. A notice past that is dropped and
//! counted. Pub/sub is only a hint (the stream is the truth), so a dropped
//! message notice costs no message: its channel is remembered, and the
//! delivery task reads that channel's stream once the backlog is down to half
//! the bound. What has no stream is lost: join and leave events, and the
//! messages of topics without history (which are delivered at most once
//! anyway). Disconnect requests are kept whatever the bound: they come only
//! from the server API, and a lost one would leave open a connection the API
//! said it closed.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::IntCounter;
use redis::aio::{AsyncPushSender, SendError};
use redis::{PushInfo, PushKind, Value};
use tokio::sync::Notify;

/// What a queued notice costs beyond its channel and payload: its slot in
/// the queue and its two allocations.
const NOTICE_OVERHEAD: usize = 64;

/// One pub/sub connection's notices on their way to the delivery task.
pub(super) struct Backlog {
    queue: Mutex<Queue>,
    ready: Notify,
    limit: usize,
    dropped: IntCounter,
}

#[derive(Default)]
struct Queue {
    notices: VecDeque<Notice>,
    bytes: usize,
    /// Channels with a message notice dropped since the delivery task last
    /// took them: at most the channels the node listens to.
    unread: HashSet<String>,
    ended: bool,
}

/// A notice published on a channel (docs/cluster.md, "Channels").
pub(super) struct Notice {
    pub channel: String,
    pub payload: Vec<u8>,
}

impl Notice {
    fn cost(&self) -> usize {
        self.channel.len() + self.payload.len() + NOTICE_OVERHEAD
    }
}

/// What the delivery task is to handle next.
pub(super) enum Heard {
    Notice(Notice),
    /// Message notices of these channels were dropped: read their streams.
    Dropped(Vec<String>),
    /// The connection has ended; nothing more comes.
    Ended,
}

impl Backlog {
    /// A backlog of at most `limit` bytes, counting what it drops in `dropped`.
    pub(super) fn new(limit: usize, dropped: IntCounter) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue::default()),
            ready: Notify::new(),
            limit,
            dropped,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every change to the queue is complete before it can panic.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues what Redis sent, or drops it when the bound is reached.
    fn push(&self, notice: Notice) {
        let mut queue = self.lock();
        let cost = notice.cost();
        if queue.bytes + cost > self.limit && !notice.payload.starts_with(b"x|") {
            self.dropped.inc();
            if notice.payload.starts_with(b"m|") {
                queue.unread.insert(notice.channel);
            }
        } else {
            queue.bytes += cost;
            queue.notices.push_back(notice);
        }
        drop(queue);
        // Even after a drop: a notice larger than the bound finds the queue
        // empty and the delivery task asleep, and its stream must be read.
        self.ready.notify_one();
    }

    fn end(&self) {
        self.lock().ended = true;
        self.ready.notify_one();
    }

    /// What to handle next, waiting until there is something.
    pub(super) async fn next(&self) -> Heard {
        loop {
            if let Some(heard) = self.take() {
                return heard;
            }
            // A notice queued since `take` left a permit: this returns at once.
            self.ready.notified().await;
        }
    }

    /// What to handle next, if anything is there now.
    pub(super) fn take(&self) -> Option<Heard> {
        let mut queue = self.lock();
        // Read the dropped channels' streams once there is room again, not
        // before: each read holds up the delivery task, which is behind.
        if !queue.unread.is_empty() && queue.bytes <= self.limit / 2 {
            return Some(Heard::Dropped(queue.unread.drain().collect()));
        }
        if let Some(notice) = queue.notices.pop_front() {
            queue.bytes -= notice.cost();
            return Some(Heard::Notice(notice));
        }
        queue.ended.then_some(Heard::Ended)
    }

    /// Bytes queued now.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

/// The sender redis-rs hands a connection's pushes to. When the connection
/// ends it also calls `lost` at once, not once the backlog is worked
/// through: the node reconnects while its delivery catches up.
pub(super) struct Hearing<F> {
    pub backlog: Arc<Backlog>,
    pub lost: F,
}

impl<F: Fn() + Send + Sync + 'static> AsyncPushSender for Hearing<F> {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        match info.kind {
            PushKind::Message => {
                if let Ok([Value::BulkString(channel), Value::BulkString(payload)]) =
                    <[Value; 2]>::try_from(info.data)
                    && let Ok(channel) = String::from_utf8(channel)
                {
                    self.backlog.push(Notice { channel, payload });
                }
            }
            PushKind::Disconnection => {
                self.backlog.end();
                (self.lost)();
            }
            // Confirmations of SUBSCRIBE and UNSUBSCRIBE: their commands'
            // own answers say what they need to.
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(channel: &str, payload: &str) -> Notice {
        Notice {
            channel: channel.into(),
            payload: payload.as_bytes().to_vec(),
        }
    }

    fn backlog(limit: usize) -> (Arc<Backlog>, IntCounter) {
        let dropped = IntCounter::new("dropped", "dropped").unwrap();
        (Backlog::new(limit, dropped.clone()), dropped)
    }

    fn taken(backlog: &Backlog) -> Vec<String> {
        std::iter::from_fn(|| backlog.take())
            .map(|heard| match heard {
                Heard::Notice(n) => {
                    format!("{} {}", n.channel, String::from_utf8(n.payload).unwrap())
                }
                Heard::Dropped(mut channels) => {
                    channels.sort();
                    format!("dropped {}", channels.join(","))
                }
                Heard::Ended => "ended".into(),
            })
            .take(20)
            .collect()
    }

    #[test]
    fn over_the_bound_messages_are_dropped_and_their_channels_read_once_there_is_room() {
        let one = notice("a", "m|e|1||x").cost();
        let (backlog, dropped) = backlog(2 * one);
        backlog.push(notice("a", "m|e|1||x"));
        backlog.push(notice("a", "m|e|2||x"));
        backlog.push(notice("b", "m|e|3||x"));
        backlog.push(notice("c", "j|42"));
        assert_eq!(dropped.get(), 2);
        assert_eq!(backlog.bytes(), 2 * one);
        // Half the bound is one notice: the channels are read after the first.
        assert_eq!(
            taken(&backlog),
            ["a m|e|1||x", "dropped b", "a m|e|2||x"],
            "a join has no stream to read"
        );
        assert_eq!(backlog.bytes(), 0);
    }

    #[test]
    fn disconnect_requests_are_kept_past_the_bound() {
        let (backlog, dropped) = backlog(1);
        backlog.push(notice("sb:c:i:7", "x|4000|gone"));
        backlog.end();
        assert_eq!(dropped.get(), 0);
        assert_eq!(taken(&backlog)[..2], ["sb:c:i:7 x|4000|gone", "ended"]);
    }

    #[test]
    fn messages_and_the_end_come_from_what_redis_pushes() {
        let (backlog, _) = backlog(1 << 20);
        let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hearing = Hearing {
            backlog: backlog.clone(),
            lost: {
                let lost = lost.clone();
                move || lost.store(true, std::sync::atomic::Ordering::Relaxed)
            },
        };
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let push = |kind, data| hearing.send(PushInfo { kind, data }).unwrap();
        push(PushKind::Subscribe, vec![bulk("sb:c:t:x"), Value::Int(1)]);
        push(PushKind::Message, vec![bulk("sb:c:t:x"), bulk("m|e|1||{}")]);
        assert!(!lost.load(std::sync::atomic::Ordering::Relaxed));
        push(PushKind::Disconnection, vec![]);
        assert!(
            lost.load(std::sync::atomic::Ordering::Relaxed),
            "told at once"
        );
        assert_eq!(taken(&backlog)[..2], ["sb:c:t:x m|e|1||{}", "ended"]);
    }

    async fn within_a_second(task: tokio::task::JoinHandle<bool>) -> bool {
        let waited = tokio::time::timeout(std::time::Duration::from_secs(1), task).await;
        waited.expect("the waiter was never woken").unwrap()
    }

    #[tokio::test]
    async fn a_notice_larger_than_the_bound_wakes_the_waiter_to_read_its_stream() {
        let (backlog, _) = backlog(8);
        let waiting = tokio::spawn({
            let backlog = backlog.clone();
            async move { matches!(backlog.next().await, Heard::Dropped(c) if c == ["a"]) }
        });
        tokio::task::yield_now().await;
        backlog.push(notice("a", "m|e|1||a payload over eight bytes"));
        assert!(within_a_second(waiting).await);
    }

    #[tokio::test]
    async fn next_waits_for_a_notice() {
        let (backlog, _) = backlog(1 << 20);
        let waiting = tokio::spawn({
            let backlog = backlog.clone();
            async move { matches!(backlog.next().await, Heard::Notice(_)) }
        });
        tokio::task::yield_now().await;
        backlog.push(notice("a", "m|e|1||x"));
        assert!(within_a_second(waiting).await);
    }
}
