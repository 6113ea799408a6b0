//! Run with `cargo run --release -p axum-relay -- 127.0.0.1:0`
//!
//! A benchmark peer: the Switchboard relay protocol as a Rust user would write it
//! without Switchboard, with axum for HTTP and tokio-tungstenite for WebSocket
//! (the same pair axum's own `ws` feature is built on), on tokio's default
//! multi-threaded runtime.
//!
//! - `/ws?id=N`: send `{"targets":[..],"payload":P}`; every connection of each
//!   target receives `P`'s JSON text. With subprotocol `switchboard.v1`,
//!   `{"type":"subscribe","topic":T,"id":I}` subscribes (acked) and
//!   `{"type":"publish","topic":T,"payload":P}` sends every subscriber
//!   `{"type":"message","topic":T,"from":ID,"payload":P}`.
//! - `/echo`: every message comes back.
//!
//! It prints `listening on ADDR` first, like the other servers of the benchmark,
//! and sets TCP_NODELAY on every connection, as Bun and Node do by default.
//! Each connection has a writer task fed by an unbounded channel, registered by
//! client id before the `101` so that a message sent right after the handshake
//! arrives.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::serve::ListenerExt as _;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

const V1: &str = "switchboard.v1";

type Outbox = UnboundedSender<Message>;

/// Live connections by client id, and topic subscribers, each keyed by connection number.
#[derive(Default)]
struct Hub {
    clients: Mutex<HashMap<String, HashMap<u64, Outbox>>>,
    topics: Mutex<HashMap<String, HashMap<u64, Outbox>>>,
    next_conn: AtomicU64,
}

#[derive(Deserialize)]
struct Inbound<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<&'a str>,
    #[serde(default)]
    targets: Vec<Target>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow)]
    topic: Option<&'a str>,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Target {
    Text(String),
    Number(u64),
}

impl Target {
    fn into_id(self) -> String {
        match self {
            Self::Text(id) => id,
            Self::Number(n) => n.to_string(),
        }
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    // Without TCP_NODELAY, Nagle's algorithm holds small frames until the previous
    // ones are acknowledged, which adds up to a delayed-ACK timeout (~40 ms) of
    // latency; Bun and Node set it by default, and axum documents this tap.
    let listener = listener.tap_io(|stream| {
        let _ = stream.set_nodelay(true);
    });
    let app = Router::new()
        .route("/ws", any(relay))
        .route("/echo", any(echo))
        .with_state(Arc::new(Hub::default()));
    axum::serve(listener, app).await
}

/// The `101` response for a WebSocket request; `None` if it is not one.
fn switching(headers: &HeaderMap, protocol: Option<&'static str>) -> Option<Response> {
    let key = headers.get(header::SEC_WEBSOCKET_KEY)?;
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    let out = response.headers_mut();
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    out.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    let accept = derive_accept_key(key.as_bytes());
    out.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    if let Some(protocol) = protocol {
        out.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(protocol),
        );
    }
    Some(response)
}

fn not_websocket() -> Response {
    (StatusCode::BAD_REQUEST, "not a WebSocket request").into_response()
}

/// Spawns the connection's task once hyper hands over the socket.
fn spawn_upgraded<F, Fut>(request: &mut Request, run: F)
where
    F: FnOnce(WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let upgrade = hyper::upgrade::on(request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrade.await {
            run(WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await)
                .await;
        }
    });
}

async fn echo(mut request: Request) -> Response {
    let Some(response) = switching(request.headers(), None) else {
        return not_websocket();
    };
    spawn_upgraded(&mut request, |mut ws| async move {
        while let Some(Ok(message)) = ws.next().await {
            if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
                break;
            }
        }
    });
    response
}

async fn relay(State(hub): State<Arc<Hub>>, mut request: Request) -> Response {
    let Some(id) = request
        .uri()
        .query()
        .and_then(|q| q.split('&').find_map(|pair| pair.strip_prefix("id=")))
        .map(str::to_owned)
    else {
        return (StatusCode::BAD_REQUEST, "missing id").into_response();
    };
    let v1 = request
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim() == V1));
    let Some(response) = switching(request.headers(), v1.then_some(V1)) else {
        return not_websocket();
    };
    let conn = hub.next_conn.fetch_add(1, Ordering::Relaxed);
    let (tx, rx) = unbounded_channel();
    hub.clients
        .lock()
        .unwrap()
        .entry(id.clone())
        .or_default()
        .insert(conn, tx.clone());
    spawn_upgraded(&mut request, move |ws| serve(hub, id, conn, tx, rx, ws));
    response
}

async fn serve(
    hub: Arc<Hub>,
    id: String,
    conn: u64,
    tx: Outbox,
    mut rx: UnboundedReceiver<Message>,
    ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
) {
    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    let mut subscribed = Vec::new();
    while let Some(Ok(message)) = stream.next().await {
        let Message::Text(text) = message else {
            continue;
        };
        let Ok(inbound) = serde_json::from_str::<Inbound<'_>>(text.as_str()) else {
            continue;
        };
        match inbound.kind {
            None | Some("send") => {
                let Some(payload) = inbound.payload else {
                    continue;
                };
                let out = Message::text(payload.get());
                let clients = hub.clients.lock().unwrap();
                for target in inbound.targets {
                    for outbox in clients
                        .get(&target.into_id())
                        .into_iter()
                        .flat_map(HashMap::values)
                    {
                        let _ = outbox.send(out.clone());
                    }
                }
            }
            Some("subscribe") => {
                let Some(topic) = inbound.topic else { continue };
                hub.topics
                    .lock()
                    .unwrap()
                    .entry(topic.to_owned())
                    .or_default()
                    .insert(conn, tx.clone());
                subscribed.push(topic.to_owned());
                if let Some(request_id) = inbound.id {
                    let ack = format!(
                        r#"{{"type":"ack","id":{},"topic":{}}}"#,
                        request_id.get(),
                        quote(topic)
                    );
                    let _ = tx.send(Message::text(ack));
                }
            }
            Some("publish") => {
                let (Some(topic), Some(payload)) = (inbound.topic, inbound.payload) else {
                    continue;
                };
                let envelope = format!(
                    r#"{{"type":"message","topic":{},"from":{},"payload":{}}}"#,
                    quote(topic),
                    quote(&id),
                    payload.get()
                );
                let out = Message::text(envelope);
                let topics = hub.topics.lock().unwrap();
                for outbox in topics.get(topic).into_iter().flat_map(HashMap::values) {
                    let _ = outbox.send(out.clone());
                }
            }
            Some(_) => {}
        }
    }
    writer.abort();
    remove(&hub.clients, &id, conn);
    for topic in subscribed {
        remove(&hub.topics, &topic, conn);
    }
}

fn remove(map: &Mutex<HashMap<String, HashMap<u64, Outbox>>>, key: &str, conn: u64) {
    let mut map = map.lock().unwrap();
    if let Some(conns) = map.get_mut(key) {
        conns.remove(&conn);
        if conns.is_empty() {
            map.remove(key);
        }
    }
}

fn quote(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}
