//! The Handler callbacks, one block each, against a real server and a real
//! client (tokio-tungstenite).

mod common;

use std::time::Duration;

use common::{Event, Probe, TIMEOUT, next_event, serve};
use futures_util::{SinkExt, StreamExt};
use switchboard::{Options, TerminateReason};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;

type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn probe_server(options: Options) -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let addr = serve(move |ws| {
        ws.protocols(["switchboard.v1"])
            .options(options.clone())
            .on_upgrade(Probe::new(tx.clone()))
    })
    .await;
    (addr, rx)
}

async fn connect(addr: std::net::SocketAddr) -> Client {
    let (client, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .unwrap();
    client
}

/// The next data or close message, skipping pings and pongs.
async fn recv(client: &mut Client) -> WsMessage {
    loop {
        let message = tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("a message in time")
            .expect("stream open")
            .expect("no protocol error");
        if !matches!(message, WsMessage::Ping(_) | WsMessage::Pong(_)) {
            return message;
        }
    }
}

async fn recv_text(client: &mut Client) -> String {
    match recv(client).await {
        WsMessage::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

/// Lets the client answer the server's close frame and see the TCP close.
async fn finish(client: &mut Client) {
    let _ = tokio::time::timeout(TIMEOUT, async { while client.next().await.is_some() {} }).await;
}

fn close_code(message: &WsMessage) -> u16 {
    match message {
        WsMessage::Close(Some(frame)) => u16::from(frame.code),
        other => panic!("expected a close frame, got {other:?}"),
    }
}

#[tokio::test]
async fn init_runs_first_and_its_frames_arrive_first() {
    let (addr, mut events) = probe_server(Options::default()).await;
    let mut request = format!("ws://{addr}/ws").into_client_request().unwrap();
    request.headers_mut().insert(
        "sec-websocket-protocol",
        "other, switchboard.v1".parse().unwrap(),
    );
    let (mut client, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "switchboard.v1"
    );
    assert_eq!(
        next_event(&mut events).await,
        Event::Init(Some("switchboard.v1".into()))
    );
    assert_eq!(recv_text(&mut client).await, "hello");
}

#[tokio::test]
async fn handle_in_receives_whole_messages() {
    let (addr, mut events) = probe_server(Options::default()).await;
    let mut client = connect(addr).await;
    assert_eq!(recv_text(&mut client).await, "hello");
    client.send(WsMessage::text("héllo wörld")).await.unwrap();
    assert_eq!(recv_text(&mut client).await, "héllo wörld");
    client
        .send(WsMessage::binary(vec![1u8, 2, 3]))
        .await
        .unwrap();
    assert_eq!(recv(&mut client).await, WsMessage::binary(vec![1u8, 2, 3]));
    next_event(&mut events).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::In("héllo wörld".into())
    );
}

#[tokio::test]
async fn handle_info_gets_messages_sent_through_the_handle() {
    let (tx, mut events) = mpsc::unbounded_channel();
    let (handles_tx, mut handles) = mpsc::unbounded_channel();
    let addr = serve(move |ws| {
        let mut probe = Probe::new(tx.clone());
        probe.handles = Some(handles_tx.clone());
        ws.on_upgrade(probe)
    })
    .await;
    let mut client = connect(addr).await;
    let handle = handles.recv().await.unwrap();
    assert_eq!(recv_text(&mut client).await, "hello");
    handle.send("from elsewhere".into()).unwrap();
    assert_eq!(recv_text(&mut client).await, "info:from elsewhere");
    // A handle can also push frames without the handler.
    handle.push(switchboard::Message::text("pushed")).unwrap();
    assert_eq!(recv_text(&mut client).await, "pushed");
    next_event(&mut events).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Info("from elsewhere".into())
    );
}

#[tokio::test]
async fn send_after_delivers_later() {
    let (addr, _events) = probe_server(Options::default()).await;
    let mut client = connect(addr).await;
    recv_text(&mut client).await;
    let started = std::time::Instant::now();
    client.send(WsMessage::text("timer")).await.unwrap();
    assert_eq!(recv_text(&mut client).await, "info:tick");
    assert!(started.elapsed() >= Duration::from_millis(50));
}

#[tokio::test]
async fn handle_control_sees_pings_after_the_automatic_pong() {
    let (addr, mut events) = probe_server(Options::default()).await;
    let mut client = connect(addr).await;
    client
        .send(WsMessage::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = loop {
        match tokio::time::timeout(TIMEOUT, client.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WsMessage::Pong(payload) => break payload,
            _ => continue,
        }
    };
    assert_eq!(&pong[..], b"are you there");
    let control = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(Event::Control(kind)) = events.recv().await {
                return kind;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(control, "ping");
}

/// How much earlier than its deadline a timer may seem to fire, seen from
/// the client: the server's clock for it starts after the client's, and
/// arrivals jitter by a scheduler tick or two.
const SLACK: Duration = Duration::from_millis(20);

#[tokio::test]
async fn server_pings_on_the_interval() {
    let interval = Duration::from_millis(100);
    let options = Options::default().ping_interval(Some(interval));
    let (addr, _events) = probe_server(options).await;
    let connected = tokio::time::Instant::now();
    let mut client = connect(addr).await;
    let mut pings = Vec::new();
    tokio::time::timeout(TIMEOUT, async {
        while pings.len() < 3 {
            if let Some(Ok(WsMessage::Ping(_))) = client.next().await {
                pings.push(connected.elapsed());
            }
        }
    })
    .await
    .expect("three pings within the timeout");
    // Not before the interval, and one per interval: the server's clock
    // starts a little after ours, and arrivals jitter, hence the margins.
    assert!(pings[0] >= interval - SLACK, "{pings:?}");
    for pair in pings.windows(2) {
        assert!(pair[1] - pair[0] >= interval - SLACK, "{pings:?}");
    }
}

#[tokio::test]
async fn terminate_reports_a_remote_close() {
    let (addr, mut events) = probe_server(Options::default()).await;
    let mut client = connect(addr).await;
    recv_text(&mut client).await;
    client
        .close(Some(CloseFrame {
            code: WsCloseCode::Away,
            reason: "leaving".into(),
        }))
        .await
        .unwrap();
    // The server echoes the code.
    assert_eq!(close_code(&recv(&mut client).await), 1001);
    next_event(&mut events).await;
    match next_event(&mut events).await {
        Event::Terminate(TerminateReason::Remote(Some(reason))) => {
            assert_eq!(reason.code().0, 1001);
            assert_eq!(reason.reason(), "leaving");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn terminate_reports_a_dropped_connection() {
    let (addr, mut events) = probe_server(Options::default()).await;
    let client = connect(addr).await;
    next_event(&mut events).await;
    drop(client);
    assert_eq!(
        next_event(&mut events).await,
        Event::Terminate(TerminateReason::ConnectionLost)
    );
}

#[tokio::test]
async fn stop_pushes_then_closes_with_the_code() {
    let (addr, mut events) = probe_server(Options::default()).await;
    let mut client = connect(addr).await;
    recv_text(&mut client).await;
    client.send(WsMessage::text("stop")).await.unwrap();
    assert_eq!(recv_text(&mut client).await, "bye now");
    assert_eq!(close_code(&recv(&mut client).await), 4000);
    finish(&mut client).await;
    next_event(&mut events).await;
    next_event(&mut events).await;
    assert!(matches!(
        next_event(&mut events).await,
        Event::Terminate(TerminateReason::Normal(reason)) if reason.code().0 == 4000
    ));
}

/// A push that the mailbox accepted was reported as queued: closing the
/// connection right after must not drop it (the relay acks such frames as
/// delivered).
#[tokio::test]
async fn frames_the_mailbox_accepted_go_out_before_our_close() {
    let (addr, _events) = probe_server(Options::default()).await;
    for _ in 0..20 {
        let mut client = connect(addr).await;
        recv_text(&mut client).await;
        client
            .send(WsMessage::text("push-then-stop"))
            .await
            .unwrap();
        let mut queued = Vec::new();
        let code = loop {
            match recv(&mut client).await {
                WsMessage::Text(text) => queued.push(text.to_string()),
                other => break close_code(&other),
            }
        };
        assert_eq!(queued, ["queued 0", "queued 1", "queued 2"]);
        assert_eq!(code, 4000);
    }
}

#[tokio::test]
async fn a_panicking_handler_closes_only_its_connection_with_1011() {
    let (addr, mut events) = probe_server(Options::default()).await;
    let mut victim = connect(addr).await;
    let mut bystander = connect(addr).await;
    recv_text(&mut victim).await;
    recv_text(&mut bystander).await;
    victim.send(WsMessage::text("panic")).await.unwrap();
    assert_eq!(close_code(&recv(&mut victim).await), 1011);
    bystander.send(WsMessage::text("still here")).await.unwrap();
    assert_eq!(recv_text(&mut bystander).await, "still here");
    // terminate is not called after a panic: no Terminate event may show up for it.
    drop(victim);
    let mut seen = Vec::new();
    while let Ok(Some(event)) =
        tokio::time::timeout(Duration::from_millis(300), events.recv()).await
    {
        seen.push(event);
    }
    assert!(
        !seen.iter().any(|e| matches!(e, Event::Terminate(_))),
        "{seen:?}"
    );
}

#[tokio::test]
async fn idle_connections_are_closed_with_1001() {
    let idle = Duration::from_millis(200);
    let options = Options::default()
        .idle_timeout(Some(idle))
        .ping_interval(None);
    let (addr, mut events) = probe_server(options).await;
    let connected = tokio::time::Instant::now();
    let mut client = connect(addr).await;
    recv_text(&mut client).await;
    let closed = recv(&mut client).await;
    let after = connected.elapsed();
    assert_eq!(close_code(&closed), 1001);
    assert!(
        after >= idle - SLACK && after < idle + TIMEOUT,
        "closed {after:?} after connecting, with an idle timeout of {idle:?}"
    );
    finish(&mut client).await;
    next_event(&mut events).await;
    assert_eq!(
        next_event(&mut events).await,
        Event::Terminate(TerminateReason::Timeout)
    );
}

#[tokio::test]
async fn activity_keeps_a_connection_alive_past_the_idle_timeout() {
    let options = Options::default()
        .idle_timeout(Some(Duration::from_millis(300)))
        .ping_interval(None);
    let (addr, _events) = probe_server(options).await;
    let mut client = connect(addr).await;
    recv_text(&mut client).await;
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        client
            .send(WsMessage::text(format!("keepalive {i}")))
            .await
            .unwrap();
        assert_eq!(recv_text(&mut client).await, format!("keepalive {i}"));
    }
}
