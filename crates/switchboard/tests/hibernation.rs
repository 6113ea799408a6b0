//! Hibernation over real sockets: a quiet connection gives up its task, and
//! everything that can reach it (a push, an info, its peer, a deadline, a
//! close, shutdown) wakes it with nothing lost. The counters of
//! [`switchboard::Stats`] show when it sleeps and wakes.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{Event, Probe, RawClient, TIMEOUT, collect, next_event, serve};
use switchboard::client::Connector;
use switchboard::proto::OpCode;
use switchboard::{
    CloseReason, ConnHandle, Message, Options, PreparedMessage, Shutdown, Stats, TerminateReason,
    WebSocketUpgrade,
};
use tokio::sync::mpsc;

const QUIET: Duration = Duration::from_millis(100);

/// Options that hibernate after [`QUIET`], counting into `stats`, and end a
/// connection 200 ms after sending a close the client (which never answers
/// one) leaves unanswered.
fn hibernating(stats: &Stats) -> Options {
    Options::default()
        .hibernate_after(Some(QUIET))
        .stats(stats.clone())
        .close_timeout(Duration::from_millis(200))
}

/// Waits until `stats` has counted `n` hibernations, and returns its wakes.
async fn hibernated(stats: &Stats, n: u64) -> u64 {
    tokio::time::timeout(TIMEOUT, async {
        loop {
            let snapshot = stats.snapshot();
            if snapshot.hibernations >= n {
                return snapshot.wakes;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the connection hibernates")
}

/// A server of probes with `options` (and `shutdown`, if given); a connected
/// client that has read the probe's greeting, the probe's events and the
/// connection's handle.
async fn connected(
    options: Options,
    shutdown: Option<Shutdown>,
) -> (
    RawClient,
    mpsc::UnboundedReceiver<Event>,
    ConnHandle<String>,
) {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (handles_tx, mut handles) = mpsc::unbounded_channel();
    let upgrade = move |ws: WebSocketUpgrade| {
        let mut probe = Probe::new(events_tx.clone());
        probe.handles = Some(handles_tx.clone());
        let ws = ws.options(options.clone());
        match &shutdown {
            Some(shutdown) => ws.shutdown(shutdown).on_upgrade(probe),
            None => ws.on_upgrade(probe),
        }
    };
    let mut client = RawClient::connect(serve(upgrade).await).await;
    let handle = handles.recv().await.unwrap();
    assert_eq!(next_event(&mut events).await, Event::Init(None));
    assert_eq!(client.recv().await, Some((OpCode::Text, b"hello".to_vec())));
    (client, events, handle)
}

fn text(s: &str) -> Option<(OpCode, Vec<u8>)> {
    Some((OpCode::Text, s.as_bytes().to_vec()))
}

/// Checks that the probe got `words` and echoed them: the connection is (or
/// was woken) awake.
async fn heard(client: &mut RawClient, events: &mut mpsc::UnboundedReceiver<Event>, words: &str) {
    assert_eq!(next_event(events).await, Event::In(words.into()));
    assert_eq!(client.recv().await, text(words));
}

/// Sends `words`, and checks that they were heard.
async fn say(client: &mut RawClient, events: &mut mpsc::UnboundedReceiver<Event>, words: &str) {
    client
        .send(&RawClient::frame(true, OpCode::Text, words.as_bytes()))
        .await;
    heard(client, events, words).await;
}

#[tokio::test]
async fn pushes_and_infos_wake_a_hibernating_connection_in_order() {
    let stats = Stats::new();
    let (mut client, mut events, handle) = connected(hibernating(&stats), None).await;
    assert_eq!(hibernated(&stats, 1).await, 0, "asleep, not woken yet");
    // A burst pushed to a sleeping connection: the first wakes it, none is lost
    // or reordered.
    for i in 0..200 {
        handle
            .push(PreparedMessage::text(format!("frame {i}")))
            .unwrap();
    }
    for i in 0..200 {
        assert_eq!(client.recv().await, text(&format!("frame {i}")));
    }
    assert!(stats.snapshot().wakes >= 1);
    // Quiet again, it sleeps again, and an info wakes it.
    hibernated(&stats, 2).await;
    handle.send("knock".into()).unwrap();
    assert_eq!(next_event(&mut events).await, Event::Info("knock".into()));
    assert_eq!(client.recv().await, text("info:knock"));
}

#[tokio::test]
async fn its_peer_wakes_a_hibernating_connection() {
    let stats = Stats::new();
    let (mut client, mut events, _handle) = connected(hibernating(&stats), None).await;
    hibernated(&stats, 1).await;
    say(&mut client, &mut events, "anyone?").await;
    assert_eq!(stats.snapshot().wakes, 1);
}

#[tokio::test]
async fn a_hibernating_connection_is_pinged_and_times_out_without_waking_for_pings() {
    let stats = Stats::new();
    let options = hibernating(&stats)
        .ping_interval(Some(Duration::from_millis(300)))
        .idle_timeout(Some(Duration::from_millis(1500)));
    let (mut client, mut events, _handle) = connected(options, None).await;
    hibernated(&stats, 1).await;
    // This client never answers pings: it gets them, then the idle timeout's close.
    let mut pings = 0;
    let close = loop {
        match client.recv_frame().await {
            Some((OpCode::Ping, payload)) => {
                assert!(payload.is_empty());
                pings += 1;
            }
            Some((OpCode::Close, payload)) => break u16::from_be_bytes([payload[0], payload[1]]),
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(close, 1001);
    assert!(pings >= 3, "{pings} pings in 1.5 s at one per 300 ms");
    // The pings went out while it slept: only the idle timeout woke it.
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.hibernations, snapshot.wakes),
        (1, 1),
        "{snapshot:?}"
    );
    assert_eq!(
        next_event(&mut events).await,
        Event::Terminate(TerminateReason::Timeout)
    );
}

/// Answers every ping `client` gets for `span` with a pong (whose payload is
/// the ping's), as a browser does; returns how many.
async fn answer_pings(client: &mut RawClient, span: Duration) -> usize {
    let mut pongs = 0;
    let until = tokio::time::Instant::now() + span;
    while let Ok(frame) = tokio::time::timeout_at(until, client.recv_frame()).await {
        let Some((OpCode::Ping, payload)) = frame else {
            panic!("unexpected {frame:?}")
        };
        client
            .send(&RawClient::frame(true, OpCode::Pong, &payload))
            .await;
        pongs += 1;
    }
    pongs
}

#[tokio::test]
async fn pongs_keep_a_hibernating_connection_alive_without_waking_it() {
    let stats = Stats::new();
    let options = hibernating(&stats)
        .ping_interval(Some(Duration::from_millis(200)))
        .idle_timeout(Some(Duration::from_millis(500)));
    let (mut client, mut events, _handle) = connected(options, None).await;
    hibernated(&stats, 1).await;
    // Three idle timeouts' worth: each pong counts as hearing from the peer.
    let pongs = answer_pings(&mut client, Duration::from_millis(1500)).await;
    assert!(pongs >= 5, "{pongs} pongs in 1.5 s at one ping per 200 ms");
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.hibernations, snapshot.wakes),
        (1, 0),
        "{snapshot:?}"
    );
    // Still open, and its first message wakes it.
    say(&mut client, &mut events, "still here").await;
    assert_eq!(stats.snapshot().wakes, 1);
}

#[tokio::test]
async fn what_comes_with_a_pong_or_without_a_ping_wakes_a_hibernating_connection() {
    let stats = Stats::new();
    let (mut client, mut events, _handle) = connected(hibernating(&stats), None).await;
    hibernated(&stats, 1).await;
    // A pong and a message in one segment: the message is not lost behind the
    // pong, which the woken task passes to the handler as an awake one does.
    let mut bytes = RawClient::frame(true, OpCode::Pong, b"unasked");
    bytes.extend(RawClient::frame(true, OpCode::Text, b"after the pong"));
    client.send(&bytes).await;
    assert_eq!(control(&mut events).await, Some(Event::Control("pong")));
    heard(&mut client, &mut events, "after the pong").await;
    assert_eq!(stats.snapshot().wakes, 1);
    // So does a pong it did not ask for (only the reply to its ping is taken asleep).
    hibernated(&stats, 2).await;
    client
        .send(&RawClient::frame(true, OpCode::Pong, b"unasked"))
        .await;
    assert_eq!(control(&mut events).await, Some(Event::Control("pong")));
    assert_eq!(stats.snapshot().wakes, 2);
    // A ping from the peer wakes it too, to be answered.
    hibernated(&stats, 3).await;
    client
        .send(&RawClient::frame(true, OpCode::Ping, b"there?"))
        .await;
    assert_eq!(
        client.recv_frame().await,
        Some((OpCode::Pong, b"there?".to_vec()))
    );
    assert_eq!(stats.snapshot().wakes, 3);
}

/// The next event, a control frame's included.
async fn control(events: &mut mpsc::UnboundedReceiver<Event>) -> Option<Event> {
    tokio::time::timeout(TIMEOUT, events.recv()).await.unwrap()
}

/// Waits for the lot's next ping, and sends `reply` to it in one write.
async fn reply_to_its_ping(client: &mut RawClient, reply: &[&[u8]]) {
    assert_eq!(client.recv_frame().await, Some((OpCode::Ping, Vec::new())));
    client.send(&reply.concat()).await;
}

#[tokio::test]
async fn only_the_empty_pong_alone_is_taken_asleep() {
    let stats = Stats::new();
    // Pings far apart against the time a connection stays awake (a period
    // after its last message): every ping is the lot's, and asks for a pong.
    let options = hibernating(&stats)
        .ping_interval(Some(Duration::from_millis(700)))
        .idle_timeout(Some(Duration::from_secs(10)));
    let (mut client, mut events, _handle) = connected(options, None).await;
    let pong = RawClient::frame(true, OpCode::Pong, b"");
    // The pong, and a message behind it: both reach the woken task.
    hibernated(&stats, 1).await;
    let text_frame = RawClient::frame(true, OpCode::Text, b"after the pong");
    reply_to_its_ping(&mut client, &[&pong, &text_frame]).await;
    assert_eq!(control(&mut events).await, Some(Event::Control("pong")));
    heard(&mut client, &mut events, "after the pong").await;
    assert_eq!(stats.snapshot().wakes, 1);
    // Two pongs for one ping: the task gets both.
    hibernated(&stats, 2).await;
    reply_to_its_ping(&mut client, &[&pong, &pong]).await;
    assert_eq!(control(&mut events).await, Some(Event::Control("pong")));
    assert_eq!(control(&mut events).await, Some(Event::Control("pong")));
    assert_eq!(stats.snapshot().wakes, 2);
    // A pong with a payload answers some other ping.
    hibernated(&stats, 3).await;
    let other = RawClient::frame(true, OpCode::Pong, b"not yours");
    reply_to_its_ping(&mut client, &[&other]).await;
    assert_eq!(control(&mut events).await, Some(Event::Control("pong")));
    assert_eq!(stats.snapshot().wakes, 3);
    // The empty pong alone is taken asleep, for pings on end.
    hibernated(&stats, 4).await;
    for _ in 0..2 {
        reply_to_its_ping(&mut client, &[&pong]).await;
    }
    // A ping later, the last pong has long been read.
    assert_eq!(client.recv_frame().await, Some((OpCode::Ping, Vec::new())));
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.hibernations, snapshot.wakes),
        (4, 3),
        "{snapshot:?}"
    );
}

#[tokio::test]
async fn a_peer_that_closes_or_vanishes_while_it_hibernates_ends_it() {
    let stats = Stats::new();
    let (mut client, mut events, _handle) = connected(hibernating(&stats), None).await;
    hibernated(&stats, 1).await;
    client
        .send(&RawClient::frame(
            true,
            OpCode::Close,
            &4000u16.to_be_bytes(),
        ))
        .await;
    assert_eq!(client.close_code().await, Some(4000));
    let Event::Terminate(TerminateReason::Remote(Some(reason))) = next_event(&mut events).await
    else {
        panic!("terminate with the peer's close")
    };
    assert_eq!(reason.code(), switchboard::CloseCode(4000));

    let stats = Stats::new();
    let (client, mut events, _handle) = connected(hibernating(&stats), None).await;
    hibernated(&stats, 1).await;
    drop(client);
    assert_eq!(
        next_event(&mut events).await,
        Event::Terminate(TerminateReason::ConnectionLost)
    );
}

#[tokio::test]
async fn closing_its_handle_closes_a_hibernating_connection() {
    let stats = Stats::new();
    let (mut client, mut events, handle) = connected(hibernating(&stats), None).await;
    hibernated(&stats, 1).await;
    handle.close(CloseReason::new(4001, "later"));
    assert_eq!(client.close_code().await, Some(4001));
    assert!(matches!(
        next_event(&mut events).await,
        Event::Terminate(TerminateReason::Normal(_))
    ));
}

#[tokio::test]
async fn shutdown_waits_for_and_closes_hibernating_connections() {
    let stats = Stats::new();
    let shutdown = Shutdown::new();
    let (mut client, mut events, _handle) =
        connected(hibernating(&stats), Some(shutdown.clone())).await;
    hibernated(&stats, 1).await;
    // No task, but still counted: drain must wait for it.
    assert_eq!(shutdown.connections(), 1);
    let drain = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { shutdown.drain(TIMEOUT).await }
    });
    assert_eq!(client.close_code().await, Some(1001));
    assert!(drain.await.unwrap(), "every connection ended");
    assert!(matches!(
        next_event(&mut events).await,
        Event::Terminate(TerminateReason::Shutdown(_))
    ));
    assert_eq!(shutdown.connections(), 0);
}

/// Regression: a connection was counted by its tasks, and for a moment as it
/// hibernated (the old task ending, a token taken) or woke it had two, so a
/// client's `/healthz` once read three connections for two. A thread reads
/// the count without pause while one connection sleeps and wakes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_counted_once_as_it_hibernates_and_wakes() {
    const CYCLES: u64 = 20;
    let stats = Stats::new();
    let shutdown = Shutdown::new();
    let options = hibernating(&stats).hibernate_after(Some(Duration::from_millis(20)));
    let (mut client, mut events, _handle) = connected(options, Some(shutdown.clone())).await;
    let reading = Arc::new(AtomicBool::new(true));
    let reader = std::thread::spawn({
        let (shutdown, reading) = (shutdown.clone(), reading.clone());
        move || {
            let (mut least, mut most, mut reads) = (usize::MAX, 0, 0_u64);
            while reading.load(Ordering::Relaxed) {
                let counted = shutdown.connections();
                (least, most) = (least.min(counted), most.max(counted));
                reads += 1;
            }
            (least, most, reads)
        }
    });
    // Stops the reader however the cycles end: a spinning thread would hold
    // a core through the rest of the suite.
    let stop = StopOnDrop(reading);
    for cycle in 1..=CYCLES {
        hibernated(&stats, cycle).await;
        say(&mut client, &mut events, &format!("wake {cycle}")).await;
    }
    drop(stop);
    let (least, most, reads) = reader.join().unwrap();
    assert!(stats.snapshot().wakes >= CYCLES);
    assert!(reads > 1_000, "the count was read {reads} times");
    assert_eq!(
        (least, most),
        (1, 1),
        "one connection, counted {least} to {most} times"
    );
}

/// Clears its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[tokio::test]
async fn a_new_connection_that_says_nothing_hibernates_without_waiting_a_period() {
    let stats = Stats::new();
    let options = hibernating(&stats).hibernate_after(Some(Duration::from_secs(600)));
    let (mut client, mut events, _handle) = connected(options, None).await;
    // Within the test's timeout, a hundredth of the period (the first look is
    // after a second).
    assert_eq!(hibernated(&stats, 1).await, 0, "asleep, not woken yet");
    say(&mut client, &mut events, "first words").await;
    assert_eq!(stats.snapshot().wakes, 1);
}

#[tokio::test]
async fn a_connection_that_keeps_talking_does_not_hibernate() {
    let stats = Stats::new();
    let (mut client, _events, _handle) = connected(hibernating(&stats), None).await;
    // New and silent, it sleeps at once; its first message wakes it.
    hibernated(&stats, 1).await;
    // A message every half period, for four periods.
    for i in 0..8 {
        let message = format!("still here {i}");
        client
            .send(&RawClient::frame(true, OpCode::Text, message.as_bytes()))
            .await;
        assert_eq!(client.recv().await, text(&message));
        tokio::time::sleep(QUIET / 2).await;
    }
    assert_eq!(stats.snapshot().hibernations, 1);
}

#[tokio::test]
async fn without_hibernate_after_a_quiet_connection_keeps_its_task() {
    let stats = Stats::new();
    let options = Options::default().stats(stats.clone());
    let (_client, _events, handle) = connected(options, None).await;
    tokio::time::sleep(QUIET * 3).await;
    assert_eq!(stats.snapshot().hibernations, 0);
    handle.push(PreparedMessage::text("x")).unwrap();
}

#[tokio::test]
async fn a_connection_waiting_on_held_work_stays_awake() {
    let stats = Stats::new();
    let options = hibernating(&stats).max_outbound_bytes(1024);
    let (mut client, mut events, handle) = connected(options, None).await;
    hibernated(&stats, 1).await;
    // Reading waits for the application's work: the peer's bytes stay unread,
    // and the socket stays readable. Asleep, the connection would wake at once,
    // find it may not read, and sleep again, over and over.
    let held = handle.outbox().hold(4096);
    client
        .send(&RawClient::frame(true, OpCode::Text, b"later"))
        .await;
    tokio::time::sleep(QUIET * 5).await;
    assert_eq!(stats.snapshot().hibernations, 1);
    drop(held);
    heard(&mut client, &mut events, "later").await;
}

/// The next message a [`collect`]ed client got.
async fn received(got: &mut mpsc::UnboundedReceiver<Result<Message, TerminateReason>>) -> Message {
    let next = tokio::time::timeout(TIMEOUT, got.recv()).await;
    next.expect("in time").expect("open").expect("a message")
}

#[tokio::test]
async fn a_compressed_connection_with_a_subprotocol_hibernates_and_wakes_intact() {
    let stats = Stats::new();
    let options = hibernating(&stats);
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let addr = serve(move |ws: WebSocketUpgrade| {
        ws.options(options.clone())
            .protocols(["proto.v1"])
            .on_upgrade(Probe::new(events_tx.clone()))
    })
    .await;
    let (handler, mut got) = collect();
    let client = Connector::new()
        .protocol("proto.v1")
        .connect(&format!("ws://{addr}/ws"), handler)
        .await
        .unwrap();
    assert!(client.compressed(), "both sides offer permessage-deflate");
    assert_eq!(
        next_event(&mut events).await,
        Event::Init(Some("proto.v1".into()))
    );
    assert_eq!(received(&mut got).await, Message::text("hello"));
    for round in 1..=2 {
        hibernated(&stats, round).await;
        // Compressed by the client: a decoder rebuilt without the peer's
        // compression would refuse it. Echoed compressed: what went out is
        // a fraction of the text.
        let big = format!("echo me, round {round}. ").repeat(1_000);
        let sent_before = stats.snapshot().bytes_out;
        client.handle().push(Message::text(big.clone())).unwrap();
        assert_eq!(next_event(&mut events).await, Event::In(big.clone()));
        assert_eq!(received(&mut got).await, Message::text(big.clone()));
        let sent = stats.snapshot().bytes_out - sent_before;
        assert!(
            sent < big.len() as u64 / 10,
            "{sent} bytes for {}",
            big.len()
        );
        assert_eq!(stats.snapshot().wakes, round);
    }
}
