//! The engine: where client ids' connections, their inboxes, topics and
//! their messages live. The relay and the HTTP API call it; neither knows
//! which engine runs. [`MemoryEngine`] is the embedded one (one process);
//! [`RedisEngine`] makes several nodes behave as one (docs/cluster.md).
//!
//! Every message sent to a client id is appended to that id's inbox stream,
//! whether or not the id is connected, and handed to its live connections in
//! offset order. A `switchboard.v1` connection is told its inbox's position
//! first (the welcome), and one that asks to resume from a position gets
//! every message after it, or is told that it cannot: never part of them.
//!
//! Calls answer with futures, as a store across the network does. What
//! orders messages is the call, not the answer: an engine fixes the order
//! of two calls made one after the other before it returns the first's
//! future, so a client's messages keep their order whenever the acks come.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use switchboard::{ClientId, CloseReason, Held, Outbox, Registration, SubscribeError};

use switchboard::PreparedMessage;

use crate::streams::{Entry, Page, Position, Retention};
use crate::wire::{self, At, Mode, Resumed};

mod memory;
pub mod redis;

pub use memory::{InboxRetention, MemoryEngine};
pub use redis::{RedisEngine, RedisSettings};

/// An engine's answer, when it comes: at once (the memory engine's, with
/// nothing allocated for it), or from a future that a store across the network
/// completes. Awaiting it gives the result either way.
#[must_use = "an answer says whether the call succeeded"]
pub struct Answer<T, E>(Due<T, E>);

enum Due<T, E> {
    /// Taken by the first poll that sees it.
    Now(Option<Result<T, E>>),
    Later(Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'static>>),
}

/// An answer that fails only when the store is unavailable.
pub type Pending<T> = Answer<T, Unavailable>;

/// An answer that is ready now.
pub fn ready<T>(value: T) -> Pending<T> {
    Answer::now(Ok(value))
}

impl<T, E> Answer<T, E> {
    /// An answer that is ready now.
    pub fn now(result: Result<T, E>) -> Self {
        Self(Due::Now(Some(result)))
    }

    /// An answer that `future` gives when it completes.
    pub fn later(future: impl Future<Output = Result<T, E>> + Send + 'static) -> Self {
        Self(Due::Later(Box::pin(future)))
    }

    /// The result if it is ready without waiting (a future is polled once,
    /// with a waker that does nothing); `None` leaves it to be awaited.
    pub fn ready_now(&mut self) -> Option<Result<T, E>> {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match Pin::new(self).poll(&mut cx) {
            std::task::Poll::Ready(result) => Some(result),
            std::task::Poll::Pending => None,
        }
    }
}

// The result is moved out, never pinned in place: nothing here relies on
// `Answer` staying where it is.
impl<T, E> Unpin for Answer<T, E> {}

impl<T, E> Future for Answer<T, E> {
    type Output = Result<T, E>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.get_mut().0 {
            Due::Now(result) => {
                std::task::Poll::Ready(result.take().expect("an answer is awaited once"))
            }
            Due::Later(future) => future.as_mut().poll(cx),
        }
    }
}

/// The most a page of history for the API holds in payloads (and senders),
/// but for its first message: 1,000 messages of up to `max_message_size`
/// each could otherwise make one answer of a gigabyte (and, in the cluster,
/// one script's reply on the link every node call shares).
pub const PAGE_BYTES: usize = 4 << 20;

/// The engine's store cannot be reached, or did not answer in time. Most
/// often nothing was done, but a call whose answer was lost may have run:
/// a caller that must not repeat it retries with an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cluster's store is unavailable: {0}")]
pub struct Unavailable(pub String);

/// A message from a client or the API.
#[derive(Debug, Clone)]
pub struct Message {
    /// The sender, when a client sent it.
    pub from: Option<ClientId>,
    /// The payload's JSON text.
    pub payload: Arc<str>,
    /// Its `Idempotency-Key` (scoped by route), from the API: within five
    /// minutes a message with the same key is not sent again, and gets the
    /// first one's answer. The API's own cache covers one node; an engine
    /// shared by several nodes checks it too.
    pub key: Option<Arc<str>>,
}

/// What became of a message to client ids: a receipt per target, in the
/// targets' order (one list, made once, where three grew on every send).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sent(pub Vec<Receipt>);

/// What became of a message for one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The target.
    pub client: ClientId,
    /// The offset the target's inbox gave the message.
    pub offset: u64,
    /// The target had a live connection somewhere; otherwise the message
    /// waits in its inbox.
    pub delivered: bool,
}

impl Sent {
    /// Room for `targets` receipts.
    pub fn with_capacity(targets: usize) -> Self {
        Self(Vec::with_capacity(targets))
    }

    /// Targets with a live connection somewhere.
    pub fn delivered(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|r| r.delivered)
            .map(|r| &*r.client)
            .collect()
    }

    /// Targets with none: the message waits in their inboxes.
    pub fn offline(&self) -> Vec<&str> {
        self.0
            .iter()
            .filter(|r| !r.delivered)
            .map(|r| &*r.client)
            .collect()
    }

    /// The offset each target's inbox gave the message.
    pub fn offsets(&self) -> Vec<(&str, u64)> {
        self.0.iter().map(|r| (&*r.client, r.offset)).collect()
    }
}

/// What became of a message published to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Subscribed connections it was sent to.
    pub subscribers: usize,
    /// Its offset in the topic's stream, when the topic keeps history.
    pub offset: Option<u64>,
}

/// A connection asking to subscribe to a topic.
#[derive(Debug, Clone)]
pub struct Subscribe {
    /// The topic.
    pub topic: Arc<str>,
    /// The connection's client id.
    pub client: ClientId,
    /// Where its messages go.
    pub outbox: Outbox,
    /// The most connections the topic may have.
    pub limit: Option<usize>,
    /// What the topic keeps, when it keeps history.
    pub history: Option<Retention>,
    /// Where to resume from.
    pub since: Option<Position>,
}

/// A subscription, and what resuming it found.
pub struct Subscribed {
    /// Dropping it unsubscribes.
    pub subscription: Registration,
    /// Whether it resumed (`Resumed::NotAsked` when it did not ask), and the
    /// topic's position: messages after it reach the subscriber. `None` for a
    /// plain subscribe to a topic that keeps no history; a position of `None`
    /// when one that keeps none was asked to resume (nothing can be).
    pub resumed: Option<(Resumed, Option<Position>)>,
    /// For the caller to run once the subscribe's answer is queued: hands
    /// the subscriber what the engine holds for it (its own join, missed
    /// messages) and then live messages, so the answer comes first, as it
    /// does when the engine answers at once. The answer may wait behind the
    /// connection's earlier ones, and the start with it: one that runs after
    /// the subscription was dropped does nothing.
    pub start: Option<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for Subscribed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscribed")
            .field("resumed", &self.resumed)
            .finish_non_exhaustive()
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeRefused {
    /// The topic is full, or the connection is subscribed already.
    PubSub(SubscribeError),
    /// `since` is past the topic's last offset under its epoch.
    Ahead {
        /// The offset asked for.
        asked: u64,
        /// The topic's last offset.
        top: u64,
    },
    /// The store cannot be reached.
    Unavailable(Unavailable),
}

/// Why a connection was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The id has as many connections as it may.
    #[error("too many connections for this client: at most {limit}")]
    Full {
        /// The limit.
        limit: usize,
    },
    /// The store cannot be reached.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
}

/// A connection let in, whose socket is about to be served: attaching its
/// outbox sends the welcome (and what it resumes) and registers it for
/// live messages. Dropped unattached (the upgrade failed), it leaves again.
pub trait Joined: Send {
    /// Registers the connection behind `outbox`; dropping the result removes it.
    fn attach(self: Box<Self>, outbox: Outbox) -> Registration;
}

/// The most client ids one presence answer holds, and the page size when a
/// query names none: an answer about a topic of any size stays a bounded
/// reply, and a bounded step for the store.
pub const PRESENCE_PAGE: usize = 1000;

/// The most bytes one client id takes in a presence answer: the id (at most
/// [`crate::ids::MAX_ID_LEN`]), its quotes, colon, count and comma.
pub const PRESENCE_ID_BYTES: usize = crate::ids::MAX_ID_LEN + 16;

/// Which page of a topic's members a presence query asks for.
#[derive(Debug, Clone)]
pub struct PresencePage {
    /// Where it starts: the `next` of the page before, checked with
    /// [`Engine::is_presence_cursor`]; `None` for the first page.
    pub cursor: Option<Arc<str>>,
    /// The most client ids to answer, 1 to [`PRESENCE_PAGE`].
    pub limit: usize,
}

impl PresencePage {
    /// The page a query asks for with its `cursor` and `limit`, checked
    /// (`engine` knows its cursors): without them, the first page of
    /// [`PRESENCE_PAGE`] ids.
    pub fn asked(
        engine: &dyn Engine,
        cursor: Option<&str>,
        limit: Option<u64>,
    ) -> Result<Self, PageRefused> {
        let limit = match limit {
            None => PRESENCE_PAGE,
            Some(n) if (1..=PRESENCE_PAGE as u64).contains(&n) => n as usize,
            Some(n) => {
                let message = format!("limit {n} is out of range: 1 to {PRESENCE_PAGE}");
                return Err(PageRefused::Limit(message));
            }
        };
        let cursor = match cursor {
            None => None,
            Some(text) if engine.is_presence_cursor(text) => Some(text.into()),
            Some(text) => {
                let message =
                    format!("{text:?} is not a cursor: pass the `next` of the page before");
                return Err(PageRefused::Cursor(message));
            }
        };
        Ok(Self { cursor, limit })
    }
}

/// Why a presence query's page cannot be served; each surface answers it with
/// its own code for a bad field (the cursor's is `invalid_cursor` on both).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageRefused {
    /// `limit` is not 1 to [`PRESENCE_PAGE`].
    Limit(String),
    /// `cursor` is not one this engine gives.
    Cursor(String),
}

/// Who is subscribed to a topic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicPresence {
    /// Subscribed connections (all of them, whatever the page).
    pub subscribers: usize,
    /// Subscribed client ids, each with its number of connections.
    pub clients: Vec<(ClientId, usize)>,
    /// Where the next page starts, when more may follow.
    pub next: Option<String>,
}

/// How many are online, for the stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Client ids with a live connection.
    pub clients: usize,
    /// Topics with a subscriber.
    pub topics: usize,
    /// Nodes serving (1 with the memory engine).
    pub nodes: usize,
}

/// A node's traffic, for the stats: its own, or a cluster's summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Traffic {
    /// Open WebSocket connections.
    pub connections: u64,
    /// Messages received from clients.
    pub messages_in: u64,
    /// Messages sent to clients.
    pub messages_out: u64,
    /// Payload bytes received.
    pub bytes_in: u64,
    /// Payload bytes sent.
    pub bytes_out: u64,
    /// Partly received data held (see `receive_budget_bytes`).
    pub receive_buffered_bytes: u64,
    /// Failed accepts.
    pub accept_errors: u64,
}

impl Traffic {
    /// The figures in a fixed order (how the Redis engine stores them).
    pub fn figures(&self) -> [u64; 7] {
        [
            self.connections,
            self.messages_in,
            self.messages_out,
            self.bytes_in,
            self.bytes_out,
            self.receive_buffered_bytes,
            self.accept_errors,
        ]
    }

    /// Figures in the order [`Traffic::figures`] gives them.
    pub fn from_figures(f: [u64; 7]) -> Self {
        Self {
            connections: f[0],
            messages_in: f[1],
            messages_out: f[2],
            bytes_in: f[3],
            bytes_out: f[4],
            receive_buffered_bytes: f[5],
            accept_errors: f[6],
        }
    }
}

/// One node's traffic, by the node's id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeTraffic {
    /// The node (`local` with the memory engine).
    pub id: Arc<str>,
    /// Its figures.
    #[serde(flatten)]
    pub traffic: Traffic,
}

/// The cluster's traffic: every node's summed.
pub fn total(nodes: &[NodeTraffic]) -> Traffic {
    let mut sum = [0; 7];
    for node in nodes {
        for (total, figure) in sum.iter_mut().zip(node.traffic.figures()) {
            *total += figure;
        }
    }
    Traffic::from_figures(sum)
}

/// Some of the topics, for a look at what is in use.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicList {
    /// How many topics have a subscriber.
    pub total: usize,
    /// The biggest (most subscribers first, then by name), each with some of
    /// its client ids and their connection counts.
    pub topics: Vec<(Arc<str>, TopicPresence)>,
}

/// Routing, presence and streams for client ids and topics.
pub trait Engine: Send + Sync + 'static {
    /// Lets a connection of `id` speaking `mode` in: it counts as online from
    /// now on. Refused when `id` has `max_connections` already, those still
    /// being let in counted (so that handshakes in flight together cannot
    /// all pass the limit). With `since`, the welcome says whether every
    /// message after it could be replayed (not for a position past the
    /// inbox's top: the store lost what it had given).
    fn connect(
        &self,
        id: ClientId,
        mode: Mode,
        since: Option<Position>,
        max_connections: usize,
    ) -> Answer<Box<dyn Joined>, ConnectError>;

    /// Appends `message` to each target's inbox and hands it to the targets'
    /// live connections.
    fn send(&self, targets: &[&str], message: Message) -> Pending<Sent>;

    /// Live connections of each id, in the order asked.
    fn connections(&self, ids: Vec<ClientId>) -> Pending<Vec<usize>>;

    /// Publishes `message` to `topic`'s subscribers; with `history`, appends
    /// it to the topic's stream first, and the deliveries carry its offset.
    fn publish(
        &self,
        topic: Arc<str>,
        history: Option<Retention>,
        message: Message,
    ) -> Pending<Published>;

    /// Subscribes a connection to a topic. With `since` (and a topic that
    /// keeps history) the messages after it are put in the connection's
    /// outbox before any live one, all of them or none.
    fn subscribe(&self, request: Subscribe) -> Answer<Subscribed, SubscribeRefused>;

    /// Who is subscribed to `topic`: one page of its client ids. A client id
    /// subscribed for the whole walk from the first page to the last is
    /// listed at least once; one that joins or leaves meanwhile may or may not be.
    fn presence(&self, topic: Arc<str>, page: PresencePage) -> Pending<TopicPresence>;

    /// Whether `text` has the shape of a cursor this engine's presence pages
    /// give as `next`.
    fn is_presence_cursor(&self, text: &str) -> bool;

    /// Closes every connection of `id`; answers how many there were.
    fn disconnect(&self, id: ClientId, close: CloseReason) -> Pending<usize>;

    /// Client ids online and topics subscribed.
    fn counts(&self) -> Pending<Counts>;

    /// Every node's traffic: this one's first (`local`, now), then, in a
    /// cluster, the others' as their last heartbeat gave them.
    fn nodes(&self, local: Traffic) -> Pending<Vec<NodeTraffic>>;

    /// The topics with the most subscribers, up to `limit`, each with up to
    /// `members` of its client ids, and how many topics there are.
    fn topics(&self, limit: usize, members: usize) -> Pending<TopicList>;

    /// Up to `limit` messages of `id`'s inbox: the latest, or those right
    /// after `since`; fewer when they pass [`PAGE_BYTES`].
    fn read_inbox(
        &self,
        id: ClientId,
        since: Option<Position>,
        limit: usize,
    ) -> Pending<(Page, Position)>;

    /// Up to `limit` messages of `topic`'s history, kept as `retention` says;
    /// fewer when they pass [`PAGE_BYTES`].
    fn read_topic(
        &self,
        topic: Arc<str>,
        retention: Retention,
        since: Option<Position>,
        limit: usize,
    ) -> Pending<(Page, Position)>;

    /// Why the engine cannot serve now, if it cannot (for `/healthz`).
    fn unready(&self) -> Option<String>;

    /// Called once serving has stopped: an engine that holds its streams in
    /// this process writes them to `dir` (and returns the file); one whose
    /// streams live elsewhere has nothing to write.
    fn save(&self, dir: &Path) -> io::Result<Option<PathBuf>>;
}

/// Whether replaying `missed` (of `topic`, or of an inbox) fits `budget`
/// bytes of a new connection's outbound queue. A replay goes into the queue
/// at once, and one that overflowed it would be cut short as a slow consumer
/// after the client was told it recovered: all or nothing, so it says so
/// instead (engines give half of `max_outbound_bytes`).
pub(crate) fn fits(missed: &[Entry], topic: Option<&str>, epoch: &str, budget: usize) -> bool {
    replayed_bytes(missed, topic, epoch) <= budget
}

/// A topic resume's replay, admitted whole or not at all (`None`: not
/// recovered). Its size is held against `outbox` within `budget`, counting
/// what already waits to be written and what other replays hold: several
/// resumes at once (a client reconnecting) never take more than `budget`
/// together, and live deliveries keep the rest of the queue. The frames are
/// then queued with [`Outbox::reply`], and the guard dropped.
pub(crate) fn admit_replay(
    outbox: &Outbox,
    missed: &[Entry],
    topic: &str,
    epoch: &str,
    budget: usize,
) -> Option<Held> {
    outbox.reserve(replayed_bytes(missed, Some(topic), epoch), budget)
}

/// What a replayed frame's envelope takes beyond its texts (its own fields,
/// up to 20 digits of offset).
const REPLAYED_FRAME: usize = 96;

/// The most messages a replay within `budget` bytes can hold: a resume that
/// missed more is not recovered, and is known so without copying them.
pub(crate) fn most_replayed(budget: usize) -> usize {
    budget / REPLAYED_FRAME
}

/// At least as many bytes as replaying `missed` queues.
fn replayed_bytes(missed: &[Entry], topic: Option<&str>, epoch: &str) -> usize {
    let per_frame = REPLAYED_FRAME + topic.map_or(0, str::len) + epoch.len();
    missed
        .iter()
        .map(|e| per_frame + e.payload.len() + e.from.as_deref().map_or(0, str::len))
        .sum()
}

/// A message of a topic's stream, as a `switchboard.v1` delivery.
pub(crate) fn topic_delivery(topic: &str, entry: &Entry, epoch: &str) -> PreparedMessage {
    let at = At {
        offset: entry.offset,
        epoch,
    };
    wire::envelope_delivery(entry.from.as_deref(), Some(topic), &entry.payload, Some(at))
}

/// A message of an inbox stream, as a `switchboard.v1` delivery.
pub(crate) fn inbox_delivery(entry: &Entry, epoch: &str) -> PreparedMessage {
    let at = At {
        offset: entry.offset,
        epoch,
    };
    wire::envelope_delivery(entry.from.as_deref(), None, &entry.payload, Some(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_is_ready_now_or_when_its_future_completes() {
        let mut now: Pending<u32> = ready(7);
        assert_eq!(now.ready_now(), Some(Ok(7)));

        let (tell, told) = tokio::sync::oneshot::channel::<u32>();
        let mut later: Pending<u32> =
            Answer::later(async move { told.await.map_err(|e| Unavailable(e.to_string())) });
        assert_eq!(later.ready_now(), None, "nothing has been told yet");
        tell.send(9).unwrap();
        assert_eq!(later.await, Ok(9));
    }

    #[test]
    fn a_replay_of_more_than_the_most_replayed_never_fits_its_budget() {
        // The smallest message there is: no sender, an empty payload text.
        let entry = Entry {
            offset: u64::MAX,
            from: None,
            payload: "".into(),
            at_ms: 0,
        };
        for budget in [0, 95, 96, 4 << 20] {
            let most = most_replayed(budget);
            assert!(fits(&vec![entry.clone(); most], None, "", budget));
            assert!(!fits(&vec![entry.clone(); most + 1], None, "", budget));
        }
    }
}
