//! Pub/sub: the channels this node listens to, and handing what they carry
//! to its connections.
//!
//! A node listens to a client id's channel while it holds a connection of
//! that id, and to a topic's while it holds a subscriber: only the nodes
//! that need a message receive it. Pub/sub only says that something is new;
//! the stream is the truth. Each connection remembers the last offset it was
//! given, so a message it has is dropped, the next one is delivered, and one
//! past a gap makes the node read the gap from the stream first. After the
//! pub/sub connection drops, the node subscribes again and reads every
//! stream it serves from where its connections are; after notices were
//! dropped over the backlog's bound (`backlog`), it reads the streams of
//! their channels. A pub/sub connection that stays open but stops answering
//! (a link gone silent, with no reset to end it) counts as dropped once a
//! command on it has waited for a lease: the node is pinged each fifth of
//! the lease while nothing else is asked of it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus::{IntCounter, IntGauge};
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ErrorKind, RedisResult};
use switchboard::{
    ClientId, CloseCode, CloseReason, ConnId, Format, Outbox, PreparedMessage, PresenceChange,
};
use tokio::sync::{mpsc, oneshot};

use super::backlog::{Backlog, Heard, Hearing};
use super::link::{Link, TIMEOUT};
use super::reply::{Read, array};
use crate::engine::Unavailable;
use crate::topics::Namespaces;
use crate::wire::{self, At, Mode};

/// Entries read per gap fill.
const FILL_BATCH: usize = 1000;
/// Bytes of entries read per gap fill, but for the first: 1,000 big entries
/// in one reply would hold up the link every call shares.
const FILL_BYTES: usize = 4 << 20;
/// How soon a gap fill that Redis could not answer is tried again.
const RETRY: Duration = Duration::from_millis(500);
/// Streams renewed in one call: a bounded step for Redis.
const RENEW_BATCH: usize = 500;

/// The channel of a client id's inbox.
pub(super) fn inbox_channel(id: &str) -> String {
    format!("sb:c:i:{id}")
}

/// The channel of a topic.
pub(super) fn topic_channel(topic: &str) -> String {
    format!("sb:c:t:{topic}")
}

/// A connection on a channel, and where it stands in the channel's stream.
pub(super) struct Conn {
    /// Where its messages go.
    pub outbox: Outbox,
    /// Its wire format.
    pub format: Format,
    /// The stream's epoch it follows (`None`: a topic without history).
    pub epoch: Option<Arc<str>>,
    /// The last offset it has been given.
    pub last: u64,
    /// A topic subscriber whose own join it was given at subscribe: the
    /// join's notice from pub/sub is not given again.
    pub joined_as: Option<ClientId>,
}

enum Command {
    /// A connection of this channel is coming: its offsets count from now.
    Expect(String),
    /// It will not come after all.
    Abandon(String),
    Attach {
        channel: String,
        conn: Conn,
    },
    Detach {
        channel: String,
        conn: ConnId,
    },
    Resync,
    CloseAll(CloseReason),
}

enum Control {
    Hold {
        channel: String,
        reply: oneshot::Sender<Result<(), Unavailable>>,
    },
    Release(String),
    /// The pub/sub connection of this generation ended (an older one's end
    /// is not news).
    Lost(u64),
}

/// How the feed holds what pub/sub brings, and what it reports.
pub(super) struct FeedSettings {
    /// Most bytes of notices held for the delivery task (see `backlog`).
    pub backlog: usize,
    /// How many channels the delivery task keeps state for.
    pub channels: IntGauge,
    /// Notices dropped over the backlog's bound.
    pub dropped: IntCounter,
    /// The node's lease: the longest a pub/sub command may wait for Redis
    /// before the connection counts as lost.
    pub lease: Duration,
    /// Counts the connections made again after one was lost.
    pub reconnects: IntCounter,
    /// How often the positions of the streams the node's clients are on are
    /// renewed in Redis.
    pub renew: Duration,
}

/// The node's pub/sub side.
#[derive(Clone)]
pub(super) struct Feed {
    control: mpsc::UnboundedSender<Control>,
    commands: mpsc::UnboundedSender<Command>,
    up: Arc<AtomicBool>,
}

impl Feed {
    /// Starts the subscriber and the delivery task on the current runtime.
    /// `client` must speak RESP3 (pub/sub on a multiplexed connection).
    pub(super) fn start(
        client: redis::Client,
        link: Link,
        namespaces: Arc<Namespaces>,
        settings: FeedSettings,
    ) -> Self {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let (listen, listen_rx) = mpsc::unbounded_channel();
        let up = Arc::new(AtomicBool::new(false));
        let delivery = Delivery {
            streams: HashMap::new(),
            link,
            namespaces,
            unfilled: HashSet::new(),
            channels: settings.channels,
            renew: settings.renew,
        };
        tokio::spawn(delivery.run(commands_rx, listen_rx));
        let subscriber = Subscriber {
            client,
            held: HashMap::new(),
            orphans: Vec::new(),
            commands: commands.clone(),
            listen,
            up: up.clone(),
            backlog: settings.backlog,
            dropped: settings.dropped,
            lease: settings.lease,
            reconnects: settings.reconnects,
            generation: 0,
            control: control.downgrade(),
        };
        tokio::spawn(subscriber.run(control_rx));
        Self {
            control,
            commands,
            up,
        }
    }

    /// Whether the pub/sub connection is up.
    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Listens to `channel` (counted: each hold needs a release). Resolves
    /// once Redis has confirmed the subscription, so anything published
    /// after that reaches this node. A refused hold needs no release; nor
    /// does one whose future is dropped before it resolves (the subscriber
    /// gives it back itself, or, if the grant came first, the future does).
    pub(super) async fn hold(&self, channel: String) -> Result<(), Unavailable> {
        // Before the subscription: the delivery task keeps the channel's
        // place from the first message it hears.
        let _ = self.commands.send(Command::Expect(channel.clone()));
        let (reply, answer) = oneshot::channel();
        self.control
            .send(Control::Hold {
                channel: channel.clone(),
                reply,
            })
            .map_err(|_| Unavailable("the pub/sub task stopped".into()))?;
        let mut waiting = Waiting {
            feed: self,
            channel,
            answer,
        };
        (&mut waiting.answer)
            .await
            .map_err(|_| Unavailable("the pub/sub task stopped".into()))?
    }

    /// Gives back a hold whose connection was attached (and detached).
    pub(super) fn release(&self, channel: String) {
        let _ = self.control.send(Control::Release(channel));
    }

    /// Gives back a hold whose connection never attached.
    pub(super) fn abandon(&self, channel: String) {
        let _ = self.commands.send(Command::Abandon(channel.clone()));
        self.release(channel);
    }

    /// Starts live delivery to a connection, from the offset it was given.
    pub(super) fn attach(&self, channel: String, conn: Conn) {
        let _ = self.commands.send(Command::Attach { channel, conn });
    }

    /// Stops live delivery to a connection.
    pub(super) fn detach(&self, channel: String, conn: ConnId) {
        let _ = self.commands.send(Command::Detach { channel, conn });
    }

    /// Closes every connection this node serves.
    pub(super) fn close_all(&self, reason: CloseReason) {
        let _ = self.commands.send(Command::CloseAll(reason));
    }
}

/// A hold's answer, until it is taken. A hold dropped first (its connect was
/// dropped: the client gave up on its handshake) gives back what was granted
/// to nobody: either the subscriber finds the caller gone as it answers (and
/// gives the hold back itself, an orphan), or the answer is here, unread.
struct Waiting<'f> {
    feed: &'f Feed,
    channel: String,
    answer: oneshot::Receiver<Result<(), Unavailable>>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Closed first, so that an answer comes here or finds nobody, never both.
        self.answer.close();
        if let Ok(Ok(())) = self.answer.try_recv() {
            self.feed.abandon(std::mem::take(&mut self.channel));
        }
    }
}

/// Owns the pub/sub connection and the count of holds per channel. One task
/// does every SUBSCRIBE and UNSUBSCRIBE, in order, batching those that
/// arrive together.
struct Subscriber {
    client: redis::Client,
    held: HashMap<String, usize>,
    /// Holds granted to callers that had gone by then (a connect dropped
    /// while it waited): released at the next turn, as nobody else will.
    orphans: Vec<String>,
    commands: mpsc::UnboundedSender<Command>,
    /// Hands each new connection's notices to the delivery task.
    listen: mpsc::UnboundedSender<Arc<Backlog>>,
    up: Arc<AtomicBool>,
    /// The bound of each connection's backlog, in bytes.
    backlog: usize,
    dropped: IntCounter,
    /// How long a command may wait for an answer (see [`Self::answered`]).
    lease: Duration,
    reconnects: IntCounter,
    /// Counts the pub/sub connections made.
    generation: u64,
    /// Where each connection says it ended. Weak: the subscriber ends once
    /// the engine has gone.
    control: mpsc::WeakUnboundedSender<Control>,
}

impl Subscriber {
    async fn run(mut self, mut control: mpsc::UnboundedReceiver<Control>) {
        let mut backoff = Duration::from_millis(50);
        let mut connected_before = false;
        loop {
            let Some(mut sink) = self.connect(&mut control).await else {
                // While down, holds fail at once; releases still count.
                while let Ok(request) = control.try_recv() {
                    self.refuse(request);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            backoff = Duration::from_millis(50);
            if std::mem::replace(&mut connected_before, true) {
                self.reconnects.inc();
            }
            self.up.store(true, Ordering::Relaxed);
            // Whatever was published while this node was not listening.
            let _ = self.commands.send(Command::Resync);
            if self.serve(&mut sink, &mut control).await.is_none() {
                return;
            }
            self.up.store(false, Ordering::Relaxed);
            tracing::warn!("lost the Redis pub/sub connection; reconnecting");
        }
    }

    /// A new pub/sub connection, listening to every held channel, with its
    /// reader started.
    async fn connect(
        &mut self,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Option<MultiplexedConnection> {
        self.generation += 1;
        let (generation, control_tx) = (self.generation, self.control.clone());
        let backlog = Backlog::new(self.backlog, self.dropped.clone());
        let hearing = Hearing {
            backlog: backlog.clone(),
            lost: move || {
                if let Some(control) = control_tx.upgrade() {
                    let _ = control.send(Control::Lost(generation));
                }
            },
        };
        // No response timeout of redis-rs's: each command is timed by
        // `answered`, which ends the connection rather than one command.
        let config = AsyncConnectionConfig::new()
            .set_push_sender(hearing)
            .set_response_timeout(None)
            .set_connection_timeout(Some(TIMEOUT));
        let mut sink = match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(connection) => connection,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Redis for pub/sub");
                return None;
            }
        };
        for channel in std::mem::take(&mut self.orphans) {
            self.refuse(Control::Release(channel));
        }
        // What queued while down first, so the counts are current; those
        // holds are answered once every held channel is subscribed.
        let mut waiting = Vec::new();
        while let Ok(request) = control.try_recv() {
            match request {
                Control::Hold { channel, reply } => {
                    *self.held.entry(channel.clone()).or_default() += 1;
                    waiting.push((channel, reply));
                }
                other => self.refuse(other),
            }
        }
        let channels: Vec<String> = self.held.keys().cloned().collect();
        let mut subscribed = Ok(());
        for chunk in channels.chunks(1000) {
            if let Err(e) = self.answered(sink.subscribe(chunk)).await {
                tracing::warn!(error = %e.0, "subscribing again after a reconnect failed");
                subscribed = Err(e);
                break;
            }
        }
        for (channel, reply) in waiting {
            self.answer(channel, reply, subscribed.clone());
        }
        subscribed.ok()?;
        // The delivery task reads the notices; the connection's end comes
        // here (`Hearing`).
        let _ = self.listen.send(backlog);
        Some(sink)
    }

    /// Applies holds and releases until the connection is lost (`Some`) or
    /// the engine is gone (`None`).
    async fn serve(
        &mut self,
        sink: &mut MultiplexedConnection,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Option<()> {
        // Pings only while nothing else is asked: any answer shows the
        // connection alive, and a command that waits is timed anyway.
        let every = self.lease / 5;
        let mut probe = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut batch: Vec<Control> = self.orphans.drain(..).map(Control::Release).collect();
            if batch.is_empty() {
                tokio::select! {
                    request = control.recv() => batch.push(request?),
                    _ = probe.tick() => {
                        if let Err(e) = self.ping(sink).await {
                            tracing::warn!(error = %e.0, "the Redis pub/sub connection did not answer a ping");
                            return Some(());
                        }
                        continue;
                    }
                }
            }
            while let Ok(more) = control.try_recv() {
                batch.push(more);
            }
            let mut lost = false;
            let mut touched: HashMap<String, bool> = HashMap::new();
            let mut waiting = Vec::new();
            for request in batch {
                match request {
                    Control::Hold { channel, reply } => {
                        let count = self.held.entry(channel.clone()).or_default();
                        touched.entry(channel.clone()).or_insert(*count > 0);
                        *count += 1;
                        waiting.push((channel, reply));
                    }
                    Control::Release(channel) => {
                        if let Some(count) = self.held.get_mut(&channel) {
                            touched.entry(channel.clone()).or_insert(*count > 0);
                            *count -= 1;
                            if *count == 0 {
                                self.held.remove(&channel);
                            }
                        }
                    }
                    Control::Lost(generation) => lost |= generation == self.generation,
                }
            }
            let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
            for (channel, was) in touched {
                match (was, self.held.contains_key(&channel)) {
                    (false, true) => subscribe.push(channel),
                    (true, false) => unsubscribe.push(channel),
                    _ => {}
                }
            }
            let asked = !(subscribe.is_empty() && unsubscribe.is_empty());
            let done = if lost {
                Err(Unavailable("the pub/sub connection was lost".into()))
            } else {
                self.change(sink, &subscribe, &unsubscribe).await
            };
            if asked {
                probe.reset();
            }
            for (channel, reply) in waiting {
                self.answer(channel, reply, done.clone());
            }
            if done.is_err() {
                return Some(());
            }
        }
    }

    async fn change(
        &self,
        sink: &mut MultiplexedConnection,
        subscribe: &[String],
        unsubscribe: &[String],
    ) -> Result<(), Unavailable> {
        if !subscribe.is_empty() {
            self.answered(sink.subscribe(subscribe)).await?;
        }
        if !unsubscribe.is_empty() {
            self.answered(sink.unsubscribe(unsubscribe)).await?;
        }
        Ok(())
    }

    /// Waits for Redis to answer a command on the pub/sub connection. One
    /// left unanswered for a lease fails, and the caller then drops the
    /// connection: Redis is slow past what the node's heartbeat allows, or
    /// the link went silent without a reset (which no read would notice).
    async fn answered<T>(
        &self,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        self.within_lease(command)
            .await?
            .map_err(|e| Unavailable(format!("pub/sub failed: {e}")))
    }

    /// Checks that the connection still carries answers. An error reply is
    /// an answer (a user whose ACL denies PING, a Redis still loading): only
    /// silence for a lease, or a failure of the connection itself, fails.
    async fn ping(&self, sink: &mut MultiplexedConnection) -> Result<(), Unavailable> {
        match self
            .within_lease(redis::cmd("PING").query_async::<()>(sink))
            .await?
        {
            Err(e) if !matches!(e.kind(), ErrorKind::Server(_) | ErrorKind::Extension) => {
                Err(Unavailable(format!("pub/sub failed: {e}")))
            }
            _ => Ok(()),
        }
    }

    /// `command`'s outcome, or a failure if it takes longer than a lease.
    async fn within_lease<T>(
        &self,
        command: impl Future<Output = RedisResult<T>>,
    ) -> Result<RedisResult<T>, Unavailable> {
        tokio::time::timeout(self.lease, command)
            .await
            .map_err(|_| {
                Unavailable(format!(
                    "Redis did not answer on the pub/sub connection for {:?}",
                    self.lease
                ))
            })
    }

    /// Answers a hold that was counted. A refused one is uncounted here (its
    /// caller will not release it); so is a granted one whose caller has
    /// gone, at the next turn. Either way the delivery task stops expecting
    /// its connection.
    fn answer(
        &mut self,
        channel: String,
        reply: oneshot::Sender<Result<(), Unavailable>>,
        result: Result<(), Unavailable>,
    ) {
        let granted = result.is_ok();
        if reply.send(result).is_ok() && granted {
            return;
        }
        let _ = self.commands.send(Command::Abandon(channel.clone()));
        if granted {
            self.orphans.push(channel);
        } else {
            self.refuse(Control::Release(channel));
        }
    }

    fn refuse(&mut self, request: Control) {
        match request {
            Control::Hold { channel, reply } => {
                // Not counted: only the delivery task's expectation is undone.
                let _ = reply.send(Err(Unavailable("cannot reach Redis for pub/sub".into())));
                let _ = self.commands.send(Command::Abandon(channel));
            }
            Control::Release(channel) => {
                if let Some(count) = self.held.get_mut(&channel) {
                    *count -= 1;
                    if *count == 0 {
                        self.held.remove(&channel);
                    }
                }
            }
            Control::Lost(_) => {}
        }
    }
}

/// What a channel is about, from its name.
enum Subject<'a> {
    Inbox(&'a str),
    Topic(&'a str),
}

impl<'a> Subject<'a> {
    /// Its stream, as the script names it: kind and name.
    fn stream(&self) -> (&'static str, &'a str) {
        match *self {
            Self::Inbox(id) => ("i", id),
            Self::Topic(topic) => ("t", topic),
        }
    }
}

fn subject(channel: &str) -> Option<Subject<'_>> {
    if let Some(id) = channel.strip_prefix("sb:c:i:") {
        Some(Subject::Inbox(id))
    } else {
        channel.strip_prefix("sb:c:t:").map(Subject::Topic)
    }
}

/// A channel's connections on this node, and the newest offset seen on it.
#[derive(Default)]
struct Local {
    conns: Vec<Conn>,
    /// Connections on their way (held, not yet attached).
    expected: u32,
    /// Pub/sub was lost while connections were on their way: what was
    /// published meanwhile reached no node, so the next to attach reads its
    /// stream (a fill finds nothing missing if nothing was).
    missed: bool,
    seen: Option<(Arc<str>, u64)>,
    /// An API disconnect came while connections were on their way: those
    /// were counted too (the answer's count includes them), so they are
    /// closed as they attach. Boxed: most channels never see one.
    closing: Option<Box<CloseReason>>,
}

impl Local {
    /// A connection on its way has attached, or will not come: once none is
    /// on its way, a disconnect no longer reaches those that come next.
    fn arrived(&mut self) {
        self.expected = self.expected.saturating_sub(1);
        if self.expected == 0 {
            self.closing = None;
        }
    }
}

/// The one task that hands live messages to this node's connections, so
/// each connection gets them in order, after what it was given at attach.
struct Delivery {
    streams: HashMap<String, Local>,
    link: Link,
    namespaces: Arc<Namespaces>,
    /// Channels whose gap fill failed, to try again.
    unfilled: HashSet<String>,
    /// The metric of how many channels `streams` holds.
    channels: IntGauge,
    /// How often [`Delivery::renew_positions`] runs.
    renew: Duration,
}

/// A message of a stream, as published: `m|EPOCH|OFFSET|FROM|PAYLOAD`.
struct Live<'a> {
    epoch: &'a str,
    offset: u64,
    from: Option<&'a str>,
    payload: &'a str,
}

fn close_missed() -> CloseReason {
    CloseReason::new(
        CloseCode::SERVICE_RESTART,
        "messages were lost: reconnect and resume",
    )
}

impl Delivery {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut listen: mpsc::UnboundedReceiver<Arc<Backlog>>,
    ) {
        let mut heard: Option<Arc<Backlog>> = None;
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renew =
            tokio::time::interval_at(tokio::time::Instant::now() + self.renew, self.renew);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = async {
                match heard.as_ref() {
                    Some(backlog) => backlog.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Commands first: a connection's expectation is recorded
                // before any message of its channel is heard.
                biased;
                command = commands.recv() => match command {
                    Some(command) => self.command(command).await,
                    None => return,
                },
                Some(new) = listen.recv() => {
                    // What the last connection heard before it ended is
                    // handled first: its messages would be read back from
                    // the streams, but its disconnect requests would not.
                    if let Some(old) = heard.replace(new) {
                        while let Some(next) = old.take() {
                            if !self.heard(next).await {
                                break;
                            }
                        }
                    }
                }
                next = next => {
                    if !self.heard(next).await {
                        heard = None;
                    }
                }
                _ = retry.tick(), if !self.unfilled.is_empty() => {
                    for channel in std::mem::take(&mut self.unfilled) {
                        self.fill(&channel).await;
                    }
                }
                _ = renew.tick() => self.renew_positions(),
            }
            self.channels.set(self.streams.len() as i64);
        }
    }

    /// Handles what pub/sub brought; false once the connection has ended.
    async fn heard(&mut self, heard: Heard) -> bool {
        match heard {
            Heard::Notice(notice) => self.live(&notice.channel, &notice.payload).await,
            Heard::Dropped(channels) => self.catch_up(channels).await,
            Heard::Ended => return false,
        }
        true
    }

    async fn command(&mut self, command: Command) {
        match command {
            Command::Expect(channel) => {
                self.streams.entry(channel).or_default().expected += 1;
            }
            Command::Abandon(channel) => {
                if let Some(local) = self.streams.get_mut(&channel) {
                    local.arrived();
                    self.forget_if_unused(&channel);
                }
            }
            Command::Attach { channel, conn } => {
                let local = self.streams.entry(channel.clone()).or_default();
                if let Some(close) = &local.closing {
                    conn.outbox.close((**close).clone());
                }
                local.arrived();
                let behind = std::mem::take(&mut local.missed)
                    || match (&local.seen, &conn.epoch) {
                        (Some((epoch, seen)), Some(at)) => epoch != at || *seen > conn.last,
                        _ => false,
                    };
                if local.conns.capacity() == 0 {
                    // Most channels are one client's inbox, with one connection:
                    // room for it alone, not the four a first push makes.
                    local.conns.reserve_exact(1);
                }
                local.conns.push(conn);
                if behind {
                    self.fill(&channel).await;
                }
            }
            Command::Detach { channel, conn } => {
                if let Some(local) = self.streams.get_mut(&channel) {
                    local.conns.retain(|c| c.outbox.id() != conn);
                    self.forget_if_unused(&channel);
                }
            }
            Command::Resync => {
                let channels = self.streams.keys().cloned().collect();
                self.catch_up(channels).await;
            }
            Command::CloseAll(reason) => {
                for local in self.streams.values_mut() {
                    for conn in local.conns.drain(..) {
                        conn.outbox.close(reason.clone());
                    }
                }
            }
        }
    }

    /// Reads the streams of `channels`, whose notices this node may have
    /// missed (pub/sub was lost, or a notice was dropped), for the
    /// connections on them and for those on their way.
    async fn catch_up(&mut self, channels: Vec<String>) {
        for channel in &channels {
            if let Some(local) = self.streams.get_mut(channel) {
                local.missed |= local.expected > 0;
            }
        }
        for channel in channels {
            self.fill(&channel).await;
        }
    }

    /// Renews the positions (epoch and top) of the streams this node's
    /// clients are on. A position lives a while after its stream's last use;
    /// a client on a stream quiet for longer would otherwise see its epoch
    /// change with the next message, be closed as having lost messages, and
    /// miss that one. Not waited for: one that fails is renewed next time.
    fn renew_positions(&self) {
        let streams: Vec<_> = (self.streams.iter())
            .filter(|(_, local)| local.conns.iter().any(|conn| conn.epoch.is_some()))
            .filter_map(|(channel, _)| Some(subject(channel)?.stream()))
            .collect();
        for chunk in streams.chunks(RENEW_BATCH) {
            let args = chunk.iter().flat_map(|&(kind, name)| [kind, name]);
            drop(self.link.call("touch", super::args(args)));
        }
    }

    /// Drops a channel's state once no connection is on it or coming.
    fn forget_if_unused(&mut self, channel: &str) {
        if self
            .streams
            .get(channel)
            .is_some_and(|local| local.conns.is_empty() && local.expected == 0)
        {
            self.streams.remove(channel);
        }
    }

    async fn live(&mut self, channel: &str, payload: &[u8]) {
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        let Some(subject) = subject(channel) else {
            return;
        };
        let (kind, rest) = text.split_at(text.find('|').unwrap_or(0).min(text.len()));
        let rest = rest.strip_prefix('|').unwrap_or_default();
        match (kind, &subject) {
            ("m", _) => {
                let mut parts = rest.splitn(4, '|');
                let (Some(epoch), Some(offset), Some(from), Some(payload)) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return;
                };
                let live = Live {
                    epoch,
                    offset: offset.parse().unwrap_or(0),
                    from: Some(from).filter(|f| !f.is_empty()),
                    payload,
                };
                self.message(channel, &live).await;
            }
            ("j" | "l", Subject::Topic(topic)) => {
                if !self.namespaces.find(topic).is_some_and(|ns| ns.presence) {
                    return;
                }
                let change = if kind == "j" {
                    PresenceChange::Joined
                } else {
                    PresenceChange::Left
                };
                let frame = wire::presence_event(topic, rest, change);
                if let Some(local) = self.streams.get_mut(channel) {
                    for conn in &mut local.conns {
                        if kind == "j" && conn.joined_as.as_deref() == Some(rest) {
                            conn.joined_as = None;
                            continue;
                        }
                        let _ = conn.outbox.push(frame.clone());
                    }
                }
            }
            ("x", Subject::Inbox(_)) => {
                let (code, reason) = rest.split_once('|').unwrap_or((rest, ""));
                let close = CloseReason::new(CloseCode(code.parse().unwrap_or(1000)), reason);
                if let Some(local) = self.streams.get_mut(channel) {
                    for conn in &local.conns {
                        conn.outbox.close(close.clone());
                    }
                    if local.expected > 0 {
                        local.closing = Some(Box::new(close));
                    }
                }
            }
            _ => {}
        }
    }

    /// A live message: to each connection that is right before it; a
    /// connection further behind has its gap read from the stream first.
    async fn message(&mut self, channel: &str, live: &Live<'_>) {
        let Some(subject) = subject(channel) else {
            return;
        };
        // A channel nobody here expects or holds any more (a message heard
        // as it was let go) is not kept.
        let Some(local) = self.streams.get_mut(channel) else {
            return;
        };
        let mut render = Render::new(&subject, live);
        if live.epoch.is_empty() {
            // A topic without history: no offsets, delivered as it comes.
            for conn in &local.conns {
                let _ = conn.outbox.push(render.frame(conn.format));
            }
            return;
        }
        match &mut local.seen {
            // Never lowered: a fill may have read past notices still queued.
            Some((epoch, seen)) if **epoch == *live.epoch => *seen = (*seen).max(live.offset),
            seen => *seen = Some((live.epoch.into(), live.offset)),
        }
        let mut behind = false;
        for conn in &mut local.conns {
            if conn.epoch.is_none() {
                // Subscribed on this node where its configuration keeps no
                // history for the topic, while another node's does (a rolling
                // deploy): as it comes, as on a topic without history. No
                // fill reads for it, so it waited for none.
                let _ = conn.outbox.push(render.frame(conn.format));
                continue;
            }
            let same = conn.epoch.as_deref() == Some(live.epoch);
            if same && conn.last + 1 == live.offset {
                let _ = conn.outbox.push(render.frame(conn.format));
                conn.last = live.offset;
            } else if !same || conn.last + 1 < live.offset {
                behind = true;
            }
        }
        if behind {
            self.fill(channel).await;
        }
    }

    /// Brings every connection of `channel` up to its stream's top, read
    /// from Redis; closes those whose gap the stream no longer holds (they
    /// resume, and are told `recovered:false`).
    async fn fill(&mut self, channel: &str) {
        let Some(subject) = subject(channel) else {
            return;
        };
        let (kind, name) = subject.stream();
        for _ in 0..16 {
            let Some(local) = self.streams.get(channel) else {
                return;
            };
            let Some(since) = local
                .conns
                .iter()
                .filter(|c| c.epoch.is_some())
                .map(|c| c.last)
                .min()
            else {
                return;
            };
            let args = super::args([
                kind,
                name,
                &since.to_string(),
                &FILL_BATCH.to_string(),
                &FILL_BYTES.to_string(),
            ]);
            let read = match self.link.call("read", args).await.and_then(|value| {
                let mut items = array(value).ok_or(super::reply::malformed("a read"))?;
                Read::parse(&mut items)
            }) {
                Ok(read) => read,
                Err(e) => {
                    // Redis cannot answer now: tried again shortly.
                    tracing::debug!(error = %e, channel, "cannot fill a gap now");
                    self.unfilled.insert(channel.to_owned());
                    return;
                }
            };
            let Some(local) = self.streams.get_mut(channel) else {
                return;
            };
            let complete = apply(local, &subject, &read);
            local.seen = Some((read.epoch.clone(), read.top));
            if complete {
                return;
            }
        }
        // Still behind after 16 reads: the rest at the next retry, so that
        // one long gap does not hold up every other channel's deliveries,
        // and is not left until the channel's next message.
        self.unfilled.insert(channel.to_owned());
    }
}

/// Gives each connection what it lacks of `read`; returns whether every
/// connection is now at the stream's top. A connection still short of the
/// top when the read had all there was is closed: the stream no longer
/// holds what it missed.
fn apply(local: &mut Local, subject: &Subject<'_>, read: &Read) -> bool {
    // A read stops at the top, at FILL_BATCH entries or at FILL_BYTES: it
    // had all there was when it reached the top, or found nothing after
    // `since` (the script gives at least one entry when there is any).
    let whole = read.entries.last().is_none_or(|e| e.offset >= read.top);
    let mut complete = true;
    local.conns.retain_mut(|conn| {
        if conn.epoch.is_none() {
            return true;
        }
        // The stream was made again (Redis lost it): what this connection
        // missed under the old epoch is gone. Or Redis lost writes it had
        // acknowledged (a crash under `appendfsync everysec`, a failover to
        // a replica behind): the top is below what this connection was
        // given, and the next messages take those offsets again, which it
        // would skip as seen.
        if conn.epoch.as_deref() != Some(&*read.epoch) || conn.last > read.top {
            conn.outbox.close(close_missed());
            return false;
        }
        let had = conn.last;
        for entry in read.entries.iter().filter(|e| e.offset > had) {
            if entry.offset != conn.last + 1 {
                conn.outbox.close(close_missed());
                return false;
            }
            let live = Live {
                epoch: &read.epoch,
                offset: entry.offset,
                from: entry.from.as_deref(),
                payload: &entry.payload,
            };
            let _ = conn
                .outbox
                .push(Render::new(subject, &live).frame(conn.format));
            conn.last = entry.offset;
        }
        if conn.last < read.top {
            if whole {
                conn.outbox.close(close_missed());
                return false;
            }
            complete = false;
        }
        true
    });
    complete
}

/// A message's frames, made at most once per wire format.
struct Render<'a> {
    subject: &'a Subject<'a>,
    live: &'a Live<'a>,
    raw: Option<PreparedMessage>,
    envelope: Option<PreparedMessage>,
}

impl<'a> Render<'a> {
    fn new(subject: &'a Subject<'a>, live: &'a Live<'a>) -> Self {
        Self {
            subject,
            live,
            raw: None,
            envelope: None,
        }
    }

    fn frame(&mut self, format: Format) -> PreparedMessage {
        let live = self.live;
        if format == Mode::Raw.format() {
            return self
                .raw
                .get_or_insert_with(|| wire::raw_delivery(live.payload))
                .clone();
        }
        let topic = match self.subject {
            Subject::Inbox(_) => None,
            Subject::Topic(topic) => Some(*topic),
        };
        let at = (!live.epoch.is_empty()).then_some(At {
            offset: live.offset,
            epoch: live.epoch,
        });
        self.envelope
            .get_or_insert_with(|| wire::envelope_delivery(live.from, topic, live.payload, at))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    use switchboard::testing::Harness;

    use super::*;

    /// A feed over bare queues: what its calls send is read here.
    fn feed() -> (
        Feed,
        mpsc::UnboundedReceiver<Control>,
        mpsc::UnboundedReceiver<Command>,
    ) {
        let (control, control_rx) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let feed = Feed {
            control,
            commands,
            up: Arc::default(),
        };
        (feed, control_rx, commands_rx)
    }

    async fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx))).await
    }

    /// What was queued, by kind and channel.
    fn queued(
        control: &mut mpsc::UnboundedReceiver<Control>,
        commands: &mut mpsc::UnboundedReceiver<Command>,
    ) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(command) = commands.try_recv() {
            seen.push(match command {
                Command::Expect(c) => format!("expect {c}"),
                Command::Abandon(c) => format!("abandon {c}"),
                _ => "other".into(),
            });
        }
        while let Ok(request) = control.try_recv() {
            seen.push(match request {
                Control::Release(c) => format!("release {c}"),
                Control::Hold { channel, .. } => format!("hold {channel}"),
                Control::Lost(_) => "lost".into(),
            });
        }
        seen
    }

    /// Quiet: handles no callback.
    struct Quiet;

    impl switchboard::Handler for Quiet {
        type Info = ();
        fn handle_in(
            &mut self,
            _: switchboard::Message,
            _: &mut switchboard::Context<'_, ()>,
        ) -> switchboard::Outcome {
            switchboard::Outcome::Continue
        }
    }

    fn delivery() -> Delivery {
        Delivery {
            streams: HashMap::new(),
            link: Link::idle(),
            namespaces: Arc::new(Namespaces::new(Vec::new())),
            unfilled: HashSet::new(),
            channels: IntGauge::new("channels", "channels").unwrap(),
            renew: Duration::from_secs(3600),
        }
    }

    fn conn(harness: &Harness<Quiet>) -> Conn {
        Conn {
            outbox: harness.handle().outbox(),
            format: crate::wire::Mode::Raw.format(),
            epoch: Some("e".into()),
            last: 0,
            joined_as: None,
        }
    }

    /// Regression: an API disconnect closed only the connections attached
    /// when its notice came, though its count (the API's answer) included
    /// those counted and still on their way, which then stayed open.
    #[tokio::test]
    async fn a_disconnect_closes_the_connections_on_their_way_as_they_attach() {
        let mut delivery = delivery();
        let channel = "sb:c:i:ann".to_owned();
        let [open, coming, later] = [(); 3].map(|()| Harness::new(Quiet));
        for _ in 0..2 {
            delivery.command(Command::Expect(channel.clone())).await;
        }
        let attach = |harness| Command::Attach {
            channel: channel.clone(),
            conn: conn(harness),
        };
        delivery.command(attach(&open)).await;
        delivery.live(&channel, b"x|4000|bye").await;
        assert!(open.handle().is_closed(), "an attached connection");
        delivery.command(attach(&coming)).await;
        assert!(coming.handle().is_closed(), "a connection on its way");
        // None is on its way now: one that comes later is not closed.
        delivery.command(Command::Expect(channel.clone())).await;
        delivery.command(attach(&later)).await;
        assert!(
            !later.handle().is_closed(),
            "a connection after the disconnect"
        );
    }

    /// Pub/sub was lost while a connection was on its way: what was
    /// published meanwhile reached no node, and the offset the connection
    /// was given may be behind it, so it reads its stream as it attaches
    /// (here the link cannot answer: the fill is left to the retry). One
    /// that attaches with nothing missed reads nothing.
    #[tokio::test]
    async fn a_connection_on_its_way_while_pub_sub_was_lost_reads_its_stream_as_it_attaches() {
        let mut delivery = delivery();
        let channel = "sb:c:i:ann".to_owned();
        let [calm, missed] = [(); 2].map(|()| Harness::new(Quiet));
        let attach = |harness| Command::Attach {
            channel: channel.clone(),
            conn: conn(harness),
        };
        delivery.command(Command::Expect(channel.clone())).await;
        delivery.command(attach(&calm)).await;
        assert!(delivery.unfilled.is_empty(), "nothing was missed");
        delivery.command(Command::Expect(channel.clone())).await;
        delivery.command(Command::Resync).await;
        delivery.unfilled.clear();
        delivery.command(attach(&missed)).await;
        assert!(delivery.unfilled.contains(&channel), "no fill was tried");
        assert!(!delivery.streams[&channel].missed, "read once, not again");
    }

    /// Regression: a hold whose answer came while its caller was still
    /// there, and which was dropped before reading it (the client's handshake
    /// was dropped in between), counted as taken: nobody gave it back, and
    /// the node listened to the channel for as long as it ran.
    #[tokio::test]
    async fn a_hold_granted_and_dropped_unread_is_given_back() {
        let (feed, mut control, mut commands) = feed();
        let mut hold = Box::pin(feed.hold("ch".into()));
        assert!(poll_once(&mut hold).await.is_pending());
        let Some(Control::Hold { reply, .. }) = control.recv().await else {
            panic!("no hold asked")
        };
        assert!(reply.send(Ok(())).is_ok(), "the caller was there");
        drop(hold);
        assert_eq!(
            queued(&mut control, &mut commands),
            ["expect ch", "abandon ch", "release ch"]
        );
    }

    #[tokio::test]
    async fn a_hold_taken_or_refused_or_left_before_its_answer_gives_nothing_back() {
        let (feed, mut control, mut commands) = feed();
        for answer in [Some(Ok(())), Some(Err(Unavailable("down".into()))), None] {
            let mut hold = Box::pin(feed.hold("ch".into()));
            assert!(poll_once(&mut hold).await.is_pending());
            let Some(Control::Hold { reply, .. }) = control.recv().await else {
                panic!("no hold asked")
            };
            match answer {
                Some(answer) => {
                    let granted = answer.is_ok();
                    reply.send(answer).unwrap();
                    assert_eq!(
                        poll_once(&mut hold).await.map(|r| r.is_ok()),
                        Poll::Ready(granted)
                    );
                    drop(hold);
                }
                // Left first: the subscriber finds it gone (and frees it, an orphan).
                None => {
                    drop(hold);
                    assert!(reply.send(Ok(())).is_err());
                }
            }
            assert_eq!(queued(&mut control, &mut commands), ["expect ch"]);
        }
    }
}
