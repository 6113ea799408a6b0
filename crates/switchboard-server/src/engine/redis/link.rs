//! The command link to Redis: every call of the engine's script goes through
//! one queue and one connection, in the order the calls were made, and what
//! arrives together goes as one pipeline (one round trip for the batch).
//!
//! Order is fixed when a call is queued, which the engine does before it
//! returns the call's future: two messages of one client are appended in the
//! order it sent them, whenever their answers come. The calls nobody waits
//! for (leaves, parts) share the queue rather than jump it: a connect dropped
//! while its call waited sends its leave behind that call, where a leave
//! that went first would undo nothing and leave the connection counted.
//! Across connections, [`super::fence`] keeps that order.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Value;
use redis::aio::MultiplexedConnection;
use tokio::sync::{Notify, mpsc, oneshot};

use super::fence::{Known, fence};
use crate::engine::Unavailable;
use crate::metrics::Metrics;

/// The engine's script, as the operations that store more run it: Redis
/// refuses it whole when it is over `maxmemory` (a script without flags is
/// checked only at its first write, and a first write that Redis allows when
/// full, such as `PEXPIRE`, let the rest of a send grow it past the limit).
const STORING: &str = concat!("#!lua\n", include_str!("engine.lua"));
/// The same script for the other operations, which Redis runs however full
/// it is: leaves and parts free memory (and are owed), heartbeats keep the
/// nodes' leases (a full Redis must not close every client), and counts and
/// presence pages read. (A stream read may make the meta hash of a stream
/// never written: it stores.)
const ALWAYS: &str = concat!("#!lua flags=allow-oom\n", include_str!("engine.lua"));

/// Which of the two scripts a call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Script {
    Storing,
    Always,
}

impl Script {
    /// The script `op` runs: those that add entries, counts or members are
    /// refused when Redis is full.
    fn of(op: &str) -> Self {
        match op {
            "send" | "publish" | "connect" | "join" | "read" => Self::Storing,
            _ => Self::Always,
        }
    }
}

/// The scripts' SHA-1s, as Redis names them once loaded.
struct Shas {
    storing: String,
    always: String,
}

impl Shas {
    fn of(&self, script: Script) -> &str {
        match script {
            Script::Storing => &self.storing,
            Script::Always => &self.always,
        }
    }
}
/// Most calls in one pipeline.
const BATCH: usize = 512;
/// Arguments' bytes past which a pipeline takes no more calls: a batch of
/// big sends (a 1 MiB payload to many ids) must not outlast its timeout.
const BATCH_BYTES: usize = 4 << 20;
/// Calls someone waits for, queued for the link; past it, calls fail at once
/// as unavailable (owed calls are never refused).
const QUEUE: usize = 65_536;
/// Their arguments' bytes, bounded the same way.
const QUEUE_BYTES: usize = 64 << 20;
/// The longest a batch may take before the link counts as down; also how
/// long the pub/sub connection may take to open.
pub(super) const TIMEOUT: Duration = Duration::from_secs(3);

/// One call of the script: its arguments after the operation's name.
struct Call {
    script: Script,
    args: Vec<Bytes>,
    /// The arguments' bytes.
    bytes: usize,
    reply: Option<oneshot::Sender<Result<Value, Unavailable>>>,
    /// Kept and sent again after a reconnect rather than failed (leaves:
    /// idempotent, and nobody waits for them).
    retry: bool,
}

/// What every call passes after its operation's name (engine.lua's header).
#[derive(Debug, Clone, Copy)]
pub(super) struct Header {
    /// How long a stream's epoch and top outlive its last write.
    pub meta_ttl: Duration,
    /// Messages the `$clients` topic keeps (0: no events).
    pub events_size: usize,
    /// How long it keeps them.
    pub events_ttl: Duration,
}

#[cfg(test)]
impl Header {
    fn for_tests() -> Self {
        Self {
            meta_ttl: Duration::from_secs(1),
            events_size: 0,
            events_ttl: Duration::from_secs(1),
        }
    }
}

/// The sending side of the link.
#[derive(Clone)]
pub(super) struct Link {
    /// Every call, in the order made. Unbounded: calls owed to Redis
    /// whatever happens (leaves) are never refused; the others are counted
    /// in `waiting` and bounded by [`QUEUE`].
    queue: mpsc::UnboundedSender<Call>,
    waiting: Arc<Waiting>,
    up: Arc<AtomicBool>,
    /// The header's arguments, rendered once.
    header: [Bytes; 3],
    connections: Arc<Connections>,
    /// Asks the link to check its connection (see [`Self::verify`]).
    verify: Arc<Verify>,
}

/// A check of its connection asked of a link.
#[derive(Default)]
struct Verify {
    asked: AtomicBool,
    /// Wakes the link if it is idle.
    wake: Notify,
}

/// The calls someone waits for that are queued, and their arguments' bytes.
#[derive(Default)]
struct Waiting {
    calls: AtomicUsize,
    bytes: AtomicUsize,
}

impl Waiting {
    /// Counts a call of `bytes`, if both bounds allow it.
    fn take(&self, bytes: usize) -> Result<(), Unavailable> {
        if self.calls.fetch_add(1, Ordering::AcqRel) >= QUEUE {
            self.calls.fetch_sub(1, Ordering::AcqRel);
            return Err(Unavailable("too many calls wait for Redis".into()));
        }
        if self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes > QUEUE_BYTES {
            self.give_back(bytes);
            return Err(Unavailable("too many bytes wait for Redis".into()));
        }
        Ok(())
    }

    /// A call counted by [`Self::take`] has left the queue.
    fn give_back(&self, bytes: usize) {
        self.calls.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Counts the link's connections to Redis, and wakes whoever waits for a
/// new one: a node checks its place in the cluster after each (Redis may
/// have restarted, and forgotten it).
#[derive(Default)]
struct Connections {
    made: AtomicU64,
    new: Notify,
}

impl Link {
    /// Starts the link's task on the current runtime.
    pub(super) fn start(client: redis::Client, header: Header, metrics: Arc<Metrics>) -> Self {
        let (link, calls) = Self::new(header);
        tokio::spawn(run(
            client,
            calls,
            Shared {
                up: link.up.clone(),
                connections: link.connections.clone(),
                verify: link.verify.clone(),
            },
            metrics,
        ));
        link
    }

    /// A link that never connects: its calls fail at once as unavailable
    /// (for tests of what holds a link without calling it).
    #[cfg(test)]
    pub(super) fn idle() -> Self {
        Self::new(Header::for_tests()).0
    }

    /// The link, and the queue its task takes calls from.
    fn new(header: Header) -> (Self, Calls) {
        let (queue, calls) = mpsc::unbounded_channel();
        let waiting = Arc::new(Waiting::default());
        let millis = |d: Duration| Bytes::from(d.as_millis().to_string());
        let header = [
            millis(header.meta_ttl),
            Bytes::from(header.events_size.to_string()),
            millis(header.events_ttl),
        ];
        let link = Self {
            queue,
            waiting: waiting.clone(),
            up: Arc::new(AtomicBool::new(false)),
            header,
            connections: Arc::new(Connections::default()),
            verify: Arc::new(Verify::default()),
        };
        (link, Calls { calls, waiting })
    }

    /// How many connections to Redis the link has made so far.
    pub(super) fn connections(&self) -> u64 {
        self.connections.made.load(Ordering::Relaxed)
    }

    /// Resolves when the link has made a new connection (at once if it
    /// made one since the last call).
    pub(super) async fn reconnected(&self) {
        self.connections.new.notified().await;
    }

    /// A call of `op` with `rest`; one nobody waits for (no `reply`) is sent
    /// again after a reconnect until Redis has it.
    fn make(
        &self,
        op: &'static str,
        rest: Vec<Vec<u8>>,
        reply: Option<oneshot::Sender<Result<Value, Unavailable>>>,
    ) -> Call {
        let bytes = rest.iter().map(Vec::len).sum();
        Call {
            script: Script::of(op),
            args: self.args(op, rest),
            bytes,
            retry: reply.is_none(),
            reply,
        }
    }

    /// The script's arguments: the operation, the header, then `rest`.
    fn args(&self, op: &'static str, rest: Vec<Vec<u8>>) -> Vec<Bytes> {
        let mut args = Vec::with_capacity(5 + rest.len());
        args.push(Bytes::from_static(op.as_bytes()));
        // An epoch for a stream this call makes, if it makes one.
        args.push(Bytes::from(crate::epochs::new_epoch().as_bytes().to_vec()));
        args.extend(self.header.iter().cloned());
        args.extend(rest.into_iter().map(Bytes::from));
        args
    }

    /// Makes the link check its connection (a `PING`) before its next
    /// batch, counting as down until it has, and connect again if that
    /// fails: another link to the same Redis found its connection gone (a
    /// restart), which this one, idle, may not know yet, and would learn
    /// only by failing its next call.
    pub(super) fn verify(&self) {
        self.up.store(false, Ordering::Relaxed);
        self.verify.asked.store(true, Ordering::Release);
        self.verify.wake.notify_one();
    }

    /// Whether the link is connected now.
    pub(super) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Queues a call; the answer comes when Redis gives it.
    pub(super) fn call(
        &self,
        op: &'static str,
        rest: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Value, Unavailable>> + Send + 'static {
        let queued = self.try_call(op, rest);
        async move { queued?.await }
    }

    /// Queues a call as [`Self::call`] does, but says at once when it was
    /// refused, and so never reaches Redis: a connect refused so owes no
    /// leave.
    pub(super) fn try_call(
        &self,
        op: &'static str,
        rest: Vec<Vec<u8>>,
    ) -> Result<impl Future<Output = Result<Value, Unavailable>> + Send + 'static, Unavailable>
    {
        // While the link is down, at once: not after the next reconnect.
        if !self.is_up() {
            return Err(Unavailable("cannot reach Redis".into()));
        }
        let bytes = rest.iter().map(Vec::len).sum();
        self.waiting.take(bytes)?;
        let (reply, answer) = oneshot::channel();
        let call = self.make(op, rest, Some(reply));
        // Fails only once the link's task has ended; the answer's sender
        // goes with the call, which the await below reports.
        if self.queue.send(call).is_err() {
            self.waiting.give_back(bytes);
        }
        Ok(async move {
            answer
                .await
                .map_err(|_| Unavailable("the Redis link stopped".into()))?
        })
    }

    /// Queues a call nobody waits for, sent again after reconnecting until
    /// Redis has it. Never refused: a node owes a leave for every connection
    /// it counted (a mass close sends one per connection at once).
    pub(super) fn call_and_forget(&self, op: &'static str, rest: Vec<Vec<u8>>) {
        let call = self.make(op, rest, None);
        // Fails only once the link's task has ended (the runtime stopping).
        let _ = self.queue.send(call);
    }
}

/// The link task's end of the queue.
struct Calls {
    calls: mpsc::UnboundedReceiver<Call>,
    waiting: Arc<Waiting>,
}

impl Calls {
    /// The next call; `None` once the link is dropped.
    async fn next(&mut self) -> Option<Call> {
        let call = self.calls.recv().await?;
        Some(self.taken(call))
    }

    /// A call that is ready now.
    fn ready(&mut self) -> Option<Call> {
        let call = self.calls.try_recv().ok()?;
        Some(self.taken(call))
    }

    /// A call leaves the queue: one someone waits for no longer counts
    /// against its bound.
    fn taken(&self, call: Call) -> Call {
        if !call.retry {
            self.waiting.give_back(call.bytes);
        }
        call
    }
}

/// What the link's task shares with its handles.
struct Shared {
    up: Arc<AtomicBool>,
    connections: Arc<Connections>,
    verify: Arc<Verify>,
}

/// Connects, loads the script, and sends batches until the connection
/// fails; then fails what is in flight (except retries) and connects again
/// with backoff.
async fn run(client: redis::Client, mut calls: Calls, shared: Shared, metrics: Arc<Metrics>) {
    let Shared {
        up,
        connections,
        verify,
    } = shared;
    // Owed calls kept through a failure or an outage, older than anything
    // still queued: sent first, a batch at a time.
    let mut held: VecDeque<Call> = VecDeque::new();
    let mut backoff = Duration::from_millis(50);
    // The last connection was left because Redis ran nothing: the next
    // keeps the backoff growing.
    let mut halted_last = false;
    // The last connection, for the next to end (see `fence`).
    let (mut previous, mut warned) = (None, false);
    loop {
        let connected = connect(&client, &mut previous, &mut warned).await;
        let (mut conn, shas) = match connected {
            Ok(connected) => connected,
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Redis; retrying in {backoff:?}");
                fail_waiting(&mut calls, &mut held, &e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        if !std::mem::take(&mut halted_last) {
            backoff = Duration::from_millis(50);
        }
        if connections.made.fetch_add(1, Ordering::Relaxed) > 0 {
            metrics.redis_reconnected();
        }
        up.store(true, Ordering::Relaxed);
        connections.new.notify_one();
        tracing::info!("connected to Redis");
        loop {
            if verify.asked.swap(false, Ordering::AcqRel) {
                let ping = redis::cmd("PING");
                let answer = tokio::time::timeout(TIMEOUT, ping.query_async::<String>(&mut conn));
                if let Ok(Ok(_)) = answer.await {
                    up.store(true, Ordering::Relaxed);
                } else {
                    tracing::info!(
                        "the Redis connection is gone, as another link found: connecting again"
                    );
                    break;
                }
            }
            let mut batch = Vec::new();
            fill(&mut batch, &mut held, &mut calls);
            if batch.is_empty() {
                tokio::select! {
                    call = calls.next() => match call {
                        Some(call) => batch.push(call),
                        None => return,
                    },
                    () = verify.wake.notified() => continue,
                }
                fill(&mut batch, &mut held, &mut calls);
            }
            let sent = Instant::now();
            match send(&mut conn, &shas, &batch).await {
                Ok(values) => {
                    // Each call of a pipelined batch waits for the whole batch.
                    metrics.redis_commands(sent.elapsed(), batch.len());
                    let halted = values.iter().find_map(halts);
                    let mut again = Vec::new();
                    for (call, value) in batch.into_iter().zip(values) {
                        // Not run: an owed call goes again, as after a lost link.
                        if call.retry && halts(&value).is_some() {
                            again.push(call);
                        } else if let Some(reply) = call.reply {
                            let _ = reply.send(answer(value));
                        }
                    }
                    if let Some(why) = halted {
                        // Redis runs no call now (a replica after a failover,
                        // loading, no replicas to write to, a script busy):
                        // connect again, with backoff, until it does.
                        up.store(false, Ordering::Relaxed);
                        tracing::warn!(refusal = %why, "Redis runs nothing now; connecting again in {backoff:?}");
                        for call in again.into_iter().rev() {
                            held.push_front(call);
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        halted_last = true;
                        break;
                    }
                    backoff = Duration::from_millis(50);
                }
                Err(e) => {
                    // A batch that failed or timed out is when the times matter.
                    metrics.redis_commands(sent.elapsed(), batch.len());
                    up.store(false, Ordering::Relaxed);
                    tracing::warn!(error = %e, "lost the Redis link");
                    // Those that can go again, before the rest of what was held.
                    for call in settle_failed(batch, &e).into_iter().rev() {
                        held.push_front(call);
                    }
                    break;
                }
            }
        }
    }
}

/// Fills `batch` up to [`BATCH`] calls: what is held first, then what is
/// queued, which is newer (it is taken only once nothing is held).
fn fill(batch: &mut Vec<Call>, held: &mut VecDeque<Call>, calls: &mut Calls) {
    let mut bytes: usize = batch.iter().map(|call| call.bytes).sum();
    // A call is taken while there is room: the last may pass `BATCH_BYTES`.
    while batch.len() < BATCH && bytes < BATCH_BYTES {
        let Some(call) = held.pop_front().or_else(|| calls.ready()) else {
            break;
        };
        bytes += call.bytes;
        batch.push(call);
    }
}

async fn connect(
    client: &redis::Client,
    previous: &mut Option<Known>,
    warned: &mut bool,
) -> redis::RedisResult<(MultiplexedConnection, Shas)> {
    // The link times its batches itself (TIMEOUT): redis-rs's own response
    // timeout (500 ms by default) would fail a slow batch whose calls ran.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    fence(&mut conn, previous, warned).await?;
    let shas = load_scripts(&mut conn).await?;
    Ok((conn, shas))
}

/// Loads the scripts, within [`TIMEOUT`] like every batch: a Redis that
/// stalls here must not hold up the link, and every call queued on it, for
/// as long as TCP takes to give up.
async fn load_scripts(conn: &mut MultiplexedConnection) -> redis::RedisResult<Shas> {
    let mut load = redis::pipe();
    for script in [STORING, ALWAYS] {
        load.cmd("SCRIPT").arg("LOAD").arg(script);
    }
    let (storing, always) = tokio::time::timeout(TIMEOUT, load.query_async(conn))
        .await
        .map_err(|_| timeout_error())??;
    Ok(Shas { storing, always })
}

pub(super) fn timeout_error() -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "Redis did not answer in time",
    ))
}

/// Sends a batch as one pipeline: a value per call, which may be a refusal
/// (see [`answer`]); `Err` when the link itself failed (what ran is unknown).
async fn send(
    conn: &mut MultiplexedConnection,
    shas: &Shas,
    batch: &[Call],
) -> redis::RedisResult<Vec<Value>> {
    let mut values = run_batch(conn, shas, batch.iter()).await?;
    let refused: Vec<usize> = (0..values.len())
        .filter(|&i| is_noscript(&values[i]))
        .collect();
    if !refused.is_empty() {
        // Redis lost its script cache (a restart, a `SCRIPT FLUSH`): the
        // calls it refused did not run, but a pipeline is not atomic, and
        // those before the loss did. Only refused calls go again, once the
        // scripts are loaded again, and only those after which nothing ran:
        // if another node reloaded the scripts within the batch, a call after
        // a refused one ran first, and sending the refused one now would
        // swap them (a connect after its own leave; two messages of one
        // client). Those are answered unavailable, as not run. Owed calls
        // (leaves, parts) go again whatever ran: each undoes its own field.
        let last_ran = values.iter().rposition(|value| !is_noscript(value));
        let again: Vec<usize> = (refused.into_iter())
            .filter(|&i| last_ran.is_none_or(|ran| ran < i) || batch[i].retry)
            .collect();
        let shas = load_scripts(conn).await?;
        if !again.is_empty() {
            let answers = run_batch(conn, &shas, again.iter().map(|&i| &batch[i])).await?;
            for (i, value) in again.into_iter().zip(answers) {
                values[i] = value;
            }
        }
    }
    Ok(values)
}

/// A call's value, or its refusal as unavailable.
fn answer(value: Value) -> Result<Value, Unavailable> {
    match value {
        Value::ServerError(e) => Err(Unavailable(refusal(&e))),
        value => Ok(value),
    }
}

fn refusal(e: &redis::ServerError) -> String {
    format!(
        "Redis refused: {} {}",
        e.code(),
        e.details().unwrap_or_default()
    )
}

/// A refusal that means Redis did not run the call, and runs none now: a
/// replica (`READONLY`, after a failover), a Redis still loading its data,
/// a primary cut from its own (`MASTERDOWN`), too few replicas for
/// `min-replicas-to-write` (`NOREPLICAS`), another script running too long
/// (`BUSY`), a disk it cannot write (`MISCONF`). Its words, for the log. A
/// script's own errors (`REAPED`) and `OOM` (the storing script's refusal
/// when Redis is full, by design) are answers, not this.
fn halts(value: &Value) -> Option<String> {
    const HALTS: [&str; 6] = [
        "READONLY",
        "LOADING",
        "MASTERDOWN",
        "NOREPLICAS",
        "BUSY",
        "MISCONF",
    ];
    match value {
        Value::ServerError(e) if HALTS.contains(&e.code()) => Some(refusal(e)),
        _ => None,
    }
}

/// Sends `calls` as one pipeline, within [`TIMEOUT`]; a value per call.
async fn run_batch(
    conn: &mut MultiplexedConnection,
    shas: &Shas,
    calls: impl Iterator<Item = &Call>,
) -> redis::RedisResult<Vec<Value>> {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    for call in calls {
        let cmd = pipe.cmd("EVALSHA").arg(shas.of(call.script)).arg(0);
        for arg in &call.args {
            cmd.arg(&arg[..]);
        }
    }
    tokio::time::timeout(TIMEOUT, pipe.query_async(conn))
        .await
        .map_err(|_| timeout_error())?
}

fn is_noscript(value: &Value) -> bool {
    matches!(value, Value::ServerError(e) if e.code() == "NOSCRIPT")
}

/// After a failed batch: calls that can be sent again are kept; the others
/// are told the store is unavailable (they may or may not have run).
fn settle_failed(batch: Vec<Call>, error: &redis::RedisError) -> Vec<Call> {
    let mut held = Vec::new();
    for call in batch {
        if call.retry {
            held.push(call);
        } else if let Some(reply) = call.reply {
            let _ = reply.send(Err(Unavailable(format!("the Redis link failed: {error}"))));
        }
    }
    held
}

/// While Redis is unreachable: whoever waits is told at once, rather than
/// after a reconnect that may never come; owed calls join `held`, in order,
/// to go first once connected.
fn fail_waiting(calls: &mut Calls, held: &mut VecDeque<Call>, error: &str) {
    while let Some(call) = calls.ready() {
        if call.retry {
            held.push_back(call);
        } else if let Some(reply) = call.reply {
            let _ = reply.send(Err(Unavailable(format!("cannot reach Redis: {error}"))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> (Link, Calls) {
        let (link, calls) = Link::new(Header::for_tests());
        link.up.store(true, Ordering::Relaxed);
        (link, calls)
    }

    fn op(call: Option<Call>) -> Bytes {
        call.expect("a call is queued").args[0].clone()
    }

    /// A connect refused before it was queued (the link down, or too much
    /// waiting) never reaches Redis, and says so at once: its connection
    /// owes no leave (one was held for every handshake retried during an
    /// outage, without bound).
    #[test]
    fn a_call_refused_at_once_says_so_and_queues_nothing() {
        let (link, mut calls) = Link::new(Header::for_tests());
        assert!(
            link.try_call("connect", Vec::new()).is_err(),
            "the link is down"
        );
        assert!(calls.ready().is_none());
        link.up.store(true, Ordering::Relaxed);
        let queued = link.try_call("connect", Vec::new());
        assert!(queued.is_ok());
        assert_eq!(op(calls.ready()), "connect");
    }

    /// Regression: leaves had a queue of their own that the link served
    /// first, so a connect dropped while its call waited for the link sent
    /// a leave that Redis ran before the count it was to undo (found by
    /// `test_a_connect_given_up_while_its_call_waits_leaves_nothing_counted`).
    #[test]
    fn a_leave_queued_after_a_call_goes_after_it() {
        let (link, mut calls) = link();
        let connect = link.call("connect", vec![b"n".to_vec(), b"ann".to_vec()]);
        link.call_and_forget("leave", vec![b"n".to_vec(), b"ann".to_vec()]);
        drop(connect);
        assert_eq!(op(calls.ready()), "connect");
        assert_eq!(op(calls.ready()), "leave");
        assert!(calls.ready().is_none());
    }

    /// While Redis is unreachable the waiting calls fail at once and the
    /// owed ones are held; after it, what was held goes first, a batch at a
    /// time (an outage closes every connection: tens of thousands of leaves,
    /// which as one pipeline could outlast the batch's timeout for ever).
    #[test]
    fn owed_calls_held_through_an_outage_go_first_a_batch_at_a_time() {
        let (link, mut calls) = link();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let waiting = link.call("connect", Vec::new());
        for _ in 0..BATCH + 88 {
            link.call_and_forget("leave", Vec::new());
        }
        let mut held = VecDeque::new();
        fail_waiting(&mut calls, &mut held, "down");
        let failed = runtime.block_on(waiting);
        assert!(failed.is_err_and(|e| e.0.contains("cannot reach Redis: down")));
        assert_eq!(link.waiting.calls.load(Ordering::Acquire), 0);
        assert_eq!(held.len(), BATCH + 88);
        let after = link.call("send", Vec::new());
        let mut batch = Vec::new();
        fill(&mut batch, &mut held, &mut calls);
        assert_eq!(batch.len(), BATCH);
        assert!(batch.iter().all(|call| call.args[0] == "leave"));
        let mut batch = Vec::new();
        fill(&mut batch, &mut held, &mut calls);
        let ops: Vec<Bytes> = batch.iter().map(|call| call.args[0].clone()).collect();
        assert_eq!(
            (ops.len(), ops.last().map(|op| &op[..])),
            (89, Some(&b"send"[..]))
        );
        drop(after);
    }

    /// Sends of a big payload to many ids: a pipeline of 512 of them could
    /// outlast the batch's timeout, and 65,536 of them waiting could hold
    /// gigabytes.
    #[test]
    fn big_calls_are_bounded_in_bytes_waiting_and_in_a_batch() {
        let (link, mut calls) = link();
        let mib = || vec![vec![7u8; 1 << 20]];
        let waiting: Vec<_> = (0..QUEUE_BYTES >> 20)
            .map(|_| link.call("send", mib()))
            .collect();
        // Refused at once: the answer is there at the first poll.
        let refused = std::pin::pin!(link.call("send", mib()))
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        assert!(
            matches!(&refused, std::task::Poll::Ready(Err(e)) if e.0.contains("too many bytes")),
            "{refused:?}"
        );
        let mut batch = Vec::new();
        fill(&mut batch, &mut VecDeque::new(), &mut calls);
        assert_eq!(batch.len(), BATCH_BYTES >> 20);
        // What the batch took makes room again.
        let _room = link.call("send", mib());
        assert_eq!(
            link.waiting.bytes.load(Ordering::Acquire) >> 20,
            ((QUEUE_BYTES - BATCH_BYTES) >> 20) + 1
        );
        drop(waiting);
    }

    #[test]
    fn calls_someone_waits_for_are_bounded_and_owed_ones_are_not() {
        let (link, mut calls) = link();
        let waiting: Vec<_> = (0..QUEUE).map(|_| link.call("send", Vec::new())).collect();
        let refused = link.call("send", Vec::new());
        let refused = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(refused);
        assert!(refused.is_err_and(|e| e.0.contains("too many calls")));
        link.call_and_forget("leave", Vec::new());
        // Taking one makes room for one.
        assert_eq!(op(calls.ready()), "send");
        let _room = link.call("send", Vec::new());
        let mut ops = std::iter::from_fn(|| calls.ready()).map(|call| call.args[0].clone());
        assert_eq!(
            ops.by_ref()
                .take(QUEUE - 1)
                .filter(|op| op != "send")
                .count(),
            0
        );
        assert_eq!(ops.collect::<Vec<_>>(), ["leave", "send"]);
        drop(waiting);
    }
}
