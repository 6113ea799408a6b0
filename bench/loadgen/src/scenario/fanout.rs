//! Fan-out: one publisher whose every message reaches all N subscribers, at a
//! fixed rate. Either the message lists every subscriber id as a target (seed
//! protocol), or (`--topic`) subscribers join the `switchboard.v1` topic
//! `bench:t` and the publisher publishes to it.

use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use switchboard_proto::Message;

use super::{
    Shared, abort_all, connect_all, measure_window, measured_deliveries, receive, send_paced,
    write_relay_message,
};
use crate::cli::{Common, FanoutArgs};
use crate::conn::{Reader, Writer};
use crate::payload::{self, Stamp};
use crate::record::Measured;
use crate::tally::Tally;

/// The subprotocol that has topics.
const V1: &str = "switchboard.v1";
/// The topic the topic variant uses.
const TOPIC: &str = "bench:t";
/// How long all subscriptions may take to be acknowledged.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the fan-out scenario.
pub async fn run(common: &Common, args: &FanoutArgs) -> anyhow::Result<Measured> {
    ensure!(
        args.subscribers > 0 && args.rate > 0.0,
        "need subscribers and a positive rate"
    );
    let server = common.probe();
    let subscribers = args.subscribers as usize;
    let subprotocol = args.topic.then_some(V1);
    let mut conns = connect_all(
        common,
        subscribers,
        |i| format!("/ws?id={}", i + 1),
        subprotocol,
    )
    .await?;
    if args.topic {
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribe_all(&mut conns))
            .await
            .context("subscribing timed out")??;
    }
    let publisher_id = args.subscribers + 1;
    let publisher = connect_all(
        common,
        1,
        move |_| format!("/ws?id={publisher_id}"),
        subprotocol,
    )
    .await?;
    let shared = Shared::new(Tally::new(subscribers, 1));

    // The subscribers' writers stay open until the end: dropping a write half
    // shuts the socket down for writing, which a server may take as a close.
    let (readers, subscriber_writers): (Vec<_>, Vec<_>) = conns.into_iter().unzip();
    let (size, topic) = (args.size, args.topic);
    let mut tasks: Vec<_> = readers
        .into_iter()
        .enumerate()
        .map(|(index, reader)| {
            let receiver = shared.clone();
            let mut scratch = String::new();
            tokio::task::spawn_local(receive(reader, shared.clone(), move |bytes| {
                let now = receiver.clock.now_ns();
                let mut tally = receiver.tally.borrow_mut();
                let inner = if topic {
                    payload::unwrap_envelope(bytes)
                } else {
                    Some(bytes)
                };
                match inner.and_then(|inner| payload::check(inner, size, &mut scratch)) {
                    Some(stamp) if stamp.from == publisher_id => {
                        tally.deliver(index, 0, &stamp, now)
                    }
                    _ => tally.corrupt(),
                }
            }))
        })
        .collect();

    // Everything before the payload is the same for every message.
    let mut prefix = String::new();
    if topic {
        prefix = format!(r#"{{"type":"publish","topic":"{TOPIC}","payload":"#);
    } else {
        let all: Vec<u32> = (1..=args.subscribers).collect();
        write_relay_message(&all, |_| {}, &mut prefix);
        prefix.pop(); // the closing brace, written after the payload
    }
    let writers = publisher
        .into_iter()
        .map(|(_reader, writer)| writer)
        .collect();
    let mut seq = 0;
    let sender = send_paced(writers, shared.clone(), args.rate, move |shared, text| {
        seq += 1;
        let stamp = Stamp {
            from: publisher_id,
            seq,
            sent_ns: shared.clock.now_ns(),
        };
        text.push_str(&prefix);
        payload::write(&stamp, size, text);
        text.push('}');
        (0, subscribers as u64)
    });
    tasks.push(tokio::task::spawn_local(sender));

    let window = measure_window(&shared, &server, common.timing()).await?;
    abort_all(&tasks);
    drop(subscriber_writers);
    let via = if topic { "topic" } else { "targets" };
    let params = format!(
        "N={} rate={}/s S={} via {via}",
        args.subscribers, args.rate, args.size
    );
    Ok(measured_deliveries(
        &shared,
        "delivery",
        params,
        subscribers + 1,
        window,
        &server,
    ))
}

/// Subscribes every connection to [`TOPIC`] and waits for each acknowledgement.
async fn subscribe_all(conns: &mut [(Reader, Writer)]) -> anyhow::Result<()> {
    let request = format!(r#"{{"type":"subscribe","topic":"{TOPIC}","id":1}}"#);
    for (_, writer) in conns.iter_mut() {
        writer.queue_text(request.clone());
        writer.flush().await?;
    }
    for (index, (reader, _)) in conns.iter_mut().enumerate() {
        let mut acked = false;
        while !acked {
            let mut refusal = None;
            let open = reader
                .read_batch(|message| {
                    if let Message::Text(text) = message {
                        let text = text.as_str();
                        if text.contains(r#""type":"ack""#) {
                            acked = true;
                        } else if text.contains(r#""type":"error""#) {
                            refusal = Some(text.to_owned());
                        }
                    }
                })
                .await?;
            if let Some(error) = refusal {
                bail!("subscriber {index} was refused: {error}");
            }
            ensure!(
                open,
                "subscriber {index} was closed before its subscription was acknowledged"
            );
        }
    }
    Ok(())
}
