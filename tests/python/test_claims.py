"""Claims of the docs that no other test checked, against the real binary.

Each test names the document and the sentence it backs. Servers, clients and
helpers come from test_relay.py (the `Server`, `start_server`/`server` fixtures,
the `client` context manager, `recv`, `recv_json`, `msg`, `inflate`, and
`nothing_before_marker`, which proves nothing else is queued for a connection
with a marker sent through the HTTP API instead of a silence window) and from
test_floods.py (`Flooder`, a raw socket that never reads after its handshake).

Every wait is bounded: each async test runs under test_relay's overall timeout,
every receive under a few seconds, and the slow-consumer flood under a message
count and a wall-clock bound.
"""

import asyncio
import base64
import contextlib
import hashlib
import hmac
import http.client
import json
import os
import socket
import struct
import time

import pytest
from websockets.exceptions import ConnectionClosed

from test_floods import Flooder, split_frame
from test_relay import (  # noqa: F401 (server and start_server are fixtures)
    RECV_TIMEOUT,
    async_test,
    client,
    inflate,
    msg,
    nothing_before_marker,
    recv,
    recv_json,
    server,
    start_server,
)

NAMESPACES = """
[[namespaces]]
prefix = "chat:"
presence = true

[[namespaces]]
prefix = "news:"
client_publish = false
"""


@pytest.fixture
def namespaces_config(tmp_path):
    """A config file with a `chat:` namespace (presence on) and a server-only `news:`."""
    path = tmp_path / "switchboard.toml"
    path.write_text(NAMESPACES)
    return str(path)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def api(server, method, path, body=None):
    """One HTTP request; returns (status, headers with lower-case names, JSON body or None)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        parsed = json.loads(raw) if raw and headers.get("content-type", "").startswith("application/json") else raw
        return resp.status, headers, parsed
    finally:
        conn.close()


async def api_async(server, method, path, body=None):
    return await asyncio.to_thread(api, server, method, path, body)


def assert_api_error(got, status, code):
    got_status, _, body = got
    assert isinstance(body, dict) and "error" in body, got
    assert (got_status, body["error"]["code"]) == (status, code), got
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], got
    return body["error"]["message"]


async def expect_close_now(ws, timeout=RECV_TIMEOUT):
    """The next thing `ws` gets is the server's close frame (no message before it)."""
    with pytest.raises(ConnectionClosed) as closed:
        got = await recv(ws, timeout)
        pytest.fail(f"expected the close frame, got a message first: {got!r}")
    assert closed.value.rcvd is not None, f"closed without a close frame: {closed.value!r}"
    return closed.value.rcvd


def sized(i, size, targets=("r",)):
    """A send message with `"id": i` of exactly `size` bytes (ASCII)."""
    head = {"targets": list(targets), "id": i, "payload": {"n": i, "pad": ""}}
    text = json.dumps(head, separators=(",", ":"))
    pad = size - len(text)
    assert pad >= 0, (size, len(text))
    text = text.replace('"pad":""', '"pad":"' + "x" * pad + '"')
    assert len(text.encode()) == size
    return text


def error_frame(got, code, id=None):
    """Checks an error frame's exact shape: type, code, a message, and `id` when given."""
    assert got.get("type") == "error" and got.get("code") == code, got
    assert isinstance(got.get("message"), str) and got["message"], got
    expected_keys = {"type", "code", "message"} | ({"id"} if id is not None else set())
    assert set(got) == expected_keys, got
    if id is not None:
        assert got["id"] == id, got


# JWT (HS256), made by hand: header.claims.signature, base64url without padding.
SECRET = "claims-test-secret-of-more-than-32-bytes"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_hs256(claims, secret=SECRET):
    signing_input = b64url(b'{"alg":"HS256","typ":"JWT"}') + "." + b64url(json.dumps(claims).encode())
    signature = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64url(signature)


def bearer(token):
    return {"additional_headers": {"Authorization": f"Bearer {token}"}}


# --------------------------------------------------------------------------
# 1. Slow consumer (docs/protocol.md close codes, docs/operations.md, docs/configuration.md)
# --------------------------------------------------------------------------


def read_until_close(flooder, timeout=RECV_TIMEOUT):
    """Reads the never-reading receiver's socket now: every message (inflated when
    compressed) up to the server's close frame. Returns (messages, close code);
    the code is None if no close frame came within `timeout`."""
    sock = flooder.sock
    sock.settimeout(0.5)
    buf = bytearray(flooder.unread)
    messages, parts, compressed = [], [], False
    deadline = time.monotonic() + timeout
    while True:
        while (frame := split_frame(buf)) is not None:
            fin, rsv1, opcode, data = frame
            if opcode == 0x8:
                assert len(data) >= 2, f"close frame without a code: {data!r}"
                return messages, struct.unpack("!H", data[:2])[0]
            if opcode in (0x9, 0xA):
                continue
            if opcode in (0x1, 0x2):
                parts, compressed = [], rsv1
            parts.append(data)
            if fin:
                whole = b"".join(parts)
                messages.append((inflate(whole) if compressed else whole).decode())
                parts = []
        if time.monotonic() >= deadline:
            return messages, None
        try:
            data = sock.recv(1 << 16)
        except socket.timeout:
            continue
        except OSError:
            return messages, None
        if not data:
            return messages, None
        buf += data


FLOOD_MAX_MESSAGES = 3000  # 24 MB: far past 64 KiB of outbound queue plus the socket buffers
FLOOD_SECS = 20.0


@pytest.mark.parametrize(
    "offer,answer",
    [
        (
            "permessage-deflate",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        ),
        (
            "permessage-deflate; server_max_window_bits=10",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover;"
            " server_max_window_bits=10",
        ),
    ],
    ids=["deflate-shared-frames", "deflate-own-compressor"],
)
@pytest.mark.parametrize("close_code", [None, 1008], ids=["default-1013", "configured-1008"])
@async_test
async def test_a_compressed_receiver_that_never_reads_is_closed_as_a_slow_consumer(
    start_server, offer, answer, close_code
):
    """docs/protocol.md, close code 1013: "a slow consumer: a delivery would have taken
    what waits to be written to this client over `max_outbound_bytes`"
    (`slow_consumer_close_code`, docs/configuration.md: 1008 when configured), and
    docs/operations.md: "A delivery that would go over closes it with 1013 (or 1008)".
    The sender is not disconnected, and the receiver, once it reads, gets every
    delivery the acks reported, then the close frame.

    The receiver negotiates permessage-deflate and never reads until the flood is
    over. The server answers a plain offer with `server_no_context_takeover` (and
    `client_no_context_takeover`; docs/protocol.md), so the relay's frames are
    compressed once and may be written to the socket by the sender's task
    (docs/architecture.md, "Direct writes"): the binary has no setting for server
    context takeover. An offer of `server_max_window_bits=10` gives the connection a
    compressor of its own (a frame compressed once with the full window is not valid
    for it: `DeflateParams::shares_standalone_frames`), so every delivery is queued
    for the receiver's connection task, which compresses and writes it. Both paths
    must end the same way."""
    # max_outbound_bytes must be at least max_message_size (docs/configuration.md).
    flags = [
        "--rate-limit-messages-per-sec", "0", "--rate-limit-bytes-per-sec", "0",
        "--max-message-size", "65536", "--max-outbound-bytes", "65536",
    ]  # fmt: skip
    expected_code = 1013
    if close_code is not None:
        flags += ["--slow-consumer-close-code", str(close_code)]
        expected_code = close_code
    server = start_server(*flags)
    receiver = await asyncio.to_thread(
        Flooder, server.host, server.port, "/ws?id=rcv", [f"Sec-WebSocket-Extensions: {offer}"]
    )
    try:
        assert receiver.headers.get("sec-websocket-extensions") == answer, receiver.headers
        # Random base64 hardly compresses: each delivery stays about 8 KB on the wire.
        pad = base64.b64encode(os.urandom(6000)).decode()
        async with client(server, "snd", envelope=True, compression=None) as snd:
            delivered = 0
            started = time.monotonic()
            closing_ack = None
            for i in range(FLOOD_MAX_MESSAGES):
                if time.monotonic() - started > FLOOD_SECS:
                    break
                await snd.send(json.dumps({"targets": ["rcv"], "payload": {"i": i, "pad": pad}, "id": i}))
                ack = await recv_json(snd)
                if ack != {"type": "ack", "id": i, "delivered": ["rcv"], "offline": [], "offsets": {"rcv": i + 1}}:
                    closing_ack = ack
                    break
                delivered += 1
            # The delivery that would go over the limit is refused: the target has no
            # connection that took it (its inbox keeps it, for when it comes back).
            refused = {"type": "ack", "id": delivered, "delivered": [], "offline": ["rcv"], "offsets": {"rcv": delivered + 1}}
            assert closing_ack == refused, (
                f"after {delivered} deliveries in {time.monotonic() - started:.1f} s: {closing_ack!r}"
            )
            print(f"\n[slow consumer, {offer!r}] {delivered} deliveries of ~8 KB before the close,"
                  f" {time.monotonic() - started:.2f} s")
            # The refused delivery would have taken the queue over 64 KiB, so the queue held
            # more than 64 KiB less one delivery; the socket buffers took the rest (on
            # loopback the server's send buffer grows to tcp_wmem's maximum).
            size = max(len(json.dumps({"i": i, "pad": pad})) for i in range(delivered + 1))
            assert (delivered + 1) * size > 65536, (delivered, size)
            # The closing connection takes nothing more.
            await snd.send(json.dumps({"targets": ["rcv"], "payload": "late", "id": "late"}))
            late = {"type": "ack", "id": "late", "delivered": [], "offline": ["rcv"], "offsets": {"rcv": delivered + 2}}
            assert await recv_json(snd) == late

            # Only now does the receiver read: every delivery the acks reported, in order,
            # then the close frame (well within the 5 s close timeout).
            messages, code = await asyncio.to_thread(read_until_close, receiver)
            assert code == expected_code, (code, len(messages), server.logs())
            assert [json.loads(m)["i"] for m in messages] == list(range(delivered))
            assert all(json.loads(m)["pad"] == pad for m in messages)

            # The sender was not disconnected: it still sends and gets its acks.
            await snd.send(msg(["snd"], "still here", id="alive"))
            replies = [await recv_json(snd), await recv_json(snd)]
            epoch = snd.welcome["epoch"]
            assert sorted(replies, key=lambda r: r["type"]) == [
                {"type": "ack", "id": "alive", "delivered": ["snd"], "offline": [], "offsets": {"snd": 1}},
                {"type": "message", "from": "snd", "offset": 1, "epoch": epoch, "payload": "still here"},
            ]
    finally:
        receiver.close()
    # The metrics count the close once the connection's task has ended
    # (docs/operations.md, "Metrics").
    expected = {"switchboard_slow_consumer_closes_total 1", f'switchboard_connections_closed_total{{code="{expected_code}"}} 1'}
    deadline = time.monotonic() + 5
    while not expected <= set(lines := server.http("GET", "/metrics")[2].decode().splitlines()):
        assert time.monotonic() < deadline, [line for line in lines if "close" in line]
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------
# 2. The byte-rate limit and the strikes (docs/protocol.md "Limits", docs/operations.md)
# --------------------------------------------------------------------------

# 1000 bytes a second, bursts of 2000, closed at the third refusal in a row. Pings
# are off (their pongs would count). The client helper's one ping costs 4 bytes
# of the 2000: a full bucket holds exactly three 600-byte messages either way.
BYTE_LIMITS = (
    "--rate-limit-messages-per-sec", "0",
    "--rate-limit-bytes-per-sec", "1000",
    "--rate-limit-strikes", "3",
    "--ping-interval-secs", "0",
    # At most twice the byte rate, or the start refuses it (docs/configuration.md).
    "--max-message-size", "2000",
)  # fmt: skip


async def expect_ack(ws, i, offset=None):
    """The ack of message `i` to "r", whose inbox gave it `offset` (default `i`)."""
    offsets = {"r": i if offset is None else offset}
    assert await recv_json(ws) == {"type": "ack", "id": i, "delivered": ["r"], "offline": [], "offsets": offsets}


async def spend_the_burst(s, count):
    """Sends `count` 600-byte messages (ids 1 to `count`) back to back from a full
    bucket of 2000 bytes: the first three fit (1800) and are acked; the bucket then
    needs 0.4 s to hold 600 again, far longer than the rest take to arrive, so the
    fourth and fifth are refused with `rate_limited`, each with its id."""
    for i in range(1, count + 1):
        await s.send(sized(i, 600))
    for i in (1, 2, 3):
        await expect_ack(s, i)
    for i in range(4, min(count, 5) + 1):
        error_frame(await recv_json(s), "rate_limited", id=i)


@async_test
async def test_byte_rate_burst_then_rate_limited_then_1008_after_the_strikes(start_server):
    """docs/protocol.md: each connection may send `rate_limit_bytes_per_sec` bytes a
    second, "with bursts of twice that"; a message over the limit "is answered with
    `rate_limited` (with its `id`...) and not acted on. The `rate_limit_strikes`-th ...
    refusal in a row closes the connection with 1008 instead of an error".

    Six 600-byte messages (see `spend_the_burst`): the sixth is the third refusal in a
    row and closes the connection with 1008 (it gets no error frame of its own). The
    receiver gets the three accepted payloads and nothing else."""
    server = start_server(*BYTE_LIMITS)
    async with client(server, "r", compression=None) as r, client(server, "s", envelope=True, compression=None) as s:
        await spend_the_burst(s, 6)
        rcvd = await expect_close_now(s)
        assert rcvd.code == 1008, rcvd
        assert [json.loads(await recv(r))["n"] for _ in range(3)] == [1, 2, 3]
        await nothing_before_marker(server, r, "r")


@async_test
async def test_a_sender_over_the_byte_rate_is_closed_whatever_it_sends_in_between(start_server):
    """A refused message was read all the same: it is charged, and pongs do not
    start the strike count again. So a client that sends big messages over the
    rate with pongs (or small or binary messages) in between, which once reset its strikes
    for ever while the server read many times its byte rate, is closed with 1008
    after a few refusals."""
    server = start_server(*BYTE_LIMITS)

    async def until_closed(s):
        """The frames before the close (each a rate_limited error), and the close."""
        errors = []
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(20):
                errors.append(await recv_json(s))
        codes = {"rate_limited", "binary_not_supported"}
        assert all(e["type"] == "error" and e["code"] in codes for e in errors), errors
        return closed.value.rcvd

    async with client(server, "r", compression=None) as r:
        for offset, between in enumerate(("pong", "small", "binary"), start=1):
            async with client(server, "s", envelope=True, compression=None) as s:
                await s.send(sized(1, 1500))
                await expect_ack(s, 1, offset=offset)
                with contextlib.suppress(ConnectionClosed):
                    for i in range(2, 12):
                        await s.send(sized(i, 1500))
                        if between == "pong":
                            await s.pong(b"")
                        elif between == "binary":
                            await s.send(b"x")
                        else:
                            await s.send(sized(100 + i, 60))
                        await asyncio.sleep(0.05)
                rcvd = await until_closed(s)
                assert rcvd is not None and rcvd.code == 1008, rcvd
        assert [json.loads(await recv(r))["n"] for _ in range(3)] == [1, 1, 1]
        await nothing_before_marker(server, r, "r")


@async_test
async def test_rate_limited_error_echoes_the_message_id(start_server):
    """docs/protocol.md: `id` "is echoed in errors"; `switchboard.v1` "errors carry the
    message id". A message refused by the byte rate carried an id."""
    server = start_server(*BYTE_LIMITS)
    async with client(server, "r", compression=None) as r, client(server, "s", envelope=True, compression=None) as s:
        for i in (1, 2, 3):
            await s.send(sized(i, 600))
        await s.send(sized("over", 600))
        for i in (1, 2, 3):
            await expect_ack(s, i)
        error_frame(await recv_json(s), "rate_limited", id="over")
        for _ in range(3):
            await recv(r)


@async_test
async def test_an_accepted_message_resets_the_strike_count(start_server):
    """docs/protocol.md: the connection closes after `rate_limit_strikes` refusals
    *in a row*, and the byte bucket refills at `rate_limit_bytes_per_sec`.

    Three 600-byte messages fit the burst; two more are refused (two strikes of three),
    and charged all the same (they were read): the bucket owes about 1000 bytes.
    After a 2 s wait it holds at least 1000, so a 600-byte message is accepted, which
    resets the strikes; after it the bucket holds at most 2000 - 600 = 1400 bytes, so
    three 1500-byte messages sent back to back are all over the limit: without the
    reset the first would close the connection; with it, two get `rate_limited` and
    the third closes with 1008."""
    server = start_server(*BYTE_LIMITS)
    async with client(server, "r", compression=None) as r, client(server, "s", envelope=True, compression=None) as s:
        await spend_the_burst(s, 5)
        await asyncio.sleep(2.0)
        await s.send(sized(6, 600))
        await expect_ack(s, 6, offset=4)
        for i in (7, 8, 9):
            await s.send(sized(i, 1500))
        for _ in (7, 8):
            got = await recv_json(s)
            assert got["type"] == "error" and got["code"] == "rate_limited", got
        rcvd = await expect_close_now(s)
        assert rcvd.code == 1008, rcvd
        # Only the accepted messages were acted on.
        assert [json.loads(await recv(r))["n"] for _ in range(4)] == [1, 2, 3, 6]
        await nothing_before_marker(server, r, "r")


# --------------------------------------------------------------------------
# 3. HTTP API errors (docs/api.md)
# --------------------------------------------------------------------------


@async_test
async def test_api_batch_of_more_than_100_operations_is_too_many_operations(server):
    """docs/api.md: a batch holds "At most 100" operations; more is
    `400 too_many_operations`. 100 run; 101 are refused and none runs."""
    op = {"op": "send", "targets": ["r"], "payload": 1}
    async with client(server, "r") as r:
        status, _, body = await api_async(server, "POST", "/api/v1/batch", {"operations": [op] * 100})
        results = [{"delivered": ["r"], "offline": [], "offsets": {"r": n}} for n in range(1, 101)]
        assert (status, body) == (200, {"results": results})
        assert [await recv(r) for _ in range(100)] == ["1"] * 100
        assert_api_error(await api_async(server, "POST", "/api/v1/batch", {"operations": [op] * 101}),
                         400, "too_many_operations")
        await nothing_before_marker(server, r, "r")


@async_test
async def test_api_send_over_max_targets_is_too_many_targets(start_server):
    """docs/api.md: `400 too_many_targets`, "more than `max_targets` targets", on
    /send and on a batch's send (whose other operations then do not run)."""
    server = start_server("--max-targets", "3")
    async with client(server, "r") as r:
        status, _, body = await api_async(server, "POST", "/api/v1/send",
                                          {"targets": ["r", "x", "y"], "payload": "three"})
        assert (status, body) == (200, {"delivered": ["r"], "offline": ["x", "y"], "offsets": {"r": 1, "x": 1, "y": 1}})
        assert await recv(r) == '"three"'
        assert_api_error(
            await api_async(server, "POST", "/api/v1/send", {"targets": ["r", "x", "y", "z"], "payload": "four"}),
            400, "too_many_targets",
        )
        batch = {"operations": [
            {"op": "send", "targets": ["r"], "payload": "first"},
            {"op": "send", "targets": ["r", "x", "y", "z"], "payload": "four"},
        ]}
        message = assert_api_error(await api_async(server, "POST", "/api/v1/batch", batch), 400, "too_many_targets")
        assert message.startswith("operations[1]"), message
        await nothing_before_marker(server, r, "r")


@async_test
async def test_api_and_websocket_topics_outside_every_namespace_are_unknown_namespace(
    start_server, namespaces_config
):
    """docs/configuration.md: "Once any namespace is configured, a topic outside all of
    them is refused with `unknown_namespace`" (docs/api.md: 400 `unknown_namespace`;
    docs/protocol.md: the same code over the WebSocket). Checked for /publish,
    GET /presence/{topic}, a batch's publish, and a client's publish and presence
    query (subscribe is tested in crates/switchboard-server/tests/topics.rs). With no
    namespaces configured the same topic is fine (one catch-all)."""
    server = start_server("--config", namespaces_config)
    async with client(server, "r") as r, client(server, "e", envelope=True) as e:
        assert_api_error(await api_async(server, "POST", "/api/v1/publish", {"topic": "sports:x", "payload": 1}),
                         400, "unknown_namespace")
        assert_api_error(await api_async(server, "GET", "/api/v1/presence/sports:x"), 400, "unknown_namespace")
        batch = {"operations": [
            {"op": "send", "targets": ["r"], "payload": "must not arrive"},
            {"op": "publish", "topic": "sports:x", "payload": 1},
        ]}
        message = assert_api_error(await api_async(server, "POST", "/api/v1/batch", batch), 400, "unknown_namespace")
        assert message.startswith("operations[1]"), message
        await nothing_before_marker(server, r, "r")
        # Inside a namespace, the same requests succeed.
        status, _, body = await api_async(server, "POST", "/api/v1/publish", {"topic": "chat:x", "payload": 1})
        assert (status, body) == (200, {"subscribers": 0})
        status, _, body = await api_async(server, "GET", "/api/v1/presence/chat:x")
        assert (status, body) == (200, {"topic": "chat:x", "subscribers": 0, "clients": {}})

        await e.send(json.dumps({"type": "publish", "topic": "sports:x", "payload": 1, "id": 1}))
        error_frame(await recv_json(e), "unknown_namespace", id=1)
        await e.send(json.dumps({"type": "presence", "topic": "sports:x", "id": 2}))
        error_frame(await recv_json(e), "unknown_namespace", id=2)
        await e.send(json.dumps({"type": "subscribe", "topic": "chat:x", "id": 3}))
        assert await recv_json(e) == {"type": "ack", "id": 3, "topic": "chat:x"}

    catch_all = start_server()
    status, _, body = await api_async(catch_all, "POST", "/api/v1/publish", {"topic": "sports:x", "payload": 1})
    assert (status, body) == (200, {"subscribers": 0})


@pytest.mark.parametrize(
    "method,path,allow",
    [
        ("GET", "/api/v1/send", "POST"),
        ("DELETE", "/api/v1/publish", "POST"),
        ("PUT", "/api/v1/disconnect", "POST"),
        ("GET", "/api/v1/batch", "POST"),
        ("POST", "/api/v1/stats", "GET,HEAD"),
        ("POST", "/api/v1/presence/chat:x", "GET,HEAD"),
        ("DELETE", "/api/v1/clients/u", "GET,HEAD"),
    ],
)
def test_api_405_names_the_allowed_methods(server, method, path, allow):
    """docs/api.md: `405 method_not_allowed` when "the endpoint exists for another
    method (the `Allow` header says which)". GET routes answer HEAD too."""
    got = api(server, method, path)
    assert_api_error(got, 405, "method_not_allowed")
    assert got[1].get("allow") == allow, got[1]
    if allow == "GET,HEAD":
        status, _, _ = api(server, "HEAD", path)
        assert status == 200, (path, status)


@pytest.mark.parametrize(
    "code,accepted",
    [
        (None, True),  # the default, 1000
        (0, False),
        (999, False),
        (1000, True),
        (1001, False),
        (1011, False),
        (2999, False),
        (3000, True),
        (4999, True),
        (5000, False),
        (65535, False),
        (65536, False),
    ],
)
@async_test
async def test_api_disconnect_accepts_1000_and_3000_to_4999_only(server, code, accepted):
    """docs/api.md: `POST /disconnect` gives each connection "that close frame (code
    1000 or 3000-4999, default 1000)"; docs/protocol.md: "closes with the code it is
    given (1000 or 3000-4999)". Any other code is `400 invalid_request` ("a bad close
    code") and closes nothing."""
    body = {"id": "u"} if code is None else {"id": "u", "code": code}
    async with client(server, "u") as u:
        got = await api_async(server, "POST", "/api/v1/disconnect", body)
        if accepted:
            assert got[:1] + got[2:] == (200, {"connections": 1}), got
            rcvd = await expect_close_now(u)
            assert rcvd.code == (1000 if code is None else code), rcvd
        else:
            assert_api_error(got, 400, "invalid_request")
            await u.send(msg(["u"], "still open"))
            assert await recv(u) == '"still open"'


# --------------------------------------------------------------------------
# 4. envelope_required for unsubscribe and refresh (docs/protocol.md)
# --------------------------------------------------------------------------


@async_test
async def test_raw_client_unsubscribe_and_refresh_get_envelope_required(start_server):
    """docs/protocol.md: "Topic operations need the `switchboard.v1` subprotocol; a raw
    client gets `envelope_required`", and the errors table: "a topic, presence, status
    or refresh message from a raw client". Unsubscribe and refresh (subscribe, publish,
    presence and status are in topics.rs). The refresh carries a valid token for the
    same client, so only the mode can refuse it; errors carry the message id in both
    modes, and the connection stays."""
    server = start_server("--jwt-hs256-secret", SECRET)
    token = jwt_hs256({"sub": "raw", "exp": int(time.time()) + 300})
    async with client(server, "ignored", **bearer(token)) as raw:
        assert raw.subprotocol is None
        await raw.send(json.dumps({"type": "unsubscribe", "topic": "chat:lobby", "id": 1}))
        error_frame(await recv_json(raw), "envelope_required", id=1)
        await raw.send(json.dumps({"type": "refresh", "token": token, "id": 2}))
        error_frame(await recv_json(raw), "envelope_required", id=2)
        await raw.send(msg(["raw"], "still open"))
        assert await recv(raw) == '"still open"'
        await nothing_before_marker(server, raw, "raw")


# --------------------------------------------------------------------------
# 5. refresh with a bad or an expired token (docs/protocol.md "With tokens")
# --------------------------------------------------------------------------


@async_test
async def test_refresh_with_a_bad_or_expired_token_is_invalid_token_and_expiry_stands(start_server):
    """docs/protocol.md: a refresh is "answered with `{"type": "ack", "id": 1}` or an
    `invalid_token` error" ("a `refresh` token that does not verify"); an error leaves
    the connection open; and "When the token expires (`exp` plus the leeway) the
    server closes the connection with 4001 ("token expired"), unless the client sent
    a fresh token for the same `sub` before then". Refused refreshes are not fresh
    tokens: the connection still closes with 4001 at its first token's expiry. A
    second connection, refused once, then refreshed with a good token, stays open."""
    server = start_server("--jwt-hs256-secret", SECRET, "--jwt-leeway-secs", "0")
    exp = int(time.time()) + 3
    first = jwt_hs256({"sub": "k", "exp": exp})
    v1 = {"subprotocols": ["switchboard.v1"]}
    async with client(server, "ignored", **bearer(first), **v1) as k, \
            client(server, "ignored", **bearer(first), **v1) as k2:
        assert k.subprotocol == "switchboard.v1"
        cases = [
            ("wrong-secret", jwt_hs256({"sub": "k", "exp": exp + 600}, secret="another-secret-also-32-bytes-long!!")),
            ("tampered", first[:-2] + ("AA" if not first.endswith("AA") else "BB")),
            ("expired", jwt_hs256({"sub": "k", "exp": int(time.time()) - 60})),
            ("garbage", "not.a.jwt"),
        ]
        for name, bad in cases:
            await k.send(json.dumps({"type": "refresh", "token": bad, "id": name}))
            error_frame(await recv_json(k), "invalid_token", id=name)
        # Still open after the refusals.
        await k.send(json.dumps({"type": "status", "clients": ["k"], "id": "s"}))
        assert await recv_json(k) == {"type": "status", "id": "s", "clients": {"k": True}}

        await k2.send(json.dumps({"type": "refresh", "token": cases[2][1], "id": "bad"}))
        error_frame(await recv_json(k2), "invalid_token", id="bad")
        await k2.send(json.dumps({"type": "refresh", "token": jwt_hs256({"sub": "k", "exp": exp + 600}), "id": "ok"}))
        assert await recv_json(k2) == {"type": "ack", "id": "ok"}

        # The first token's expiry stands for k: 4001 "token expired", around exp.
        rcvd = await expect_close_now(k, timeout=exp - time.time() + 3)
        assert (rcvd.code, rcvd.reason) == (4001, "token expired"), rcvd
        assert time.time() >= exp - 0.2, "closed before the token's exp"
        # k2 outlives it.
        await asyncio.sleep(0.5)
        await k2.send(json.dumps({"type": "status", "clients": ["k"], "id": "s2"}))
        assert await recv_json(k2) == {"type": "status", "id": "s2", "clients": {"k": True}}


# --------------------------------------------------------------------------
# 6. Presence: leave on unsubscribe (docs/protocol.md "Presence")
# --------------------------------------------------------------------------


def join(client_id):
    return {"type": "presence", "topic": "chat:lobby", "event": "join", "client": client_id}


def leave(client_id):
    return {"type": "presence", "topic": "chat:lobby", "event": "leave", "client": client_id}


@async_test
async def test_unsubscribing_last_connection_sends_one_leave(start_server, namespaces_config):
    """docs/protocol.md: "In namespaces with `presence = true`, subscribers see who
    joins and leaves. A client id joins with its first subscribed connection and
    leaves with its last, so a second tab announces nothing". With unsubscribe (the
    disconnect case is in topics.rs): ann's first tab unsubscribing announces nothing,
    the second one's unsubscribe sends the watcher exactly one leave event."""
    server = start_server("--config", namespaces_config)
    async with client(server, "watcher", envelope=True) as watcher, \
            client(server, "ann", envelope=True) as tab1, client(server, "ann", envelope=True) as tab2:
        await watcher.send(json.dumps({"type": "subscribe", "topic": "chat:lobby", "id": 1}))
        assert await recv_json(watcher) == {"type": "ack", "id": 1, "topic": "chat:lobby"}
        assert await recv_json(watcher) == join("watcher")

        await tab1.send(json.dumps({"type": "subscribe", "topic": "chat:lobby", "id": 1}))
        assert await recv_json(tab1) == {"type": "ack", "id": 1, "topic": "chat:lobby"}
        assert await recv_json(watcher) == join("ann")
        await tab2.send(json.dumps({"type": "subscribe", "topic": "chat:lobby", "id": 1}))
        assert await recv_json(tab2) == {"type": "ack", "id": 1, "topic": "chat:lobby"}
        # Subscribers see the join, the joining connection too (as the watcher saw its own).
        assert await recv_json(tab1) == join("ann")
        await nothing_before_marker(server, watcher, "watcher")

        await tab1.send(json.dumps({"type": "unsubscribe", "topic": "chat:lobby", "id": 2}))
        assert await recv_json(tab1) == {"type": "ack", "id": 2, "topic": "chat:lobby"}
        await nothing_before_marker(server, watcher, "watcher")  # ann still has a subscribed connection

        await tab2.send(json.dumps({"type": "unsubscribe", "topic": "chat:lobby", "id": 2}))
        assert await recv_json(tab2) == {"type": "ack", "id": 2, "topic": "chat:lobby"}
        assert await recv_json(watcher) == leave("ann")
        await nothing_before_marker(server, watcher, "watcher")  # exactly one
        # Neither tab, no longer subscribed, sees ann's leave.
        await nothing_before_marker(server, tab1, "ann")
        await nothing_before_marker(server, tab2, "ann")

        # The watcher's presence query agrees.
        await watcher.send(json.dumps({"type": "presence", "topic": "chat:lobby", "id": "q"}))
        assert await recv_json(watcher) == {
            "type": "presence", "id": "q", "topic": "chat:lobby", "clients": {"watcher": 1}
        }
