//! Topics: publish once, deliver to every subscriber, and know who is there.
//!
//! [`PubSub`] maps a topic to its subscribed connections. A publish renders the
//! message at most once per [`Format`] and pushes the same frame to every
//! subscriber. Presence is kept per topic by client id, so a client with two
//! connections (two tabs) joins once and leaves once; a [`PresenceListener`]
//! hears each join and leave. A [`Subscription`] unsubscribes when dropped, so a
//! connection's subscriptions end with it, however it ends.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use switchboard_proto::PreparedMessage;

use crate::handle::{ConnId, Outbound, Outbox};
use crate::members::Members;
use crate::registry::{ClientId, Format};
use crate::sharded::ShardedMap;

/// A client's first connection joined a topic, or its last one left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceChange {
    /// The client had no connection subscribed before.
    Joined,
    /// The client has no connection subscribed any more.
    Left,
}

/// Hears joins and leaves, in the order the transitions happened: a client's
/// `Joined` and `Left` for a topic alternate, so a member list built from them
/// is always right. Called outside the topics' locks, on the task that caused
/// the change or on another that was emitting events at the time; one call at
/// a time. It must not subscribe or unsubscribe itself.
pub trait PresenceListener: Send + Sync + 'static {
    /// `client` joined or left `topic`.
    fn changed(&self, pubsub: &PubSub, topic: &str, client: &ClientId, change: PresenceChange);

    /// Whether the listener hears `topic`'s joins and leaves at all (every
    /// topic's, unless it says otherwise). The changes of a topic it does
    /// not are never queued: its subscribes and unsubscribes skip the one
    /// lock every emitter takes in turn.
    fn wants(&self, _topic: &str) -> bool {
        true
    }
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The topic has as many subscribers as its limit allows.
    #[error("the topic has reached its subscriber limit")]
    Full,
    /// This connection is already subscribed to the topic.
    #[error("already subscribed")]
    AlreadySubscribed,
}

/// One subscribed connection.
#[derive(Clone)]
struct Subscriber {
    outbox: Outbox,
    format: Format,
    client: ClientId,
}

#[derive(Default)]
struct Topic {
    subscribers: HashMap<ConnId, Subscriber>,
    /// Connections per client id: presence.
    members: Members,
}

/// Topics and their subscribers.
#[derive(Clone)]
pub struct PubSub {
    inner: Arc<Inner>,
}

struct Inner {
    topics: ShardedMap<Topic>,
    listener: Option<Arc<dyn PresenceListener>>,
    /// Presence changes in the order they happened: queued under the topic's
    /// lock, handed to the listener outside it. Events sent straight from each
    /// task, after its lock was released, could pass each other.
    events: Mutex<VecDeque<Event>>,
    /// Held while handing queued events to the listener, so they go out one at
    /// a time, in queue order.
    emitting: Mutex<()>,
}

/// A presence change waiting for the listener.
struct Event {
    topic: Arc<str>,
    client: ClientId,
    change: PresenceChange,
}

impl Default for PubSub {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PubSub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSub")
            .field("topics", &self.topics())
            .finish()
    }
}

impl PubSub {
    /// An empty set of topics, with no presence listener.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// An empty set of topics whose joins and leaves go to `listener`.
    pub fn with_listener(listener: impl PresenceListener) -> Self {
        Self::build(Some(Arc::new(listener)))
    }

    fn build(listener: Option<Arc<dyn PresenceListener>>) -> Self {
        Self {
            inner: Arc::new(Inner {
                topics: ShardedMap::new(),
                listener,
                events: Mutex::new(VecDeque::new()),
                emitting: Mutex::new(()),
            }),
        }
    }

    /// Subscribes the connection behind `outbox`, of client `client`, to `topic`.
    /// `limit` caps the topic's subscribers. Dropping the result unsubscribes.
    ///
    /// # Errors
    ///
    /// [`SubscribeError::AlreadySubscribed`] when this connection already is,
    /// and [`SubscribeError::Full`] when the topic has `limit` subscribers.
    ///
    /// # Examples
    ///
    /// ```
    /// use switchboard::testing::Harness;
    /// use switchboard::{Context, Format, Handler, Message, Outcome, PreparedMessage, PubSub};
    ///
    /// struct Quiet;
    /// impl Handler for Quiet {
    ///     type Info = ();
    ///     fn handle_in(&mut self, _m: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
    ///         Outcome::Continue
    ///     }
    /// }
    ///
    /// let pubsub = PubSub::new();
    /// let mut harness = Harness::new(Quiet);
    /// let outbox = harness.handle().outbox();
    /// let subscription = pubsub
    ///     .subscribe("news", "ada".into(), &outbox, Format::default(), None)
    ///     .unwrap();
    /// let news = PreparedMessage::text("extra!");
    /// assert_eq!(pubsub.publish("news", &|_| news.clone()), 1);
    /// drop(subscription);
    /// assert_eq!(pubsub.publish("news", &|_| news.clone()), 0);
    /// ```
    pub fn subscribe(
        &self,
        topic: &str,
        client: ClientId,
        outbox: &Outbox,
        format: Format,
        limit: Option<usize>,
    ) -> Result<Subscription, SubscribeError> {
        let topic: Arc<str> = Arc::from(topic);
        let conn = outbox.id();
        let queued = {
            let mut shard = self.inner.topics.write(&topic);
            let entry = shard.entry(topic.clone()).or_default();
            if entry.subscribers.contains_key(&conn) {
                return Err(SubscribeError::AlreadySubscribed);
            }
            if limit.is_some_and(|limit| entry.subscribers.len() >= limit) {
                if entry.subscribers.is_empty() {
                    shard.remove(&topic);
                }
                return Err(SubscribeError::Full);
            }
            let subscriber = Subscriber {
                outbox: outbox.clone(),
                format,
                client: client.clone(),
            };
            entry.subscribers.insert(conn, subscriber);
            entry.members.join(&client) && self.queue_event(&topic, client, PresenceChange::Joined)
        };
        // Only a change of its own to hand on makes it wait for the emitter:
        // it returns once its event is out.
        if queued {
            self.emit_events();
        }
        Ok(Subscription {
            pubsub: self.clone(),
            topic,
            conn,
        })
    }

    fn unsubscribe(&self, topic: &Arc<str>, conn: ConnId) {
        let queued = {
            let mut shard = self.inner.topics.write(topic);
            let Some(entry) = shard.get_mut(topic) else {
                return;
            };
            let Some(subscriber) = entry.subscribers.remove(&conn) else {
                return;
            };
            let queued = entry.members.leave(&subscriber.client)
                && self.queue_event(topic, subscriber.client, PresenceChange::Left);
            if entry.subscribers.is_empty() {
                shard.remove(&**topic);
            }
            queued
        };
        if queued {
            self.emit_events();
        }
    }

    /// Queues a change for the listener, if it wants the topic's; called
    /// under the topic's lock, so the queue holds the changes in the order
    /// they happened. Returns whether it queued one.
    fn queue_event(&self, topic: &Arc<str>, client: ClientId, change: PresenceChange) -> bool {
        let wanted = (self.inner.listener)
            .as_ref()
            .is_some_and(|listener| listener.wants(topic));
        if wanted {
            let event = Event {
                topic: topic.clone(),
                client,
                change,
            };
            lock(&self.inner.events).push_back(event);
        }
        wanted
    }

    /// Hands the queued changes to the listener, in order and one at a time,
    /// outside the topics' locks (the listener may publish). Whoever holds
    /// `emitting` drains the queue; the others find it drained.
    fn emit_events(&self) {
        let Some(listener) = &self.inner.listener else {
            return;
        };
        let _emitting = lock(&self.inner.emitting);
        loop {
            // Popped in a statement of its own: a `while let` keeps its
            // scrutinee's guard for the whole body, so the queue stayed
            // locked while the listener published, and a subscribe or
            // unsubscribe holding that topic's shard (to queue its change)
            // deadlocked with it.
            let next = lock(&self.inner.events).pop_front();
            let Some(event) = next else {
                break;
            };
            listener.changed(self, &event.topic, &event.client, event.change);
        }
    }

    /// Queues a message on every subscriber of `topic`, rendered by `render` at
    /// most once per format; returns how many connections took it.
    pub fn publish(&self, topic: &str, render: &dyn Fn(Format) -> PreparedMessage) -> usize {
        // Pushes can write to sockets (direct writes), so they happen after the
        // shard's lock is released: a publish to many subscribers must not hold
        // up subscribes, or other publishes queued behind one, on the same shard.
        let recipients: Vec<(Outbox, Format)> = {
            let shard = self.inner.topics.read(topic);
            let Some(entry) = shard.get(topic) else {
                return 0;
            };
            entry
                .subscribers
                .values()
                .map(|s| (s.outbox.clone(), s.format))
                .collect()
        };
        let mut rendered: Vec<(Format, PreparedMessage)> = Vec::new();
        let mut reached = 0;
        for (outbox, format) in recipients {
            let message = match rendered.iter().find(|(f, _)| *f == format) {
                Some((_, message)) => message.clone(),
                None => {
                    let message = render(format);
                    rendered.push((format, message.clone()));
                    message
                }
            };
            if outbox.push(Outbound::Prepared(message)).is_ok() {
                reached += 1;
            }
        }
        reached
    }

    /// The client ids subscribed to `topic`, with their connection counts:
    /// all of them, in one list (see [`Self::presence_page`] for big topics).
    pub fn presence(&self, topic: &str) -> Vec<(ClientId, usize)> {
        let shard = self.inner.topics.read(topic);
        let Some(entry) = shard.get(topic) else {
            return Vec::new();
        };
        entry.members.some(usize::MAX)
    }

    /// Up to `limit` of the client ids subscribed to `topic` that sort after
    /// `after` (byte order), in that order, with their connection counts; and
    /// whether more follow. Passing a page's last id as the next `after` walks
    /// the members in pages: an id subscribed throughout the walk is listed
    /// exactly once. A page of a big topic is a range read; one of a small
    /// topic scans its members (see `members`).
    pub fn presence_page(
        &self,
        topic: &str,
        after: Option<&str>,
        limit: usize,
    ) -> (Vec<(ClientId, usize)>, bool) {
        let shard = self.inner.topics.read(topic);
        let Some(entry) = shard.get(topic) else {
            return (Vec::new(), false);
        };
        entry.members.page(after, limit)
    }

    /// How many connections are subscribed to `topic`.
    pub fn subscribers(&self, topic: &str) -> usize {
        self.inner
            .topics
            .read(topic)
            .get(topic)
            .map_or(0, |t| t.subscribers.len())
    }

    /// How many topics have at least one subscriber.
    pub fn topics(&self) -> usize {
        self.inner.topics.len()
    }

    /// The `limit` topics with the most subscribers (on equal counts, by name),
    /// biggest first, each with up to `members` of its client ids. Visits every
    /// topic but keeps only `limit` of them: for an operator's overview, not
    /// for the message path.
    pub fn biggest(&self, limit: usize, members: usize) -> Vec<TopicSummary> {
        // A min-heap of the best so far: its top is the first to give way.
        let mut best: BinaryHeap<Reverse<(usize, Reverse<Arc<str>>)>> = BinaryHeap::new();
        self.inner.topics.for_each(|name, topic| {
            let subscribers = topic.subscribers.len();
            if best.len() < limit {
                best.push(Reverse((subscribers, Reverse(name.clone()))));
                return;
            }
            // The name is cloned only for a topic that makes the list.
            let better = best.peek().is_some_and(|Reverse((least, Reverse(last)))| {
                (subscribers, Reverse(&**name)) > (*least, Reverse(&**last))
            });
            if better {
                best.pop();
                best.push(Reverse((subscribers, Reverse(name.clone()))));
            }
        });
        best.into_sorted_vec()
            .into_iter()
            .map(|Reverse((subscribers, Reverse(topic)))| {
                let shard = self.inner.topics.read(&topic);
                let members = shard
                    .get(&topic)
                    .map_or_else(Vec::new, |t| t.members.some(members));
                drop(shard);
                TopicSummary {
                    topic,
                    subscribers,
                    members,
                }
            })
            .collect()
    }
}

/// A topic as [`PubSub::biggest`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSummary {
    /// Its name.
    pub topic: Arc<str>,
    /// Connections subscribed.
    pub subscribers: usize,
    /// Some of its client ids, with their connection counts.
    pub members: Vec<(ClientId, usize)>,
}

/// Keeps a connection subscribed; dropping it unsubscribes.
#[must_use = "the connection is unsubscribed as soon as this is dropped"]
pub struct Subscription {
    pubsub: PubSub,
    topic: Arc<str>,
    conn: ConnId,
}

impl Subscription {
    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.topic)
            .finish()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.pubsub.unsubscribe(&self.topic, self.conn);
    }
}

/// A lock whose holder cannot leave the data half-changed: a panic in the
/// listener happens with `emitting` held, not in the middle of a queue operation.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
