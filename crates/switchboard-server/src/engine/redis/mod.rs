//! The cluster engine: client ids, topics, presence and streams in Redis 7,
//! so that every node on the same Redis behaves as one (docs/cluster.md).
//!
//! - [`link`]: one ordered, pipelined queue of script calls.
//! - [`feed`]: pub/sub, and delivery to this node's connections with gap fill.
//! - [`fence`]: ends the link's given-up connection before a new one carries calls.
//! - `backlog`: what pub/sub brought and delivery has not handled, bounded.
//! - [`lease`]: the node's heartbeat, the reaping of dead nodes, readiness.
//! - `engine.lua`: every change to shared state, atomically.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::ProtocolVersion;
use switchboard::{
    ClientId, CloseReason, Outbound, Outbox, PreparedMessage, PresenceChange, Registration,
    Registry, SubscribeError,
};

use switchboard::Broker;

use super::{
    Answer, ConnectError, Counts, Engine, Joined, Message, NodeTraffic, PAGE_BYTES, Pending,
    PresencePage, Published, Receipt, Sent, Subscribe, SubscribeRefused, Subscribed, TopicList,
    TopicPresence, Traffic, Unavailable, fits,
};
use crate::metrics::Metrics;
use crate::streams::{Entry, Page, Position, Resume, Retention};
use crate::topics::Namespaces;
use crate::wire::{self, At, Mode, Resumed};
use feed::{Conn, Feed, FeedSettings, inbox_channel, topic_channel};
use link::{Header, Link};
use reply::{Read, array, int, malformed, text};

mod backlog;
mod feed;
mod fence;
mod lease;
mod link;
mod reply;

/// What the Redis engine needs to know.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Redis's address (`redis://...`).
    pub url: String,
    /// How long a node's place outlives its last heartbeat.
    pub lease: Duration,
    /// What inboxes keep.
    pub inbox: Retention,
    /// Bytes a resume may replay at once (see [`super::fits`]).
    pub replay_budget: usize,
    /// Messages the `$clients` topic keeps (0: no events).
    pub client_events: usize,
    /// Most bytes of pub/sub notices a node holds for its delivery task.
    pub pubsub_backlog: usize,
    /// How long a stream's epoch and top outlive its last use (at least
    /// what its entries live).
    pub position_ttl: Duration,
}

/// This node's traffic now, for its heartbeat.
pub type LocalTraffic = Arc<dyn Fn() -> Traffic + Send + Sync>;

/// The cluster engine. Cloning shares it.
#[derive(Clone)]
pub struct RedisEngine(Arc<Core>);

struct Core {
    link: Link,
    /// The heartbeats' own connection: behind the data calls (a client's
    /// sends to a thousand ids each take Redis 15 ms), a beat waited past
    /// the lease, and the node closed every client of a reachable cluster.
    beats: Link,
    feed: Feed,
    registry: Registry,
    /// This node's id in the cluster: new on every start, and again after
    /// the cluster reaped it (its lease lapsed).
    node: Mutex<Arc<str>>,
    inbox: Retention,
    replay_budget: usize,
    /// Numbers the node's connections and subscriptions in Redis.
    tokens: AtomicU64,
    lease: lease::Health,
    traffic: LocalTraffic,
    namespaces: Arc<Namespaces>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("node", &self.0.node())
            .finish_non_exhaustive()
    }
}

impl RedisEngine {
    /// Connects to Redis (in the background, reconnecting with backoff) and
    /// starts this node's heartbeat. `registry` counts this node's own
    /// connections; `namespaces` say which topics have presence events;
    /// `traffic` gives this node's figures, which each heartbeat stores for
    /// the other nodes' stats. `metrics` counts appends, resumes and the
    /// link's commands.
    pub fn start(
        settings: &RedisSettings,
        registry: Registry,
        namespaces: Arc<Namespaces>,
        traffic: LocalTraffic,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let client = client(&settings.url)?;
        // At least as long as any stream keeps its messages, so a stream's
        // position never goes before its entries do.
        let meta_ttl = (settings.position_ttl)
            .max(settings.inbox.ttl)
            .max(namespaces.longest_history_ttl());
        let header = Header {
            meta_ttl,
            events_size: settings.client_events,
            events_ttl: crate::topics::CLIENT_EVENTS_TTL,
        };
        let link = Link::start(client.clone(), header, metrics.clone());
        let beats = Link::start(client.clone(), header, metrics.clone());
        // Pub/sub on a multiplexed connection (RESP3), whose pushes come to
        // a sender of ours: the only way to bound what redis-rs holds.
        let info = client.get_connection_info().clone();
        let resp3 = info
            .redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3);
        let pubsub = redis::Client::open(info.set_redis_settings(resp3))
            .map_err(|e| anyhow::anyhow!("invalid redis_url: {e}"))?;
        let feed = Feed::start(
            pubsub,
            link.clone(),
            namespaces.clone(),
            FeedSettings {
                backlog: settings.pubsub_backlog,
                channels: metrics.redis_channels.clone(),
                dropped: metrics.redis_pubsub_dropped.clone(),
                lease: settings.lease,
                reconnects: metrics.redis_pubsub_reconnects.clone(),
                // Well within the time a position outlives its last use.
                renew: meta_ttl / 4,
            },
        );
        let core = Arc::new(Core {
            link,
            beats,
            feed,
            registry,
            node: Mutex::new(lease::new_node_id()),
            inbox: settings.inbox,
            replay_budget: settings.replay_budget,
            tokens: AtomicU64::new(1),
            lease: lease::Health::new(settings.lease),
            traffic,
            namespaces,
            metrics,
        });
        tokio::spawn(lease::run(Arc::downgrade(&core)));
        Ok(Self(core))
    }
}

impl Core {
    /// A new connection's or subscription's token, unique on this node.
    fn token(&self) -> String {
        self.tokens.fetch_add(1, Ordering::Relaxed).to_string()
    }

    fn node(&self) -> Arc<str> {
        self.node
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The cluster reaped this node: its connections are closed, and it
    /// joins again under a new id. Under the id's lock, as [`Self::attach`]
    /// reads it: a connection counted under the old id is closed either here
    /// or as it attaches, never missed.
    fn rejoin(&self) {
        let mut node = self.node.lock().unwrap_or_else(PoisonError::into_inner);
        self.feed.close_all(lease::lost_place());
        *node = lease::new_node_id();
    }

    /// Hands a connection counted under `counted_under` to the delivery
    /// task. One whose handshake was under way as the cluster reaped that id
    /// is no longer counted anywhere, and the reap's close did not reach it:
    /// it is closed here, as the others were.
    fn attach(&self, counted_under: &str, channel: String, conn: Conn) {
        let node = self.node.lock().unwrap_or_else(PoisonError::into_inner);
        if **node != *counted_under {
            conn.outbox.close(lease::lost_place());
        }
        self.feed.attach(channel, conn);
    }

    /// Whether an inbox resume's replay fits a new connection; otherwise it
    /// is not recovered.
    fn resume(&self, read: Read, since: &Position, ttl: Duration) -> (Resume, Position) {
        let position = read.position();
        match read.resume(since, ttl) {
            Resume::Recovered(missed)
                if !fits(&missed, None, &position.epoch, self.replay_budget) =>
            {
                (Resume::Lost, position)
            }
            other => (other, position),
        }
    }
}

/// Script arguments from strings.
/// A client for `url`, parsed, not connected: the one check of a
/// `redis_url`, which the configuration makes before anything binds. The
/// error never quotes the URL (it may hold a password).
pub fn client(url: &str) -> anyhow::Result<redis::Client> {
    redis::Client::open(url).map_err(|e| anyhow::anyhow!("invalid redis_url: {e}"))
}

fn args<'a>(items: impl IntoIterator<Item = &'a str>) -> Vec<Vec<u8>> {
    items.into_iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn millis(d: Duration) -> String {
    d.as_millis().to_string()
}

/// `since` as the script takes it: offset and epoch, or two empty strings.
fn since_args(since: Option<&Position>) -> (String, String) {
    since.map_or_else(Default::default, |s| {
        (s.offset.to_string(), s.epoch.to_string())
    })
}

/// The top offset, when the script refused a `since` past it.
fn ahead(values: &[redis::Value]) -> Option<u64> {
    match values {
        [tag, top] if text(tag) == Some("ahead") => int(top),
        _ => None,
    }
}

/// Whether the script refused a connect for the id's connection limit.
fn full(values: &[redis::Value]) -> bool {
    matches!(values, [tag] if text(tag) == Some("full"))
}

/// A script answer as an array.
/// An answer, and whether it is one the script had saved for an
/// `Idempotency-Key` (marked `again` at its end): nothing was appended.
fn replayed(mut values: Vec<redis::Value>) -> (Vec<redis::Value>, bool) {
    let again = values.last().and_then(text) == Some("again");
    if again {
        values.pop();
    }
    (values, again)
}

/// A topic's client ids and their connection counts, from a flattened hash.
fn presence(flat: &[redis::Value]) -> Option<Vec<(ClientId, usize)>> {
    flat.chunks(2)
        .map(|pair| Some((ClientId::from(text(&pair[0])?), int(pair.get(1)?)? as usize)))
        .collect()
}

fn items(value: redis::Value) -> Result<Vec<redis::Value>, Unavailable> {
    array(value).ok_or_else(|| malformed("not an array"))
}

/// Undoes a connection's count when dropped: the leave (keyed by the
/// connection's token, so it undoes this connection's count once or not at
/// all) is sent until Redis has it, and the node stops listening for the id.
struct Counted {
    core: Arc<Core>,
    node: Arc<str>,
    id: ClientId,
    token: String,
    attached: bool,
    /// Its connect was queued for Redis, and may have run: a leave is owed
    /// (a connect refused before that owes none, and one held for every
    /// handshake retried while the link was down piled up without bound).
    owed: bool,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let core = &self.core;
        if self.owed {
            let rest = args([&*self.node, &*self.id, &self.token]);
            core.link.call_and_forget("leave", rest);
        }
        let channel = inbox_channel(&self.id);
        if self.attached {
            core.feed.release(channel);
        } else {
            core.feed.abandon(channel);
        }
    }
}

/// A connection counted in Redis, with its welcome (and replay) ready.
struct Admitted {
    counted: Counted,
    mode: Mode,
    frames: Vec<PreparedMessage>,
    epoch: Arc<str>,
    top: u64,
}

impl Joined for Admitted {
    fn attach(self: Box<Self>, outbox: Outbox) -> Registration {
        let Self {
            mut counted,
            mode,
            frames,
            epoch,
            top,
        } = *self;
        counted.attached = true;
        for frame in frames {
            let _ = outbox.push(Outbound::Prepared(frame));
        }
        let local =
            counted
                .core
                .registry
                .register(counted.id.clone(), outbox.clone(), mode.format());
        let channel = inbox_channel(&counted.id);
        let conn = outbox.id();
        counted.core.attach(
            &counted.node,
            channel.clone(),
            Conn {
                outbox,
                format: mode.format(),
                epoch: Some(epoch),
                last: top,
                joined_as: None,
            },
        );
        Registration::new(move || {
            counted.core.feed.detach(channel, conn);
            drop(local);
            drop(counted);
        })
    }
}

/// Undoes a subscription's count when dropped, as [`Counted`] does a
/// connection's.
struct Member {
    core: Arc<Core>,
    node: Arc<str>,
    topic: Arc<str>,
    client: ClientId,
    token: String,
    /// Whether the subscription's start ran (its connection attached), is
    /// still to run, or will not.
    stage: Arc<Mutex<Stage>>,
    /// Its join was queued for Redis: a part is owed (see [`Counted`]).
    owed: bool,
}

/// Where a subscription stands. Its start may run after its answer waited
/// behind others (so after the subscription was dropped), or never: the
/// two decide under one lock, so that the feed is told of an attach before
/// its detach, or of neither.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Waiting,
    Started,
    CalledOff,
}

impl Drop for Member {
    fn drop(&mut self) {
        let core = &self.core;
        if self.owed {
            let rest = args([&*self.node, &*self.topic, &*self.client, &self.token]);
            core.link.call_and_forget("part", rest);
        }
        let channel = topic_channel(&self.topic);
        if *self.stage.lock().unwrap_or_else(PoisonError::into_inner) == Stage::Started {
            core.feed.release(channel);
        } else {
            core.feed.abandon(channel);
        }
    }
}

impl Engine for RedisEngine {
    fn connect(
        &self,
        id: ClientId,
        mode: Mode,
        since: Option<Position>,
        max_connections: usize,
    ) -> Answer<Box<dyn Joined>, ConnectError> {
        let core = self.0.clone();
        Answer::later(async move {
            core.feed.hold(inbox_channel(&id)).await?;
            // Counted from the call on (whether or not its answer comes):
            // dropping `counted` undoes it, or does nothing if it never ran.
            let mut counted = Counted {
                core: core.clone(),
                node: core.node(),
                id: id.clone(),
                token: core.token(),
                attached: false,
                owed: true,
            };
            // Only a resume reads entries; every connect learns the position.
            let limit = if since.is_some() {
                core.inbox.max_entries
            } else {
                0
            };
            let (since_offset, since_epoch) = since_args(since.as_ref());
            let rest = args([
                &*counted.node,
                &*id,
                &counted.token,
                &since_offset,
                &since_epoch,
                &limit.to_string(),
                &max_connections.to_string(),
                &core.replay_budget.to_string(),
            ]);
            let call = core.link.try_call("connect", rest).inspect_err(|_| {
                counted.owed = false;
            })?;
            let mut values = items(call.await?)?;
            if full(&values) {
                return Err(ConnectError::Full {
                    limit: max_connections,
                });
            }
            let read = Read::parse(&mut values)?;
            let (epoch, top) = (read.epoch.clone(), read.top);
            let frames = match (mode, since) {
                (Mode::Raw, _) => Vec::new(),
                (_, None) => {
                    let at = At {
                        offset: top,
                        epoch: &epoch,
                    };
                    vec![wire::welcome(&id, at, Resumed::NotAsked)]
                }
                (_, Some(since)) => {
                    let (resume, position) = core.resume(read, &since, core.inbox.ttl);
                    let (resumed, missed) = match resume {
                        // Ahead: Redis lost messages it had given.
                        Resume::Ahead | Resume::Lost => (Resumed::Lost, Vec::new()),
                        Resume::Recovered(missed) => (Resumed::Recovered(missed.len()), missed),
                    };
                    core.metrics
                        .recovery(matches!(resumed, Resumed::Recovered(_)));
                    let at = At {
                        offset: position.offset,
                        epoch: &position.epoch,
                    };
                    let mut frames = vec![wire::welcome(&id, at, resumed)];
                    frames.extend(
                        missed
                            .iter()
                            .map(|entry| super::inbox_delivery(entry, &position.epoch)),
                    );
                    frames
                }
            };
            Ok(Box::new(Admitted {
                counted,
                mode,
                frames,
                epoch,
                top,
            }) as Box<dyn Joined>)
        })
    }

    fn send(&self, targets: &[&str], message: Message) -> Pending<Sent> {
        let inbox = self.0.inbox;
        let mut rest = args([
            message.key.as_deref().unwrap_or(""),
            &*inbox.max_entries.to_string(),
            &millis(inbox.ttl),
            message.from.as_deref().unwrap_or(""),
            &message.payload,
        ]);
        rest.extend(targets.iter().map(|t| t.as_bytes().to_vec()));
        let answer = self.0.link.call("send", rest);
        let metrics = self.0.metrics.clone();
        Answer::later(async move {
            // (target, epoch, offset, online) each: a replayed answer names
            // the first request's targets, which the retry may list otherwise.
            let (values, again) = replayed(items(answer.await?)?);
            if values.len() % 4 != 0 {
                return Err(malformed("a send"));
            }
            let mut sent = Sent::with_capacity(values.len() / 4);
            for receipt in values.chunks(4) {
                let target = text(&receipt[0]).ok_or_else(|| malformed("a target"))?;
                let offset = int(&receipt[2]).ok_or_else(|| malformed("an offset"))?;
                let online = int(&receipt[3]).ok_or_else(|| malformed("a count"))?;
                sent.0.push(Receipt {
                    client: target.into(),
                    offset,
                    delivered: online > 0,
                });
            }
            if !again {
                metrics.appends.add(sent.0.len() as u64);
            }
            Ok(sent)
        })
    }

    fn connections(&self, ids: Vec<ClientId>) -> Pending<Vec<usize>> {
        let answer = self
            .0
            .link
            .call("connections", args(ids.iter().map(|id| &**id)));
        Answer::later(async move {
            items(answer.await?)?
                .iter()
                .map(|v| int(v).map(|n| n as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed("counts"))
        })
    }

    fn publish(
        &self,
        topic: Arc<str>,
        history: Option<Retention>,
        message: Message,
    ) -> Pending<Published> {
        let (size, ttl) = history.map_or((0, Duration::ZERO), |r| (r.max_entries, r.ttl));
        let rest = args([
            message.key.as_deref().unwrap_or(""),
            &*topic,
            &size.to_string(),
            &millis(ttl),
            message.from.as_deref().unwrap_or(""),
            &message.payload,
        ]);
        let answer = self.0.link.call("publish", rest);
        let metrics = self.0.metrics.clone();
        Answer::later(async move {
            let (values, again) = replayed(items(answer.await?)?);
            let [_, offset, subscribers] = values.as_slice() else {
                return Err(malformed("a publish"));
            };
            if history.is_some() && !again {
                metrics.appends.add(1);
            }
            Ok(Published {
                subscribers: int(subscribers).ok_or_else(|| malformed("a count"))? as usize,
                offset: history
                    .map(|_| int(offset).ok_or_else(|| malformed("an offset")))
                    .transpose()?,
            })
        })
    }

    fn subscribe(&self, request: Subscribe) -> Answer<Subscribed, SubscribeRefused> {
        let core = self.0.clone();
        Answer::later(async move {
            let unavailable = SubscribeRefused::Unavailable;
            let Subscribe {
                topic,
                client,
                outbox,
                limit,
                history,
                since,
            } = request;
            let channel = topic_channel(&topic);
            core.feed.hold(channel.clone()).await.map_err(unavailable)?;
            // Counted from the call on, as a connection is (see connect).
            let mut joined = Member {
                core: core.clone(),
                node: core.node(),
                topic: topic.clone(),
                client: client.clone(),
                token: core.token(),
                stage: Arc::new(Mutex::new(Stage::Waiting)),
                owed: true,
            };
            let (since_offset, since_epoch) = since_args(since.as_ref());
            let rest = args([
                &*joined.node,
                &*topic,
                &*client,
                &joined.token,
                &limit.unwrap_or(0).to_string(),
                if history.is_some() { "1" } else { "0" },
                &since_offset,
                &since_epoch,
                &history.map_or(0, |h| h.max_entries).to_string(),
                &core.replay_budget.to_string(),
            ]);
            let call = core.link.try_call("join", rest).inspect_err(|_| {
                joined.owed = false;
            });
            let answer = call.map_err(unavailable)?.await.and_then(items);
            let mut values = answer.map_err(unavailable)?;
            if let Some(top) = ahead(&values) {
                let asked = since.as_ref().map_or(0, |s| s.offset);
                return Err(SubscribeRefused::Ahead { asked, top });
            }
            if values.first().and_then(text) != Some("ok") {
                return Err(SubscribeRefused::PubSub(SubscribeError::Full));
            }
            values.remove(0);
            // Its own join, first (as the memory engine gives it): the
            // notice that pub/sub brings may reach this node before the
            // connection is attached, or after.
            let first = values.first().and_then(int) == Some(1);
            values.remove(0);
            let announced = first && core.namespaces.find(&topic).is_some_and(|ns| ns.presence);
            let mut frames = Vec::new();
            if announced {
                frames.push(wire::presence_event(
                    &topic,
                    &client,
                    PresenceChange::Joined,
                ));
            }
            let joined_as = announced.then(|| client.clone());
            let (mut epoch, mut last) = (None, 0);
            let mut resumed = since.as_ref().map(|_| (Resumed::Lost, None));
            let mut missed: Vec<Entry> = Vec::new();
            let mut replay = None;
            if let Some(retention) = history {
                let read = Read::parse(&mut values).map_err(unavailable)?;
                epoch = Some(read.epoch.clone());
                last = read.top;
                resumed = Some(match &since {
                    // Deliveries start after `last`, so the subscriber can
                    // resume from there.
                    None => {
                        let position = Position {
                            epoch: read.epoch.clone(),
                            offset: read.top,
                        };
                        (Resumed::NotAsked, Some(position))
                    }
                    Some(since) => {
                        let position = read.position();
                        match read.resume(since, retention.ttl) {
                            // Refused by the script, before it counted.
                            Resume::Ahead | Resume::Lost => (Resumed::Lost, Some(position)),
                            Resume::Recovered(entries) => {
                                let budget = core.replay_budget;
                                let epoch = &position.epoch;
                                // Held until `start` queues it.
                                match super::admit_replay(&outbox, &entries, &topic, epoch, budget)
                                {
                                    Some(held) => {
                                        replay = Some(held);
                                        missed = entries;
                                        (Resumed::Recovered(missed.len()), Some(position))
                                    }
                                    None => (Resumed::Lost, Some(position)),
                                }
                            }
                        }
                    }
                });
            }
            if let Some(epoch) = &epoch {
                frames.extend(
                    missed
                        .iter()
                        .map(|entry| super::topic_delivery(&topic, entry, epoch)),
                );
            }
            let conn = outbox.id();
            let feed = core.feed.clone();
            let (attach, detach) = (channel.clone(), feed.clone());
            let stage = joined.stage.clone();
            let attached = stage.clone();
            let start = move || {
                let mut stage = stage.lock().unwrap_or_else(PoisonError::into_inner);
                if *stage != Stage::Waiting {
                    // Dropped while its answer waited behind others.
                    return;
                }
                *stage = Stage::Started;
                // The replay was admitted whole, within the room reserved for
                // it (and the join event is one small frame): deliveries pushed
                // since must not make them close the connection.
                for frame in frames {
                    let _ = outbox.reply(Outbound::Prepared(frame));
                }
                drop(replay);
                let conn = Conn {
                    outbox,
                    format: Mode::Envelope.format(),
                    epoch,
                    last,
                    joined_as,
                };
                feed.attach(attach, conn);
            };
            Ok(Subscribed {
                subscription: Registration::new(move || {
                    // Only a started attempt is on the channel. One called off
                    // before it started must not detach: the connection may
                    // have subscribed again meanwhile, and the feed knows
                    // connections by id (the cluster test
                    // test_subscribing_again_while_a_subscribe_waits_keeps_the_second
                    // lost its second subscription's deliveries so).
                    let mut stage = attached.lock().unwrap_or_else(PoisonError::into_inner);
                    if *stage == Stage::Started {
                        detach.detach(channel, conn);
                    } else {
                        *stage = Stage::CalledOff;
                    }
                    drop(stage);
                    drop(joined);
                }),
                resumed,
                start: Some(Box::new(start)),
            })
        })
    }

    fn presence(&self, topic: Arc<str>, page: PresencePage) -> Pending<TopicPresence> {
        let cursor = page.cursor.as_deref().unwrap_or("0");
        let limit = page.limit.to_string();
        let answer = self
            .0
            .link
            .call("presence", args([&*topic, cursor, &limit]));
        Answer::later(async move {
            let mut values = items(answer.await?)?.into_iter();
            let (Some(subscribers), Some(next), Some(members), None) =
                (values.next(), values.next(), values.next(), values.next())
            else {
                return Err(malformed("a presence page"));
            };
            let subscribers = int(&subscribers).ok_or_else(|| malformed("a count"))?;
            let next = text(&next).ok_or_else(|| malformed("a cursor"))?;
            let members = array(members).ok_or_else(|| malformed("members"))?;
            let mut clients = presence(&members).ok_or_else(|| malformed("members"))?;
            // HSCAN may give an id twice (the hash rehashed between its steps);
            // one of its counts is kept.
            clients.sort_unstable();
            clients.dedup_by(|a, b| a.0 == b.0);
            Ok(TopicPresence {
                subscribers: subscribers as usize,
                clients,
                next: (next != "0").then(|| next.to_owned()),
            })
        })
    }

    fn is_presence_cursor(&self, text: &str) -> bool {
        // HSCAN's cursors: unsigned 64-bit numbers, in at most 20 digits alone.
        text.len() <= 20 && text.bytes().all(|b| b.is_ascii_digit()) && text.parse::<u64>().is_ok()
    }

    fn disconnect(&self, id: ClientId, close: CloseReason) -> Pending<usize> {
        let rest = args([&*id, &close.code().0.to_string(), close.reason()]);
        let answer = self.0.link.call("disconnect", rest);
        Answer::later(async move {
            int(&answer.await?)
                .map(|n| n as usize)
                .ok_or_else(|| malformed("a count"))
        })
    }

    fn counts(&self) -> Pending<Counts> {
        let answer = self.0.link.call("counts", Vec::new());
        Answer::later(async move {
            let values = items(answer.await?)?;
            let count = |i: usize| {
                values
                    .get(i)
                    .and_then(int)
                    .ok_or_else(|| malformed("counts"))
            };
            Ok(Counts {
                clients: count(0)? as usize,
                topics: count(1)? as usize,
                nodes: count(2)? as usize,
            })
        })
    }

    fn nodes(&self, local: Traffic) -> Pending<Vec<NodeTraffic>> {
        let node = self.0.node();
        let answer = self.0.link.call("nodes", args([&*node]));
        Answer::later(async move {
            let values = items(answer.await?)?;
            let mut nodes = vec![NodeTraffic {
                id: node,
                traffic: local,
            }];
            for other in values.chunks(8) {
                let id = other
                    .first()
                    .and_then(text)
                    .ok_or_else(|| malformed("a node"))?;
                let mut figures = [0; 7];
                for (figure, value) in figures.iter_mut().zip(&other[1..]) {
                    *figure = int(value).ok_or_else(|| malformed("a figure"))?;
                }
                nodes.push(NodeTraffic {
                    id: id.into(),
                    traffic: Traffic::from_figures(figures),
                });
            }
            Ok(nodes)
        })
    }

    fn topics(&self, limit: usize, members: usize) -> Pending<TopicList> {
        let (limit, members) = (limit.to_string(), members.to_string());
        let answer = self.0.link.call("topics", args([&*limit, &*members]));
        Answer::later(async move {
            let mut values = items(answer.await?)?.into_iter();
            let total = values
                .next()
                .as_ref()
                .and_then(int)
                .ok_or_else(|| malformed("HLEN"))?;
            let topics = values
                .map(|topic| {
                    let mut fields = array(topic)?.into_iter();
                    let name: Arc<str> = text(&fields.next()?)?.into();
                    let subscribers = int(&fields.next()?)? as usize;
                    let clients = presence(&array(fields.next()?)?)?;
                    Some((
                        name,
                        TopicPresence {
                            subscribers,
                            clients,
                            next: None,
                        },
                    ))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| malformed("topics"))?;
            Ok(TopicList {
                total: total as usize,
                topics,
            })
        })
    }

    fn read_inbox(
        &self,
        id: ClientId,
        since: Option<Position>,
        limit: usize,
    ) -> Pending<(Page, Position)> {
        read(&self.0, "i", &id, since, limit, self.0.inbox.ttl)
    }

    fn read_topic(
        &self,
        topic: Arc<str>,
        retention: Retention,
        since: Option<Position>,
        limit: usize,
    ) -> Pending<(Page, Position)> {
        read(&self.0, "t", &topic, since, limit, retention.ttl)
    }

    fn unready(&self) -> Option<String> {
        if !self.0.link.is_up() {
            Some("cannot reach Redis".into())
        } else if !self.0.feed.is_up() {
            Some("the Redis pub/sub connection is down".into())
        } else {
            let connections = [self.0.beats.connections(), self.0.link.connections()];
            self.0.lease.unready(connections)
        }
    }

    fn save(&self, _dir: &std::path::Path) -> std::io::Result<Option<std::path::PathBuf>> {
        Ok(None)
    }
}

/// A page of a stream for the history API.
fn read(
    core: &Core,
    kind: &str,
    name: &str,
    since: Option<Position>,
    limit: usize,
    ttl: Duration,
) -> Pending<(Page, Position)> {
    let since_arg = since.as_ref().map(|s| s.offset.to_string());
    let rest = args([
        kind,
        name,
        since_arg.as_deref().unwrap_or(""),
        &limit.to_string(),
        &PAGE_BYTES.to_string(),
    ]);
    let answer = core.link.call("read", rest);
    Answer::later(async move {
        let read = Read::parse(&mut items(answer.await?)?)?;
        Ok(read.page(since.as_ref(), ttl))
    })
}
