//! Timeouts and a shutdown that always finishes: a client that stalls a request
//! body or its headers, or never answers a close, cannot hold the process.

mod common;

use std::time::{Duration, Instant};

use common::{Server, TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `head` (and no more), and returns the response status line that
/// comes back, with how long it took.
async fn status_after(stream: &mut TcpStream, head: &str) -> (String, Duration) {
    let started = Instant::now();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut response = vec![0u8; 1024];
    let n = tokio::time::timeout(TIMEOUT, stream.read(&mut response))
        .await
        .expect("an answer")
        .unwrap();
    let text = String::from_utf8_lossy(&response[..n]);
    let status = text.lines().next().unwrap_or_default().to_owned();
    (status, started.elapsed())
}

fn post_head(length: usize) -> String {
    format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_declared_length_over_the_limit_gets_413_at_once() {
    let server = Server::start(&["--api-max-body-bytes", "1000"]);
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let (status, took) = status_after(&mut stream, &post_head(1_000_000)).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    // Without waiting for the body that never comes.
    assert!(took < Duration::from_secs(1), "{took:?}");
}

#[tokio::test]
async fn a_stalled_body_gets_408_at_the_body_timeout() {
    let server = Server::start(&["--api-body-timeout-secs", "1"]);
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // 1,000 bytes declared, one sent.
    let (status, took) = status_after(&mut stream, &format!("{}{{", post_head(1000))).await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status}");
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(3)).contains(&took),
        "{took:?}"
    );
}

/// Regression: the body was read before the API key was checked, so a
/// caller with no key could have the server buffer up to
/// `api_max_body_bytes` per request for up to `api_body_timeout_secs`.
#[tokio::test]
async fn a_request_without_the_api_key_is_refused_before_its_body_is_read() {
    let server = Server::start(&["--api-key", "the-key"]);
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // 1,000 bytes declared, one sent: the 401 does not wait for the rest.
    let (status, _) = status_after(&mut stream, &format!("{}{{", post_head(1000))).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status}");
}

/// Waits for the process to exit, up to `limit` after `since`; returns its exit
/// code and when it exited.
fn exit_within(server: &mut Server, since: Instant, limit: Duration) -> (Option<i32>, Duration) {
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return (status.code(), since.elapsed());
        }
        assert!(
            since.elapsed() < limit,
            "still running {:?} after SIGTERM",
            since.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn sigterm_ends_the_process_within_the_drain_time_whatever_clients_do() {
    let mut server = Server::start(&["--shutdown-drain-secs", "1"]);
    // A request whose body stalls, one whose headers never end, and a
    // WebSocket client that never reads nor answers the close.
    let mut stalled_body = TcpStream::connect(server.addr).await.unwrap();
    stalled_body
        .write_all(format!("{}{{", post_head(1000)).as_bytes())
        .await
        .unwrap();
    let mut half_header = TcpStream::connect(server.addr).await.unwrap();
    half_header
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow:")
        .await
        .unwrap();
    let mut silent_ws = TcpStream::connect(server.addr).await.unwrap();
    silent_ws
        .write_all(
            b"GET /ws?id=silent HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    server.wait_for_clients(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (code, took) = exit_within(&mut server, signalled, Duration::from_secs(2));
    assert_eq!(code, Some(0), "exit code");
    // It waited for the drain time (the clients never finished), no longer.
    assert!(took >= Duration::from_millis(900), "{took:?}");
    drop((stalled_body, half_header, silent_ws));
}
