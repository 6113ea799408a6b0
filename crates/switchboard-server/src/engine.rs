//! The engine: where client ids' connections, their inboxes and their
//! messages live. The relay and the HTTP API call it; neither knows which
//! engine runs. [`MemoryEngine`] is the embedded one (one process); a Redis
//! engine for several nodes implements the same trait (docs/architecture.md,
//! "The engine").
//!
//! Every message sent to a client id is appended to that id's inbox stream,
//! whether or not the id is connected, and handed to its live connections in
//! offset order. A `switchboard.v1` connection is told its inbox's position
//! first (the welcome), and one that asks to resume from a position gets
//! every message after it, or is told that it cannot: never part of them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::value::RawValue;
use switchboard::{
    Broker, ClientId, Format, Outbound, Outbox, PreparedMessage, PubSub, Registration, Registry,
    SubscribeError, Subscription,
};

use crate::snapshot::{self, Loaded};
use crate::streams::{Entry, Page, Position, Resume, Retention, StreamKey, Streams};
use crate::wire::{self, At, Mode, Resumed};

/// A message to client ids.
#[derive(Debug, Clone, Copy)]
pub struct Direct<'a> {
    /// The sender, when a client sent it.
    pub from: Option<&'a str>,
    /// The payload's JSON text.
    pub payload: &'a RawValue,
}

/// What became of a message to client ids.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sent<'t> {
    /// Targets with a live connection that took it.
    pub delivered: Vec<&'t str>,
    /// Targets with none: it waits in their inboxes.
    pub offline: Vec<&'t str>,
    /// The offset each target's inbox gave it.
    pub offsets: Vec<(&'t str, u64)>,
}

/// What became of a message published to a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Subscribed connections that took it.
    pub subscribers: usize,
    /// Its offset in the topic's stream, when the topic keeps history.
    pub offset: Option<u64>,
}

/// A subscription, and what resuming it found.
pub struct Subscribed {
    /// Dropping it unsubscribes.
    pub subscription: Subscription,
    /// When it asked to resume: whether it did, and the topic's position
    /// (`None` for a topic that keeps no history: nothing can be recovered).
    pub resumed: Option<(Resumed, Option<Position>)>,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscribeRefused {
    /// The pub/sub's refusal (full, or subscribed already).
    PubSub(SubscribeError),
    /// `since` is past the topic's last offset under its epoch.
    Ahead {
        /// The offset asked for.
        asked: u64,
        /// The topic's last offset.
        top: u64,
    },
}

/// Why a connection was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// It asked to resume from an offset its inbox never reached.
    #[error("since is ahead of this client's inbox (offset {asked} > {top})")]
    Ahead {
        /// The offset asked for.
        asked: u64,
        /// The inbox's last offset.
        top: u64,
    },
}

/// Routing and inboxes for client ids.
pub trait Engine: Send + Sync + 'static {
    /// Registers a live connection of `id` speaking `mode`. A `switchboard.v1`
    /// connection's outbox gets the welcome first, then, when it asked to
    /// resume from `since`, every inbox message after it; live messages follow,
    /// with no gap and no duplicate. A position that cannot be recovered is
    /// said so in the welcome (check it first with [`Engine::check_since`]).
    /// Dropping the registration removes the connection.
    fn connect(
        &self,
        id: ClientId,
        outbox: Outbox,
        mode: Mode,
        since: Option<&Position>,
    ) -> Registration;

    /// Appends `message` to each target's inbox and hands it to the target's
    /// live connections.
    fn send<'t>(&self, targets: Vec<&'t str>, message: Direct<'_>) -> Sent<'t>;

    /// Checks `since` against `id`'s inbox before a connection is let in.
    fn check_since(&self, id: &str, since: &Position) -> Result<(), ConnectError>;

    /// How many live connections `id` has.
    fn connections(&self, id: &str) -> usize;

    /// Publishes `message` to `topic`'s subscribers; with `history`, appends
    /// it to the topic's stream first, and the deliveries carry its offset.
    fn publish(&self, topic: &str, history: Option<Retention>, message: Direct<'_>) -> Published;

    /// Subscribes a connection of `client` to `topic`. With `since` (and a
    /// topic that keeps history) the messages after it are put in the
    /// connection's outbox before any live one, all of them or none.
    fn subscribe(
        &self,
        topic: &str,
        client: ClientId,
        outbox: &Outbox,
        limit: Option<usize>,
        history: Option<Retention>,
        since: Option<&Position>,
    ) -> Result<Subscribed, SubscribeRefused>;

    /// Up to `limit` messages of `id`'s inbox: the latest, or those right
    /// after `since`.
    fn read_inbox(&self, id: &str, since: Option<&Position>, limit: usize) -> (Page, Position);

    /// Up to `limit` messages of `topic`'s history, kept as `retention` says.
    fn read_topic(
        &self,
        topic: &str,
        retention: Retention,
        since: Option<&Position>,
        limit: usize,
    ) -> (Page, Position);

    /// Called once serving has stopped: an engine that holds its streams in
    /// this process writes them to `dir` (and returns the file); one whose
    /// streams live elsewhere has nothing to write.
    fn save(&self, dir: &Path) -> io::Result<Option<PathBuf>>;
}

/// How long and how much inboxes keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxRetention {
    /// Messages per inbox.
    pub size: usize,
    /// Their age.
    pub ttl: Duration,
}

/// The embedded engine: a [`Registry`] of live connections and [`Streams`]
/// in memory.
pub struct MemoryEngine {
    registry: Registry,
    pubsub: PubSub,
    streams: Streams,
    inbox: Retention,
    replay_budget: usize,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEngine")
            .field("registry", &self.registry)
            .field("streams", &self.streams)
            .finish_non_exhaustive()
    }
}

impl MemoryEngine {
    /// An engine over `registry`, keeping inboxes as `inbox` says, within
    /// `max_bytes` of history in all.
    /// With `snapshot`, the streams start as a graceful stop left them.
    /// A resume is replayed whole only when its frames fit `replay_budget`
    /// bytes: they all go into the connection's outbound queue at once, and
    /// one that overflowed it would be cut short as a slow consumer after
    /// the client was told it recovered (give half of `max_outbound_bytes`).
    pub fn new(
        registry: Registry,
        pubsub: PubSub,
        inbox: InboxRetention,
        max_bytes: usize,
        replay_budget: usize,
        snapshot: Option<Loaded>,
    ) -> Self {
        let streams = match snapshot {
            Some(loaded) => Streams::restore(max_bytes, loaded.epoch, loaded.streams),
            None => Streams::new(max_bytes),
        };
        Self {
            registry,
            pubsub,
            streams,
            replay_budget,
            inbox: Retention {
                max_entries: inbox.size,
                ttl: inbox.ttl,
            },
        }
    }

    /// Bytes of history held now.
    pub fn history_bytes(&self) -> usize {
        self.streams.bytes()
    }

    /// Whether replaying `missed` fits the replay budget: all or nothing, so
    /// a replay that could not be whole says so instead of being cut off.
    fn fits(&self, missed: &[Entry]) -> bool {
        // The envelope's own fields, a frame header, and the epoch.
        const FRAME: usize = 96;
        let bytes: usize = missed
            .iter()
            .map(|e| FRAME + e.payload.len() + e.from.as_deref().map_or(0, str::len))
            .sum();
        bytes <= self.replay_budget
    }
}

fn inbox(id: &str) -> StreamKey {
    StreamKey::Inbox(id.into())
}

impl Engine for MemoryEngine {
    fn connect(
        &self,
        id: ClientId,
        outbox: Outbox,
        mode: Mode,
        since: Option<&Position>,
    ) -> Registration {
        let key = StreamKey::Inbox(id.clone());
        let register = |frames: Vec<PreparedMessage>| {
            // Under the inbox's lock: nothing appended to it can reach this
            // connection before these frames, or be among them and after them.
            for frame in frames {
                let _ = outbox.push(Outbound::Prepared(frame));
            }
            self.registry
                .register(id.clone(), outbox.clone(), mode.format())
        };
        if mode == Mode::Raw {
            // No welcome and no offsets: nothing to order against the inbox.
            return self.registry.register(id, outbox, mode.format());
        }
        let Some(since) = since else {
            return self.streams.position(&key, |position| {
                register(vec![wire::welcome(&id, at(position), Resumed::NotAsked)])
            });
        };
        self.streams
            .resume(&key, since, self.inbox, usize::MAX, |resume, position| {
                let (resumed, missed) = match resume {
                    // Checked before the upgrade; a stream's top only grows.
                    Resume::Ahead | Resume::Lost => (Resumed::Lost, Vec::new()),
                    Resume::Recovered(missed) if !self.fits(&missed) => (Resumed::Lost, Vec::new()),
                    Resume::Recovered(missed) => (Resumed::Recovered(missed.len()), missed),
                };
                let mut frames = vec![wire::welcome(&id, at(position), resumed)];
                frames.extend(missed.iter().map(|entry| replay(entry, &position.epoch)));
                register(frames)
            })
    }

    fn send<'t>(&self, targets: Vec<&'t str>, message: Direct<'_>) -> Sent<'t> {
        // The payload is copied once, for every inbox that keeps it.
        let payload: Arc<str> = message.payload.get().into();
        let from: Option<Arc<str>> = message.from.map(Arc::from);
        let raw = OnceLock::new();
        let mut sent = Sent::default();
        for target in targets {
            let reached = self.streams.append(
                &inbox(target),
                from.clone(),
                payload.clone(),
                self.inbox,
                |entry, epoch| {
                    let at = At {
                        offset: entry.offset,
                        epoch,
                    };
                    let render = |format: Format| {
                        if format == Mode::Raw.format() {
                            raw.get_or_init(|| wire::raw_delivery(message.payload))
                                .clone()
                        } else {
                            let payload = message.payload.get();
                            wire::envelope_delivery(message.from, None, payload, Some(at))
                        }
                    };
                    (self.registry.push(target, &render), entry.offset)
                },
            );
            let (connections, offset) = reached;
            sent.offsets.push((target, offset));
            if connections > 0 {
                sent.delivered.push(target);
            } else {
                sent.offline.push(target);
            }
        }
        sent
    }

    fn check_since(&self, id: &str, since: &Position) -> Result<(), ConnectError> {
        self.streams.position(&inbox(id), |position| {
            if since.epoch == position.epoch && since.offset > position.offset {
                Err(ConnectError::Ahead {
                    asked: since.offset,
                    top: position.offset,
                })
            } else {
                Ok(())
            }
        })
    }

    fn connections(&self, id: &str) -> usize {
        self.registry.connections(id)
    }

    fn publish(&self, topic: &str, history: Option<Retention>, message: Direct<'_>) -> Published {
        let payload = message.payload.get();
        let Some(retention) = history else {
            let frame = wire::envelope_delivery(message.from, Some(topic), payload, None);
            let subscribers = self.pubsub.publish(topic, &|_| frame.clone());
            return Published {
                subscribers,
                offset: None,
            };
        };
        let key = StreamKey::Topic(topic.into());
        let from = message.from.map(Arc::from);
        self.streams
            .append(&key, from, payload.into(), retention, |entry, epoch| {
                let at = At {
                    offset: entry.offset,
                    epoch,
                };
                let frame = wire::envelope_delivery(message.from, Some(topic), payload, Some(at));
                Published {
                    subscribers: self.pubsub.publish(topic, &|_| frame.clone()),
                    offset: Some(entry.offset),
                }
            })
    }

    fn subscribe(
        &self,
        topic: &str,
        client: ClientId,
        outbox: &Outbox,
        limit: Option<usize>,
        history: Option<Retention>,
        since: Option<&Position>,
    ) -> Result<Subscribed, SubscribeRefused> {
        // Topics are for switchboard.v1 connections only.
        let format = Mode::Envelope.format();
        let join = || {
            self.pubsub
                .subscribe(topic, client.clone(), outbox, format, limit)
                .map_err(SubscribeRefused::PubSub)
        };
        let (Some(retention), Some(since)) = (history, since) else {
            let subscription = join()?;
            let resumed = since.map(|_| (Resumed::Lost, None));
            return Ok(Subscribed {
                subscription,
                resumed,
            });
        };
        let key = StreamKey::Topic(topic.into());
        self.streams
            .resume(&key, since, retention, usize::MAX, |resume, position| {
                let (resumed, missed) = match resume {
                    Resume::Ahead => {
                        return Err(SubscribeRefused::Ahead {
                            asked: since.offset,
                            top: position.offset,
                        });
                    }
                    Resume::Lost => (Resumed::Lost, Vec::new()),
                    Resume::Recovered(missed) if !self.fits(&missed) => (Resumed::Lost, Vec::new()),
                    Resume::Recovered(missed) => (Resumed::Recovered(missed.len()), missed),
                };
                // Under the stream's lock: a publish after this one reaches the
                // new subscriber after the missed messages, never among them.
                let subscription = join()?;
                for entry in &missed {
                    let at = At {
                        offset: entry.offset,
                        epoch: &position.epoch,
                    };
                    let frame = wire::envelope_delivery(
                        entry.from.as_deref(),
                        Some(topic),
                        &entry.payload,
                        Some(at),
                    );
                    let _ = outbox.push(Outbound::Prepared(frame));
                }
                Ok(Subscribed {
                    subscription,
                    resumed: Some((resumed, Some(position.clone()))),
                })
            })
    }

    fn read_inbox(&self, id: &str, since: Option<&Position>, limit: usize) -> (Page, Position) {
        self.streams.read(&inbox(id), since, self.inbox, limit)
    }

    fn read_topic(
        &self,
        topic: &str,
        retention: Retention,
        since: Option<&Position>,
        limit: usize,
    ) -> (Page, Position) {
        let key = StreamKey::Topic(topic.into());
        self.streams.read(&key, since, retention, limit)
    }

    fn save(&self, dir: &Path) -> io::Result<Option<PathBuf>> {
        let (epoch, streams) = self.streams.export();
        snapshot::save(dir, &epoch, &streams).map(Some)
    }
}

fn at(position: &Position) -> At<'_> {
    At {
        offset: position.offset,
        epoch: &position.epoch,
    }
}

/// A missed inbox message, as a `switchboard.v1` delivery.
fn replay(entry: &Entry, epoch: &str) -> PreparedMessage {
    let at = At {
        offset: entry.offset,
        epoch,
    };
    wire::envelope_delivery(entry.from.as_deref(), None, &entry.payload, Some(at))
}
