//! The relay service end to end: the real `switchboard` binary on port 0, driven
//! by real WebSocket clients (tokio-tungstenite) and raw TCP for what no real
//! client would send.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn delivers_the_payload_text_to_one_target() {
    let server = Server::start(&[]);
    let mut one = server.connect("1").await;
    let mut two = server.connect("2").await;
    server.wait_for_clients(2).await;
    one.send(Message::text(
        r#"{"targets":[2],"payload":{"text": "hi",  "n": [1, 2]}}"#,
    ))
    .await
    .unwrap();
    assert_eq!(recv_text(&mut two).await, r#"{"text": "hi",  "n": [1, 2]}"#);
    assert_nothing_before_marker(&server, &mut one, "1").await;
}

#[tokio::test]
async fn delivers_to_every_connection_of_every_target_once() {
    let server = Server::start(&[]);
    let mut sender = server.connect("alice").await;
    let mut bob_phone = server.connect("bob").await;
    let mut bob_laptop = server.connect("bob").await;
    let mut carol = server.connect("carol").await;
    let mut dave = server.connect("dave").await;
    server.wait_for_clients(4).await;
    send(
        &mut sender,
        json!({"targets": ["bob", "carol", "bob", "nobody"], "payload": [1, 2, 3]}),
    )
    .await;
    for (client, id) in [
        (&mut bob_phone, "bob"),
        (&mut bob_laptop, "bob"),
        (&mut carol, "carol"),
    ] {
        assert_eq!(recv_text(client).await, "[1,2,3]");
        assert_nothing_before_marker(&server, client, id).await;
    }
    assert_nothing_before_marker(&server, &mut dave, "dave").await;
    // Targeting yourself reaches your own connections, this one included.
    send(&mut sender, json!({"targets": ["alice"], "payload": "me"})).await;
    assert_eq!(recv_text(&mut sender).await, r#""me""#);
}

#[tokio::test]
async fn integer_ids_and_targets_mean_their_decimal_form() {
    let server = Server::start(&[]);
    let mut one = server.connect("1").await;
    let mut two = server.connect("2").await;
    let mut three = server.connect("3").await;
    server.wait_for_clients(3).await;
    send(
        &mut one,
        json!({"targets": [2, "3"], "payload": {"seed": true}}),
    )
    .await;
    assert_eq!(recv_json(&mut two).await, json!({"seed": true}));
    assert_eq!(recv_json(&mut three).await, json!({"seed": true}));
}

#[tokio::test]
async fn envelope_clients_get_senders_acks_and_offline_targets() {
    let server = Server::start(&[]);
    let mut alice = server.connect_envelope("alice").await;
    let (mut bob, bob_welcome) = server.connect_envelope_welcome("bob").await;
    let mut raw_bob = server.connect("bob").await;
    server.wait_for_clients(2).await;
    send(
        &mut alice,
        json!({"id": 7, "targets": ["bob", "ghost"], "payload": {"x": 1}}),
    )
    .await;
    assert_eq!(
        recv_json(&mut bob).await,
        json!({"type": "message", "from": "alice", "offset": 1, "epoch": bob_welcome["epoch"], "payload": {"x": 1}})
    );
    assert_eq!(recv_json(&mut raw_bob).await, json!({"x": 1}));
    assert_eq!(
        recv_json(&mut alice).await,
        json!({"type": "ack", "id": 7, "delivered": ["bob"], "offline": ["ghost"], "offsets": {"bob": 1, "ghost": 1}})
    );
    // Without an id there is no ack.
    send(&mut alice, json!({"targets": ["bob"], "payload": null})).await;
    assert_eq!(recv_json(&mut bob).await["payload"], Value::Null);
    assert_nothing_before_marker(&server, &mut alice, "alice").await;
}

#[tokio::test]
async fn bad_messages_get_error_codes_and_nobody_else_sees_them() {
    let server = Server::start(&["--max-targets", "3"]);
    let mut bystander = server.connect("bystander").await;
    for envelope in [true, false] {
        let mut client = if envelope {
            server.connect_envelope("sender").await
        } else {
            server.connect("sender").await
        };
        let cases: [(Message, &str); 9] = [
            (Message::text("{not json"), "invalid_json"),
            (Message::text("[1,2]"), "invalid_message"),
            (
                Message::text(r#"{"targets":"bystander","payload":1}"#),
                "invalid_message",
            ),
            (Message::text(r#"{"payload":1}"#), "invalid_message"),
            (
                Message::text(r#"{"targets":["bystander"]}"#),
                "invalid_message",
            ),
            (
                Message::text(r#"{"targets":["bystander","a b"],"payload":1}"#),
                "invalid_target",
            ),
            (
                Message::text(r#"{"targets":[1,2,3,4],"payload":1}"#),
                "too_many_targets",
            ),
            (
                Message::text(r#"{"type":"teleport","id":"q","targets":[],"payload":1}"#),
                "unknown_type",
            ),
            (Message::binary(vec![1u8, 2, 3]), "binary_not_supported"),
        ];
        for (message, code) in cases {
            client.send(message).await.unwrap();
            let error = recv_json(&mut client).await;
            assert_eq!(error["type"], "error", "{error}");
            assert_eq!(error["code"], code, "{error}");
            assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        // The connection still works, and the bystander saw nothing but this.
        send(
            &mut client,
            json!({"targets": ["bystander"], "payload": "after"}),
        )
        .await;
        assert_eq!(recv_text(&mut bystander).await, r#""after""#);
    }
    assert_nothing_before_marker(&server, &mut bystander, "bystander").await;
}

#[tokio::test]
async fn errors_carry_the_message_id_in_envelope_mode() {
    let server = Server::start(&[]);
    let mut client = server.connect_envelope("a").await;
    send(
        &mut client,
        json!({"id": "m1", "targets": [1.5], "payload": 1}),
    )
    .await;
    let error = recv_json(&mut client).await;
    assert_eq!(
        (error["code"].as_str(), error["id"].as_str()),
        (Some("invalid_target"), Some("m1"))
    );
}

#[tokio::test]
async fn oversize_messages_close_with_1009() {
    let server = Server::start(&["--max-message-size", "1024"]);
    let mut client = server.connect("big").await;
    let payload = "x".repeat(2000);
    send(&mut client, json!({"targets": ["big"], "payload": payload})).await;
    assert_eq!(recv_close(&mut client).await, 1009);
}

/// Connects over raw TCP and sends `frame` after the handshake; returns the close code.
async fn raw_close_code(server: &Server, frame: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let request = "GET /ws?id=raw HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(stream.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    stream.write_all(frame).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut reply))
        .await
        .unwrap()
        .unwrap();
    // Skip pings; the close frame is the last server frame: 0x88, len, code.
    let at = reply
        .iter()
        .rposition(|b| *b == 0x88)
        .expect("a close frame");
    u16::from_be_bytes([reply[at + 2], reply[at + 3]])
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007_and_protocol_violations_with_1002() {
    let server = Server::start(&[]);
    let mask = [1u8, 2, 3, 4];
    let payload = b"{\"targets\":[\xff]}";
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    assert_eq!(raw_close_code(&server, &frame).await, 1007);
    // An unmasked client frame.
    assert_eq!(
        raw_close_code(&server, &[0x81, 0x02, b'{', b'}']).await,
        1002
    );
}

#[tokio::test]
async fn missing_or_invalid_ids_are_refused_before_the_upgrade() {
    let server = Server::start(&[]);
    let (status, body) = server.http("GET /ws").await;
    assert_eq!(status, 400);
    assert!(body.contains("missing id"), "{body}");
    let (status, body) = server.http("GET /ws?id=a%20b").await;
    assert_eq!(status, 400);
    assert!(body.contains("invalid id"), "{body}");
    let (status, _) = server
        .http(&format!("GET /ws?id={}", "x".repeat(129)))
        .await;
    assert_eq!(status, 400);
    let (status, _) = server.http("GET /ws?id=1").await;
    assert_eq!(status, 426);
    let (status, body) = server.http("GET /healthz").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["status"],
        "ok"
    );
}

#[tokio::test]
async fn the_registry_forgets_clean_and_abrupt_disconnects() {
    let server = Server::start(&[]);
    let mut clean = server.connect("clean").await;
    let abrupt = server.connect("abrupt").await;
    let mut sender = server.connect_envelope("sender").await;
    server.wait_for_clients(3).await;
    clean.close(None).await.unwrap();
    drop(abrupt);
    server.wait_for_clients(1).await;
    send(
        &mut sender,
        json!({"id": 1, "targets": ["clean", "abrupt"], "payload": 0}),
    )
    .await;
    assert_eq!(
        recv_json(&mut sender).await["offline"],
        json!(["clean", "abrupt"])
    );
}

#[tokio::test]
async fn idle_clients_are_closed_with_1001() {
    let server = Server::start(&["--idle-timeout-secs", "1", "--ping-interval-secs", "0"]);
    let connected = tokio::time::Instant::now();
    let mut client = server.connect("sleepy").await;
    assert_eq!(recv_close(&mut client).await, 1001);
    let after = connected.elapsed();
    assert!(
        after >= Duration::from_millis(980) && after < Duration::from_secs(4),
        "closed {after:?} after connecting, with an idle timeout of 1 s"
    );
}

#[tokio::test]
async fn sigterm_closes_clients_with_1012_and_exits_zero() {
    let mut server = Server::start(&["--shutdown-drain-secs", "5"]);
    let mut clients = Vec::new();
    for id in ["a", "b", "c"] {
        clients.push(server.connect(id).await);
    }
    server.wait_for_clients(3).await;
    // Every node (one, unless in cluster mode).
    for child in server.children() {
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    for client in &mut clients {
        assert_eq!(recv_close(client).await, 1012);
        // Let the client answer the close so the drain completes.
        let _ =
            tokio::time::timeout(TIMEOUT, async { while client.next().await.is_some() {} }).await;
    }
    let deadline = std::time::Instant::now() + TIMEOUT;
    for child in server.children() {
        let exit = loop {
            if let Some(exit) = child.try_wait().unwrap() {
                break exit;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(exit.success(), "{exit:?}");
    }
}

/// Regression: the id used to be registered only once the driver task started,
/// after the 101 went out, so a message sent right after the handshake could find
/// its target offline.
#[tokio::test]
async fn a_client_is_reachable_as_soon_as_its_handshake_completes() {
    let server = Server::start(&[]);
    let mut sender = server.connect_envelope("sender").await;
    for i in 0..100 {
        let mut target = server.connect(&format!("t{i}")).await;
        send(
            &mut sender,
            json!({"id": i, "targets": [format!("t{i}")], "payload": i}),
        )
        .await;
        let ack = recv_json(&mut sender).await;
        assert_eq!(ack["offline"], json!([]), "attempt {i}: {ack}");
        assert_eq!(recv_text(&mut target).await, i.to_string());
    }
}
