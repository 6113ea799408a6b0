//! The client against the toolkit's own server, over ws:// and wss://: the
//! same handler trait in both roles, subprotocols, headers, compression, and
//! each way a handshake can be refused.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::HeaderMap;
use axum::routing::get;
use common::{Event, Probe, collect};
use http::{HeaderName, HeaderValue};
use switchboard::client::{ConnectError, Connector, rustls};
use switchboard::{
    CloseCode, CloseReason, Context, Handler, Message, Options, Outcome, TerminateReason,
    WebSocketUpgrade,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(common::TIMEOUT, rx.recv())
        .await
        .expect("in time")
        .expect("not ended")
}

/// A server whose `/ws` runs a `Probe` (it greets with "hello" and echoes),
/// offering `proto.v1`, and whose `/header` greets with its `x-greeting` header.
fn app(events: mpsc::UnboundedSender<Event>) -> Router {
    let probe_events = events.clone();
    Router::new()
        .route(
            "/ws",
            get(move |ws: WebSocketUpgrade| {
                let events = probe_events.clone();
                async move { ws.protocols(["proto.v1"]).on_upgrade(Probe::new(events)) }
            }),
        )
        .route(
            "/header",
            get(|ws: WebSocketUpgrade, headers: HeaderMap| async move {
                let greeting = headers
                    .get("x-greeting")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                ws.on_upgrade(Greeter(greeting))
            }),
        )
}

struct Greeter(String);

impl Handler for Greeter {
    type Info = ();
    fn init(&mut self, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::push(Message::text(self.0.clone()))
    }
    fn handle_in(&mut self, _message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        Outcome::Continue
    }
}

async fn plain_server() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<Event>) {
    let (events, events_rx) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(switchboard::serve(
        listener,
        app(events),
        std::future::pending(),
    ));
    (addr, events_rx)
}

#[tokio::test]
async fn a_client_handler_talks_to_a_server_handler() {
    let (addr, mut events) = plain_server().await;
    let (handler, mut got) = collect();
    let client = Connector::new()
        .protocol("other")
        .protocol("proto.v1")
        .connect(&format!("ws://{addr}/ws"), handler)
        .await
        .unwrap();
    assert_eq!(client.protocol(), Some("proto.v1"));
    assert!(
        client.compressed(),
        "both sides offer permessage-deflate by default"
    );
    assert_eq!(
        next(&mut events).await,
        Event::Init(Some("proto.v1".into()))
    );
    assert_eq!(next(&mut got).await.unwrap(), Message::text("hello"));
    // Large and repetitive: compressed, and fragmented by nobody.
    let big = "echo me ".repeat(20_000);
    client.handle().push(Message::text(big.clone())).unwrap();
    assert_eq!(next(&mut got).await.unwrap(), Message::text(big.clone()));
    assert_eq!(next(&mut events).await, Event::In(big));
    client
        .handle()
        .close(CloseReason::new(CloseCode::NORMAL, "done"));
    assert_eq!(
        next(&mut got).await.unwrap_err(),
        TerminateReason::Normal(CloseReason::new(CloseCode::NORMAL, "done"))
    );
    client.finished().await;
    assert!(matches!(
        next(&mut events).await,
        Event::Terminate(TerminateReason::Remote(Some(close))) if close.code() == CloseCode::NORMAL
    ));
}

#[tokio::test]
async fn headers_reach_the_server_and_compression_can_be_left_off() {
    let (addr, _events) = plain_server().await;
    let (handler, mut got) = collect();
    let client = Connector::new()
        .options(switchboard::Options::default().compression(None))
        .header(
            HeaderName::from_static("x-greeting"),
            HeaderValue::from_static("hi there"),
        )
        .connect(&format!("ws://{addr}/header"), handler)
        .await
        .unwrap();
    assert!(!client.compressed());
    assert_eq!(client.protocol(), None);
    assert_eq!(next(&mut got).await.unwrap(), Message::text("hi there"));
}

#[tokio::test]
async fn refused_handshakes_are_typed_errors() {
    let (addr, _events) = plain_server().await;
    let connector = Connector::new();
    let (handler, _) = collect();
    let error = connector
        .connect(&format!("ws://{addr}/nowhere"), handler)
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectError::Status(404)), "{error}");
    // A proxy's refusal keeps its status, whatever its HTTP version.
    let proxy = answering("HTTP/1.0 403 Forbidden\r\nContent-Length: 0\r\n\r\n").await;
    let (handler, _) = collect();
    let error = connector
        .connect(&format!("ws://{proxy}/"), handler)
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectError::Status(403)), "{error}");
    // Lines may end in a bare LF (RFC 9112 §2.2).
    let bare = answering("HTTP/1.1 429 Too Many Requests\nContent-Length: 0\n\n").await;
    let (handler, _) = collect();
    let error = connector
        .connect(&format!("ws://{bare}/"), handler)
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectError::Status(429)), "{error}");

    for url in ["http://x/", "ws:///path", "not a url", "ws://user@host/"] {
        let (handler, _) = collect();
        let error = connector.connect(url, handler).await.unwrap_err();
        assert!(matches!(error, ConnectError::Url(..)), "{url}: {error}");
    }

    let (handler, _) = collect();
    let error = connector
        .connect(&format!("wss://{addr}/ws"), handler)
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectError::TlsNotConfigured), "{error}");
}

/// A server that accepts one WebSocket handshake by hand and hands over the
/// socket, so a test can watch the client's TCP.
async fn raw_server() -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<tokio::net::TcpStream>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            stream.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|line| line.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let accept = switchboard_proto::handshake::accept_key(key.as_bytes());
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
        );
        stream.write_all(response.as_bytes()).await.unwrap();
        stream
    });
    (addr, accepted)
}

#[tokio::test]
async fn the_client_lets_the_server_close_tcp_first() {
    const CLOSE_1000: [u8; 4] = [0x88, 0x02, 0x03, 0xe8];
    let quick = Options::default()
        .compression(None)
        .close_timeout(Duration::from_secs(3));
    for server_closes in [true, false] {
        let (addr, accepted) = raw_server().await;
        let (handler, _got) = collect();
        let client = Connector::new()
            .options(quick.clone())
            .connect(&format!("ws://{addr}/"), handler)
            .await
            .unwrap();
        let mut stream = accepted.await.unwrap();
        stream.write_all(&CLOSE_1000).await.unwrap();
        // The client's answer: a masked close frame of 1000.
        let mut answer = [0u8; 8];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer[..2], [0x88, 0x82]);
        // No FIN behind it: the client waits for ours (RFC 6455 §7.1.1).
        let mut more = [0u8; 16];
        let early = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut more)).await;
        assert!(early.is_err(), "the client closed TCP first: {early:?}");
        let started = Instant::now();
        if server_closes {
            stream.shutdown().await.unwrap();
        }
        tokio::time::timeout(common::TIMEOUT, client.finished())
            .await
            .expect("the client ends");
        // It ends at once on our FIN, or at its close timeout without one.
        let waited = started.elapsed();
        if server_closes {
            assert!(waited < Duration::from_millis(1500), "{waited:?}");
        } else {
            assert!(waited >= Duration::from_secs(2), "{waited:?}");
        }
        assert_eq!(stream.read(&mut more).await.unwrap(), 0);
    }
}

/// A server that answers every request with `response`, whatever it asked.
async fn answering(response: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    addr
}

#[tokio::test]
async fn a_101_that_breaks_rfc_6455_is_refused() {
    let cases = [
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: d3JvbmcgYWNjZXB0IGtleQ==\r\n\r\n",
            "Sec-WebSocket-Accept",
        ),
        (
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
            "Upgrade: websocket",
        ),
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket, foo\r\nConnection: Upgrade\r\n\r\n",
            "Upgrade: websocket",
        ),
        (
            "HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            "HTTP/1.1",
        ),
    ];
    for (response, why) in cases {
        let addr = answering(response).await;
        let (handler, _) = collect();
        let error = Connector::new()
            .connect(&format!("ws://{addr}/"), handler)
            .await
            .unwrap_err();
        assert!(
            matches!(&error, ConnectError::Handshake(m) if m.contains(why)),
            "{error}"
        );
    }
}

/// A test CA, and a certificate for `localhost` it signed.
fn test_pki() -> (
    rustls::pki_types::CertificateDer<'static>,
    rustls::ServerConfig,
) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    (ca.der().clone(), server)
}

/// The toolkit's upgrade under its own TLS server.
async fn tls_server(config: rustls::ServerConfig) -> std::net::SocketAddr {
    let (events, events_rx) = mpsc::unbounded_channel();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    // The probes' event receiver lives as long as the server.
    tokio::spawn(switchboard::serve_tls(
        listener,
        app(events),
        acceptor,
        async move {
            std::future::pending::<()>().await;
            drop(events_rx);
        },
    ));
    addr
}

fn client_tls(ca: rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test]
async fn wss_with_a_trusted_ca_works_and_with_another_fails() {
    let (ca, server) = test_pki();
    let addr = tls_server(server).await;
    let url = format!("wss://localhost:{}/ws", addr.port());

    let (handler, mut got) = collect();
    let client = Connector::new()
        .tls(client_tls(ca))
        .connect(&url, handler)
        .await
        .unwrap();
    assert_eq!(next(&mut got).await.unwrap(), Message::text("hello"));
    client.handle().push(Message::text("over TLS")).unwrap();
    assert_eq!(next(&mut got).await.unwrap(), Message::text("over TLS"));

    let (other_ca, _) = test_pki();
    let (handler, _) = collect();
    let error = Connector::new()
        .tls(client_tls(other_ca))
        .connect(&url, handler)
        .await
        .unwrap_err();
    assert!(matches!(error, ConnectError::Tls(_)), "{error}");
}
