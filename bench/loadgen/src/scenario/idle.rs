//! Idle: N relay clients connected and silent. The server's RSS growth from
//! before the first connection to the end of the hold, divided by the connections
//! held, is its memory per idle connection. A ping on every connection at the end
//! checks that they were all still alive.

use std::cell::Cell;
use std::rc::Rc;

use bytes::Bytes;
use switchboard_proto::Message;

use super::{abort_all, connect_many};
use crate::cli::{Common, IdleArgs};
use crate::conn::{Reader, Writer};
use crate::measure::Window;
use crate::record::{HELD, Measured};

/// Runs the idle scenario.
pub async fn run(common: &Common, args: &IdleArgs) -> anyhow::Result<Measured> {
    let server = common.probe();
    let timing = common.timing();
    let rss_before = server.rss_bytes()?;
    let results = connect_many(
        common,
        args.connections,
        args.concurrency,
        |i| format!("/ws?id={}", i + 1),
        None,
    )
    .await;
    let mut conns = Vec::with_capacity(results.len());
    let mut failures = 0;
    for result in results {
        match result {
            Ok(conn) => conns.push(conn),
            Err(error) => {
                if failures == 0 {
                    eprintln!("loadgen: first failed connection: {error:#}");
                }
                failures += 1;
            }
        }
    }
    if failures > 0 {
        eprintln!(
            "loadgen: {failures} of {} connections failed",
            args.connections
        );
    }

    // The warm-up lets the server settle after the handshakes; the window then
    // measures what holding the connections costs.
    tokio::time::sleep(timing.warmup).await;
    let window = Window::open(&server)?;
    tokio::time::sleep(timing.duration).await;
    let window = window.close()?;
    let rss_after = server.rss_bytes()?;
    let held = conns.len();
    let alive = ping_all(conns, timing.drain).await;

    Ok(Measured {
        unit: HELD,
        params: format!("N={}", args.connections),
        connections: held as u64,
        window,
        ops: held as u64,
        sent: 0,
        latency: None,
        server_rss_bytes: rss_after,
        rss_per_conn_bytes: (held > 0)
            .then(|| (rss_after as f64 - rss_before as f64) / held as f64),
        expected: args.connections as u64,
        lost: (args.connections - alive) as u64,
        duplicated: 0,
        corrupted: 0,
    })
}

/// Pings every connection and counts those that answer within `timeout`.
async fn ping_all(conns: Vec<(Reader, Writer)>, timeout: std::time::Duration) -> usize {
    let alive = Rc::new(Cell::new(0));
    let mut tasks: Vec<_> = conns
        .into_iter()
        .map(|(reader, writer)| tokio::task::spawn_local(ping(reader, writer, alive.clone())))
        .collect();
    let all = async {
        for task in tasks.iter_mut() {
            let _ = task.await;
        }
    };
    let _ = tokio::time::timeout(timeout, all).await;
    abort_all(&tasks);
    alive.get()
}

async fn ping(mut reader: Reader, mut writer: Writer, alive: Rc<Cell<usize>>) {
    writer.queue(&Message::Ping(Bytes::from_static(b"alive?")));
    if writer.flush().await.is_err() {
        return;
    }
    let mut ponged = false;
    while !ponged {
        match reader
            .read_batch(|message| ponged |= matches!(message, Message::Pong(_)))
            .await
        {
            Ok(true) => {}
            _ => return,
        }
    }
    alive.set(alive.get() + 1);
}
