"""Logs (docs/operations.md, "Logs"): a span per connection whose fields every event of
the connection carries (in JSON logs too), one info event when it opens and one when it
closes with its traffic, and no token, API key, secret or payload in the logs at any
level, trace included."""

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import InvalidStatus

from test_claims import jwt_hs256
from test_relay import (  # noqa: F401 (start_server is a fixture)
    RECV_TIMEOUT,
    async_test,
    client,
    recv,
    single_node,
    start_server,
)


def all_logs(server):
    """Everything the server wrote to stderr, after it stopped."""
    server.signal(signal.SIGTERM)
    server.wait(10)
    node = server.nodes[0]
    node.stderr.seek(0)
    return node.stderr.read().decode(errors="replace")


def events(text):
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@single_node
@async_test
async def test_each_connection_logs_its_open_and_close_with_its_span_and_traffic(start_server):
    server = start_server("--log-format", "json", "--log-level", "info", "--compression", "false")
    message = json.dumps({"targets": ["ann", "bob"], "payload": {"n": 1}}, separators=(",", ":"))
    async with client(server, "bob", compression=None) as bob, client(server, "ann", compression=None) as ann:
        # bob is idle: ann's task writes bob's copy to bob's socket itself (a
        # direct write), which bob's close event counts all the same.
        await ann.send(message)
        assert await recv(ann) == '{"n":1}'
        assert await recv(bob) == '{"n":1}'
    await asyncio.sleep(0.2)
    logged = events(await asyncio.to_thread(all_logs, server))
    closes = {}
    for name in ("ann", "bob"):
        mine = [e for e in logged if e.get("span", {}).get("client") == name]
        assert [e["fields"]["message"] for e in mine] == ["connection opened", "connection closed"], mine
        opened, closed = mine
        span = opened["span"]
        assert span["name"] == "connection" and span["protocol"] == "none", span
        assert span["peer"].startswith("127.0.0.1:") and span["conn"].isdigit(), span
        assert closed["span"] == span
        assert (closed["fields"]["code"], closed["fields"]["reason"]) == (1000, "")
        assert 0 <= closed["fields"]["duration_ms"] < 10_000
        closes[name] = closed["fields"]
    # One delivery each: '{"n":1}' in a frame with a 2-byte header.
    frame = len('{"n":1}') + 2
    assert [closes["ann"][k] for k in ("messages_in", "bytes_in", "messages_out", "bytes_out")] == [1, len(message), 1, frame]
    assert [closes["bob"][k] for k in ("messages_in", "bytes_in", "messages_out", "bytes_out")] == [0, 0, 1, frame]
    # Per-message events are at debug: none at info.
    assert not [e for e in logged if e["fields"]["message"] == "message received"]


@single_node
@async_test
async def test_no_token_api_key_secret_or_payload_is_ever_logged_even_at_trace(start_server):
    secret = "the-jwt-secret-that-must-never-be-logged-1"
    key = "the-api-key-that-must-never-be-logged-2"
    wrong_key = "a-wrong-api-key-that-must-never-be-logged-3"
    server = start_server(
        "--log-format", "json", "--log-level", "trace",
        "--jwt-hs256-secret", secret, "--jwt-leeway-secs", "0", "--api-key", key,
    )  # fmt: skip
    now = int(time.time())
    tokens = [jwt_hs256({"sub": f"user{i}", "exp": now + 60, "iat": now}, secret) for i in range(3)]
    # The refresh's token is user0's too, and another token.
    tokens.append(jwt_hs256({"sub": "user0", "exp": now + 120, "iat": now}, secret))
    expired = jwt_hs256({"sub": "late", "exp": now - 60}, secret)
    payload = "a-payload-that-must-never-be-logged-4"

    base = f"ws://127.0.0.1:{server.port}/ws"
    # A token in the URL, in a subprotocol entry, and in a header; a refresh.
    async with client(None, "u0", uri=f"{base}?token={tokens[0]}", envelope=True) as by_query, \
            client(None, "u1", uri=base, subprotocols=["switchboard.v1", f"bearer.{tokens[1]}"]) as by_protocol, \
            client(None, "u2", uri=base, envelope=True, additional_headers={"Authorization": f"Bearer {tokens[2]}"}):
        await by_query.send(json.dumps({"type": "refresh", "token": tokens[3], "id": 1}))
        assert json.loads(await recv(by_query))["type"] == "ack"
        await by_protocol.send(json.dumps({"targets": ["user0"], "payload": payload}))
        assert payload in await recv(by_query)
    # A refused token, and the API with its key and with a wrong one.
    with pytest.raises(InvalidStatus) as refused:
        async with client(None, "late", uri=f"{base}?token={expired}"):
            pass
    assert refused.value.response.status_code == 401
    for presented, status in ((key, 200), (wrong_key, 401)):
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/api/v1/stats", headers={"Authorization": f"Bearer {presented}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=RECV_TIMEOUT) as response:
                assert response.status == status
        except urllib.error.HTTPError as error:
            assert error.code == status

    text = await asyncio.to_thread(all_logs, server)
    assert len(events(text)) > 10, "trace logging produced events"
    for needle in [secret, key, wrong_key, payload, expired, *tokens]:
        assert needle not in text, f"{needle[:20]}... was logged"
    # Nor any token's signature on its own.
    for token in [expired, *tokens]:
        assert token.rsplit(".", 1)[1] not in text
