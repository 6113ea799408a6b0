//! Connection auth, origins and client limits against the real binary.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "an-integration-test-secret-32-bytes!";

fn token(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// A `switchboard.v1` connection of `id`, authenticated by `token` in the
/// query, once its welcome has come.
async fn envelope_with_token(server: &Server, token: &str, id: &str) -> Client {
    let mut client = server
        .connect_request(
            &format!("/ws?token={token}"),
            &[("sec-websocket-protocol", "switchboard.v1")],
        )
        .await
        .unwrap();
    recv_welcome(&mut client, id).await;
    client
}

fn token_for(sub: &str, lifetime_secs: u64) -> String {
    token(json!({"sub": sub, "exp": get_current_timestamp() + lifetime_secs}))
}

fn jwt_server(extra: &[&str]) -> Server {
    let mut args = vec!["--jwt-hs256-secret", SECRET, "--jwt-leeway-secs", "0"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[tokio::test]
async fn with_tokens_configured_an_id_alone_is_refused() {
    let server = jwt_server(&[]);
    assert_eq!(server.refused_status("/ws?id=1", &[]).await, 401);
    let (status, body) = server.http("GET /ws?id=1").await;
    assert_eq!(status, 401);
    assert!(body.contains("a token is required"), "{body}");
}

#[tokio::test]
async fn a_token_can_travel_in_a_header_the_query_or_a_subprotocol() {
    let server = jwt_server(&[]);
    let mut sender = server
        .connect_request(
            "/ws",
            &[(
                "authorization",
                &format!("Bearer {}", token_for("alice", 60)),
            )],
        )
        .await
        .unwrap();
    let mut by_query = server
        .connect_request(&format!("/ws?token={}", token_for("bob", 60)), &[])
        .await
        .unwrap();
    let protocols = format!("switchboard.v1, bearer.{}", token_for("carol", 60));
    let mut by_protocol = server
        .connect_request("/ws", &[("sec-websocket-protocol", &protocols)])
        .await
        .unwrap();
    recv_welcome(&mut by_protocol, "carol").await;
    server.wait_for_clients(3).await;
    send(
        &mut sender,
        json!({"targets": ["bob", "carol"], "payload": "hi"}),
    )
    .await;
    assert_eq!(recv_text(&mut by_query).await, r#""hi""#);
    assert_eq!(
        recv_delivery(&mut by_protocol, true).await,
        json!({"type": "message", "from": "alice", "payload": "hi"})
    );
}

#[tokio::test]
async fn a_forged_id_is_ignored_when_tokens_are_on() {
    let server = jwt_server(&[]);
    let mut mallory = server
        .connect_request(
            &format!("/ws?id=alice&token={}", token_for("mallory", 60)),
            &[],
        )
        .await
        .unwrap();
    let mut sender = envelope_with_token(&server, &token_for("sender", 60), "sender").await;
    server.wait_for_clients(2).await;
    send(
        &mut sender,
        json!({"targets": ["alice", "mallory"], "payload": 1, "id": 1}),
    )
    .await;
    let ack = recv_json(&mut sender).await;
    assert_eq!(
        (ack["delivered"].clone(), ack["offline"].clone()),
        (json!(["mallory"]), json!(["alice"]))
    );
    assert_eq!(recv_text(&mut mallory).await, "1");
}

#[tokio::test]
async fn bad_tokens_are_refused_before_the_upgrade() {
    let server = jwt_server(&[]);
    let expired = token(json!({"sub": "a", "exp": get_current_timestamp() - 5}));
    let other_secret = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "a", "exp": get_current_timestamp() + 60}),
        &EncodingKey::from_secret(b"a-different-secret-also-32-bytes-long"),
    )
    .unwrap();
    for bad in [expired.as_str(), other_secret.as_str(), "not.a.jwt"] {
        assert_eq!(
            server
                .refused_status(&format!("/ws?token={bad}"), &[])
                .await,
            401,
            "{bad}"
        );
    }
}

#[tokio::test]
async fn an_expiring_token_closes_with_4001_unless_refreshed() {
    let server = jwt_server(&[]);
    let headers = [("sec-websocket-protocol", "switchboard.v1")];
    let mut expiring = server
        .connect_request(&format!("/ws?token={}", token_for("e", 1)), &headers)
        .await
        .unwrap();
    recv_welcome(&mut expiring, "e").await;
    let mut refreshed = server
        .connect_request(&format!("/ws?token={}", token_for("r", 1)), &headers)
        .await
        .unwrap();
    recv_welcome(&mut refreshed, "r").await;
    send(
        &mut refreshed,
        json!({"type": "refresh", "token": token_for("r", 60), "id": "fresh"}),
    )
    .await;
    assert_eq!(
        recv_json(&mut refreshed).await,
        json!({"type": "ack", "id": "fresh"})
    );
    // A token for someone else cannot be swapped in.
    send(
        &mut refreshed,
        json!({"type": "refresh", "token": token_for("x", 60), "id": 2}),
    )
    .await;
    assert_eq!(recv_json(&mut refreshed).await["code"], "invalid_token");

    assert_eq!(
        recv_close_frame(&mut expiring).await,
        (4001, "token expired".to_string())
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    send(
        &mut refreshed,
        json!({"type": "status", "clients": ["r"], "id": 3}),
    )
    .await;
    assert_eq!(recv_json(&mut refreshed).await["clients"]["r"], true);
}

#[tokio::test]
async fn claims_restrict_topics_and_targets() {
    let server = jwt_server(&[]);
    let limited = token(json!({
        "sub": "limited", "exp": get_current_timestamp() + 60,
        "switchboard": {"subscribe": ["chat:*"], "publish": [], "send": ["support"]}
    }));
    let mut client = envelope_with_token(&server, &limited, "limited").await;
    let cases = [
        (
            json!({"type": "subscribe", "topic": "chat:lobby", "id": 1}),
            "ack",
        ),
        (
            json!({"type": "subscribe", "topic": "admin:x", "id": 2}),
            "forbidden",
        ),
        (
            json!({"type": "publish", "topic": "chat:lobby", "payload": 1, "id": 3}),
            "forbidden",
        ),
        (
            json!({"targets": ["support"], "payload": 1, "id": 4}),
            "ack",
        ),
        (
            json!({"targets": ["support", "ceo"], "payload": 1, "id": 5}),
            "forbidden",
        ),
        // Who is in a topic, and who is online, follow the same claims.
        (
            json!({"type": "presence", "topic": "admin:x", "id": 6}),
            "forbidden",
        ),
        (
            json!({"type": "status", "clients": ["support"], "id": 7}),
            "status",
        ),
        (
            json!({"type": "status", "clients": ["support", "ceo"], "id": 8}),
            "forbidden",
        ),
    ];
    for (message, expected) in cases {
        send(&mut client, message.clone()).await;
        let reply = recv_json(&mut client).await;
        let got = match reply["type"].as_str() {
            Some(kind @ ("ack" | "status")) => kind,
            _ => reply["code"].as_str().unwrap(),
        };
        assert_eq!(got, expected, "{message} -> {reply}");
    }
}

#[tokio::test]
async fn a_refresh_ends_the_subscriptions_the_new_token_does_not_allow() {
    let server = jwt_server(&[]);
    let claims = |subscribe: Value| {
        token(json!({
            "sub": "narrowed", "exp": get_current_timestamp() + 60,
            "switchboard": {"subscribe": subscribe}
        }))
    };
    let refresh = |subscribe: Value, id: u64| json!({"type": "refresh", "token": claims(subscribe), "id": id});
    let wide = claims(json!(["chat:*", "news:*"]));
    let mut client = envelope_with_token(&server, &wide, "narrowed").await;
    for (id, topic) in [(1, "chat:lobby"), (2, "news:world")] {
        send(
            &mut client,
            json!({"type": "subscribe", "topic": topic, "id": id}),
        )
        .await;
        assert_eq!(recv_json(&mut client).await["type"], "ack");
    }
    send(&mut client, refresh(json!(["chat:*"]), 3)).await;
    assert_eq!(
        recv_json(&mut client).await,
        json!({"type": "unsubscribed", "topic": "news:world", "code": "forbidden",
               "message": "your token no longer allows subscribing to \"news:world\""})
    );
    assert_eq!(
        recv_json(&mut client).await,
        json!({"type": "ack", "id": 3})
    );
    // The ended subscription gets nothing more; the one still allowed does.
    for topic in ["news:world", "chat:lobby"] {
        let body = json!({"topic": topic, "payload": topic});
        let (status, answer) = server
            .api("POST", "/api/v1/publish", None, Some(body))
            .await;
        let expected = u64::from(topic == "chat:lobby");
        assert_eq!(
            (status, &answer["subscribers"]),
            (200, &json!(expected)),
            "{topic}"
        );
    }
    assert_eq!(recv_json(&mut client).await["payload"], "chat:lobby");
    // A refresh that narrows nothing ends nothing.
    send(&mut client, refresh(json!(["chat:*"]), 4)).await;
    assert_eq!(
        recv_json(&mut client).await,
        json!({"type": "ack", "id": 4})
    );
    // A subscribe and a refresh that disallows it, in one write. The memory
    // engine answers the subscribe at once, so the refresh ends it; in
    // cluster mode the refresh can come first, and the subscribe's answer is
    // then `forbidden` (not tested here: the auth tests run on one node).
    send(&mut client, refresh(json!(["chat:*", "news:*"]), 5)).await;
    assert_eq!(recv_json(&mut client).await["id"], 5);
    for message in [
        json!({"type": "subscribe", "topic": "news:late", "id": 6}),
        refresh(json!(["chat:*"]), 7),
    ] {
        client
            .feed(Message::text(message.to_string()))
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let frame = recv_json(&mut client).await;
        got.push((
            frame["type"].clone(),
            frame["id"].clone(),
            frame["topic"].clone(),
        ));
    }
    assert_eq!(
        got,
        [
            (json!("ack"), json!(6), json!("news:late")),
            (json!("unsubscribed"), Value::Null, json!("news:late")),
            (json!("ack"), json!(7), Value::Null),
        ]
    );
    let body = json!({"topic": "news:late", "payload": 1});
    let (_, answer) = server
        .api("POST", "/api/v1/publish", None, Some(body))
        .await;
    assert_eq!(answer["subscribers"], 0);
}

#[tokio::test]
async fn only_allowed_browser_origins_may_connect() {
    let server = Server::start(&["--allowed-origin", "https://app.example"]);
    assert_eq!(
        server
            .refused_status("/ws?id=1", &[("origin", "https://evil.example")])
            .await,
        403
    );
    assert!(
        server
            .connect_request("/ws?id=1", &[("origin", "https://app.example")])
            .await
            .is_ok()
    );
    // Clients that are not browsers send no Origin.
    assert!(server.connect_request("/ws?id=1", &[]).await.is_ok());
}

#[tokio::test]
async fn a_public_address_without_auth_needs_allow_insecure() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "0.0.0.0:0", "--persist", "false"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("without client authentication"), "{stderr}");
    assert!(stderr.contains("--allow-insecure"), "{stderr}");

    let server = Server::start(&["--listen", "0.0.0.0:0", "--allow-insecure"]);
    assert!(server.addr.port() > 0);
    let server = jwt_server(&["--listen", "0.0.0.0:0"]);
    assert!(server.addr.port() > 0);
}

#[tokio::test]
async fn floods_are_refused_then_disconnected() {
    // One message a second, bursts of two: whatever the machine's speed, the
    // flood below arrives within the second, so the counts are exact.
    let server = Server::start(&[
        "--rate-limit-messages-per-sec",
        "1",
        "--rate-limit-strikes",
        "5",
    ]);
    let mut flooder = server.connect_envelope("flood").await;
    let mut bystander = server.connect("calm").await;
    server.wait_for_clients(2).await;
    for i in 0..30 {
        // The connection may already be closing at the end of the burst.
        let _ = futures_util::SinkExt::send(
            &mut flooder,
            tokio_tungstenite::tungstenite::Message::text(
                json!({"targets": ["flood"], "payload": i}).to_string(),
            ),
        )
        .await;
    }
    let (mut delivered, mut refused) = (Vec::new(), 0);
    let code = loop {
        match recv(&mut flooder).await {
            tokio_tungstenite::tungstenite::Message::Text(text) => {
                let value: Value = serde_json::from_str(&text).unwrap();
                match value["type"].as_str() {
                    Some("message") => delivered.push(value["payload"].clone()),
                    Some("error") if value["code"] == "rate_limited" => refused += 1,
                    _ => panic!("unexpected {value}"),
                }
            }
            tokio_tungstenite::tungstenite::Message::Close(frame) => {
                break frame.map(|f| u16::from(f.code));
            }
            _ => {}
        }
    };
    // The burst's two, then four refusals; the fifth strike closes.
    assert_eq!(delivered, [json!(0), json!(1)]);
    assert_eq!(refused, 4, "rate_limited errors before the close");
    assert_eq!(code, Some(1008));
    // Nobody else was affected.
    let (status, _) = server
        .api(
            "POST",
            "/api/v1/send",
            None,
            Some(json!({"targets": ["calm"], "payload": 1})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(recv_text(&mut bystander).await, "1");
}

#[tokio::test]
async fn a_client_id_holds_at_most_its_connection_limit() {
    let server = Server::start(&["--max-connections-per-client", "2"]);
    let _a = server.connect("same").await;
    let _b = server.connect("same").await;
    server.wait_for_clients(1).await;
    assert_eq!(server.refused_status("/ws?id=same", &[]).await, 429);
    assert!(server.connect_request("/ws?id=other", &[]).await.is_ok());
}

#[tokio::test]
async fn handshakes_in_flight_together_do_not_pass_the_connection_limit() {
    // End to end, with the refusal's status: the engine counts those on
    // their way (engine_model's connections_on_their_way_count_against_the_
    // limit; cluster mode: test_cluster.py's racing handshakes).
    let server = Server::start(&["--max-connections-per-client", "2"]);
    let attempts = (0..12).map(|_| server.connect_request("/ws?id=crowd", &[]));
    let results = futures_util::future::join_all(attempts).await;
    let (held, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!((held.len(), refused.len()), (2, 10));
    drop(held);
    // Given back as they close.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.connect_request("/ws?id=crowd", &[]).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "never let in again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn help_never_prints_secret_values() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--help"])
        .env(
            "SWITCHBOARD_JWT_HS256_SECRET",
            "very-secret-value-for-the-help-test",
        )
        .env("SWITCHBOARD_API_KEYS", "secret-api-key-for-the-help-test")
        .env(
            "SWITCHBOARD_REDIS_URL",
            "redis://:redis-password-for-the-help@db:6379/0",
        )
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(
        help.contains("--jwt-hs256-secret") && help.contains("--api-key"),
        "{help}"
    );
    assert!(
        !help.contains("very-secret-value")
            && !help.contains("secret-api-key")
            && !help.contains("redis-password"),
        "{help}"
    );
}

/// Regression: the expiry delay was whole seconds, so a connection outlived
/// its token by the fraction of a second at which it connected.
#[tokio::test]
async fn a_token_that_expires_past_the_clocks_range_is_taken_and_refreshed() {
    // The largest `exp` a u64 holds: the deadline is past what the system
    // clock can name (it panicked the handshake's task, and a refresh's).
    let server = jwt_server(&[]);
    let forever = |sub: &str| token(json!({"sub": sub, "exp": u64::MAX}));
    let mut client = envelope_with_token(&server, &forever("far"), "far").await;
    send(
        &mut client,
        json!({"type": "refresh", "token": forever("far"), "id": 1}),
    )
    .await;
    assert_eq!(
        recv_json(&mut client).await,
        json!({"type": "ack", "id": 1})
    );
}

#[tokio::test]
async fn a_connection_ends_at_its_tokens_expiry_not_up_to_a_second_later() {
    use std::time::{SystemTime, UNIX_EPOCH};
    let server = jwt_server(&[]);
    let now = || SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    // Late in a second, where whole seconds were most wrong (by 0.6 s or more).
    while now().subsec_millis() < 600 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exp = now().as_secs() + 2;
    let token = token(json!({"sub": "e", "exp": exp}));
    let mut client = server
        .connect_request(&format!("/ws?token={token}"), &[])
        .await
        .unwrap();
    assert_eq!(
        recv_close_frame(&mut client).await,
        (4001, "token expired".to_string())
    );
    let closed = now();
    let expiry = Duration::from_secs(exp);
    assert!(
        closed >= expiry,
        "closed {:?} before the token expired",
        expiry - closed
    );
    assert!(
        closed < expiry + Duration::from_millis(400),
        "closed {:?} after the token expired",
        closed - expiry
    );
}
