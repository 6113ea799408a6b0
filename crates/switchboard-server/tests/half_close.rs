//! Acks tell the truth when a client half-closes: what the ack calls
//! delivered reaches the client, even when the client's FIN arrives right
//! behind its messages (issue 14: 46 of 50 runs lost them).

mod common;

use bytes::BytesMut;
use common::{Server, TIMEOUT};
use switchboard::proto::frame::encode_frame;
use switchboard::proto::{FrameDecoder, OpCode, Role};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends three acked messages to itself, then FIN; returns the text frames
/// that came back before the server closed.
async fn three_then_fin(server: &Server, id: &str) -> Vec<serde_json::Value> {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /ws?id={id} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: switchboard.v1\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    // The 101 first, so that the messages reach the connection's own reads.
    let mut received = Vec::new();
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(TIMEOUT, stream.read(&mut chunk))
            .await
            .expect("a response")
            .unwrap();
        assert!(n > 0, "the server closed during the handshake");
        received.extend_from_slice(&chunk[..n]);
    }
    let mut wire = BytesMut::new();
    for n in 1..=3 {
        let text = format!(r#"{{"type":"send","id":{n},"targets":["{id}"],"payload":{n}}}"#);
        encode_frame(
            &mut wire,
            true,
            false,
            OpCode::Text,
            text.as_bytes(),
            Some([7, 7, 7, 7]),
        );
    }
    // Messages and FIN in one go, as a client that says all it has to say.
    stream.write_all(&wire).await.unwrap();
    stream.shutdown().await.unwrap();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut received))
        .await
        .expect("the server closes")
        .unwrap();
    let head_end = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head")
        + 4;
    assert!(received.starts_with(b"HTTP/1.1 101"));
    let mut buf = BytesMut::from(&received[head_end..]);
    let mut decoder = FrameDecoder::new(Role::Client, 1 << 20, false);
    let mut texts = Vec::new();
    while let Ok(Some(frame)) = decoder.decode(&mut buf) {
        if frame.opcode == OpCode::Text {
            texts.push(serde_json::from_slice(&frame.payload).unwrap());
        }
    }
    texts
}

#[tokio::test]
async fn what_an_ack_calls_delivered_arrives_before_a_half_closed_connection_ends() {
    let server = Server::start(&[]);
    for run in 0..60 {
        let id = format!("half{run}");
        let texts = three_then_fin(&server, &id).await;
        let delivered: usize = texts
            .iter()
            .filter(|t| t["type"] == "ack")
            .map(|t| t["delivered"].as_array().unwrap().len())
            .sum();
        let messages = texts.iter().filter(|t| t["type"] == "message").count();
        assert_eq!(
            (delivered, messages),
            (3, 3),
            "run {run}: the acks said {delivered} delivered, {messages} arrived: {texts:?}"
        );
    }
}
