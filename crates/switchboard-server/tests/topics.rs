//! Topics, presence and status over `switchboard.v1`, against the real binary.

mod common;

use common::*;
use serde_json::{Value, json};

/// Namespaces: `chat:` with presence, `news:` server-only with two subscribers at most.
fn namespaces_config() -> tempfile_path::TempConfig {
    tempfile_path::TempConfig::new(
        r#"
[[namespaces]]
prefix = "chat:"
presence = true

[[namespaces]]
prefix = "news:"
client_publish = false
max_subscribers = 2
"#,
    )
}

mod tempfile_path {
    /// A config file that is removed on drop.
    pub struct TempConfig(pub std::path::PathBuf);

    impl TempConfig {
        pub fn new(text: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir()
                .join(format!("switchboard-test-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            Self(path)
        }

        pub fn arg(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TempConfig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

async fn subscribe(client: &mut Client, topic: &str) -> Value {
    send(
        client,
        json!({"type": "subscribe", "topic": topic, "id": topic}),
    )
    .await;
    recv_json(client).await
}

#[tokio::test]
async fn subscribers_get_published_messages_until_they_unsubscribe() {
    let server = Server::start(&[]);
    let mut alice = server.connect_envelope("alice").await;
    let mut bob = server.connect_envelope("bob").await;
    let mut publisher = server.connect_envelope("pub").await;
    assert_eq!(
        subscribe(&mut alice, "room:1").await,
        json!({"type": "ack", "id": "room:1", "topic": "room:1"})
    );
    assert_eq!(subscribe(&mut bob, "room:1").await["type"], "ack");
    // Subscribing twice is harmless.
    assert_eq!(subscribe(&mut bob, "room:1").await["type"], "ack");

    send(
        &mut publisher,
        json!({"type": "publish", "topic": "room:1", "payload": {"n": 1}, "id": 9}),
    )
    .await;
    assert_eq!(
        recv_json(&mut publisher).await,
        json!({"type": "ack", "id": 9, "topic": "room:1", "subscribers": 2})
    );
    let expected =
        json!({"type": "message", "topic": "room:1", "from": "pub", "payload": {"n": 1}});
    assert_eq!(recv_json(&mut alice).await, expected);
    assert_eq!(recv_json(&mut bob).await, expected);
    assert_nothing_before_marker(&server, &mut bob, "bob").await;

    send(
        &mut bob,
        json!({"type": "unsubscribe", "topic": "room:1", "id": 2}),
    )
    .await;
    assert_eq!(
        recv_json(&mut bob).await,
        json!({"type": "ack", "id": 2, "topic": "room:1"})
    );
    send(
        &mut bob,
        json!({"type": "unsubscribe", "topic": "room:1", "id": 3}),
    )
    .await;
    assert_eq!(recv_json(&mut bob).await["code"], "not_subscribed");
    // A name no subscribe could take gets the error a subscribe would.
    send(
        &mut bob,
        json!({"type": "unsubscribe", "topic": "has space", "id": 4}),
    )
    .await;
    assert_eq!(recv_json(&mut bob).await["code"], "invalid_topic");
    send(
        &mut publisher,
        json!({"type": "publish", "topic": "room:1", "payload": 2}),
    )
    .await;
    assert_eq!(recv_json(&mut alice).await["payload"], 2);
    assert_nothing_before_marker(&server, &mut bob, "bob").await;
}

#[tokio::test]
async fn a_closed_connection_leaves_its_topics() {
    let server = Server::start(&[]);
    let mut reader = server.connect_envelope("reader").await;
    let mut publisher = server.connect_envelope("pub").await;
    subscribe(&mut reader, "t").await;
    drop(reader);
    let (_, stats) = server.api("GET", "/api/v1/stats", None, None).await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut topics = stats["topics"].as_u64().unwrap();
    while topics != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the topic never emptied"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        topics = server.api("GET", "/api/v1/stats", None, None).await.1["topics"]
            .as_u64()
            .unwrap();
    }
    send(
        &mut publisher,
        json!({"type": "publish", "topic": "t", "payload": 1, "id": 1}),
    )
    .await;
    assert_eq!(recv_json(&mut publisher).await["subscribers"], 0);
}

#[tokio::test]
async fn topic_messages_need_the_envelope_subprotocol() {
    let server = Server::start(&[]);
    let mut raw = server.connect("raw").await;
    for kind in ["subscribe", "publish", "presence", "status"] {
        send(
            &mut raw,
            json!({"type": kind, "topic": "t", "payload": 1, "clients": ["a"]}),
        )
        .await;
        assert_eq!(
            recv_json(&mut raw).await["code"],
            "envelope_required",
            "{kind}"
        );
    }
}

#[tokio::test]
async fn namespaces_decide_who_publishes_and_how_many_subscribe() {
    let config = namespaces_config();
    let server = Server::start(&["--config", config.arg()]);
    let mut a = server.connect_envelope("a").await;
    let mut b = server.connect_envelope("b").await;
    let mut c = server.connect_envelope("c").await;
    assert_eq!(subscribe(&mut a, "news:world").await["type"], "ack");
    assert_eq!(subscribe(&mut b, "news:world").await["type"], "ack");
    let full = subscribe(&mut c, "news:world").await;
    assert_eq!(
        (full["code"].as_str(), full["id"].as_str()),
        (Some("topic_full"), Some("news:world"))
    );

    send(
        &mut a,
        json!({"type": "publish", "topic": "news:world", "payload": 1, "id": 1}),
    )
    .await;
    assert_eq!(recv_json(&mut a).await["code"], "forbidden");
    // The server API may publish where clients may not.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/publish",
            None,
            Some(json!({"topic": "news:world", "payload": "extra"})),
        )
        .await;
    assert_eq!((status, body), (200, json!({"subscribers": 2})));
    assert_eq!(
        recv_json(&mut b).await,
        json!({"type": "message", "topic": "news:world", "payload": "extra"})
    );

    assert_eq!(
        subscribe(&mut c, "sports:x").await["code"],
        "unknown_namespace"
    );
    assert_eq!(
        subscribe(&mut c, "chat:bad topic").await["code"],
        "invalid_topic"
    );
    assert_eq!(
        subscribe(&mut c, &"chat:".repeat(50)).await["code"],
        "invalid_topic"
    );
}

#[tokio::test]
async fn presence_counts_clients_not_connections() {
    let config = namespaces_config();
    let server = Server::start(&["--config", config.arg()]);
    let mut watcher = server.connect_envelope("watcher").await;
    subscribe(&mut watcher, "chat:lobby").await;
    assert_eq!(
        recv_json(&mut watcher).await,
        json!({"type": "presence", "topic": "chat:lobby", "event": "join", "client": "watcher"})
    );
    let mut tab1 = server.connect_envelope("ann").await;
    let mut tab2 = server.connect_envelope("ann").await;
    subscribe(&mut tab1, "chat:lobby").await;
    assert_eq!(recv_json(&mut watcher).await["event"], "join");
    subscribe(&mut tab2, "chat:lobby").await;
    // The second tab does not announce a second join.
    assert_nothing_before_marker(&server, &mut watcher, "watcher").await;

    send(
        &mut watcher,
        json!({"type": "presence", "topic": "chat:lobby", "id": "p"}),
    )
    .await;
    assert_eq!(
        recv_json(&mut watcher).await,
        json!({"type": "presence", "id": "p", "topic": "chat:lobby", "clients": {"ann": 2, "watcher": 1}})
    );
    let (_, http) = server
        .api("GET", "/api/v1/presence/chat:lobby", None, None)
        .await;
    assert_eq!(
        http,
        json!({"topic": "chat:lobby", "subscribers": 3, "clients": {"ann": 2, "watcher": 1}})
    );

    drop(tab1);
    // Once the server has seen that tab go, a leave would be queued already.
    server.wait_for_connections_of("ann", 1).await;
    assert_nothing_before_marker(&server, &mut watcher, "watcher").await;
    drop(tab2);
    assert_eq!(
        recv_json(&mut watcher).await,
        json!({"type": "presence", "topic": "chat:lobby", "event": "leave", "client": "ann"})
    );
    send(&mut watcher, json!({"type": "presence", "topic": "news:x"})).await;
    assert_eq!(recv_json(&mut watcher).await["code"], "presence_disabled");
}

/// Walks a topic's presence in pages of `limit` over the WebSocket and over
/// the API, checking each page's size; answers the members and the pages.
async fn walk_presence(
    server: &Server,
    asker: &mut Client,
    topic: &str,
    limit: usize,
) -> (serde_json::Map<String, Value>, usize) {
    let mut seen = serde_json::Map::new();
    let (mut cursor, mut pages) = (None::<String>, 0);
    loop {
        let mut ask = json!({"type": "presence", "topic": topic, "id": pages, "limit": limit});
        let mut path = format!("/api/v1/presence/{topic}?limit={limit}");
        if let Some(cursor) = &cursor {
            ask["cursor"] = json!(cursor);
            path.push_str(&format!("&cursor={cursor}"));
        }
        send(asker, ask).await;
        let page = recv_json(asker).await;
        let (_, http) = server.api("GET", &path, None, None).await;
        // Nobody joins or leaves during the walk: both surfaces give the same page.
        assert_eq!(page["clients"], http["clients"], "page {pages}");
        assert_eq!(page["next"], http["next"], "page {pages}");
        let clients = page["clients"].as_object().unwrap();
        assert!(clients.len() <= limit, "page {pages}: {}", clients.len());
        for (id, count) in clients {
            assert!(
                seen.insert(id.clone(), count.clone()).is_none(),
                "{id} twice"
            );
        }
        pages += 1;
        match page.get("next") {
            Some(next) => cursor = Some(next.as_str().unwrap().to_owned()),
            None => return (seen, pages),
        }
        assert!(pages < 100, "the walk does not end");
    }
}

#[tokio::test]
async fn presence_answers_in_pages_that_walk_every_member() {
    let config = namespaces_config();
    let server = Server::start(&["--config", config.arg()]);
    let mut asker = server.connect_envelope("asker").await;
    // 600 ids (beyond the 512 that Redis 7.0 as Debian builds it keeps in a
    // small hash, which it gives whole), every tenth with two connections.
    let mut members = Vec::new();
    let mut expected = serde_json::Map::new();
    for n in 0..600 {
        let id = format!("m{n}");
        let tabs = if n % 10 == 0 { 2 } else { 1 };
        for _ in 0..tabs {
            let mut member = server.connect_envelope(&id).await;
            assert_eq!(subscribe(&mut member, "chat:crowd").await["type"], "ack");
            members.push(member);
        }
        expected.insert(id, json!(tabs));
    }

    let (walked, pages) = walk_presence(&server, &mut asker, "chat:crowd", 150).await;
    assert_eq!(walked, expected);
    assert!(pages >= 4, "{pages} pages of at most 150 for 600 ids");
    // Without a limit, one answer holds up to 1,000 ids: these all, and no `next`.
    let (walked, pages) = walk_presence(&server, &mut asker, "chat:crowd", 1000).await;
    assert_eq!((walked, pages), (expected, 1));
    send(
        &mut asker,
        json!({"type": "presence", "topic": "chat:crowd", "id": 1}),
    )
    .await;
    let whole = recv_json(&mut asker).await;
    assert_eq!(whole["clients"].as_object().unwrap().len(), 600);
    assert!(whole.get("next").is_none(), "{whole}");

    // Bad pages get their codes, on both surfaces.
    for (field, value, code) in [
        ("limit", json!(0), "invalid_message"),
        ("limit", json!(1001), "invalid_message"),
        ("limit", json!("ten"), "invalid_message"),
        ("limit", json!(2.5), "invalid_message"),
        ("cursor", json!(5), "invalid_message"),
        ("cursor", json!("not a cursor!"), "invalid_cursor"),
        ("cursor", json!("x".repeat(200)), "invalid_cursor"),
    ] {
        let mut ask = json!({"type": "presence", "topic": "chat:crowd", "id": 2});
        ask[field] = value.clone();
        send(&mut asker, ask).await;
        let answer = recv_json(&mut asker).await;
        assert_eq!(
            (&answer["code"], &answer["id"]),
            (&json!(code), &json!(2)),
            "{field} {value}: {answer}"
        );
    }
    // `null` is as good as absent.
    send(
        &mut asker,
        json!({"type": "presence", "topic": "chat:crowd", "id": 4, "limit": null, "cursor": null}),
    )
    .await;
    let whole = recv_json(&mut asker).await;
    assert_eq!(whole["clients"].as_object().unwrap().len(), 600, "{whole}");
    // Other messages still ignore the fields, whatever their values.
    let send_with_page =
        json!({"targets": ["m1"], "payload": 1, "limit": "x", "cursor": 5, "id": 3});
    send(&mut asker, send_with_page).await;
    assert_eq!(recv_json(&mut asker).await["type"], "ack");
    for (query, code) in [
        ("limit=0", "invalid_request"),
        ("limit=ten", "invalid_request"),
        ("cursor=not%20a%20cursor!", "invalid_cursor"),
    ] {
        let path = format!("/api/v1/presence/chat:crowd?{query}");
        let (status, answer) = server.api("GET", &path, None, None).await;
        assert_eq!(
            (status, &answer["error"]["code"]),
            (400, &json!(code)),
            "{query}"
        );
    }
}

#[tokio::test]
async fn status_says_who_is_online() {
    let server = Server::start(&[]);
    let mut asker = server.connect_envelope("asker").await;
    let _online = server.connect("7").await;
    server.wait_for_clients(2).await;
    send(
        &mut asker,
        json!({"type": "status", "clients": [7, "ghost"], "id": 1}),
    )
    .await;
    assert_eq!(
        recv_json(&mut asker).await,
        json!({"type": "status", "id": 1, "clients": {"7": true, "ghost": false}})
    );
    let (_, client) = server.api("GET", "/api/v1/clients/7", None, None).await;
    assert_eq!(client, json!({"id": "7", "online": true, "connections": 1}));
}

#[tokio::test]
async fn a_connection_subscribes_to_at_most_its_topic_limit() {
    let server = Server::start(&["--max-topics-per-connection", "2"]);
    let mut client = server.connect_envelope("c").await;
    assert_eq!(subscribe(&mut client, "t1").await["type"], "ack");
    assert_eq!(subscribe(&mut client, "t2").await["type"], "ack");
    assert_eq!(
        subscribe(&mut client, "t3").await["code"],
        "too_many_topics"
    );
    assert_eq!(
        subscribe(&mut client, "t1").await["type"],
        "ack",
        "an existing topic is fine"
    );
}

#[tokio::test]
async fn a_thousand_subscribers_each_get_a_publish_exactly_once() {
    let server = Server::start(&[]);
    let mut readers = Vec::new();
    for i in 0..1000 {
        let mut reader = server.connect_envelope(&format!("r{i}")).await;
        send(&mut reader, json!({"type": "subscribe", "topic": "big"})).await;
        readers.push(reader);
    }
    // Subscriptions are processed in order; wait until all have landed.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (_, presence) = server.api("GET", "/api/v1/presence/big", None, None).await;
        if presence["subscribers"] == 1000 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriptions never completed: {presence}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let before = server.settled_stats().await;
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/publish",
            None,
            Some(json!({"topic": "big", "payload": {"seq": 1}})),
        )
        .await;
    assert_eq!((status, body), (200, json!({"subscribers": 1000})));
    let checks = readers.iter_mut().map(|reader| async move {
        assert_eq!(recv_json(reader).await["payload"], json!({"seq": 1}));
    });
    futures_util::future::join_all(checks).await;
    let stats = server.settled_stats().await;
    assert_eq!(
        stats["messages_out"].as_u64().unwrap() - before["messages_out"].as_u64().unwrap(),
        1000,
        "one frame per subscriber, nothing else (the publish pushed them all before it answered): {stats}"
    );
}
