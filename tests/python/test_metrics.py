"""GET /metrics (docs/operations.md, "Metrics"): the Prometheus text format, checked
with `promtool check metrics` (Debian's prometheus package), and counters that move by
exactly what a known exchange of real clients makes them move.

The slow-consumer close is counted in test_claims.py, where a real slow consumer is
made; the cluster's metrics (nodes, Redis commands and reconnects) in test_cluster.py.
"""

import asyncio
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory

from test_claims import jwt_hs256
from test_relay import (  # noqa: F401 (start_server is a fixture)
    RECV_TIMEOUT,
    async_test,
    client,
    recv,
    single_node,
    start_server,
)

KEY = "metrics-test-key"
NAMESPACES = """
[[namespaces]]
prefix = "news:"
history_size = 100
"""


def scrape(server, key=KEY):
    """The metrics text, and the samples parsed: {(name, ((label, value), ...)): value}."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    status, response_headers, body = server.http("GET", "/metrics", headers)
    assert status == 200, (status, body)
    assert response_headers["content-type"].startswith("text/plain; version=0.0.4"), response_headers
    text = body.decode()
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, value = line.rsplit(" ", 1)
        name, _, labels = series.partition("{")
        pairs = tuple(sorted(
            tuple(pair.split("=", 1)) for pair in labels.rstrip("}").split(",") if pair
        ))
        samples[(name, tuple((k, v.strip('"')) for k, v in pairs))] = float(value)
    return text, samples


def value(samples, name, **labels):
    """A sample's value. A labelled series appears with its first event (0 before);
    an unlabelled one is always there, and missing is a failure."""
    series = (f"switchboard_{name}", tuple(sorted(labels.items())))
    if not labels:
        assert series in samples, f"{name} is missing"
    return samples.get(series, 0.0)


def promtool_check(text):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: the test command installs Debian's prometheus package"
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def frame_bytes(text):
    """Bytes on the wire of an uncompressed server text frame carrying `text`."""
    n = len(text.encode())
    return n + (2 if n < 126 else 4 if n < 65536 else 10)


class Tally:
    """What the clients of a test sent and received, to compare with the counters."""

    def __init__(self):
        self.sent = 0
        self.sent_bytes = 0
        self.received = 0
        self.received_bytes = 0

    async def send(self, ws, message):
        text = message if isinstance(message, str) else json.dumps(message)
        await ws.send(text)
        self.sent += 1
        self.sent_bytes += len(text.encode())

    async def recv(self, ws):
        text = await recv(ws)
        self.count(text)
        return json.loads(text)

    def count(self, text):
        self.received += 1
        self.received_bytes += frame_bytes(text)


@single_node  # one node's counters; test_cluster.py has the cluster's
@async_test
async def test_a_known_exchange_moves_each_counter_by_exactly_what_it_did(start_server, tmp_path):
    config = tmp_path / "switchboard.toml"
    config.write_text(NAMESPACES)
    server = start_server(
        "--config", str(config), "--api-key", KEY, "--compression", "false",
        "--rate-limit-messages-per-sec", "5", "--rate-limit-strikes", "3",
    )  # fmt: skip
    text, before = scrape(server)
    promtool_check(text)
    for name in ("connections", "client_ids", "topics", "subscriptions", "messages_received_total",
                 "deliveries_total", "history_appends_total", "connections_opened_total"):
        assert value(before, name) == 0, name
    assert value(before, "nodes") == 1
    tally = Tally()

    # Two handshakes refused: no id, and a bad one.
    statuses = [server.http("GET", path)[0] for path in ("/ws", "/ws?id=a%20b")]
    assert statuses == [400, 400]

    epoch = None
    async with client(server, "a", envelope=True, compression=None) as a, \
            client(server, "b", envelope=True, compression=None) as b:
        for ws in (a, b):
            tally.count(json.dumps(ws.welcome, separators=(",", ":")))
        await tally.send(a, {"targets": ["b", "nobody"], "payload": {"n": 1}, "id": 1})
        ack = await tally.recv(a)
        assert ack["delivered"] == ["b"]
        delivered = await tally.recv(b)
        epoch = delivered["epoch"]
        await tally.send(b, {"type": "subscribe", "topic": "news:1", "id": 2})
        subscribed = await tally.recv(b)
        await tally.send(a, {"type": "publish", "topic": "news:1", "payload": 2, "id": 3})
        assert (await tally.recv(a))["subscribers"] == 1
        assert (await tally.recv(b))["payload"] == 2
        _, during = scrape(server)
        assert value(during, "connections") == 2
        assert value(during, "client_ids") == 2
        assert value(during, "topics") == 1
        assert value(during, "subscriptions") == 1

    # b comes back and resumes its inbox and the topic: two recoveries.
    since = f"{epoch}:{delivered['offset']}"
    async with client(server, "b", uri=server.ws_url(query=f"id=b&since={since}"), envelope=True, compression=None) as b:
        tally.count(json.dumps(b.welcome, separators=(",", ":")))
        assert b.welcome["recovered"] is True
        position = {"epoch": subscribed["epoch"], "offset": subscribed["offset"]}
        await tally.send(b, {"type": "subscribe", "topic": "news:1", "since": position, "id": 4})
        assert (await tally.recv(b))["recovered"] is True
        # The publish after the position its first subscribe was given, replayed.
        assert (await tally.recv(b))["payload"] == 2
    # c asks for an epoch that is not its inbox's: not recovered.
    async with client(server, "c", uri=server.ws_url(query="id=c&since=zzzz:0"), envelope=True, compression=None) as c:
        tally.count(json.dumps(c.welcome, separators=(",", ":")))
        assert c.welcome["recovered"] is False

    # d sends 12 messages at once: 10 fit the burst (5/s, twice that), 2 are refused.
    async with client(server, "d", envelope=True, compression=None) as d:
        tally.count(json.dumps(d.welcome, separators=(",", ":")))
        for _ in range(12):
            await tally.send(d, "{}")
        answers = [await tally.recv(d) for _ in range(12)]
        codes = [answer["code"] for answer in answers]
        assert codes.count("invalid_message") == 10 and codes.count("rate_limited") == 2, codes
        await asyncio.sleep(0.1)

    # An API call with a wrong key.
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/api/v1/stats", headers={"Authorization": "Bearer wrong"}
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=RECV_TIMEOUT)
    assert refused.value.code == 401

    # Every connection has closed (the server counts a close when its task ends).
    deadline = time.monotonic() + 5
    while value((after := scrape(server))[1], "connections") != 0:
        assert time.monotonic() < deadline, after[0]
        await asyncio.sleep(0.05)
    text, after = after
    promtool_check(text)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("handshake_failures_total", status="400") == 2
    assert moved("connections_opened_total") == 5
    assert moved("connections_closed_total", code="1000") == 5
    assert moved("messages_received_total") == tally.sent
    assert moved("bytes_received_total") == tally.sent_bytes
    assert moved("deliveries_total") == tally.received
    assert moved("bytes_sent_total") == tally.received_bytes
    # Appends: the send to b and nobody (two inboxes), the publish to a topic with history.
    assert moved("history_appends_total") == 3
    assert moved("recoveries_total", recovered="true") == 2
    assert moved("recoveries_total", recovered="false") == 1
    assert moved("rate_limited_total") == 2
    assert moved("auth_failures_total", reason="api_key") == 1
    assert moved("slow_consumer_closes_total") == 0
    assert value(after, "subscriptions") == 0
    assert value(after, "client_ids") == 0


@single_node
@async_test
async def test_refused_tokens_are_counted_by_reason(start_server):
    secret = "a-metrics-test-secret-of-32-bytes!!"
    server = start_server("--jwt-hs256-secret", secret, "--jwt-leeway-secs", "0", "--api-key", KEY)
    _, before = scrape(server)
    now = int(time.time())
    tokens = {
        "expired": jwt_hs256({"sub": "x", "exp": now - 10}, secret),
        "bad_signature": jwt_hs256({"sub": "x", "exp": now + 60}, "another-secret-of-at-least-32-bytes"),
        "malformed": "not.a.jwt",
        "missing": None,
    }
    for token in tokens.values():
        path = "/ws" if token is None else f"/ws?token={token}"
        headers = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        assert server.http("GET", path, headers)[0] == 401
    # A refresh with another client's (valid) token.
    uri = f"ws://127.0.0.1:{server.port}/ws?token={jwt_hs256({'sub': 'x', 'exp': now + 60}, secret)}"
    async with client(None, "x", uri=uri, envelope=True) as x:
        await x.send(json.dumps({"type": "refresh", "token": jwt_hs256({"sub": "y", "exp": now + 60}, secret), "id": 1}))
        assert json.loads(await recv(x))["code"] == "invalid_token"
    _, after = scrape(server)
    tokens["wrong_subject"] = None
    for reason in tokens:
        assert value(after, "auth_failures_total", reason=reason) - value(before, "auth_failures_total", reason=reason) == 1, reason
    assert value(after, "handshake_failures_total", status="401") - value(before, "handshake_failures_total", status="401") == 4


@single_node
def test_metrics_need_the_api_key_unless_metrics_auth_is_none(start_server):
    keyed = start_server("--api-key", KEY)
    assert keyed.http("GET", "/metrics")[0] == 401
    assert keyed.http("GET", "/metrics", {"Authorization": "Bearer wrong"})[0] == 401
    scrape(keyed)
    open_server = start_server("--api-key", KEY, "--metrics-auth", "none")
    text, _ = scrape(open_server, key=None)
    promtool_check(text)
    # The rest of the API still needs the key.
    assert open_server.http("GET", "/api/v1/stats")[0] == 401


async def hibernating_count(server, expected, timeout=5):
    """Waits until the node reports `expected` hibernating connections; returns the samples."""
    deadline = time.monotonic() + timeout
    while True:
        _, samples = scrape(server)
        if value(samples, "connections_hibernating") == expected:
            return samples
        assert time.monotonic() < deadline, f"hibernating: {value(samples, 'connections_hibernating')}, not {expected}"
        await asyncio.sleep(0.05)


@single_node
@async_test
async def test_a_new_connection_hibernates_within_moments_its_welcome_aside(start_server):
    # docs/operations.md, "Hibernation": a new connection whose client has said
    # nothing is looked at after 5 ms, not after a whole period (here ten
    # minutes); the welcome the server sent it does not keep it awake.
    server = start_server("--api-key", KEY, "--compression", "false", "--hibernate-after-secs", "600")
    async with client(server, "a", envelope=True, compression=None) as a:
        await hibernating_count(server, 1)
        async with client(server, "b", compression=None) as b:
            await hibernating_count(server, 2)
            await b.send(json.dumps({"targets": ["a"], "payload": "hi"}))
            delivery = json.loads(await recv(a))
            assert (delivery["type"], delivery["payload"]) == ("message", "hi"), delivery


@single_node
@async_test
async def test_quiet_connections_hibernate_and_wake_for_what_reaches_them(start_server):
    # docs/operations.md, "Hibernation": quiet connections give up their task, and a
    # message to or from one wakes it, with nothing lost.
    server = start_server("--api-key", KEY, "--compression", "false", "--hibernate-after-secs", "1")
    async with client(server, "a", compression=None) as a, client(server, "b", compression=None) as b:
        await hibernating_count(server, 2)
        # To a sleeping connection, from a sleeping connection: both wake.
        for n in range(20):
            await a.send(json.dumps({"targets": ["b"], "payload": {"n": n}}))
        assert [json.loads(await recv(b)) for _ in range(20)] == [{"n": n} for n in range(20)]
        samples = await hibernating_count(server, 2)
        assert value(samples, "hibernations_total") >= 4
        await b.send(json.dumps({"targets": ["a"], "payload": "back"}))
        assert json.loads(await recv(a)) == "back"
        # Pings are answered while asleep too (the first wakes it).
        await asyncio.wait_for(await b.ping(), RECV_TIMEOUT)


@single_node
@async_test
async def test_compressed_connections_sleep_through_pings_and_wake_for_messages(start_server):
    # docs/operations.md, "Hibernation": the server's pings and the clients'
    # pongs do not wake a hibernating connection (one thread sends the pings and
    # takes the pongs), and the pongs keep it alive past the idle timeout.
    # Compression on, as browsers and this client (websockets) offer it.
    server = start_server(
        "--api-key", KEY, "--hibernate-after-secs", "1",
        "--ping-interval-secs", "1", "--idle-timeout-secs", "3",
    )
    async with client(server, "a") as a, client(server, "b") as b:
        assert a.protocol.extensions and b.protocol.extensions, "permessage-deflate agreed"
        samples = await hibernating_count(server, 2)
        slept = value(samples, "hibernations_total")
        # Four pings each, and longer than the idle timeout.
        await asyncio.sleep(4.5)
        samples = await hibernating_count(server, 2)
        assert value(samples, "hibernations_total") == slept, "no wake for pings or pongs"
        # Compressed both ways, each wakes.
        text = "all quiet on the wire " * 200
        await a.send(json.dumps({"targets": ["b"], "payload": text}))
        assert json.loads(await recv(b)) == text
        await b.send(json.dumps({"targets": ["a"], "payload": "ack"}))
        assert json.loads(await recv(a)) == "ack"
        # Compressed messages leave no state behind: both sleep again.
        samples = await hibernating_count(server, 2)
        assert value(samples, "hibernations_total") >= slept + 2


@single_node
@async_test
async def test_a_client_that_narrows_the_servers_window_stays_awake(start_server):
    # docs/operations.md, "Hibernation", which connections: a frame compressed
    # once for every subscriber has the full window, so a client that asks for
    # a smaller server_max_window_bits gets frames compressed for it alone, and
    # its connection keeps its compressor and its task.
    server = start_server("--api-key", KEY, "--hibernate-after-secs", "1")
    narrow = ClientPerMessageDeflateFactory(server_max_window_bits=10)
    async with client(server, "a") as a, client(server, "n", extensions=[narrow]) as n:
        assert a.protocol.extensions and n.protocol.extensions, "permessage-deflate agreed"
        await hibernating_count(server, 1)
        # Past three periods, still one: the default client sleeps, the narrow one does not.
        await asyncio.sleep(3)
        await hibernating_count(server, 1)
        text = "narrow window " * 300
        await a.send(json.dumps({"targets": ["n"], "payload": text}))
        assert json.loads(await recv(n)) == text
