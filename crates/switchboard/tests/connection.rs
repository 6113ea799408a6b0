//! The connection as a whole: upgrade rejections, hand-built bytes, protocol
//! errors and their close codes, backpressure, the registry and shutdown.

mod common;

use std::time::Duration;

use common::{Event, Probe, RawClient, TIMEOUT, handing_out_handles, next_event, serve};
use switchboard::proto::OpCode;
use switchboard::{
    Broker, ConnHandle, Options, PushError, Registry, Shutdown, SlowConsumerPolicy, TerminateReason,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

async fn probe_server(options: Options) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve(move |ws| {
        ws.options(options.clone())
            .on_upgrade(Probe::new(tx.clone()))
    })
    .await;
    (addr, rx)
}

/// Polls `check` until it holds or the timeout passes.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_headers_never_end_is_dropped_after_30_s() {
    // The clock is paused: it jumps to the next timer whenever the runtime waits.
    let (addr, _events) = probe_server(Options::default()).await;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "the half-sent request was still open after 60 s"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(30),
        "dropped too early"
    );
}

#[tokio::test]
async fn bad_upgrade_requests_get_clear_http_errors() {
    let (addr, _events) = probe_server(Options::default()).await;
    let good = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let cases = [
        (
            format!(
                "POST /ws HTTP/1.1\r\nHost: localhost\r\n{good}Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n"
            ),
            "405",
        ),
        ("GET /ws HTTP/1.1\r\nHost: localhost\r\n\r\n".to_string(), "426"),
        (
            format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{good}Sec-WebSocket-Version: 8\r\n\r\n"),
            "426",
        ),
        (
            format!(
                "GET /ws HTTP/1.1\r\nHost: localhost\r\n{good}Sec-WebSocket-Version: 13\r\n\
                 Sec-WebSocket-Version: 8\r\n\r\n"
            ),
            "426",
        ),
        (
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                .to_string(),
            "400",
        ),
        (
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: short\r\nSec-WebSocket-Version: 13\r\n\r\n"
                .to_string(),
            "400",
        ),
        (
            format!(
                "GET /ws HTTP/1.1\r\nHost: localhost\r\n{good}Sec-WebSocket-Key: \
                 AQIDBAUGBwgJCgsMDQ4PEA==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ),
            "400",
        ),
        // No Host, and two (RFC 6455 §4.2.1).
        (
            format!("GET /ws HTTP/1.1\r\n{good}Sec-WebSocket-Version: 13\r\n\r\n"),
            "400",
        ),
        (
            format!(
                "GET /ws HTTP/1.1\r\nHost: localhost\r\nHost: elsewhere\r\n{good}\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            ),
            "400",
        ),
    ];
    for (request, status) in cases {
        let (head, _) = RawClient::request(addr, &request).await;
        assert!(
            head.starts_with(&format!("HTTP/1.1 {status}")),
            "{request:?} -> {head}"
        );
        if status == "426" {
            assert!(
                head.to_ascii_lowercase()
                    .contains("sec-websocket-version: 13"),
                "{head}"
            );
        }
    }
}

#[tokio::test]
async fn list_headers_may_come_on_several_lines() {
    let (addr, _events) = probe_server(Options::default()).await;
    let request = "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
                   Connection: keep-alive\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Extensions: x-unknown\r\n\
                   Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n";
    let (head, _) = RawClient::request(addr, request).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-extensions: permessage-deflate"),
        "the offer on the second line is taken: {head}"
    );
}

#[tokio::test]
async fn frames_sent_one_byte_at_a_time_are_reassembled() {
    let (addr, _events) = probe_server(Options::default()).await;
    let mut client = RawClient::connect(addr).await;
    assert_eq!(client.recv().await.unwrap().1, b"hello");
    let mut bytes = RawClient::frame(false, OpCode::Text, "frag".as_bytes());
    bytes.extend(RawClient::frame(true, OpCode::Ping, b"mid"));
    bytes.extend(RawClient::frame(
        true,
        OpCode::Continuation,
        "mentéd".as_bytes(),
    ));
    client.send_bytewise(&bytes).await;
    assert_eq!(
        client.recv().await.unwrap(),
        (OpCode::Pong, b"mid".to_vec())
    );
    assert_eq!(
        client.recv().await.unwrap(),
        (OpCode::Text, "fragmentéd".as_bytes().to_vec())
    );
}

#[tokio::test]
async fn protocol_errors_close_with_their_codes() {
    let options = Options::default().max_message_size(1000);
    let (addr, mut events) = probe_server(options).await;
    let unmasked = vec![0x81, 0x02, b'h', b'i'];
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("unmasked frame", unmasked, 1002),
        (
            "reserved opcode",
            RawClient::frame(true, OpCode::Text, b"x")
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 0 { 0x83 } else { b })
                .collect(),
            1002,
        ),
        (
            "invalid UTF-8",
            RawClient::frame(true, OpCode::Text, b"ok \xff\xfe"),
            1007,
        ),
        (
            "oversize message",
            RawClient::frame(true, OpCode::Binary, &[0; 2000]),
            1009,
        ),
        (
            "unexpected continuation",
            RawClient::frame(true, OpCode::Continuation, b"x"),
            1002,
        ),
    ];
    for (what, bytes, code) in cases {
        let mut client = RawClient::connect(addr).await;
        client.recv().await;
        client.send(&bytes).await;
        assert_eq!(client.close_code().await, Some(code), "{what}");
        // The server then shuts down its side of the TCP connection, and keeps
        // reading (discarding) until we close ours.
        assert_eq!(client.recv().await, None, "{what}");
        drop(client);
        next_event(&mut events).await;
        assert!(
            matches!(
                next_event(&mut events).await,
                Event::Terminate(TerminateReason::Error(_))
            ),
            "{what}"
        );
    }
}

#[tokio::test]
async fn invalid_utf8_fails_before_the_frame_is_complete() {
    let (addr, _events) = probe_server(Options::default()).await;
    let mut client = RawClient::connect(addr).await;
    client.recv().await;
    let frame = RawClient::frame(
        true,
        OpCode::Text,
        &[b"abc\xff".as_slice(), &[b'x'; 1000]].concat(),
    );
    // Send only the start: the server must fail fast without waiting for the rest.
    client.send(&frame[..20]).await;
    assert_eq!(client.close_code().await, Some(1007));
}

/// A probe server with a 256 KiB outbound budget that closes slow consumers with
/// 1013, and a receiver of each connection's handle.
async fn slow_consumer_server(
    close_timeout: Duration,
) -> (
    std::net::SocketAddr,
    mpsc::UnboundedReceiver<Event>,
    mpsc::UnboundedReceiver<ConnHandle<String>>,
) {
    let options = Options::default()
        .max_outbound_bytes(256 * 1024)
        .slow_consumer(SlowConsumerPolicy::Close(
            switchboard::CloseCode::TRY_AGAIN_LATER,
        ))
        .close_timeout(close_timeout);
    let (upgrade, events, handles) = handing_out_handles(options);
    (serve(upgrade).await, events, handles)
}

/// The receive buffer of clients that never read, fixed so that what the
/// kernel holds for them is known.
const CLIENT_RECEIVE_BUFFER: u32 = 64 * 1024;

/// The most the kernel may hold of one loopback connection's data, sent but
/// not yet read: the sender's largest send buffer (net.ipv4.tcp_wmem, its
/// third field) and the client's fixed receive buffer, which the kernel doubles.
fn kernel_buffers() -> usize {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem").unwrap();
    let send: usize = text.split_whitespace().nth(2).unwrap().parse().unwrap();
    send + 2 * CLIENT_RECEIVE_BUFFER as usize
}

/// Pushes 64 KiB messages through `handle` until one is refused; returns why,
/// and how many bytes were accepted.
async fn fill(handle: &ConnHandle<String>) -> (PushError, usize) {
    const CHUNK: usize = 64 * 1024;
    let chunk = switchboard::PreparedMessage::binary(vec![7u8; CHUNK]);
    // What waits in our queue (the 256 KiB budget), plus what the kernel holds
    // (frames written straight to the socket), plus the frame being refused.
    let bound = 256 * 1024 + kernel_buffers() + CHUNK;
    let mut accepted = 0usize;
    loop {
        match handle.push(chunk.clone()) {
            Ok(()) => accepted += CHUNK,
            Err(e) => return (e, accepted),
        }
        assert!(
            accepted <= bound,
            "{accepted} bytes accepted, over the {bound} bytes the budget and the kernel can hold"
        );
        tokio::task::yield_now().await;
    }
}

/// Waits for the probe's `terminate`.
async fn terminated(events: &mut mpsc::UnboundedReceiver<Event>) -> TerminateReason {
    loop {
        if let Event::Terminate(reason) = next_event(events).await {
            return reason;
        }
    }
}

#[tokio::test]
async fn a_slow_consumer_is_closed_and_its_buffer_stays_bounded() {
    let (addr, _events, mut handles) = slow_consumer_server(Duration::from_secs(5)).await;
    // This client never reads until the end.
    let mut client = RawClient::connect_with_receive_buffer(addr, CLIENT_RECEIVE_BUFFER).await;
    let handle = handles.recv().await.unwrap();
    let (refused, accepted) = fill(&handle).await;
    assert_eq!(refused, PushError::SlowConsumer);
    assert!(
        accepted >= 256 * 1024,
        "refused after only {accepted} bytes"
    );
    let chunk = switchboard::PreparedMessage::binary(vec![7u8; 16]);
    assert_eq!(handle.push(chunk), Err(PushError::Closed));
    assert_eq!(client.close_code().await, Some(1013));
}

#[tokio::test]
async fn work_held_past_the_budget_pauses_reading_until_it_is_done() {
    let options = Options::default().max_outbound_bytes(1024);
    let (upgrade, mut events, mut handles) = common::handing_out_handles(options);
    let mut client = RawClient::connect(serve(upgrade).await).await;
    let handle = handles.recv().await.unwrap();
    assert_eq!(next_event(&mut events).await, Event::Init(None));
    // Within the budget: messages are read.
    let small = handle.outbox().hold(512);
    client
        .send(&RawClient::frame(true, OpCode::Text, b"one"))
        .await;
    assert_eq!(next_event(&mut events).await, Event::In("one".into()));
    // Past it: nothing more is read while the work is in flight.
    let big = handle.outbox().hold(1024);
    client
        .send(&RawClient::frame(true, OpCode::Text, b"two"))
        .await;
    let early = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
    assert!(early.is_err(), "read while held past the budget: {early:?}");
    drop(big);
    assert_eq!(next_event(&mut events).await, Event::In("two".into()));
    drop(small);
}

/// Regression: messages that arrived in one read were all handled, however
/// much their answers queued past `max_outbound_bytes` (one small message
/// can ask for a big answer: a presence page), so one read could queue many
/// times the budget. Now handling pauses once the queue is over it, and
/// what was read waits, counted against the receive budget.
#[tokio::test]
async fn messages_read_together_wait_while_an_answer_is_over_the_budget() {
    let options = Options::default()
        .max_outbound_bytes(1024)
        .max_message_size(16 << 20);
    let (upgrade, mut events, _handles) = common::handing_out_handles(options);
    let addr = serve(upgrade).await;
    let mut client = RawClient::connect_with_receive_buffer(addr, CLIENT_RECEIVE_BUFFER).await;
    assert_eq!(next_event(&mut events).await, Event::Init(None));
    // Its echo is more than the kernel holds for a client that does not read.
    let big = "a".repeat(kernel_buffers() + 64 * 1024);
    let mut both = RawClient::frame(true, OpCode::Text, big.as_bytes());
    both.extend(RawClient::frame(true, OpCode::Text, b"two"));
    client.send(&both).await;
    assert_eq!(next_event(&mut events).await, Event::In(big.clone()));
    let early = tokio::time::timeout(Duration::from_millis(300), events.recv()).await;
    assert!(
        early.is_err(),
        "handled with the queue over the budget: {early:?}"
    );
    // The client reads the greeting and the echo: the queue drains, and what
    // waited is handled.
    assert_eq!(client.recv().await, Some((OpCode::Text, b"hello".to_vec())));
    assert_eq!(
        client.recv().await.map(|(_, payload)| payload.len()),
        Some(big.len())
    );
    assert_eq!(next_event(&mut events).await, Event::In("two".into()));
}

/// Regression: bytes that completed nothing counted as activity, so a peer
/// could hold the start of a message (and its part of the receive budget:
/// up to what a first compressed fragment inflates to) for ever, with a
/// ping now and then. A message begun must now come whole within the idle
/// timeout of its start; pings still keep a connection holding nothing open.
#[tokio::test]
async fn a_message_begun_must_come_whole_within_the_idle_timeout() {
    let idle = Duration::from_millis(600);
    let options = Options::default()
        .idle_timeout(Some(idle))
        .ping_interval(None);
    let (upgrade, mut events, _handles) = common::handing_out_handles(options);
    let mut client = RawClient::connect(serve(upgrade).await).await;
    assert_eq!(next_event(&mut events).await, Event::Init(None));
    assert_eq!(client.recv().await, Some((OpCode::Text, b"hello".to_vec())));
    let ping = RawClient::frame(true, OpCode::Ping, b"");
    // Holding nothing: its pings keep it open past the timeout.
    for _ in 0..5 {
        tokio::time::sleep(idle / 3).await;
        client.send(&ping).await;
        assert_eq!(client.recv().await, Some((OpCode::Pong, Vec::new())));
    }
    // Quiet for most of the timeout, then a message begun, then only pings:
    // closed once the timeout has run from the message's start, not from the
    // activity before it.
    tokio::time::sleep(idle * 2 / 3).await;
    client
        .send(&RawClient::frame(false, OpCode::Text, b"the start"))
        .await;
    let began = tokio::time::Instant::now();
    let closed = loop {
        tokio::time::sleep(idle / 3).await;
        assert!(began.elapsed() < idle * 4, "still open, pinging");
        client.send(&ping).await;
        match client.recv().await {
            Some((OpCode::Pong, _)) => {}
            other => break other,
        }
    };
    let (opcode, payload) = closed.expect("a close frame");
    assert_eq!(opcode, OpCode::Close);
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 1001);
    assert!(
        began.elapsed() >= idle,
        "closed early: {:?}",
        began.elapsed()
    );
}

#[tokio::test]
async fn a_peer_that_never_reads_is_dropped_at_the_close_timeout() {
    let close_timeout = Duration::from_millis(300);
    let (addr, mut events, mut handles) = slow_consumer_server(close_timeout).await;
    // Connected, and never reads or closes: the close frame waits behind data the
    // peer will not take, and the connection must still end, at the close timeout.
    let _client = RawClient::connect_with_receive_buffer(addr, CLIENT_RECEIVE_BUFFER).await;
    let handle = handles.recv().await.unwrap();
    assert_eq!(fill(&handle).await.0, PushError::SlowConsumer);
    // The close (and its deadline) comes after the refusal.
    let refused = tokio::time::Instant::now();
    let reason = terminated(&mut events).await;
    let took = refused.elapsed();
    let TerminateReason::SlowConsumer(close) = &reason else {
        panic!("ended as {reason:?}, not as a slow consumer");
    };
    assert_eq!(close.code(), switchboard::CloseCode::TRY_AGAIN_LATER);
    assert!(
        took >= close_timeout && took < close_timeout + Duration::from_secs(2),
        "ended {took:?} after the close, with a close timeout of {close_timeout:?}"
    );
}

#[tokio::test]
async fn a_peer_that_keeps_talking_and_never_closes_is_dropped_at_the_close_timeout() {
    let close_timeout = Duration::from_millis(300);
    let (addr, mut events, mut handles) = slow_consumer_server(close_timeout).await;
    let mut client = RawClient::connect(addr).await;
    let handle = handles.recv().await.unwrap();
    let closed = tokio::time::Instant::now();
    handle.close(switchboard::CloseReason::new(1001u16, "bye"));
    // The client never answers our close, and keeps sending: every read of the
    // server's makes progress, and the close deadline must still be kept. A
    // failed write means the server has hung up.
    let frame = RawClient::frame(true, OpCode::Binary, &[5u8; 512]);
    let mut talking = true;
    let reason = tokio::time::timeout(TIMEOUT, async {
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Terminate(reason)) => return reason,
                    Some(_) => {}
                    None => panic!("the probe's events ended without terminate"),
                },
                sent = client.stream.write_all(&frame), if talking => talking = sent.is_ok(),
            }
        }
    })
    .await
    .expect("the connection outlived its close timeout");
    let took = closed.elapsed();
    assert_eq!(
        reason,
        TerminateReason::Normal(switchboard::CloseReason::new(1001u16, "bye"))
    );
    assert!(
        took >= close_timeout && took < close_timeout + Duration::from_secs(2),
        "ended {took:?} after the close, with a close timeout of {close_timeout:?}"
    );
}

#[tokio::test]
async fn frames_queued_when_the_client_half_closes_are_still_delivered() {
    let (upgrade, _events, mut handles) =
        handing_out_handles(Options::default().max_outbound_bytes(64 << 20));
    let mut client = RawClient::connect(serve(upgrade).await).await;
    let handle = handles.recv().await.unwrap();
    assert_eq!(client.recv().await, Some((OpCode::Text, b"hello".to_vec())));
    // More than the socket buffers hold, so most of it waits in the server's queue
    // when the client's FIN arrives (as a client that has said all it will say).
    let chunk = vec![3u8; 256 * 1024];
    for _ in 0..40 {
        handle
            .push(switchboard::PreparedMessage::binary(chunk.clone()))
            .unwrap();
    }
    tokio::task::yield_now().await;
    client.stream.shutdown().await.unwrap();
    let mut delivered = 0;
    while let Some((opcode, payload)) = client.recv().await {
        assert_eq!((opcode, payload.len()), (OpCode::Binary, chunk.len()));
        delivered += 1;
    }
    assert_eq!(
        delivered, 40,
        "queued frames were dropped at the client's FIN"
    );
}

/// A server whose probes register as "probe" in `registry`.
async fn registry_server(
    registry: &Registry,
) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let registry = registry.clone();
    let addr = serve(move |ws| {
        let mut probe = Probe::new(tx.clone());
        probe.registry = Some(registry.clone());
        ws.on_upgrade(probe)
    })
    .await;
    (addr, rx)
}

#[tokio::test]
async fn the_registry_forgets_connections_however_they_end() {
    let registry = Registry::new();
    let (addr, mut events) = registry_server(&registry).await;

    // A clean close.
    let mut a = RawClient::connect(addr).await;
    a.recv().await;
    assert_eq!(registry.connections("probe"), 1);
    a.send(&RawClient::frame(true, OpCode::Close, &[0x03, 0xe8]))
        .await;
    assert_eq!(a.close_code().await, Some(1000));
    assert!(
        eventually(|| registry.connections("probe") == 0).await,
        "clean close"
    );

    // An abrupt TCP drop, with a second connection of the same id staying.
    let mut b = RawClient::connect(addr).await;
    let mut c = RawClient::connect(addr).await;
    b.recv().await;
    c.recv().await;
    assert_eq!(registry.connections("probe"), 2);
    drop(b);
    assert!(
        eventually(|| registry.connections("probe") == 1).await,
        "abrupt drop"
    );

    // A handler panic.
    c.send(&RawClient::frame(true, OpCode::Text, b"panic"))
        .await;
    assert_eq!(c.close_code().await, Some(1011));
    c.send(&RawClient::frame(true, OpCode::Close, &[0x03, 0xf3]))
        .await;
    assert!(
        eventually(|| registry.connections("probe") == 0).await,
        "panic"
    );
    assert_eq!(registry.clients(), 0);
    while events.try_recv().is_ok() {}
}

#[tokio::test]
async fn registry_delivery_reaches_every_connection_of_an_id() {
    let registry = Registry::new();
    let (addr, _events) = registry_server(&registry).await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let mut tab = RawClient::connect(addr).await;
        tab.recv().await;
        tabs.push(tab);
    }
    let message = switchboard::PreparedMessage::text("to every tab");
    assert_eq!(registry.push("probe", &|_| message.clone()), 3);
    assert_eq!(registry.push("nobody", &|_| message.clone()), 0);
    for tab in &mut tabs {
        assert_eq!(
            tab.recv().await.unwrap(),
            (OpCode::Text, b"to every tab".to_vec())
        );
    }
}

#[tokio::test]
async fn shutdown_closes_everyone_with_1001_and_drains() {
    let shutdown = Shutdown::new();
    let (tx, mut events) = mpsc::unbounded_channel();
    let sd = shutdown.clone();
    let addr = serve(move |ws| ws.shutdown(&sd).on_upgrade(Probe::new(tx.clone()))).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = RawClient::connect(addr).await;
        client.recv().await;
        clients.push(client);
    }
    assert_eq!(shutdown.connections(), 3);
    let drain = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { shutdown.drain(TIMEOUT).await }
    });
    for client in &mut clients {
        assert_eq!(client.close_code().await, Some(1001));
        client
            .send(&RawClient::frame(true, OpCode::Close, &[0x03, 0xe9]))
            .await;
    }
    assert!(
        drain.await.unwrap(),
        "every connection ended before the timeout"
    );
    assert_eq!(shutdown.connections(), 0);
    let mut shutdowns = 0;
    while let Ok(event) = events.try_recv() {
        shutdowns += usize::from(matches!(
            event,
            Event::Terminate(TerminateReason::Shutdown(_))
        ));
    }
    assert_eq!(shutdowns, 3);
}
