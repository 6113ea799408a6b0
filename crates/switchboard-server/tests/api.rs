//! The HTTP API against the real binary: keys, every endpoint, and its errors.

mod common;

use common::*;
use serde_json::json;

const KEY: &str = "key-one";

#[tokio::test]
async fn every_protected_endpoint_needs_one_of_the_api_keys() {
    let server = Server::start(&["--api-key", KEY, "--api-key", "key-two"]);
    for (method, path) in [
        ("POST", "/api/v1/send"),
        ("POST", "/api/v1/publish"),
        ("POST", "/api/v1/disconnect"),
        ("POST", "/api/v1/batch"),
        ("GET", "/api/v1/presence/t"),
        ("GET", "/api/v1/clients/1"),
        ("GET", "/api/v1/stats"),
    ] {
        for key in [None, Some("wrong"), Some("key-on")] {
            let (status, body) = server.api(method, path, key, Some(json!({}))).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (401, Some("unauthorized")),
                "{method} {path} {key:?}"
            );
        }
    }
    // Both keys work (rotation), and the OpenAPI document needs none.
    assert_eq!(
        server.api("GET", "/api/v1/stats", Some(KEY), None).await.0,
        200
    );
    assert_eq!(
        server
            .api("GET", "/api/v1/stats", Some("key-two"), None)
            .await
            .0,
        200
    );
    let (status, doc) = server.api("GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!((status, doc["openapi"].as_str()), (200, Some("3.1.0")));
}

#[tokio::test]
async fn the_served_openapi_document_is_the_one_in_docs() {
    let server = Server::start(&[]);
    let (_, served) = server.api("GET", "/api/v1/openapi.json", None, None).await;
    let in_docs: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap();
    assert_eq!(served, in_docs);
}

#[tokio::test]
async fn send_reports_delivered_and_offline_targets() {
    let server = Server::start(&["--api-key", KEY]);
    let mut raw = server.connect("1").await;
    let (mut envelope, welcome) = server.connect_envelope_welcome("2").await;
    assert_eq!(welcome["offset"], 0, "a new inbox: {welcome}");
    server.wait_for_clients(2).await;
    let body = json!({"targets": [1, "2", "3", 1], "payload": {"from": "backend"}});
    let (status, result) = server
        .api("POST", "/api/v1/send", Some(KEY), Some(body))
        .await;
    // Every target's inbox took it, the offline one's too.
    assert_eq!(
        (status, result),
        (
            200,
            json!({"delivered": ["1", "2"], "offline": ["3"], "offsets": {"1": 1, "2": 1, "3": 1}})
        )
    );
    assert_eq!(recv_json(&mut raw).await, json!({"from": "backend"}));
    assert_eq!(
        recv_json(&mut envelope).await,
        json!({"type": "message", "offset": 1, "epoch": welcome["epoch"], "payload": {"from": "backend"}})
    );
    assert_nothing_before_marker(&server, &mut raw, "1").await;

    let body = json!({"targets": ["2"], "payload": 1, "from": "billing"});
    server
        .api("POST", "/api/v1/send", Some(KEY), Some(body))
        .await;
    assert_eq!(recv_json(&mut envelope).await["from"], "billing");
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_a_client() {
    let server = Server::start(&["--api-key", KEY]);
    let mut phone = server.connect("u").await;
    let mut laptop = server.connect("u").await;
    let mut other = server.connect("v").await;
    server.wait_for_clients(2).await;
    let body = json!({"id": "u", "code": 4000, "reason": "account suspended"});
    let (status, result) = server
        .api("POST", "/api/v1/disconnect", Some(KEY), Some(body))
        .await;
    assert_eq!((status, result), (200, json!({"connections": 2})));
    for client in [&mut phone, &mut laptop] {
        assert_eq!(
            recv_close_frame(client).await,
            (4000, "account suspended".to_string())
        );
    }
    assert_nothing_before_marker(&server, &mut other, "v").await;
    let body = json!({"id": "v", "code": 1001});
    let (status, error) = server
        .api("POST", "/api/v1/disconnect", Some(KEY), Some(body))
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
}

#[tokio::test]
async fn batch_checks_every_operation_before_running_any() {
    let server = Server::start(&["--api-key", KEY]);
    let mut reader = server.connect_envelope("reader").await;
    send(
        &mut reader,
        json!({"type": "subscribe", "topic": "t", "id": 1}),
    )
    .await;
    recv_json(&mut reader).await;
    let good = json!({"operations": [
        {"op": "send", "targets": ["reader", "nobody"], "payload": "direct"},
        {"op": "publish", "topic": "t", "payload": "topical"},
        {"op": "disconnect", "id": "nobody"}
    ]});
    let (status, result) = server
        .api("POST", "/api/v1/batch", Some(KEY), Some(good))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        result,
        json!({"results": [
            {"delivered": ["reader"], "offline": ["nobody"], "offsets": {"reader": 1, "nobody": 1}},
            {"subscribers": 1},
            {"connections": 0}
        ]})
    );
    assert_eq!(recv_json(&mut reader).await["payload"], "direct");
    assert_eq!(recv_json(&mut reader).await["payload"], "topical");

    let bad = json!({"operations": [
        {"op": "send", "targets": ["reader"], "payload": "must not arrive"},
        {"op": "publish", "topic": "bad topic", "payload": 1}
    ]});
    let (status, error) = server
        .api("POST", "/api/v1/batch", Some(KEY), Some(bad))
        .await;
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("invalid_topic"))
    );
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("operations[1]")
    );
    assert_nothing_before_marker(&server, &mut reader, "reader").await;
    let unknown = json!({"operations": [{"op": "teleport"}]});
    assert_eq!(
        server
            .api("POST", "/api/v1/batch", Some(KEY), Some(unknown))
            .await
            .0,
        400
    );
}

#[tokio::test]
async fn errors_are_json_with_stable_codes() {
    let server = Server::start(&["--api-key", KEY, "--api-max-body-bytes", "200"]);
    let cases = [
        (
            "POST",
            "/api/v1/send",
            Some(json!({"targets": "1", "payload": 1})),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/send",
            Some(json!({"targets": ["a b"], "payload": 1})),
            400,
            "invalid_id",
        ),
        (
            "POST",
            "/api/v1/send",
            Some(json!({"targets": [], "payload": 1, "extra": true})),
            400,
            "invalid_request",
        ),
        // The fields in order, as an array: serde's derive alone would take it.
        (
            "POST",
            "/api/v1/send",
            Some(json!([["1"], {"x": 1}])),
            400,
            "invalid_request",
        ),
        (
            "POST",
            "/api/v1/publish",
            Some(json!({"topic": "", "payload": 1})),
            400,
            "invalid_topic",
        ),
        (
            "POST",
            "/api/v1/send",
            Some(json!({"targets": [], "payload": "x".repeat(300)})),
            413,
            "payload_too_large",
        ),
        (
            "GET",
            "/api/v1/presence/bad%20topic",
            None,
            400,
            "invalid_topic",
        ),
        ("GET", "/api/v1/clients/bad%20id", None, 400, "invalid_id"),
        ("GET", "/api/v1/nothing-here", None, 404, "not_found"),
        ("DELETE", "/api/v1/send", None, 405, "method_not_allowed"),
    ];
    for (method, path, body, status, code) in cases {
        let (got_status, got) = server.api(method, path, Some(KEY), body).await;
        assert_eq!(
            (got_status, got["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}"
        );
        assert!(
            got["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    let request = format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Length: 2\r\n\r\n{{}}"
    );
    let (status, body) = raw_http(server.addr, &request).await;
    assert_eq!(status, 415, "{body}");
    // Bodies that are not JSON, with and without a wrong type before the end.
    for bad in ["{nope", r#"{"targets":"1","#] {
        let request = format!(
            "POST /api/v1/send HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{bad}",
            bad.len()
        );
        let (status, body) = raw_http(server.addr, &request).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("invalid_json"), "{bad}: {body}");
    }
    // A body malformed on the wire is no larger than the limit: 400, not 413.
    let request = format!(
        "POST /api/v1/send HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    let (status, body) = raw_http(server.addr, &request).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_request"), "{body}");
}

#[tokio::test]
async fn stats_count_connections_and_traffic() {
    let server = Server::start(&[]);
    let mut a = server.connect("a").await;
    let mut b = server.connect("b").await;
    server.wait_for_clients(2).await;
    send(&mut a, json!({"targets": ["b"], "payload": "hello"})).await;
    recv_text(&mut b).await;
    // A frame written straight to the socket is counted once the write
    // returns, which can be just after the client has read it; in a
    // cluster, other nodes' figures are as of their last heartbeat.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let stats = loop {
        let (status, stats) = server.api("GET", "/api/v1/stats", None, None).await;
        assert_eq!(status, 200);
        let all_in = stats["messages_out"] != 0 && stats["messages_in"] != 0;
        if (all_in && stats["connections"] == 2) || tokio::time::Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert_eq!(
        (stats["connections"].as_u64(), stats["clients"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(
        (
            stats["messages_in"].as_u64(),
            stats["messages_out"].as_u64()
        ),
        (Some(1), Some(1))
    );
    let sent = json!({"targets": ["b"], "payload": "hello"})
        .to_string()
        .len() as u64;
    assert_eq!(stats["bytes_in"].as_u64(), Some(sent));
    assert_eq!(
        stats["bytes_out"].as_u64(),
        Some(2 + "\"hello\"".len() as u64),
        "header + payload"
    );
}

#[tokio::test]
async fn a_separate_api_listener_takes_the_api_off_the_client_port() {
    let (server, api) = Server::start_with(&["--api-listen", "127.0.0.1:0", "--api-key", KEY]);
    let api = api.unwrap();
    let (status, _) = server.api("GET", "/api/v1/stats", Some(KEY), None).await;
    assert_eq!(status, 404);
    let (status, stats) = api_call(api, "GET", "/api/v1/stats", Some(KEY), None).await;
    assert_eq!((status, stats["clients"].as_u64()), (200, Some(0)));
    let (status, _) = api_call(api, "GET", "/healthz", None, None).await;
    assert_eq!(status, 404, "the API listener serves only the API");
}

#[tokio::test]
async fn without_keys_the_api_is_open_on_loopback_only() {
    let server = Server::start(&[]);
    assert_eq!(server.api("GET", "/api/v1/stats", None, None).await.0, 200);
    // Off loopback, with no keys, it stays shut (clients still need --allow-insecure there).
    let (server, api) = Server::start_with(&["--api-listen", "0.0.0.0:0"]);
    let api = std::net::SocketAddr::from(([127, 0, 0, 1], api.unwrap().port()));
    let (status, body) = api_call(api, "GET", "/api/v1/stats", None, None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    drop(server);
}

#[tokio::test]
async fn keys_come_from_the_environment_or_the_config_file_too() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--persist", "false"])
        .args(["--log-level", "warn"])
        .env("SWITCHBOARD_API_KEYS", "env-one,env-two")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    for key in ["env-one", "env-two"] {
        assert_eq!(
            api_call(addr, "GET", "/api/v1/stats", Some(key), None)
                .await
                .0,
            200,
            "{key}"
        );
    }
    assert_eq!(
        api_call(addr, "GET", "/api/v1/stats", None, None).await.0,
        401
    );
    child.kill().unwrap();
    child.wait().unwrap();

    let path = std::env::temp_dir().join(format!("switchboard-keys-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        "api_keys = [\"file-key\"]\nallowed_origins = [\"https://app.example\"]\n",
    )
    .unwrap();
    let server = Server::start(&["--config", path.to_str().unwrap()]);
    assert_eq!(
        server
            .api("GET", "/api/v1/stats", Some("file-key"), None)
            .await
            .0,
        200
    );
    assert_eq!(
        server
            .refused_status("/ws?id=1", &[("origin", "https://other.example")])
            .await,
        403
    );
    std::fs::remove_file(path).unwrap();
}

/// Regression: a batch operation parsed through a map kept the last of two
/// equal keys, so `"op":"disconnect","op":"send"` ran as a send; `/send` and
/// the WebSocket path refuse duplicates, and so does the batch now.
#[tokio::test]
async fn batch_operations_refuse_duplicate_keys_as_send_does() {
    let server = Server::start(&["--api-key", KEY]);
    let mut reader = server.connect_envelope("reader").await;
    let post = |path: &str, body: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let twice = r#"{"operations":[{"op":"disconnect","op":"send","id":"reader","targets":["reader"],"payload":1}]}"#;
    let (status, body) = common::raw_http(server.addr, &post("/api/v1/batch", twice)).await;
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (status, error["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    assert!(body.contains("duplicate field `op`"), "{body}");
    let send_twice = r#"{"targets":["reader"],"targets":["nobody"],"payload":1}"#;
    let (status, body) = common::raw_http(server.addr, &post("/api/v1/send", send_twice)).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("duplicate field `targets`"), "{body}");
    assert_nothing_before_marker(&server, &mut reader, "reader").await;
}
