//! Relay: N clients in the seed protocol (`/ws?id=1..N`), sending at a fixed total
//! rate, round robin, messages to K random other clients each. Every receiver
//! checks the payload and that it was one of the message's targets.

use anyhow::ensure;

use super::{
    Shared, abort_all, connect_all, measure_window, measured_deliveries, receive, send_paced,
    write_relay_message,
};
use crate::cli::{Common, RelayArgs};
use crate::payload::{self, Stamp};
use crate::record::Measured;
use crate::tally::Tally;
use crate::targets::Picker;

/// Runs the relay scenario.
pub async fn run(common: &Common, args: &RelayArgs) -> anyhow::Result<Measured> {
    let picker = Picker {
        clients: args.clients,
        per_message: args.targets,
    };
    ensure!(
        args.clients >= 3 && picker.is_valid(),
        "need K >= 1 targets and at least 2K+1 clients"
    );
    ensure!(args.rate > 0.0, "the rate must be positive");
    let server = common.probe();
    let clients = args.clients as usize;
    let conns = connect_all(common, clients, |i| format!("/ws?id={}", i + 1), None).await?;
    let shared = Shared::new(Tally::new(clients, clients));
    let (readers, writers): (Vec<_>, Vec<_>) = conns.into_iter().unzip();

    let size = args.size;
    let mut tasks: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(index, reader)| {
            let receiver = shared.clone();
            let id = index as u32 + 1;
            let (mut scratch, mut targets) = (String::new(), Vec::new());
            tokio::task::spawn_local(receive(reader, shared.clone(), move |bytes| {
                let now = receiver.clock.now_ns();
                let mut tally = receiver.tally.borrow_mut();
                let checked = payload::check(bytes, size, &mut scratch)
                    .filter(|stamp| picker.is_target(stamp.from, stamp.seq, id, &mut targets));
                match checked.and_then(|stamp| Some((stamp.from.checked_sub(1)?, stamp))) {
                    Some((sender, stamp)) => tally.deliver(index, sender as usize, &stamp, now),
                    None => tally.corrupt(),
                }
            }))
        })
        .collect();

    let mut seqs = vec![0u32; clients];
    let mut turn = 0;
    let mut targets = Vec::new();
    let sender = send_paced(writers, shared.clone(), args.rate, move |shared, text| {
        let index = turn;
        turn = (turn + 1) % clients;
        seqs[index] += 1;
        let stamp = Stamp {
            from: index as u32 + 1,
            seq: seqs[index],
            sent_ns: shared.clock.now_ns(),
        };
        picker.pick(stamp.from, stamp.seq, &mut targets);
        write_relay_message(&targets, |out| payload::write(&stamp, size, out), text);
        (index, targets.len() as u64)
    });
    tasks.push(tokio::task::spawn_local(sender));

    let window = measure_window(&shared, &server, common.timing()).await?;
    abort_all(&tasks);
    let params = format!(
        "N={} K={} rate={}/s S={}",
        args.clients, args.targets, args.rate, args.size
    );
    Ok(measured_deliveries(
        &shared, "delivery", params, clients, window, &server,
    ))
}
