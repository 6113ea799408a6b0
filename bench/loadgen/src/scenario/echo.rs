//! Echo: C connections to an echo route, each keeping W messages of S bytes in
//! flight. A closed loop: every reply that arrives is answered with the next
//! message, so the rate is whatever the server (or the load generator) sustains.

use std::rc::Rc;

use anyhow::ensure;
use switchboard_proto::Message;

use super::{Phase, Shared, abort_all, connect_all, measure_window, measured_deliveries};
use crate::cli::{Common, EchoArgs};
use crate::conn::{Reader, Writer};
use crate::payload::{self, Stamp};
use crate::record::Measured;
use crate::tally::Tally;

/// Runs the echo scenario.
pub async fn run(common: &Common, args: &EchoArgs) -> anyhow::Result<Measured> {
    ensure!(
        args.connections > 0 && args.window > 0,
        "need at least one connection and a window of one"
    );
    let server = common.probe();
    let path = args.path.clone();
    let conns = connect_all(common, args.connections, move |_| path.clone(), None).await?;
    let shared = Shared::new(Tally::new(args.connections, 1));
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(index, (reader, writer))| {
            let conn = EchoConn {
                index,
                seq: 0,
                size: args.size,
                shared: shared.clone(),
            };
            tokio::task::spawn_local(conn.run(reader, writer, args.window))
        })
        .collect();
    let window = measure_window(&shared, &server, common.timing()).await?;
    abort_all(&tasks);
    let params = format!("C={} W={} S={}", args.connections, args.window, args.size);
    Ok(measured_deliveries(
        &shared,
        "echo",
        params,
        args.connections,
        window,
        &server,
    ))
}

/// One echo connection's sending state.
struct EchoConn {
    index: usize,
    seq: u32,
    size: usize,
    shared: Rc<Shared>,
}

impl EchoConn {
    async fn run(mut self, mut reader: Reader, mut writer: Writer, window: u32) {
        for _ in 0..window {
            self.queue_next(&mut writer);
        }
        let mut scratch = String::new();
        while self.shared.phase.get() != Phase::Done {
            if let Err(error) = writer.flush().await {
                eprintln!("loadgen: echo connection {} failed: {error}", self.index);
                return;
            }
            let mut replies = 0;
            let read = reader
                .read_batch(|message| {
                    if let Message::Text(text) = message {
                        self.check(text.as_bytes(), &mut scratch);
                        replies += 1;
                    }
                })
                .await;
            match read {
                Ok(true) => {}
                Ok(false) => return,
                Err(error) => {
                    eprintln!("loadgen: echo connection {} failed: {error:#}", self.index);
                    return;
                }
            }
            if self.shared.sending() {
                for _ in 0..replies {
                    self.queue_next(&mut writer);
                }
            }
        }
    }

    fn queue_next(&mut self, writer: &mut Writer) {
        self.seq += 1;
        let stamp = Stamp {
            from: self.index as u32,
            seq: self.seq,
            sent_ns: self.shared.clock.now_ns(),
        };
        writer.queue_text(payload::render(&stamp, self.size));
        self.shared.tally.borrow_mut().sent(1);
    }

    fn check(&self, bytes: &[u8], scratch: &mut String) {
        let now = self.shared.clock.now_ns();
        let mut tally = self.shared.tally.borrow_mut();
        match payload::check(bytes, self.size, scratch) {
            Some(stamp) if stamp.from == self.index as u32 => {
                tally.deliver(self.index, 0, &stamp, now)
            }
            _ => tally.corrupt(),
        }
    }
}
