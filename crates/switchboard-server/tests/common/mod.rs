//! Shared fixtures: the real `switchboard` binary on port 0, real WebSocket
//! clients (tokio-tungstenite), and a minimal HTTP client for the API.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the fixtures"
)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

pub mod redis;

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// With `SWITCHBOARD_TEST_CLUSTER=N`, every server of these suites is N
/// nodes on one Redis of its own (`--engine redis`), and each connection
/// and API request goes to the next node in turn: the suites then show that
/// a cluster behaves as one server. A server started with a fixed
/// `--listen` or `--api-listen` is one node on Redis.
fn cluster_size() -> usize {
    std::env::var("SWITCHBOARD_TEST_CLUSTER")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

pub type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A running `switchboard serve`, killed on drop (in cluster mode, its
/// nodes and their Redis).
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every node's address (one unless in cluster mode), taken in turn.
    nodes: Vec<SocketAddr>,
    turn: AtomicUsize,
    others: Vec<Child>,
    redis: Option<redis::Redis>,
    /// Where the API is served (the main listener unless `--api-listen`), and
    /// the first `--api-key` it was given: for markers sent through the API.
    api_addr: SocketAddr,
    api_key: Option<String>,
}

/// The first `n` lines the child prints, or a panic if they do not come
/// within the timeout: a server that hangs before it listens must fail the
/// test, not hang it.
fn first_lines(stdout: ChildStdout, n: usize) -> Vec<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        for _ in 0..n {
            let mut line = String::new();
            if stdout.read_line(&mut line).unwrap_or(0) == 0 || tx.send(line).is_err() {
                return;
            }
        }
    });
    (0..n)
        .map(|_| {
            rx.recv_timeout(Duration::from_secs(10))
                .expect("the server printed where it listens within 10 s")
        })
        .collect()
}

impl Server {
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(args).0
    }

    /// Starts the server; also returns the API listener's address when
    /// `--api-listen` was given.
    pub fn start_with(args: &[&str]) -> (Self, Option<SocketAddr>) {
        let fixed = args.contains(&"--listen") || args.contains(&"--api-listen");
        let size = match cluster_size() {
            0 => return Self::start_node(args),
            _ if fixed => 1,
            n => n,
        };
        let redis = redis::Redis::start();
        let url = redis.url();
        let cluster: Vec<&str> = ["--engine", "redis", "--redis-url", &url]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let (mut server, api) = Self::start_node(&cluster);
        for _ in 1..size {
            let (mut node, _) = Self::start_node(&cluster);
            server.nodes.push(node.addr);
            server
                .others
                .push(std::mem::replace(&mut node.child, dummy_child()));
        }
        server.redis = Some(redis);
        server.wait_ready();
        (server, api)
    }

    /// Waits until every node says it is ready (joined the cluster).
    fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for node in &self.nodes {
            loop {
                // Blocking: tests start servers from inside their runtime.
                let ready = std::net::TcpStream::connect(node).is_ok_and(|mut stream| {
                    use std::io::{Read, Write};
                    let request =
                        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
                    let mut answer = String::new();
                    stream.write_all(request).is_ok()
                        && stream.read_to_string(&mut answer).is_ok()
                        && answer.starts_with("HTTP/1.1 200")
                });
                if ready {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "node {node} never became ready"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The node to use next.
    pub fn next_addr(&self) -> SocketAddr {
        self.nodes[self.turn.fetch_add(1, Ordering::Relaxed) % self.nodes.len()]
    }

    /// Every node's process.
    pub fn children(&mut self) -> impl Iterator<Item = &mut Child> {
        std::iter::once(&mut self.child).chain(&mut self.others)
    }

    /// Whether this server is several nodes.
    pub fn is_cluster(&self) -> bool {
        self.redis.is_some()
    }

    fn start_node(args: &[&str]) -> (Self, Option<SocketAddr>) {
        let listen: &[&str] = if args.contains(&"--listen") {
            &[]
        } else {
            &["--listen", "127.0.0.1:0"]
        };
        // No snapshot in the working directory unless a test asks for one
        // in a directory of its own.
        let persist: &[&str] = if args.contains(&"--data-dir") || args.contains(&"--persist") {
            &[]
        } else {
            &["--persist", "false"]
        };
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--log-level", "warn"])
            .args(listen)
            .args(persist)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("the switchboard binary starts");
        let api_listen = args.contains(&"--api-listen");
        let lines = first_lines(child.stdout.take().unwrap(), 1 + usize::from(api_listen));
        let addr: SocketAddr = lines[0]
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {:?}", lines[0]))
            .parse()
            .unwrap();
        let api = api_listen.then(|| {
            lines[1]
                .trim()
                .strip_prefix("api listening on ")
                .unwrap()
                .parse()
                .unwrap()
        });
        let api_key = args
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| args[i + 1].to_owned());
        let server = Self {
            child,
            addr,
            nodes: vec![addr],
            turn: AtomicUsize::new(0),
            others: Vec::new(),
            redis: None,
            api_addr: api.unwrap_or(addr),
            api_key,
        };
        (server, api)
    }

    pub async fn connect(&self, id: &str) -> Client {
        self.connect_request(&format!("/ws?id={id}"), &[])
            .await
            .unwrap()
    }

    /// A `switchboard.v1` connection whose welcome has been read (and checked).
    pub async fn connect_envelope(&self, id: &str) -> Client {
        self.connect_envelope_welcome(id).await.0
    }

    /// A `switchboard.v1` connection, and its welcome.
    pub async fn connect_envelope_welcome(&self, id: &str) -> (Client, Value) {
        let headers = [("sec-websocket-protocol", "switchboard.v1")];
        let mut client = self
            .connect_request(&format!("/ws?id={id}"), &headers)
            .await
            .unwrap();
        let welcome = recv_welcome(&mut client, id).await;
        (client, welcome)
    }

    /// Connects with a custom handshake request (headers, subprotocols).
    pub async fn connect_request(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
        let mut request = format!("ws://{}{path_and_query}", self.next_addr())
            .into_client_request()
            .unwrap();
        for (name, value) in headers {
            let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
            request.headers_mut().insert(name, value.parse().unwrap());
        }
        tokio_tungstenite::connect_async(request)
            .await
            .map(|(client, _)| client)
    }

    /// The HTTP status of a handshake that the server refused.
    pub async fn refused_status(&self, path_and_query: &str, headers: &[(&str, &str)]) -> u16 {
        match self.connect_request(path_and_query, headers).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                response.status().as_u16()
            }
            Ok(_) => panic!("the handshake succeeded"),
            Err(other) => panic!("unexpected error {other}"),
        }
    }

    /// Sends a plain HTTP/1.1 request and returns the status code and body.
    pub async fn http(&self, request_line: &str) -> (u16, String) {
        let request =
            format!("{request_line} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        raw_http(self.next_addr(), &request).await
    }

    /// Calls the HTTP API on this server's main listener.
    pub async fn api(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        api_call(self.next_addr(), method, path, key, body).await
    }

    /// `GET /api/v1/stats` once every node's figures are current: in
    /// cluster mode, other nodes' traffic is as of their last heartbeat (one
    /// a second), so this waits for the next.
    pub async fn settled_stats(&self) -> Value {
        if self.is_cluster() {
            tokio::time::sleep(Duration::from_millis(1200)).await;
        }
        let key = self.api_key.as_deref();
        api_call(self.api_addr, "GET", "/api/v1/stats", key, None)
            .await
            .1
    }

    /// Client ids online: this server's (the cluster's, in cluster mode).
    pub async fn clients(&self) -> u64 {
        if self.is_cluster() {
            let (_, body) = api_call(
                self.api_addr,
                "GET",
                "/api/v1/stats",
                self.api_key.as_deref(),
                None,
            )
            .await;
            return body["clients"].as_u64().unwrap();
        }
        let (_, body) = self.http("GET /healthz").await;
        serde_json::from_str::<Value>(&body).unwrap()["clients"]
            .as_u64()
            .unwrap()
    }

    /// Waits until the server counts `expected` connections of `id`.
    pub async fn wait_for_connections_of(&self, id: &str, expected: u64) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let path = format!("/api/v1/clients/{id}");
            let (_, body) =
                api_call(self.api_addr, "GET", &path, self.api_key.as_deref(), None).await;
            if body["connections"].as_u64() == Some(expected) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{id} never had {expected} connections: {body}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_for_clients(&self, expected: u64) {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        while self.clients().await != expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "registry never reached {expected} clients"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        for child in self.children() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A stand-in for a child moved out of a node's `Server`.
fn dummy_child() -> Child {
    Command::new("true").spawn().expect("`true` runs")
}

/// Sends one JSON request to `addr`; returns the status and the JSON body
/// (`Value::Null` when the body is empty or not JSON).
pub async fn api_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let (status, text) = raw_http(addr, &request).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Sends a raw HTTP/1.1 request and returns the status and body.
pub async fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let status = response[9..12].parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub async fn send(client: &mut Client, value: Value) {
    client.send(Message::text(value.to_string())).await.unwrap();
}

/// The next text or close message, skipping pings.
pub async fn recv(client: &mut Client) -> Message {
    loop {
        let message = tokio::time::timeout(TIMEOUT, client.next())
            .await
            .expect("a message in time")
            .expect("the stream is open")
            .expect("no protocol error");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

pub async fn recv_text(client: &mut Client) -> String {
    match recv(client).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

pub async fn recv_json(client: &mut Client) -> Value {
    serde_json::from_str(&recv_text(client).await).unwrap()
}

/// Reads until the close frame; returns its code and reason.
pub async fn recv_close_frame(client: &mut Client) -> (u16, String) {
    loop {
        match recv(client).await {
            Message::Close(Some(frame)) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Message::Close(None) => panic!("close without a code"),
            _ => continue,
        }
    }
}

pub async fn recv_close(client: &mut Client) -> u16 {
    recv_close_frame(client).await.0
}

/// Reads a `switchboard.v1` connection's first frame, which must be the
/// welcome of client `id`.
pub async fn recv_welcome(client: &mut Client, id: &str) -> Value {
    let welcome = recv_json(client).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["client"], id, "{welcome}");
    assert!(
        welcome["offset"].is_u64() && welcome["epoch"].is_string(),
        "{welcome}"
    );
    welcome
}

/// The next delivery to a `switchboard.v1` client, without its stream
/// position (`offset`, `epoch`), which must be there when `positioned`.
pub async fn recv_delivery(client: &mut Client, positioned: bool) -> Value {
    let mut value = recv_json(client).await;
    let object = value.as_object_mut().expect("a JSON object");
    let offset = object.remove("offset");
    let epoch = object.remove("epoch");
    if positioned {
        assert!(
            offset
                .as_ref()
                .is_some_and(|o| o.as_u64().is_some_and(|o| o > 0)),
            "no offset in {value}"
        );
        assert!(
            epoch.as_ref().is_some_and(Value::is_string),
            "no epoch in {value}"
        );
    }
    value
}

/// Proves that nothing more is on its way to `client`, a connection of `id`,
/// without trusting a silence window: a marker sent through the API now is
/// queued behind anything already pushed to the connection (a connection's
/// frames go out in the order they were pushed), so the next message must be
/// the marker. Markers of earlier calls (to other connections of the same id)
/// are skipped; anything else fails.
pub async fn assert_nothing_before_marker(server: &Server, client: &mut Client, id: &str) {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let marker = NEXT.fetch_add(1, Ordering::Relaxed);
    let body = serde_json::json!({"targets": [id], "payload": {"marker": marker}});
    let (status, _) = api_call(
        server.api_addr,
        "POST",
        "/api/v1/send",
        server.api_key.as_deref(),
        Some(body),
    )
    .await;
    assert_eq!(status, 200, "the marker was not sent");
    loop {
        let value = recv_json(client).await;
        // Raw connections get the payload; switchboard.v1 ones an envelope.
        let payload = if value.get("type").is_some() {
            &value["payload"]
        } else {
            &value
        };
        match payload.get("marker").and_then(Value::as_u64) {
            Some(seen) if seen == marker => return,
            Some(seen) if seen < marker => continue,
            _ => panic!("expected nothing before marker {marker}, got {value}"),
        }
    }
}
