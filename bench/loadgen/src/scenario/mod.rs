//! The scenarios, and what they share: the run's phases, connecting many clients,
//! a paced sender clock, and the loop that feeds received messages to a check.
//!
//! Every scenario runs the same way: connect, load for the warm-up, measure a
//! window (server and own CPU from /proc), stop sending and drain what is in
//! flight (bounded), then close everything. Tasks are `spawn_local` on one
//! thread, so shared state is `Rc<RefCell<..>>` without atomics or locks.

pub mod echo;
pub mod fanout;
pub mod idle;
pub mod relay;
pub mod storm;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use std::fmt::Write as _;

use anyhow::Context as _;
use switchboard_proto::Message;
use tokio::task::JoinHandle;

use crate::cli::{Common, Timing};
use crate::conn::{self, Reader, Target, Writer};
use crate::measure::{Probe, Window, WindowFigures};
use crate::record::Measured;
use crate::rng::Rng;
use crate::tally::{Clock, Tally};

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Senders send.
    Sending,
    /// Senders have stopped; receivers wait for what is in flight.
    Draining,
    /// Everything stops.
    Done,
}

/// State shared by the tasks of one run.
#[derive(Debug)]
pub struct Shared {
    /// The payload time base.
    pub clock: Clock,
    /// The current phase.
    pub phase: Cell<Phase>,
    /// Delivery counts.
    pub tally: RefCell<Tally>,
}

impl Shared {
    /// Shared state for a run with this tally.
    pub fn new(tally: Tally) -> Rc<Self> {
        Rc::new(Self {
            clock: Clock::start(),
            phase: Cell::new(Phase::Sending),
            tally: RefCell::new(tally),
        })
    }

    /// Whether senders should send.
    pub fn sending(&self) -> bool {
        self.phase.get() == Phase::Sending
    }
}

/// Runs the warm-up, the measured window and the drain, then ends the run.
pub async fn measure_window(
    shared: &Shared,
    server: &Probe,
    timing: Timing,
) -> anyhow::Result<WindowFigures> {
    tokio::time::sleep(timing.warmup).await;
    shared.tally.borrow_mut().set_measuring(true);
    let window = Window::open(server)?;
    tokio::time::sleep(timing.duration).await;
    let figures = window.close()?;
    shared.tally.borrow_mut().set_measuring(false);
    shared.phase.set(Phase::Draining);
    let deadline = Instant::now() + timing.drain;
    while !shared.tally.borrow().settled() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shared.phase.set(Phase::Done);
    Ok(figures)
}

/// Ends tasks that may still be waiting on a socket.
pub fn abort_all(tasks: &[JoinHandle<()>]) {
    for task in tasks {
        task.abort();
    }
}

/// A connection, or why it could not be opened.
pub type Connected = anyhow::Result<(Reader, Writer)>;

/// Opens `count` connections, `concurrency` handshakes at a time; connection `i`
/// requests `path(i)` from source address `common.source(i)`. Each entry is the
/// connection or why it failed, in order.
pub async fn connect_many(
    common: &Common,
    count: usize,
    concurrency: usize,
    path: impl Fn(usize) -> String + 'static,
    subprotocol: Option<&'static str>,
) -> Vec<Connected> {
    let results: Rc<RefCell<Vec<Option<Connected>>>> =
        Rc::new(RefCell::new((0..count).map(|_| None).collect()));
    let next = Rc::new(Cell::new(0usize));
    let path = Rc::new(path);
    let sources: Vec<_> = (0..count).map(|i| common.source(i)).collect();
    let sources = Rc::new(sources);
    let servers: Rc<Vec<_>> = Rc::new((0..count).map(|i| common.addr_for(i)).collect());
    let deflate = common.deflate;
    let tls = Rc::new(common.tls_ca.clone());
    let workers: Vec<_> = (0..concurrency.clamp(1, count.max(1)))
        .map(|worker| {
            let (results, next, path, sources, servers, tls) = (
                results.clone(),
                next.clone(),
                path.clone(),
                sources.clone(),
                servers.clone(),
                tls.clone(),
            );
            tokio::task::spawn_local(async move {
                let mut rng = Rng::new(Rng::from_clock().next_u64() ^ worker as u64);
                loop {
                    let i = next.get();
                    if i >= count {
                        break;
                    }
                    next.set(i + 1);
                    let path = path(i);
                    let target = Target {
                        server: servers[i],
                        path: &path,
                        subprotocol,
                        deflate,
                        tls: tls.as_ref().as_ref(),
                    };
                    let result = conn::connect(target, sources[i], &mut rng).await;
                    results.borrow_mut()[i] =
                        Some(result.with_context(|| format!("connection {i} ({path})")));
                }
            })
        })
        .collect();
    for worker in workers {
        // A worker only ends by running out of indices; a panic is a bug here.
        worker.await.expect("connect worker panicked");
    }
    let results = Rc::try_unwrap(results).map_or_else(|rc| rc.take(), RefCell::into_inner);
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(anyhow::anyhow!("never attempted"))))
        .collect()
}

/// Opens `count` connections and fails on the first that could not be opened.
pub async fn connect_all(
    common: &Common,
    count: usize,
    path: impl Fn(usize) -> String + 'static,
    subprotocol: Option<&'static str>,
) -> anyhow::Result<Vec<(Reader, Writer)>> {
    connect_many(common, count, 64, path, subprotocol)
        .await
        .into_iter()
        .collect()
}

/// Reads until the run is done or the connection ends, handing each text message
/// to `on_text`. Errors end this connection only; what it missed counts as lost.
pub async fn receive(mut reader: Reader, shared: Rc<Shared>, mut on_text: impl FnMut(&[u8])) {
    while shared.phase.get() != Phase::Done {
        let read = reader
            .read_batch(|message| {
                if let Message::Text(text) = message {
                    on_text(text.as_bytes());
                }
            })
            .await;
        match read {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) => {
                eprintln!("loadgen: a connection failed: {error:#}");
                break;
            }
        }
    }
}

/// Paces a sender at a fixed rate: after each tick, [`Pacer::due`] tells how many
/// messages are owed so that the total follows `rate * elapsed`.
#[derive(Debug)]
pub struct Pacer {
    rate: f64,
    started: Instant,
    sent: u64,
}

/// The pacer's tick. Tokio timers have a 1 ms resolution; messages owed within a
/// tick go out together.
pub const PACER_TICK: Duration = Duration::from_millis(1);

impl Pacer {
    /// A pacer starting now.
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            started: Instant::now(),
            sent: 0,
        }
    }

    /// Messages owed now, which the caller then sends.
    pub fn due(&mut self) -> u64 {
        let target = (self.rate * self.started.elapsed().as_secs_f64()) as u64;
        let due = target.saturating_sub(self.sent);
        self.sent += due;
        due
    }
}

/// Sends at `rate` messages per second until sending stops. For each message owed,
/// `next` appends its text to an empty string and returns which writer sends it
/// and how many deliveries it should cause. Writers are flushed once per tick,
/// and kept open until the run is done: dropping a write half sends a FIN, which
/// a server may take as a close and answer by discarding deliveries still queued
/// for that client.
pub async fn send_paced(
    mut writers: Vec<Writer>,
    shared: Rc<Shared>,
    rate: f64,
    mut next: impl FnMut(&Shared, &mut String) -> (usize, u64),
) {
    let mut pacer = Pacer::new(rate);
    let mut tick = tokio::time::interval(PACER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut touched = Vec::new();
    while shared.sending() {
        tick.tick().await;
        for _ in 0..pacer.due() {
            let mut text = String::new();
            let (writer, deliveries) = next(&shared, &mut text);
            writers[writer].queue_text(text);
            shared.tally.borrow_mut().sent(deliveries);
            touched.push(writer);
        }
        for writer in touched.drain(..) {
            if let Err(error) = writers[writer].flush().await {
                // The run goes on so that the record shows the shortfall.
                eprintln!("loadgen: sender {writer} failed, sending stops: {error}");
                shared.phase.set(Phase::Draining);
            }
        }
    }
    while shared.phase.get() != Phase::Done {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(writers);
}

/// What a message scenario (echo, relay, fan-out) measured, from its tally.
pub fn measured_deliveries(
    shared: &Shared,
    unit: &'static str,
    params: String,
    connections: usize,
    window: WindowFigures,
    server: &Probe,
) -> Measured {
    let tally = shared.tally.borrow();
    Measured {
        unit,
        params,
        connections: connections as u64,
        window,
        ops: tally.window_delivered,
        sent: tally.window_sent,
        latency: Some(tally.latency.clone()),
        server_rss_bytes: server.rss_bytes().unwrap_or(0),
        rss_per_conn_bytes: None,
        expected: tally.expected,
        lost: tally.lost(),
        duplicated: tally.duplicated,
        corrupted: tally.corrupted,
    }
}

/// Appends a relay message, `{"targets":[..],"payload":PAYLOAD}`, to `out`.
pub fn write_relay_message(targets: &[u32], payload: impl FnOnce(&mut String), out: &mut String) {
    out.push_str(r#"{"targets":["#);
    for (i, target) in targets.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        // Writing to a String cannot fail.
        let _ = write!(out, "{target}");
    }
    out.push_str(r#"],"payload":"#);
    payload(out);
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pacer_owes_nothing_at_first_and_catches_up_later() {
        let mut pacer = Pacer::new(1000.0);
        assert!(pacer.due() <= 1);
        std::thread::sleep(Duration::from_millis(20));
        let owed = pacer.due();
        // At least the 20 ms slept; far more would mean the rate is ignored.
        assert!((19..=500).contains(&owed), "{owed}");
    }
}
