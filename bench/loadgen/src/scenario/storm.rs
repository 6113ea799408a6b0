//! Connect storm: workers that each, in a loop, open a TCP connection, complete
//! the opening handshake as relay client, send a close frame and hang up. The
//! rate of completed handshakes, their latency (connect to `101`), and the
//! server CPU per handshake are measured.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use switchboard_proto::{CloseReason, Message};

use super::abort_all;
use crate::cli::{Common, StormArgs};
use crate::conn::{self, HANDSHAKE_TIMEOUT, Target, Tls};
use crate::histogram::Histogram;
use crate::measure::Window;
use crate::record::Measured;
use crate::rng::Rng;

/// Handshake counts shared by the workers.
#[derive(Debug, Default)]
struct Counts {
    measuring: bool,
    completed: u64,
    failed: u64,
    window_completed: u64,
    latency: Histogram,
}

/// Runs the connect-storm scenario.
pub async fn run(common: &Common, args: &StormArgs) -> anyhow::Result<Measured> {
    ensure!(args.concurrency > 0, "need at least one worker");
    let server = common.probe();
    let timing = common.timing();
    let counts = Rc::new(RefCell::new(Counts::default()));
    let running = Rc::new(Cell::new(true));
    let attempts = Rc::new(Cell::new(0usize));
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|worker| {
            let worker = Worker {
                server: common.addr_for(worker),
                deflate: common.deflate,
                tls: common.tls_ca.clone(),
                sources: (0..usize::from(common.sources))
                    .map(|i| common.source(i))
                    .collect(),
                counts: counts.clone(),
                running: running.clone(),
                attempts: attempts.clone(),
                rng: Rng::new(Rng::from_clock().next_u64() ^ worker as u64),
            };
            tokio::task::spawn_local(worker.run())
        })
        .collect();

    tokio::time::sleep(timing.warmup).await;
    counts.borrow_mut().measuring = true;
    let window = Window::open(&server)?;
    tokio::time::sleep(timing.duration).await;
    let window = window.close()?;
    counts.borrow_mut().measuring = false;
    running.set(false);
    // Workers finish the handshake they are in; each is bounded by its timeout.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT + Duration::from_secs(1);
    while !tasks.iter().all(|t| t.is_finished()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    abort_all(&tasks);

    let counts = counts.borrow();
    Ok(Measured {
        unit: "handshake",
        params: format!("workers={}", args.concurrency),
        connections: args.concurrency as u64,
        window,
        ops: counts.window_completed,
        sent: counts.window_completed,
        latency: Some(counts.latency.clone()),
        server_rss_bytes: server.rss_bytes().unwrap_or(0),
        rss_per_conn_bytes: None,
        expected: counts.completed + counts.failed,
        lost: counts.failed,
        duplicated: 0,
        corrupted: 0,
    })
}

/// One worker's loop.
struct Worker {
    server: std::net::SocketAddr,
    deflate: bool,
    tls: Option<Tls>,
    sources: Vec<std::net::IpAddr>,
    counts: Rc<RefCell<Counts>>,
    running: Rc<Cell<bool>>,
    attempts: Rc<Cell<usize>>,
    rng: Rng,
}

impl Worker {
    async fn run(mut self) {
        while self.running.get() {
            let attempt = self.attempts.get();
            self.attempts.set(attempt + 1);
            let path = format!("/ws?id={}", attempt % 100_000 + 1);
            let target = Target {
                server: self.server,
                path: &path,
                subprotocol: None,
                deflate: self.deflate,
                tls: self.tls.as_ref(),
            };
            let started = Instant::now();
            let source = self.sources[attempt % self.sources.len()];
            match conn::connect(target, source, &mut self.rng).await {
                Ok((_reader, mut writer)) => {
                    let elapsed = started.elapsed().as_nanos() as u64;
                    {
                        let mut counts = self.counts.borrow_mut();
                        counts.completed += 1;
                        if counts.measuring {
                            counts.window_completed += 1;
                            counts.latency.record(elapsed);
                        }
                    }
                    // Say goodbye properly; the server's reply is not awaited.
                    writer.queue(&Message::Close(Some(CloseReason::new(1000u16, ""))));
                    let _ = writer.flush().await;
                }
                Err(error) => {
                    let failed = {
                        let mut counts = self.counts.borrow_mut();
                        counts.failed += 1;
                        counts.failed
                    };
                    if failed == 1 {
                        eprintln!("loadgen: first failed handshake: {error:#}");
                    }
                    // Back off a little so that a refusing server is not spun on.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}
