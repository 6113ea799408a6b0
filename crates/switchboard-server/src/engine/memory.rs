//! The embedded engine: one process, its streams in memory (saved to the
//! data directory on a graceful stop).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use switchboard::{
    Broker, ClientId, CloseReason, Format, Outbound, Outbox, PreparedMessage, PubSub, Registration,
    Registry,
};

use super::{
    Answer, ConnectError, Counts, Engine, Joined, Message, NodeTraffic, PAGE_BYTES, Pending,
    PresencePage, Published, Receipt, Sent, Subscribe, SubscribeRefused, Subscribed, TopicList,
    TopicPresence, Traffic, ready,
};
use crate::ids;
use crate::metrics::Metrics;
use crate::snapshot::{self, Loaded};
use crate::streams::{Page, Position, Resume, Retention, StreamKey, StreamRef, Streams, now_ms};
use crate::wire::{self, At, Mode, Resumed};

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
#[derive(Clone)]
pub struct MemoryEngine(Arc<Core>);

struct Core {
    registry: Registry,
    /// Connections let in and not yet registered, by client id: counted
    /// with the registered ones against the limit.
    connecting: Mutex<HashMap<ClientId, usize>>,
    pubsub: PubSub,
    streams: Streams,
    inbox: Retention,
    replay_budget: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for MemoryEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryEngine")
            .field("registry", &self.0.registry)
            .field("streams", &self.0.streams)
            .finish_non_exhaustive()
    }
}

impl MemoryEngine {
    /// An engine over `registry`, keeping inboxes as `inbox` says, within
    /// `max_bytes` of history in all.
    /// With `snapshot`, the streams start as a graceful stop left them.
    /// A resume is replayed whole only when its frames fit `replay_budget`
    /// bytes (see [`super::fits`]). `metrics` counts appends and resumes.
    pub fn new(
        registry: Registry,
        pubsub: PubSub,
        inbox: InboxRetention,
        max_bytes: usize,
        replay_budget: usize,
        snapshot: Option<Loaded>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let streams = match snapshot {
            Some(loaded) => Streams::restore(max_bytes, loaded.epochs, loaded.streams),
            None => Streams::new(max_bytes),
        };
        Self(Arc::new(Core {
            registry,
            connecting: Mutex::default(),
            pubsub,
            streams,
            replay_budget,
            inbox: inbox.retention(),
            metrics,
        }))
    }

    /// Bytes of history held now.
    pub fn history_bytes(&self) -> usize {
        self.0.streams.bytes()
    }
}

impl InboxRetention {
    /// As a stream's retention.
    pub fn retention(self) -> Retention {
        Retention {
            max_entries: self.size,
            ttl: self.ttl,
        }
    }
}

impl Core {
    /// Counts a connection of `id` as on its way, unless it has `max` already.
    fn reserve(self: &Arc<Self>, id: &ClientId, max: usize) -> Result<Reserved, ConnectError> {
        let mut connecting = self.connecting.lock().unwrap_or_else(|e| e.into_inner());
        let coming = connecting.get(id).copied().unwrap_or(0);
        // A connection that registers is counted twice until its
        // reservation goes: a refusal at the limit then, never one too many.
        if self.registry.connections(id) + coming >= max {
            return Err(ConnectError::Full { limit: max });
        }
        *connecting.entry(id.clone()).or_default() += 1;
        Ok(Reserved {
            core: self.clone(),
            id: id.clone(),
        })
    }
}

/// A connection counted as on its way, until it is registered or given up.
struct Reserved {
    core: Arc<Core>,
    id: ClientId,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        let mut connecting = self
            .core
            .connecting
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(coming) = connecting.get_mut(&self.id) {
            *coming -= 1;
            if *coming == 0 {
                connecting.remove(&self.id);
            }
        }
    }
}

/// A connection let in, registered when its outbox is attached.
struct Admitted {
    core: Arc<Core>,
    id: ClientId,
    mode: Mode,
    since: Option<Position>,
    reserved: Reserved,
}

impl Joined for Admitted {
    fn attach(self: Box<Self>, outbox: Outbox) -> Registration {
        let Self {
            core,
            id,
            mode,
            since,
            reserved,
        } = *self;
        let registration = register(&core, id, mode, since, outbox);
        // Given back only once registered: at no moment is the connection
        // left out of both counts.
        drop(reserved);
        registration
    }
}

/// Registers a connection let in, with its welcome (and what it resumes).
fn register(
    core: &Arc<Core>,
    id: ClientId,
    mode: Mode,
    since: Option<Position>,
    outbox: Outbox,
) -> Registration {
    let key = StreamKey::Inbox(id.clone());
    let register = |frames: Vec<PreparedMessage>| {
        // Under the inbox's lock: nothing appended to it can reach this
        // connection before these frames, or be among them and after them.
        for frame in frames {
            let _ = outbox.push(Outbound::Prepared(frame));
        }
        core.registry
            .register(id.clone(), outbox.clone(), mode.format())
    };
    if mode == Mode::Raw {
        // No welcome and no offsets: nothing to order against the inbox.
        return core.registry.register(id, outbox, mode.format());
    }
    let Some(since) = since else {
        return core.streams.position(&key, |position| {
            register(vec![wire::welcome(&id, at(position), Resumed::NotAsked)])
        });
    };
    core.streams.resume(
        &key,
        &since,
        core.inbox,
        super::most_replayed(core.replay_budget),
        |resume, position| {
            let (resumed, missed) = match resume {
                // Ahead: history restored from an older copy than the
                // client saw, or a position from another store.
                Resume::Ahead | Resume::Lost => (Resumed::Lost, Vec::new()),
                Resume::Recovered(missed)
                    if !super::fits(&missed, None, &position.epoch, core.replay_budget) =>
                {
                    (Resumed::Lost, Vec::new())
                }
                Resume::Recovered(missed) => (Resumed::Recovered(missed.len()), missed),
            };
            core.metrics
                .recovery(matches!(resumed, Resumed::Recovered(_)));
            let mut frames = vec![wire::welcome(&id, at(position), resumed)];
            frames.extend(
                missed
                    .iter()
                    .map(|entry| super::inbox_delivery(entry, &position.epoch)),
            );
            register(frames)
        },
    )
}

impl Core {
    fn send(&self, targets: &[&str], message: &Message) -> Sent {
        let payload = &*message.payload;
        let raw_frame = OnceLock::new();
        let mut sent = Sent::with_capacity(targets.len());
        let at_ms = now_ms();
        for &target in targets {
            let (client, connections, offset) = self.streams.append(
                StreamRef::Inbox(target),
                message.from.clone(),
                message.payload.clone(),
                self.inbox,
                at_ms,
                |entry, epoch, key| {
                    let at = At {
                        offset: entry.offset,
                        epoch,
                    };
                    let render = |format: Format| {
                        if format == Mode::Raw.format() {
                            raw_frame
                                .get_or_init(|| wire::raw_delivery(payload))
                                .clone()
                        } else {
                            let from = message.from.as_deref();
                            wire::envelope_delivery(from, None, payload, Some(at))
                        }
                    };
                    // The inbox's own key names the target: no id is made per target.
                    let (StreamKey::Inbox(client) | StreamKey::Topic(client)) = key;
                    let connections = self.registry.push(target, &render);
                    (client.clone(), connections, entry.offset)
                },
            );
            sent.0.push(Receipt {
                client,
                offset,
                delivered: connections > 0,
            });
        }
        // Once per message, not per target, as the Redis engine counts.
        self.metrics.appends.add(sent.0.len() as u64);
        sent
    }

    fn publish(&self, topic: &str, history: Option<Retention>, message: &Message) -> Published {
        let payload = &*message.payload;
        let from = message.from.as_deref();
        let Some(retention) = history else {
            let frame = wire::envelope_delivery(from, Some(topic), payload, None);
            let subscribers = self.pubsub.publish(topic, &|_| frame.clone());
            return Published {
                subscribers,
                offset: None,
            };
        };
        self.metrics.appends.add(1);
        self.streams.append(
            StreamRef::Topic(topic),
            message.from.clone(),
            message.payload.clone(),
            retention,
            now_ms(),
            |entry, epoch, _| {
                let at = At {
                    offset: entry.offset,
                    epoch,
                };
                let frame = wire::envelope_delivery(from, Some(topic), payload, Some(at));
                Published {
                    subscribers: self.pubsub.publish(topic, &|_| frame.clone()),
                    offset: Some(entry.offset),
                }
            },
        )
    }

    fn subscribe(&self, request: &Subscribe) -> Result<Subscribed, SubscribeRefused> {
        let Subscribe {
            topic,
            client,
            outbox,
            limit,
            history,
            since,
        } = request;
        // Topics are for switchboard.v1 connections only.
        let format = Mode::Envelope.format();
        let join = || {
            let subscription = self
                .pubsub
                .subscribe(topic, client.clone(), outbox, format, *limit)
                .map_err(SubscribeRefused::PubSub)?;
            Ok(Registration::new(move || drop(subscription)))
        };
        let key = StreamKey::Topic(topic.clone());
        let Some(retention) = history else {
            let subscription = join()?;
            let resumed = since.as_ref().map(|_| (Resumed::Lost, None));
            return Ok(Subscribed {
                subscription,
                resumed,
                start: None,
            });
        };
        let Some(since) = since else {
            // Under the stream's lock: the position names the last message
            // this subscriber will not be sent, so it can resume from it.
            return self.streams.position(&key, |position| {
                Ok(Subscribed {
                    subscription: join()?,
                    resumed: Some((Resumed::NotAsked, Some(position.clone()))),
                    start: None,
                })
            });
        };
        self.streams.resume(
            &key,
            since,
            *retention,
            super::most_replayed(self.replay_budget),
            |resume, position| {
                let (resumed, missed, held) = match resume {
                    Resume::Ahead => {
                        return Err(SubscribeRefused::Ahead {
                            asked: since.offset,
                            top: position.offset,
                        });
                    }
                    Resume::Lost => (Resumed::Lost, Vec::new(), None),
                    Resume::Recovered(missed) => {
                        let budget = self.replay_budget;
                        match super::admit_replay(outbox, &missed, topic, &position.epoch, budget) {
                            Some(held) => (Resumed::Recovered(missed.len()), missed, Some(held)),
                            None => (Resumed::Lost, Vec::new(), None),
                        }
                    }
                };
                // Under the stream's lock: a publish after this one reaches the
                // new subscriber after the missed messages, never among them.
                let subscription = join()?;
                for entry in &missed {
                    let frame = super::topic_delivery(topic, entry, &position.epoch);
                    let _ = outbox.reply(Outbound::Prepared(frame));
                }
                drop(held);
                Ok(Subscribed {
                    subscription,
                    resumed: Some((resumed, Some(position.clone()))),
                    start: None,
                })
            },
        )
    }
}

impl Engine for MemoryEngine {
    fn connect(
        &self,
        id: ClientId,
        mode: Mode,
        since: Option<Position>,
        max_connections: usize,
    ) -> Answer<Box<dyn Joined>, ConnectError> {
        let admitted = (|| {
            let reserved = self.0.reserve(&id, max_connections)?;
            Ok(Box::new(Admitted {
                core: self.0.clone(),
                id,
                mode,
                since,
                reserved,
            }) as Box<dyn Joined>)
        })();
        Answer::now(admitted)
    }

    fn send(&self, targets: &[&str], message: Message) -> Pending<Sent> {
        ready(self.0.send(targets, &message))
    }

    fn connections(&self, ids: Vec<ClientId>) -> Pending<Vec<usize>> {
        ready(
            ids.iter()
                .map(|id| self.0.registry.connections(id))
                .collect(),
        )
    }

    fn publish(
        &self,
        topic: Arc<str>,
        history: Option<Retention>,
        message: Message,
    ) -> Pending<Published> {
        ready(self.0.publish(&topic, history, &message))
    }

    fn subscribe(&self, request: Subscribe) -> Answer<Subscribed, SubscribeRefused> {
        Answer::now(self.0.subscribe(&request))
    }

    fn presence(&self, topic: Arc<str>, page: PresencePage) -> Pending<TopicPresence> {
        let pubsub = &self.0.pubsub;
        // Pages go by client id: the cursor is the last id of the page before.
        let (clients, more) = pubsub.presence_page(&topic, page.cursor.as_deref(), page.limit);
        let next = more
            .then(|| clients.last().map(|(id, _)| id.to_string()))
            .flatten();
        ready(TopicPresence {
            subscribers: pubsub.subscribers(&topic),
            clients,
            next,
        })
    }

    fn is_presence_cursor(&self, text: &str) -> bool {
        ids::is_valid(text)
    }

    fn disconnect(&self, id: ClientId, close: CloseReason) -> Pending<usize> {
        let connections = self.0.registry.lookup(&id);
        for outbox in &connections {
            outbox.close(close.clone());
        }
        ready(connections.len())
    }

    fn counts(&self) -> Pending<Counts> {
        ready(Counts {
            clients: self.0.registry.clients(),
            topics: self.0.pubsub.topics(),
            nodes: 1,
        })
    }

    fn nodes(&self, local: Traffic) -> Pending<Vec<NodeTraffic>> {
        ready(vec![NodeTraffic {
            id: "local".into(),
            traffic: local,
        }])
    }

    fn topics(&self, limit: usize, members: usize) -> Pending<TopicList> {
        let pubsub = &self.0.pubsub;
        let topics = pubsub
            .biggest(limit, members)
            .into_iter()
            .map(|summary| {
                let presence = TopicPresence {
                    subscribers: summary.subscribers,
                    clients: summary.members,
                    next: None,
                };
                (summary.topic, presence)
            })
            .collect();
        ready(TopicList {
            total: pubsub.topics(),
            topics,
        })
    }

    fn read_inbox(
        &self,
        id: ClientId,
        since: Option<Position>,
        limit: usize,
    ) -> Pending<(Page, Position)> {
        let key = StreamKey::Inbox(id);
        ready(
            self.0
                .streams
                .read(&key, since.as_ref(), self.0.inbox, limit, PAGE_BYTES),
        )
    }

    fn read_topic(
        &self,
        topic: Arc<str>,
        retention: Retention,
        since: Option<Position>,
        limit: usize,
    ) -> Pending<(Page, Position)> {
        let key = StreamKey::Topic(topic);
        let read = self
            .0
            .streams
            .read(&key, since.as_ref(), retention, limit, PAGE_BYTES);
        ready(read)
    }

    fn unready(&self) -> Option<String> {
        None
    }

    fn save(&self, dir: &Path) -> io::Result<Option<PathBuf>> {
        let (epochs, streams) = self.0.streams.export();
        snapshot::save(dir, &epochs, &streams).map(Some)
    }
}

fn at(position: &Position) -> At<'_> {
    At {
        offset: position.offset,
        epoch: &position.epoch,
    }
}
