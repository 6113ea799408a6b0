//! Shared test fixtures: a real server on port 0, a recording handler, and a raw
//! TCP client that sends hand-built bytes.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the fixtures"
)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::response::Response;
use axum::routing::get;
use bytes::BytesMut;
use switchboard::proto::frame::encode_frame;
use switchboard::proto::{FrameDecoder, OpCode, Role};
use switchboard::{
    Broker, ConnHandle, Context, Handler, Message, Options, Outcome, Registration, Registry,
    TerminateReason, WebSocketUpgrade,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `upgrade` at `/ws` on a fresh port, with [`switchboard::serve`].
pub async fn serve<F>(upgrade: F) -> SocketAddr
where
    F: Fn(WebSocketUpgrade) -> Response + Clone + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(switchboard::serve(
        listener,
        ws_router(upgrade),
        std::future::pending(),
    ));
    addr
}

/// [`serve`] with `axum::serve`, whose sockets the toolkit cannot write to
/// directly: every frame goes through the connection's task.
pub async fn serve_with_axum<F>(upgrade: F) -> SocketAddr
where
    F: Fn(WebSocketUpgrade) -> Response + Clone + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = ws_router(upgrade);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

fn ws_router<F>(upgrade: F) -> Router
where
    F: Fn(WebSocketUpgrade) -> Response + Clone + Send + Sync + 'static,
{
    Router::new().route(
        "/ws",
        get(move |ws: WebSocketUpgrade| {
            let upgrade = upgrade.clone();
            async move { upgrade(ws) }
        }),
    )
}

/// An upgrade that runs a [`Probe`] with `options` and hands each connection's
/// handle out, with the receivers of the probes' events and of the handles.
pub fn handing_out_handles(
    options: Options,
) -> (
    impl Fn(WebSocketUpgrade) -> Response + Clone + Send + Sync + 'static,
    mpsc::UnboundedReceiver<Event>,
    mpsc::UnboundedReceiver<ConnHandle<String>>,
) {
    let (events_tx, events) = mpsc::unbounded_channel();
    let (handles_tx, handles) = mpsc::unbounded_channel();
    let upgrade = move |ws: WebSocketUpgrade| {
        let mut probe = Probe::new(events_tx.clone());
        probe.handles = Some(handles_tx.clone());
        ws.options(options.clone()).on_upgrade(probe)
    };
    (upgrade, events, handles)
}

/// What a [`Probe`] saw, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Init(Option<String>),
    In(String),
    Info(String),
    Control(&'static str),
    Terminate(TerminateReason),
}

/// A handler that records every callback and reacts to a few commands:
/// `panic`, `stop`, `timer`, and anything else is echoed.
pub struct Probe {
    pub events: mpsc::UnboundedSender<Event>,
    pub handles: Option<mpsc::UnboundedSender<ConnHandle<String>>>,
    pub registry: Option<Registry>,
    pub registration: Option<Registration>,
}

impl Probe {
    pub fn new(events: mpsc::UnboundedSender<Event>) -> Self {
        Self {
            events,
            handles: None,
            registry: None,
            registration: None,
        }
    }
}

impl Handler for Probe {
    type Info = String;

    fn init(&mut self, ctx: &mut Context<'_, String>) -> Outcome {
        let _ = self
            .events
            .send(Event::Init(ctx.protocol().map(str::to_owned)));
        if let Some(handles) = &self.handles {
            let _ = handles.send(ctx.handle().clone());
        }
        if let Some(registry) = &self.registry {
            let outbox = ctx.handle().outbox();
            self.registration = Some(registry.register("probe".into(), outbox, Default::default()));
        }
        Outcome::push(Message::text("hello"))
    }

    fn handle_in(&mut self, message: Message, ctx: &mut Context<'_, String>) -> Outcome {
        let Message::Text(text) = &message else {
            return Outcome::push(message);
        };
        let _ = self.events.send(Event::In(text.to_string()));
        match &**text {
            "panic" => panic!("handler panics on request"),
            "stop" => Outcome::Stop {
                push: vec![Message::text("bye now").into()],
                close: switchboard::CloseReason::new(4000, "bye"),
            },
            "push-then-stop" => {
                // Through the mailbox, as any other code would push.
                for i in 0..3 {
                    let frame = switchboard::PreparedMessage::text(format!("queued {i}"));
                    ctx.handle().push(frame).expect("the mailbox takes it");
                }
                Outcome::stop(switchboard::CloseCode(4000), "bye")
            }
            "timer" => {
                let _ = ctx
                    .handle()
                    .send_after("tick".into(), Duration::from_millis(50));
                Outcome::Continue
            }
            _ => Outcome::push(message),
        }
    }

    fn handle_info(&mut self, info: String, _ctx: &mut Context<'_, String>) -> Outcome {
        let _ = self.events.send(Event::Info(info.clone()));
        Outcome::push(Message::text(format!("info:{info}")))
    }

    fn handle_control(&mut self, message: Message, _ctx: &mut Context<'_, String>) -> Outcome {
        let kind = match message {
            Message::Ping(_) => "ping",
            _ => "pong",
        };
        let _ = self.events.send(Event::Control(kind));
        Outcome::Continue
    }

    fn terminate(&mut self, reason: &TerminateReason) {
        let _ = self.events.send(Event::Terminate(reason.clone()));
    }
}

/// A client handler that forwards what arrives and why it ended.
pub struct Collect(mpsc::UnboundedSender<Result<Message, TerminateReason>>);

impl Handler for Collect {
    type Info = ();
    fn handle_in(&mut self, message: Message, _ctx: &mut Context<'_, ()>) -> Outcome {
        let _ = self.0.send(Ok(message));
        Outcome::Continue
    }
    fn terminate(&mut self, reason: &TerminateReason) {
        let _ = self.0.send(Err(reason.clone()));
    }
}

/// A [`Collect`] and what it forwards.
pub fn collect() -> (
    Collect,
    mpsc::UnboundedReceiver<Result<Message, TerminateReason>>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Collect(tx), rx)
}

/// Waits for the next event that is not a control frame.
pub async fn next_event(events: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    loop {
        let event = tokio::time::timeout(TIMEOUT, events.recv())
            .await
            .expect("an event in time")
            .expect("the handler is alive");
        if !matches!(event, Event::Control(_)) {
            return event;
        }
    }
}

/// A client speaking raw bytes, for what real clients never send.
pub struct RawClient {
    pub stream: TcpStream,
    decoder: FrameDecoder,
    buf: BytesMut,
}

impl RawClient {
    /// Sends `request` and reads the response head.
    pub async fn request(addr: SocketAddr, request: &str) -> (String, TcpStream) {
        let stream = TcpStream::connect(addr).await.unwrap();
        Self::request_on(stream, request).await
    }

    /// Sends `request` on `stream` and reads the response head.
    async fn request_on(mut stream: TcpStream, request: &str) -> (String, TcpStream) {
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = tokio::time::timeout(TIMEOUT, stream.read(&mut byte))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                break;
            }
            head.push(byte[0]);
        }
        (String::from_utf8(head).unwrap(), stream)
    }

    /// Completes a WebSocket handshake on `/ws`.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_on(TcpStream::connect(addr).await.unwrap(), addr).await
    }

    /// Completes a WebSocket handshake on `/ws` from a socket whose receive
    /// buffer is fixed at `bytes` (the kernel doubles it, and does not grow it):
    /// for tests that bound what the kernel can hold for a peer that never reads.
    pub async fn connect_with_receive_buffer(addr: SocketAddr, bytes: u32) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(bytes).unwrap();
        Self::connect_on(socket.connect(addr).await.unwrap(), addr).await
    }

    async fn connect_on(stream: TcpStream, addr: SocketAddr) -> Self {
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let (head, stream) = Self::request_on(stream, &request).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        Self {
            stream,
            decoder: FrameDecoder::new(Role::Client, 1 << 24, false),
            buf: BytesMut::new(),
        }
    }

    /// A client around a connected std socket (set non-blocking).
    pub fn from_std(socket: std::net::TcpStream) -> Self {
        Self {
            stream: TcpStream::from_std(socket).unwrap(),
            decoder: FrameDecoder::new(Role::Client, 1 << 24, false),
            buf: BytesMut::new(),
        }
    }

    /// A masked client frame.
    pub fn frame(fin: bool, opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        encode_frame(
            &mut out,
            fin,
            false,
            opcode,
            payload,
            Some([0x37, 0xfa, 0x21, 0x3d]),
        );
        out.to_vec()
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends one byte per write, with a pause, so every split is exercised.
    pub async fn send_bytewise(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.stream.write_all(&[*byte]).await.unwrap();
            self.stream.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The next frame from the server, skipping pings; `None` at EOF.
    pub async fn recv(&mut self) -> Option<(OpCode, Vec<u8>)> {
        loop {
            let frame = self.recv_frame().await?;
            if frame.0 != OpCode::Ping {
                return Some(frame);
            }
        }
    }

    /// The next frame from the server, pings included; `None` at EOF.
    pub async fn recv_frame(&mut self) -> Option<(OpCode, Vec<u8>)> {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buf).unwrap() {
                return Some((frame.opcode, frame.payload.to_vec()));
            }
            let n = tokio::time::timeout(TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("server answers in time")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Reads until the server's close frame and returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some((opcode, payload)) = self.recv().await {
            if opcode == OpCode::Close {
                return Some(u16::from_be_bytes([payload[0], payload[1]]));
            }
        }
        None
    }
}
