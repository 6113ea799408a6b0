//! Direct writes: under `switchboard::serve`, a prepared frame pushed to a
//! connection that waits with nothing queued is written to its socket by the
//! pusher, without waking the connection's task. These tests run on tokio's
//! current-thread runtime, so no other task runs until the test awaits.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{RawClient, handing_out_handles, serve, serve_with_axum};
use switchboard::proto::OpCode;
use switchboard::{ConnHandle, Options, PreparedMessage};

#[derive(Clone, Copy)]
enum Server {
    /// `switchboard::serve`: the socket stays a `TcpStream`.
    Switchboard,
    /// `axum::serve`: the socket is hidden, every frame goes through the task.
    Axum,
}

/// A connected raw client and the handle of its connection, once the
/// connection's task waits for work.
async fn connected(server: Server) -> (RawClient, ConnHandle<String>) {
    let (upgrade, _events, mut handles) =
        handing_out_handles(Options::default().max_outbound_bytes(64 << 20));
    let addr = match server {
        Server::Switchboard => serve(upgrade).await,
        Server::Axum => serve_with_axum(upgrade).await,
    };
    let mut client = RawClient::connect(addr).await;
    let handle = handles.recv().await.expect("the probe sends its handle");
    let greeting = client.recv().await;
    assert_eq!(greeting, Some((OpCode::Text, b"hello".to_vec())));
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    (client, handle)
}

/// The client's socket as a blocking std socket, reading with `timeout`.
fn blocking(client: RawClient, timeout: Duration) -> std::net::TcpStream {
    let socket = client.stream.into_std().unwrap();
    socket.set_nonblocking(false).unwrap();
    socket.set_read_timeout(Some(timeout)).unwrap();
    socket
}

#[tokio::test]
async fn a_push_to_a_waiting_connection_is_written_by_the_pusher() {
    let (client, handle) = connected(Server::Switchboard).await;
    let mut socket = blocking(client, Duration::from_secs(5));
    handle.push(PreparedMessage::text("direct")).unwrap();
    // No await since the push, so the connection's task has not run: the bytes
    // on the socket were written by `push` itself.
    let mut frame = [0u8; 8];
    socket
        .read_exact(&mut frame)
        .expect("the frame is on the socket");
    assert_eq!(&frame, b"\x81\x06direct");
}

#[tokio::test]
async fn under_axum_serve_a_push_waits_for_the_connections_task() {
    let (client, handle) = connected(Server::Axum).await;
    let mut socket = blocking(client, Duration::from_millis(200));
    handle.push(PreparedMessage::text("queued")).unwrap();
    let mut frame = [0u8; 8];
    let error = socket.read_exact(&mut frame).unwrap_err();
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{error}"
    );
    // Once the runtime runs the task, the frame goes out.
    socket.set_nonblocking(true).unwrap();
    let mut client = RawClient::from_std(socket);
    assert_eq!(
        client.recv().await,
        Some((OpCode::Text, b"queued".to_vec()))
    );
}

/// Pushes numbered messages of uneven sizes, about 10 MB in all, while the
/// client reads nothing, then checks that every one arrives whole and in order.
async fn frames_survive_a_full_socket(server: Server) {
    let (mut client, handle) = connected(server).await;
    let count = 100;
    let body = |i: usize| {
        let mut payload = format!("{i:05}").into_bytes();
        payload.resize(100_000 + i * 37, b'a' + (i % 26) as u8);
        payload
    };
    // No await in between: the socket fills, one write is cut short, the rest queue.
    for i in 0..count {
        handle.push(PreparedMessage::binary(body(i))).unwrap();
    }
    for i in 0..count {
        let (opcode, payload) = client.recv().await.expect("every message arrives");
        assert_eq!(opcode, OpCode::Binary);
        assert!(
            payload == body(i),
            "message {i} arrived damaged or out of order"
        );
    }
}

#[tokio::test]
async fn frames_written_directly_survive_a_full_socket() {
    frames_survive_a_full_socket(Server::Switchboard).await;
}

#[tokio::test]
async fn frames_written_by_the_task_survive_a_full_socket() {
    frames_survive_a_full_socket(Server::Axum).await;
}
