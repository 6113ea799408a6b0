"""Black-box tests of the switchboard relay, driven by a real non-Rust client.

Each test starts the real binary on port 0 (SWITCHBOARD_BIN, default
/work/main/target/debug/switchboard), reads the port from its first stdout line
and stops it afterwards. Clients use the `websockets` library; a small raw
asyncio client covers what a well-behaved library refuses to send (invalid
UTF-8, unmasked frames) and checks compressed frames on the wire.

Every wait is bounded: each test runs under an overall timeout and each
receive under a few seconds.
"""

import asyncio
import base64
import contextlib
import functools
import itertools
import http.client
import json
import os
import re
import selectors
import signal
import struct
import subprocess
import tempfile
import socket
import time
import urllib.error
import urllib.request
import zlib

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

BIN = os.environ.get("SWITCHBOARD_BIN", "/work/main/target/debug/switchboard")
RECV_TIMEOUT = 5.0
TEST_TIMEOUT = 60.0


# --------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------


class Node:
    """One running `switchboard serve` process."""

    def __init__(self, args, cpus=None):
        """`cpus`: the set of CPUs the server may run on (its affinity); default all."""
        if not os.access(BIN, os.X_OK):
            pytest.fail(f"switchboard binary not found at {BIN} (set SWITCHBOARD_BIN)")
        self.stderr = tempfile.TemporaryFile()
        # No snapshot in the working directory unless the test gives a directory.
        if "--data-dir" not in args and "--persist" not in args:
            args = ("--persist", "false", *args)
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
        )
        line = self._first_line(timeout=15)
        prefix = "listening on 127.0.0.1:"
        if not line.startswith(prefix):
            self.stop()
            pytest.fail(f"unexpected first stdout line {line!r}; stderr:\n{self.logs()}")
        self.port = int(line[len(prefix):])
        self.host = "127.0.0.1"

    def _first_line(self, timeout):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                self.stop()
                pytest.fail(f"server printed nothing in {timeout}s; stderr:\n{self.logs()}")
            return self.proc.stdout.readline().decode().rstrip("\n")
        finally:
            sel.close()

    def logs(self):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-4000:]

    def http(self, method, path, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request(method, path, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()


# With SWITCHBOARD_TEST_CLUSTER=N, every server of these tests is N nodes on
# one Redis of its own (--engine redis), and each connection and HTTP request
# goes to the next node in turn: the suites then show that a cluster behaves
# as one server. Tests of one process's own behaviour say so with
# @single_node. A server given a fixed --listen, a --data-dir (the memory
# engine's snapshot) or an --engine is one node.
CLUSTER = int(os.environ.get("SWITCHBOARD_TEST_CLUSTER") or 0)

single_node = pytest.mark.skipif(bool(CLUSTER), reason="about one process, not what a cluster shares")


class Server:
    """A switchboard service under test: one node, or a cluster of nodes."""

    def __init__(self, *args, cpus=None, nodes=None):
        count = CLUSTER if nodes is None else nodes
        self.redis = None
        if count and not any(flag in args for flag in ("--listen", "--data-dir", "--engine")):
            from cluster import Redis

            self.redis = Redis()
            args = ("--engine", "redis", "--redis-url", self.redis.url, *args)
        else:
            count = 1
        self.nodes = []
        for _ in range(count):
            self.nodes.append(Node(args, cpus))
        if self.redis:
            self.wait_ready()
        self.proc = self.nodes[0].proc
        self.port = self.nodes[0].port
        self.host = "127.0.0.1"
        self._turn = itertools.count()

    def wait_ready(self, timeout=10):
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while True:
                try:
                    if node.http("GET", "/healthz")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"a node never became ready:\n{self.logs()}")
                time.sleep(0.05)

    def _next(self):
        return self.nodes[next(self._turn) % len(self.nodes)]

    def ws_url(self, client_id=None, query=None):
        if query is None:
            query = f"id={client_id}"
        return f"ws://{self.host}:{self._next().port}/ws?{query}"

    def logs(self):
        return "\n".join(node.logs() for node in self.nodes)

    def http(self, method, path, headers=None):
        return self._next().http(method, path, headers)

    def signal(self, sig):
        """Sends `sig` to every node."""
        for node in self.nodes:
            node.proc.send_signal(sig)

    def wait(self, timeout):
        """Waits for every node to exit; the worst exit code."""
        return max(node.proc.wait(timeout) for node in self.nodes)

    def stop(self):
        for node in self.nodes:
            node.stop()
            node.stderr.close()
        if self.redis:
            self.redis.stop()


@pytest.fixture
def start_server():
    """A factory: start_server(*flags, cpus=None) starts a server; all are stopped at the end."""
    servers = []

    def start(*args, cpus=None):
        s = Server(*args, cpus=cpus)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def server(start_server):
    return start_server()


def async_test(fn):
    """Runs an async test in its own event loop, under an overall timeout."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

    return wrapper


# --------------------------------------------------------------------------
# Client helpers
# --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def client(server, client_id, envelope=False, uri=None, **kwargs):
    """A connected client, registered with the relay.

    The server registers a connection's id only once its connection task runs,
    which is after the 101 response, so a message sent right after the
    handshake can find the id offline (see test_registered_when_handshake_completes).
    A ping's pong is answered by that task after it registered the id, so
    waiting for it makes the tests deterministic.
    """
    kwargs.setdefault("open_timeout", 5)
    kwargs.setdefault("close_timeout", 2)
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("proxy", None)
    kwargs.setdefault("max_size", 4 * 1024 * 1024)
    if envelope:
        kwargs["subprotocols"] = ["switchboard.v1"]
    async with connect(uri or server.ws_url(client_id), **kwargs) as ws:
        if ws.subprotocol == "switchboard.v1":
            # The first frame of a switchboard.v1 connection: its inbox's
            # position. The server sends it once the id is registered, so it
            # proves what the ping proves for raw connections (and a ping's
            # pong could wait behind more replayed messages than the client
            # buffers before it stops reading).
            ws.welcome = json.loads(await recv(ws))
            assert ws.welcome["type"] == "welcome" and isinstance(ws.welcome["client"], str), ws.welcome
        else:
            await asyncio.wait_for(await ws.ping(), RECV_TIMEOUT)
        yield ws


def delivery_text(ws, offset, payload_text, sender=None):
    """The exact text of a direct delivery to `ws` (a switchboard.v1 client) at
    `offset` of its inbox, whose epoch its welcome gave."""
    sender = f'"from":"{sender}",' if sender is not None else ""
    epoch = ws.welcome["epoch"]
    return f'{{"type":"message",{sender}"offset":{offset},"epoch":"{epoch}","payload":{payload_text}}}'


async def recv(ws, timeout=RECV_TIMEOUT):
    return await asyncio.wait_for(ws.recv(), timeout)


async def recv_json(ws, timeout=RECV_TIMEOUT):
    return json.loads(await recv(ws, timeout))


MARKERS = itertools.count(1)


async def nothing_before_marker(server, ws, client_id):
    """Proves that nothing more is on its way to `ws`, a connection of
    `client_id`, without trusting a silence window: a marker sent through the
    HTTP API now is queued behind anything already pushed to the connection
    (its frames go out in the order they were pushed), so the next message must
    be the marker. Earlier markers (to other connections of the id) are skipped."""
    marker = next(MARKERS)
    body = json.dumps({"targets": [str(client_id)], "payload": {"marker": marker}}).encode()

    def post():
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/api/v1/send", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=RECV_TIMEOUT) as response:
            return response.status

    assert await asyncio.to_thread(post) == 200
    while True:
        got = json.loads(await recv(ws))
        payload = got.get("payload") if isinstance(got, dict) and "type" in got else got
        seen = payload.get("marker") if isinstance(payload, dict) else None
        if seen == marker:
            return
        if not (isinstance(seen, int) and seen < marker):
            raise AssertionError(f"expected nothing before marker {marker}, got {got!r}")


async def expect_close(ws, timeout=RECV_TIMEOUT):
    """Waits for the server to close `ws`; returns the close frame it sent."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    except ConnectionClosed as e:
        assert e.rcvd is not None, f"connection closed without a close frame: {e!r}"
        return e.rcvd


def msg(targets, payload, **extra):
    return json.dumps({"targets": targets, "payload": payload, **extra})


async def roundtrip_marker(sender, receiver, receiver_id, marker):
    """Sends `marker` from sender to receiver and checks it is the next thing
    the receiver gets: proves nothing else was delivered before it."""
    await sender.send(msg([receiver_id], {"marker": marker}))
    got = await recv(receiver)
    assert json.loads(got) == {"marker": marker}, f"receiver got {got!r} before the marker"


# --------------------------------------------------------------------------
# A raw client, for bytes a WebSocket library will not send
# --------------------------------------------------------------------------


class RawClient:
    def __init__(self, reader, writer, status, headers):
        self.reader, self.writer = reader, writer
        self.status, self.headers = status, headers

    @classmethod
    async def open(cls, server, client_id, extra_headers=()):
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(server.host, server.port), RECV_TIMEOUT
        )
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET /ws?id={client_id} HTTP/1.1",
            f"Host: {server.host}:{server.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *extra_headers,
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RECV_TIMEOUT)
        status_line, *header_lines = head.decode().split("\r\n")
        status = int(status_line.split()[1])
        headers = {}
        for h in header_lines:
            if ":" in h:
                k, v = h.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return cls(reader, writer, status, headers)

    def send_frame(self, opcode, payload, fin=True, rsv1=False, masked=True):
        b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
        n = len(payload)
        mask_bit = 0x80 if masked else 0
        if n < 126:
            head = struct.pack("!BB", b0, mask_bit | n)
        elif n < 65536:
            head = struct.pack("!BBH", b0, mask_bit | 126, n)
        else:
            head = struct.pack("!BBQ", b0, mask_bit | 127, n)
        if masked:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.writer.write(head + payload)

    async def read_frame(self, timeout=RECV_TIMEOUT):
        async def read():
            b0, b1 = await self.reader.readexactly(2)
            assert not b1 & 0x80, "server frames must not be masked"
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            data = await self.reader.readexactly(n)
            return bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, data

        return await asyncio.wait_for(read(), timeout)

    async def read_message_frame(self, timeout=RECV_TIMEOUT):
        """The next data frame, skipping pings."""
        while True:
            frame = await self.read_frame(timeout)
            if frame[2] != 0x9:
                return frame

    async def read_close_code(self, timeout=RECV_TIMEOUT):
        """Reads until the server's close frame and returns its code."""
        while True:
            fin, rsv1, opcode, data = await self.read_frame(timeout)
            if opcode == 0x8:
                assert len(data) >= 2, f"close frame without a code: {data!r}"
                return struct.unpack("!H", data[:2])[0]

    async def close(self):
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), 2)
        except (asyncio.TimeoutError, ConnectionError):
            pass


def inflate(data):
    d = zlib.decompressobj(-15)
    return d.decompress(data + b"\x00\x00\xff\xff") + d.flush()


def deflate(data):
    c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


# --------------------------------------------------------------------------
# HTTP surface
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    ["", "foo=1", "id=", "id=a%20b", "id=a%2Fb", "id=%C3%A9", "id=" + "x" * 129],
    ids=["no-query", "no-id", "empty", "space", "slash", "non-ascii", "too-long"],
)
def test_bad_id_is_400_with_plain_text_reason(server, query):
    # With full upgrade headers: still refused before upgrading.
    status, headers, body = server.http(
        "GET",
        f"/ws?{query}",
        {
            "Upgrade": "websocket",
            "Connection": "Upgrade",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version": "13",
        },
    )
    assert status == 400, (status, body)
    assert headers.get("content-type", "").startswith("text/plain"), headers
    assert b"id" in body and body.strip(), body
    assert "upgrade" not in {k.lower() for k in headers}


@pytest.mark.parametrize(
    "elsewhere",
    [
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"Host": "rebound.example:4000"},
        {"Origin": "https://another.example"},
    ],
    ids=["x-forwarded-for", "forwarded", "host", "origin"],
)
def test_without_credentials_a_loopback_listener_serves_this_host_only(start_server, elsewhere):
    """With no tokens and no API keys, a loopback listener takes ids chosen by
    clients and serves the API without a key, but only to this host: a request
    a reverse proxy on this host forwarded, or one naming another host (DNS
    rebinding), is refused with the reason. --allow-insecure lets such clients
    choose their ids; the API still needs a key for them."""
    server = start_server()
    status, _, body = server.http("GET", "/ws?id=a", {**UPGRADE, **elsewhere})
    assert status == 403 and b"this host only" in body and b"--allow-insecure" in body, (status, body)
    status, _, body = server.http("GET", "/api/v1/stats", elsewhere)
    error = json.loads(body)["error"]
    assert (status, error["code"]) == (401, "unauthorized") and "--api-key" in error["message"], body
    # From this host, both are served.
    assert server.http("GET", "/ws?id=a", UPGRADE)[0] == 101
    assert server.http("GET", "/api/v1/stats", {"Host": f"localhost:{server.port}"})[0] == 200

    insecure = start_server("--allow-insecure")
    assert insecure.http("GET", "/ws?id=a", {**UPGRADE, **elsewhere})[0] == 101
    assert insecure.http("GET", "/api/v1/stats", elsewhere)[0] == 401


def test_bad_id_without_upgrade_headers_is_400(server):
    status, _, body = server.http("GET", "/ws")
    assert status == 400 and b"id" in body


@async_test
async def test_longest_valid_id_is_accepted(server):
    longest = "a.b_c~d:e@f-" + "x" * 116
    assert len(longest) == 128
    async with client(server, longest) as ws:
        await ws.send(msg([longest], 1))
        assert await recv(ws) == "1"


@async_test
async def test_bad_id_refused_to_websocket_client(server):
    with pytest.raises(InvalidStatus) as e:
        async with client(server, "a%20b"):
            pass
    assert e.value.response.status_code == 400


def test_plain_get_without_upgrade_is_426(server):
    status, _, _ = server.http("GET", "/ws?id=1")
    assert status == 426


def test_missing_and_invalid_id_reasons(server):
    status, _, body = server.http("GET", "/ws")
    assert (status, body) == (400, b"missing id: connect to /ws?id=<client id>\n")
    status, _, body = server.http("GET", "/ws?id=a%20b")
    assert status == 400 and body.startswith(b"invalid id: ids are 1-128 characters of"), body


UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}


@pytest.mark.parametrize(
    "method,changes,status",
    [
        ("GET", {"Sec-WebSocket-Version": "8"}, 426),
        ("GET", {"Sec-WebSocket-Key": "too-short"}, 400),
        ("GET", {"Connection": "keep-alive"}, 400),
        ("POST", {}, 405),
    ],
    ids=["version-8", "bad-key", "connection-without-upgrade", "post"],
)
def test_handshake_rejections(server, method, changes, status):
    got, headers, _ = server.http(method, "/ws?id=1", {**UPGRADE, **changes})
    assert got == status, (got, headers)
    if status == 426:
        assert headers.get("sec-websocket-version") == "13", headers


def test_valid_handshake_accept_header(server):
    got, headers, _ = server.http("GET", "/ws?id=1", UPGRADE)
    assert got == 101
    # RFC 6455's own example key and accept value.
    assert headers.get("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_demo_page_and_healthz(server):
    status, headers, body = server.http("GET", "/")
    assert status == 200
    assert headers.get("content-type", "").startswith("text/html")
    for element in (b'id="me"', b'id="connect"', b'id="targets"', b'id="text"', b'id="send"', b'id="log"'):
        assert element in body
    assert b'import { Client } from "/client.js"' in body

    # The JavaScript client the page runs on, for any origin.
    status, headers, body = server.http("GET", "/client.js")
    assert status == 200
    assert headers.get("content-type", "").startswith("text/javascript")
    assert headers.get("access-control-allow-origin") == "*"
    assert b"export{" in body and b"SwitchboardError" in body

    status, headers, body = server.http("GET", "/healthz")
    assert status == 200
    assert headers.get("content-type", "").startswith("application/json")
    assert json.loads(body) == {"status": "ok", "connections": 0, "clients": 0}


@single_node  # /healthz counts the node's own connections
@async_test
async def test_healthz_counts_connections_and_clients(server):
    def health():
        return json.loads(server.http("GET", "/healthz")[2])

    async with client(server, "x") as x1, client(server, "x") as x2, client(server, "y") as y:
        # Make sure all three are registered: a message to each arrives.
        await y.send(msg(["x", "y"], 0))
        for ws in (x1, x2, y):
            assert await recv(ws) == "0"
        h = await asyncio.to_thread(health)
        assert h == {"status": "ok", "connections": 3, "clients": 2}
    deadline = time.monotonic() + 5
    while (h := await asyncio.to_thread(health))["connections"] and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert h == {"status": "ok", "connections": 0, "clients": 0}


# --------------------------------------------------------------------------
# Delivery (raw / seed protocol)
# --------------------------------------------------------------------------


@async_test
async def test_seed_protocol_delivery_to_one_target(server):
    async with client(server, 1) as c1, client(server, 2) as c2, client(server, 3) as c3:
        await c1.send('{"targets":[2],"payload":{"text":"hi"}}')
        assert await recv(c2) == '{"text":"hi"}'
        await nothing_before_marker(server, c3, 3)
        await nothing_before_marker(server, c1, 1)


@async_test
async def test_delivery_to_several_targets_int_and_string(server):
    async with client(server, 1) as c1, client(server, 2) as c2, client(server, 3) as c3, client(server, 4) as c4:
        await c1.send('{"targets":[2,"3"],"payload":[1,2,3]}')
        assert await recv(c2) == "[1,2,3]"
        assert await recv(c3) == "[1,2,3]"
        await nothing_before_marker(server, c4, 4)
        await nothing_before_marker(server, c1, 1)


@async_test
async def test_sender_receives_its_own_message_when_targeted(server):
    async with client(server, "me") as me, client(server, "me") as me2:
        await me.send(msg(["me"], "echo"))
        assert await recv(me) == '"echo"'
        assert await recv(me2) == '"echo"'


@async_test
async def test_duplicate_targets_are_delivered_once(server):
    async with client(server, 1) as c1, client(server, 2) as c2:
        await c1.send('{"targets":[2,"2",2,"2"],"payload":"once"}')
        assert await recv(c2) == '"once"'
        await roundtrip_marker(c1, c2, "2", "after-dup")


@async_test
async def test_every_connection_of_a_target_receives(server):
    async with client(server, 1) as c1, client(server, 2) as a, client(server, 2) as b:
        await c1.send(msg([2], {"n": 1}))
        assert await recv(a) == '{"n": 1}'
        assert await recv(b) == '{"n": 1}'
        # After one of them leaves, the other still receives.
        await a.close()
        await c1.send(msg([2], {"n": 2}))
        assert await recv(b) == '{"n": 2}'


@async_test
async def test_offline_target_is_skipped_silently(server):
    async with client(server, 1) as c1, client(server, 2) as c2:
        await c1.send(msg(["nobody", 2], "x"))
        assert await recv(c2) == '"x"'
        await nothing_before_marker(server, c1, 1)


@pytest.mark.parametrize(
    "payload_text",
    [
        '{ "a" :  [1 , 2.50, 1e3, -0.0] , "s":"\\u00e9 é \\ud83d\\ude00 😀", "n" : null }',
        '  "  spaced string  "',
        "12345678901234567890123456789",
        "1.000000000000000000001",
        "null",
        "true",
        "[\n\t1,\r\n 2 ]",
        '{"deep":[[[[[[[[[[{"x":{}}]]]]]]]]]]}',
        '""',
        # Valid JSON grammar that no parser agrees on: passed on, not judged.
        "1e999999",
        '"\\ud800 lone surrogates \\udfff"',
        "[" * 100_000 + "]" * 100_000,
        '{"x":1,"x":2}',
        "9007199254740993",
    ],
    ids=lambda text: text[:24],
)
@async_test
async def test_payload_is_passed_byte_for_byte(server, payload_text):
    async with client(server, "s") as s, client(server, "r") as r, client(server, "e", envelope=True) as e:
        text = '{"targets":["r","e"],  "payload":' + payload_text + "  \n}"
        await s.send(text)
        # Surrounding whitespace is not part of the JSON value; everything inside is.
        expected = payload_text.strip(" \n")
        assert await recv(r) == expected
        assert await recv(e) == delivery_text(e, 1, expected, sender="s")


PASS_THROUGH = ["1e999999", '"\\ud800"', "[" * 100_000 + "]" * 100_000, '{"x":1,"x":2}']


@pytest.mark.parametrize("payload_text", PASS_THROUGH, ids=lambda text: text[:12])
@async_test
async def test_api_passes_payloads_on_byte_for_byte_too(server, payload_text):
    async with client(server, "r") as r:
        body = ('{"targets":["r"],"payload":' + payload_text + "}").encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/api/v1/send",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.load(response) == {"delivered": ["r"], "offline": [], "offsets": {"r": 1}}
        assert await recv(r) == payload_text


@pytest.mark.parametrize("target", ["9007199254740993.5", "1e400", "1.50", "true", '"a b"'])
@async_test
async def test_an_invalid_target_is_quoted_as_sent(server, target):
    """A number never goes through a float on its way to the error message."""
    shown = json.loads(target) if target.startswith('"') else target
    async with client(server, "s") as s:
        await s.send('{"targets":["r",' + target + '],"payload":1}')
        err = await recv_json(s)
        assert err["code"] == "invalid_target", err
        assert f'"{shown}"' in err["message"], err
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/api/v1/send",
        data=('{"targets":[' + target + '],"payload":1}').encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    error = json.load(refused.value)["error"]
    assert (refused.value.code, error["code"]) == (400, "invalid_id"), error
    assert f'"{shown}"' in error["message"], error


@async_test
async def test_payload_text_survives_frames_sent_as_fragments(server):
    async with client(server, "s") as s, client(server, "r") as r:
        parts = ['{"targets":["r"],', '"payload":{"a" : ', "[1,  2]}}"]

        async def fragments():
            for p in parts:
                yield p

        await s.send(fragments())
        assert await recv(r) == '{"a" : [1,  2]}'


@async_test
async def test_type_send_and_unknown_fields_are_accepted(server):
    async with client(server, "s") as s, client(server, "r") as r:
        await s.send('{"type":"send","targets":["r"],"payload":1,"future":{"x":1}}')
        assert await recv(r) == "1"
        await nothing_before_marker(server, s, "s")


@async_test
async def test_empty_targets_is_fine_and_delivers_nothing(server):
    async with client(server, "s") as s, client(server, "r") as r:
        await s.send(msg([], "nothing"))
        await roundtrip_marker(s, r, "r", "after-empty")
        await nothing_before_marker(server, s, "s")


@async_test
async def test_exactly_max_targets_is_accepted(server):
    async with client(server, "s") as s, client(server, "r") as r:
        targets = [f"t{i}" for i in range(999)] + ["r"]
        await s.send(msg(targets, "many"))
        assert await recv(r) == '"many"'
        await nothing_before_marker(server, s, "s")


# --------------------------------------------------------------------------
# Envelope mode (switchboard.v1)
# --------------------------------------------------------------------------


@async_test
async def test_registered_when_handshake_completes(start_server):
    # 300 messages in a burst: above the default rate limit (100/s, bursts of 200).
    server = start_server("--rate-limit-messages-per-sec", "0")
    async with client(server, "s", envelope=True) as s:
        offline = []
        for i in range(300):
            async with connect(server.ws_url(f"r{i}"), proxy=None, open_timeout=5, ping_interval=None) as r:
                # No ping: send as soon as the handshake is done.
                await s.send(msg([f"r{i}"], i, id=i))
                ack = await recv_json(s)
                if ack["offline"]:
                    offline.append(i)
                else:
                    assert await recv(r) == str(i)
        assert not offline, f"{len(offline)}/300 connected targets reported offline: {offline[:10]}"


@async_test
async def test_envelope_subprotocol_is_negotiated(server):
    async with client(server, "e", envelope=True) as e, client(server, "r") as r:
        assert e.subprotocol == "switchboard.v1"
        assert e.response.headers.get("Sec-WebSocket-Protocol") == "switchboard.v1"
        assert r.subprotocol is None
        assert "Sec-WebSocket-Protocol" not in r.response.headers


@async_test
async def test_unknown_subprotocol_falls_back_to_raw(server):
    async with client(server, "s") as s, client(server, "r", subprotocols=["other.v9"]) as r:
        assert r.subprotocol is None
        await s.send(msg(["r"], {"x": 1}))
        assert await recv(r) == '{"x": 1}'


@async_test
async def test_envelope_message_ack_delivered_and_offline(server):
    async with client(server, "alice", envelope=True) as a, client(server, "bob", envelope=True) as b, client(
        server, "carol"
    ) as c:
        await a.send('{"targets":["bob","carol","dave"],"payload":{"hi":1},"id":42}')
        assert await recv(b) == delivery_text(b, 1, '{"hi":1}', sender="alice")
        assert await recv(c) == '{"hi":1}'
        # Every target's inbox took it: dave's waits for him.
        assert await recv_json(a) == {
            "type": "ack",
            "id": 42,
            "delivered": ["bob", "carol"],
            "offline": ["dave"],
            "offsets": {"bob": 1, "carol": 1, "dave": 1},
        }
        # Raw sender to envelope receiver: the envelope names the sender.
        await c.send(msg(["alice"], "from carol"))
        assert await recv(a) == delivery_text(a, 1, '"from carol"', sender="carol")


@async_test
async def test_envelope_ack_keeps_any_json_id_and_dedups(server):
    async with client(server, "a", envelope=True) as a, client(server, "b") as b:
        await a.send('{"id":{"k":[1, "two"]},"targets":["b",2,"b","2"],"payload":0}')
        assert await recv(b) == "0"
        ack = await recv(a)
        assert ack == '{"type":"ack","id":{"k":[1, "two"]},"delivered":["b"],"offline":["2"],"offsets":{"b":1,"2":1}}'
        for ident in ('"str"', "null", "1.5", "[]"):
            await a.send('{"id":' + ident + ',"targets":[],"payload":0}')
            assert await recv(a) == '{"type":"ack","id":' + ident + ',"delivered":[],"offline":[],"offsets":{}}'


@async_test
async def test_envelope_without_id_gets_no_ack_and_raw_gets_no_ack(server):
    async with client(server, "a", envelope=True) as a, client(server, "r") as r:
        await a.send(msg(["r"], 1))
        assert await recv(r) == "1"
        await nothing_before_marker(server, a, "a")
        await r.send(msg(["a"], 2, id=7))
        assert await recv(a) == delivery_text(a, 2, "2", sender="r")  # the marker took offset 1
        await nothing_before_marker(server, r, "r")


@async_test
async def test_envelope_self_delivery_and_ack(server):
    async with client(server, "a", envelope=True) as a:
        await a.send(msg(["a"], "me", id=1))
        first, second = await recv(a), await recv(a)
        assert delivery_text(a, 1, '"me"', sender="a") in (first, second)
        ack = {"type": "ack", "id": 1, "delivered": ["a"], "offline": [], "offsets": {"a": 1}}
        assert ack in (json.loads(first), json.loads(second))


@pytest.mark.parametrize(
    "text,code",
    [
        ('{"id":5,"type":"teleport","targets":["b"],"payload":1}', "unknown_type"),
        ('{"id":5,"targets":["b","a b"],"payload":1}', "invalid_target"),
        ('{"id":5,"targets":["b"]}', "invalid_message"),
        ('{"id":5,"payload":1}', "invalid_message"),
        ('{"id":5,"targets":' + json.dumps(["b"] * 1001) + ',"payload":1}', "too_many_targets"),
        # Messages serde refuses whole still name their id.
        ('{"id":5,"type":"status","clients":"42"}', "invalid_message"),
        ('{"id":5,"targets":["b"],"targets":["a"],"payload":1}', "invalid_message"),
        ('{"id":5,"targets":"b","payload":1}', "invalid_message"),
    ],
)
@async_test
async def test_envelope_error_carries_the_id(server, text, code):
    async with client(server, "a", envelope=True) as a, client(server, "b") as b:
        await a.send(text)
        err = await recv_json(a)
        assert err["type"] == "error" and err["code"] == code, err
        assert err["id"] == 5
        assert isinstance(err["message"], str) and err["message"]
        assert set(err) == {"type", "code", "message", "id"}
        await roundtrip_marker(a, b, "b", "after-error")


@async_test
async def test_raw_mode_error_also_carries_the_id(server):
    async with client(server, "a") as a:
        await a.send('{"id":"x1","targets":[1.5],"payload":1}')
        err = await recv_json(a)
        assert err["code"] == "invalid_target" and err["id"] == "x1", err
        assert "1.5" in err["message"]


@async_test
async def test_envelope_error_without_known_id_has_no_id(server):
    async with client(server, "a", envelope=True) as a:
        await a.send("{nope")
        err = await recv_json(a)
        assert err["type"] == "error" and err["code"] == "invalid_json"
        assert "id" not in err


# --------------------------------------------------------------------------
# Bad input: error frames in both modes, connection keeps working, nothing delivered
# --------------------------------------------------------------------------

BAD_INPUTS = [
    ("not json", "invalid_json"),
    ("{nope", "invalid_json"),
    ("", "invalid_json"),
    ('{"targets":["r"],"payload":1} trailing', "invalid_json"),
    ('{"targets":["r"],"payload":', "invalid_json"),
    # A wrong type before the text breaks off: still not JSON.
    ("[1,", "invalid_json"),
    ('{"targets":"r","payload":', "invalid_json"),
    ("[1,2]", "invalid_message"),
    ('"a string"', "invalid_message"),
    ("42", "invalid_message"),
    ("null", "invalid_message"),
    ('{"targets":"r","payload":1}', "invalid_message"),
    ('{"targets":{"r":1},"payload":1}', "invalid_message"),
    ('{"payload":1}', "invalid_message"),
    ('{"targets":["r"]}', "invalid_message"),
    ('{"targets":["r"],"payload":1,"type":7}', "invalid_message"),
    ('{"targets":["r"],"targets":["x"],"payload":1}', "invalid_message"),
    ('{"targets":["r"],"payload":1,"payload":2}', "invalid_message"),
    ('{"targets":["r","a b"],"payload":1}', "invalid_target"),
    ('{"targets":["r",1.5],"payload":1}', "invalid_target"),
    ('{"targets":["r",null],"payload":1}', "invalid_target"),
    ('{"targets":["r",true],"payload":1}', "invalid_target"),
    ('{"targets":["r",""],"payload":1}', "invalid_target"),
    ('{"targets":["r","' + "x" * 129 + '"],"payload":1}', "invalid_target"),
    ('{"targets":["r","é"],"payload":1}', "invalid_target"),
    ('{"targets":' + json.dumps(["r"] * 1001) + ',"payload":1}', "too_many_targets"),
    ('{"type":"teleport","targets":["r"],"payload":1}', "unknown_type"),
    ('{"type":"SEND","targets":["r"],"payload":1}', "unknown_type"),
]


@pytest.mark.parametrize("envelope", [False, True], ids=["raw", "envelope"])
@pytest.mark.parametrize("text,code", BAD_INPUTS, ids=[f"{c}-{i}" for i, (_, c) in enumerate(BAD_INPUTS)])
@async_test
async def test_bad_input_gets_error_code_and_connection_survives(server, text, code, envelope):
    async with client(server, "s", envelope=envelope) as s, client(server, "r") as r, client(
        server, "r", envelope=True
    ) as r2:
        await s.send(text)
        err = await recv_json(s)
        assert err["type"] == "error", err
        assert err["code"] == code, err
        assert isinstance(err["message"], str) and err["message"]
        assert "id" not in err
        # The connection still works, and the targets got nothing before the marker.
        await s.send(msg(["r"], {"marker": 1}))
        assert await recv(r) == '{"marker": 1}'
        assert await recv(r2) == delivery_text(r2, 1, '{"marker": 1}', sender="s")
        await nothing_before_marker(server, s, "s")


@pytest.mark.parametrize("envelope", [False, True], ids=["raw", "envelope"])
@async_test
async def test_binary_frame_is_refused_with_error(server, envelope):
    async with client(server, "s", envelope=envelope) as s, client(server, "r") as r:
        await s.send(msg(["r"], "binary").encode())
        err = await recv_json(s)
        assert err["type"] == "error" and err["code"] == "binary_not_supported", err
        await roundtrip_marker(s, r, "r", "after-binary")


@async_test
async def test_max_targets_flag(start_server):
    server = start_server("--max-targets", "2")
    async with client(server, "s") as s, client(server, "r") as r:
        await s.send(msg(["r", "x"], "two"))
        assert await recv(r) == '"two"'
        await s.send(msg(["r", "x", "y"], "three"))
        err = await recv_json(s)
        assert err["code"] == "too_many_targets"
        await roundtrip_marker(s, r, "r", "after-too-many")


# --------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------


@async_test
async def test_permessage_deflate_negotiated_and_large_payload_roundtrips(server):
    big = {"rows": [{"name": "switchboard", "index": i % 10, "text": "lorem ipsum " * 4} for i in range(2000)]}
    payload_text = json.dumps(big)
    assert len(payload_text) > 100_000
    async with client(server, "a") as a, client(server, "b", envelope=True) as b:
        for ws in (a, b):
            ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
            assert "permessage-deflate" in ext, ext
            assert "server_no_context_takeover" in ext, ext
            assert [type(e).__name__ for e in ws.protocol.extensions] == ["PerMessageDeflate"]
        await a.send('{"targets":["b","a"],"payload":' + payload_text + "}")
        assert await recv(a) == payload_text
        assert await recv(b) == delivery_text(b, 1, payload_text, sender="a")
        # Several in a row, both ways (context takeover on the client side).
        for i in range(3):
            await b.send(msg(["a"], {"i": i, "big": big}, id=i))
            assert json.loads(await recv(a)) == {"i": i, "big": big}
            ack = {"type": "ack", "id": i, "delivered": ["a"], "offline": [], "offsets": {"a": i + 2}}
            assert await recv_json(b) == ack


@async_test
async def test_no_compression_when_not_offered(server):
    async with client(server, "a", compression=None) as a:
        assert "Sec-WebSocket-Extensions" not in a.response.headers
        await a.send(msg(["a"], "x" * 50_000))
        assert await recv(a) == '"' + "x" * 50_000 + '"'


@async_test
async def test_compression_can_be_disabled(start_server):
    server = start_server("--compression", "false")
    async with client(server, "a") as a:
        assert "Sec-WebSocket-Extensions" not in a.response.headers
        await a.send(msg(["a"], "y" * 50_000))
        assert await recv(a) == '"' + "y" * 50_000 + '"'


@async_test
async def test_compressed_frames_on_the_wire(server):
    raw = await RawClient.open(
        server, "w", ["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]
    )
    try:
        assert raw.status == 101
        ext = raw.headers.get("sec-websocket-extensions", "")
        assert ext.startswith("permessage-deflate") and "server_no_context_takeover" in ext, ext
        payload_text = json.dumps(["compress me please"] * 6000)
        body = ('{"targets":["w"],"payload":' + payload_text + "}").encode()
        # An uncompressed message (RSV1 clear) is allowed after negotiating deflate.
        raw.send_frame(0x1, body)
        await raw.writer.drain()
        fin, rsv1, opcode, data = await raw.read_message_frame()
        assert opcode == 0x1 and fin
        assert rsv1, "server did not compress a large compressible message"
        assert len(data) < len(payload_text) / 10
        assert inflate(data).decode() == payload_text
        # A compressed message from the client is inflated by the server.
        raw.send_frame(0x1, deflate(body), rsv1=True)
        await raw.writer.drain()
        fin, rsv1, opcode, data = await raw.read_message_frame()
        assert opcode == 0x1 and rsv1
        # server_no_context_takeover: each message inflates on its own.
        assert inflate(data).decode() == payload_text
    finally:
        await raw.close()


# --------------------------------------------------------------------------
# Close codes
# --------------------------------------------------------------------------


@async_test
async def test_message_at_max_size_is_accepted(start_server):
    server = start_server("--max-message-size", "10000")
    async with client(server, "a", compression=None) as a, client(server, "b") as b:
        prefix, suffix = '{"targets":["b"],"payload":"', '"}'
        text = prefix + "z" * (10000 - len(prefix) - len(suffix)) + suffix
        assert len(text.encode()) == 10000
        await a.send(text)
        assert await recv(b) == text[len(prefix) - 1 : -1]


@async_test
async def test_oversize_message_closes_1009(server):
    async with client(server, "a", compression=None) as a, client(server, "b") as b:
        prefix, suffix = '{"targets":["b"],"payload":"', '"}'
        text = prefix + "z" * (1048576 + 1 - len(prefix) - len(suffix)) + suffix
        assert len(text.encode()) == 1048577
        await a.send(text)
        rcvd = await expect_close(a)
        assert rcvd.code == 1009, rcvd
        # Nothing was delivered, and the server keeps serving others.
        async with client(server, "c") as c:
            await roundtrip_marker(c, b, "b", "after-oversize")


@async_test
async def test_oversize_fragmented_message_closes_1009(start_server):
    server = start_server("--max-message-size", "1000")
    raw = await RawClient.open(server, "a")
    try:
        assert raw.status == 101
        # Each fragment is under the limit; the message they add up to is not.
        raw.send_frame(0x1, b'{"targets":["a"],"payload":"' + b"q" * 570, fin=False)
        raw.send_frame(0x0, b"q" * 600, fin=False)
        await raw.writer.drain()
        assert await raw.read_close_code() == 1009
    finally:
        await raw.close()


@async_test
async def test_oversize_while_client_keeps_sending_still_shows_1009(start_server):
    server = start_server("--max-message-size", "1000")
    raw = await RawClient.open(server, "a")
    try:
        assert raw.status == 101
        raw.send_frame(0x1, b'{"targets":["a"],"payload":"' + b"q" * 570, fin=False)
        try:
            # A client streaming a large message: it has not read the close yet.
            for _ in range(20):
                raw.send_frame(0x0, b"q" * 600, fin=False)
                await raw.writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            pass
        assert await raw.read_close_code() == 1009
    finally:
        await raw.close()


@async_test
async def test_oversize_after_inflate_closes_1009(start_server):
    server = start_server("--max-message-size", "20000")
    # Compressed this is tiny; inflated it is over the limit.
    async with client(server, "a") as a:
        assert "permessage-deflate" in a.response.headers.get("Sec-WebSocket-Extensions", "")
        await a.send(msg(["a"], "k" * 50_000))
        rcvd = await expect_close(a)
        assert rcvd.code == 1009, rcvd


@async_test
async def test_invalid_utf8_closes_1007(server):
    raw = await RawClient.open(server, "u")
    try:
        assert raw.status == 101
        raw.send_frame(0x1, b'{"targets":["u"],"payload":"\xff\xfe"}')
        await raw.writer.drain()
        assert await raw.read_close_code() == 1007
    finally:
        await raw.close()


@async_test
async def test_invalid_utf8_split_over_fragments_closes_1007(server):
    raw = await RawClient.open(server, "u")
    try:
        assert raw.status == 101
        # A valid 3-byte sequence start, then a byte that cannot continue it.
        raw.send_frame(0x1, b'{"payload":"\xe2\x82', fin=False)
        raw.send_frame(0x0, b'(", "targets":[]}', fin=True)
        await raw.writer.drain()
        assert await raw.read_close_code() == 1007
    finally:
        await raw.close()


@async_test
async def test_valid_utf8_split_over_fragments_is_delivered(server):
    raw = await RawClient.open(server, "u")
    try:
        euro = "€".encode()
        raw.send_frame(0x1, b'{"targets":["u"],"payload":"' + euro[:1], fin=False)
        raw.send_frame(0x0, euro[1:2], fin=False)
        raw.send_frame(0x0, euro[2:] + b'"}', fin=True)
        await raw.writer.drain()
        fin, rsv1, opcode, data = await raw.read_message_frame()
        assert opcode == 0x1 and data.decode() == '"€"'
    finally:
        await raw.close()


@async_test
async def test_invalid_utf8_close_reason_closes_1007(server):
    raw = await RawClient.open(server, "u")
    try:
        raw.send_frame(0x8, struct.pack("!H", 1000) + b"\xff")
        await raw.writer.drain()
        assert await raw.read_close_code() == 1007
    finally:
        await raw.close()


@async_test
async def test_invalid_compressed_data_closes_1007(server):
    raw = await RawClient.open(server, "z", ["Sec-WebSocket-Extensions: permessage-deflate"])
    try:
        assert "permessage-deflate" in raw.headers.get("sec-websocket-extensions", "")
        # Block type 3 is reserved in DEFLATE: this can never inflate.
        raw.send_frame(0x1, b"\xff\xff\xff\xff", rsv1=True)
        await raw.writer.drain()
        assert await raw.read_close_code() == 1007
    finally:
        await raw.close()


@pytest.mark.parametrize("code", [1000, 4001])
@async_test
async def test_client_close_code_is_echoed(server, code):
    raw = await RawClient.open(server, "c")
    try:
        raw.send_frame(0x8, struct.pack("!H", code) + b"bye")
        await raw.writer.drain()
        assert await raw.read_close_code() == code
        # Then the server closes the TCP connection.
        assert await asyncio.wait_for(raw.reader.read(), RECV_TIMEOUT) == b""
    finally:
        await raw.close()


@async_test
async def test_ping_from_client_gets_pong_with_same_data(server):
    raw = await RawClient.open(server, "p")
    try:
        raw.send_frame(0x9, b"are you there")
        await raw.writer.drain()
        fin, rsv1, opcode, data = await raw.read_frame()
        assert (fin, opcode, data) == (True, 0xA, b"are you there")
    finally:
        await raw.close()


@pytest.mark.parametrize(
    "frame",
    [
        dict(opcode=0x1, payload=b'{"targets":[],"payload":1}', masked=False),
        dict(opcode=0x3, payload=b"reserved opcode"),
        dict(opcode=0x1, payload=b'{"targets":[],"payload":1}', rsv1=True),
        dict(opcode=0x0, payload=b"continuation with nothing to continue"),
        dict(opcode=0x9, payload=b"fragmented ping", fin=False),
        dict(opcode=0x9, payload=b"p" * 126),
        dict(opcode=0x8, payload=b"\x03"),
        dict(opcode=0x8, payload=struct.pack("!H", 999)),
        dict(opcode=0x8, payload=struct.pack("!H", 1005)),
        dict(opcode=0x1, payload=b'{"targets":[],', fin=False, then=dict(opcode=0x1, payload=b'"payload":1}')),
    ],
    ids=[
        "unmasked",
        "reserved-opcode",
        "rsv1-without-extension",
        "stray-continuation",
        "fragmented-control",
        "oversized-control",
        "close-one-byte",
        "close-code-999",
        "close-code-1005",
        "new-message-inside-fragmented-one",
    ],
)
@async_test
async def test_protocol_violation_closes_1002(server, frame):
    raw = await RawClient.open(server, "p")
    try:
        assert raw.status == 101
        frame = dict(frame)
        then = frame.pop("then", None)
        raw.send_frame(**frame)
        if then:
            raw.send_frame(**then)
        await raw.writer.drain()
        assert await raw.read_close_code() == 1002
    finally:
        await raw.close()


@async_test
async def test_idle_connection_closes_1001(start_server):
    server = start_server("--idle-timeout-secs", "1", "--ping-interval-secs", "0")
    async with client(server, "idle") as idle, client(server, "busy") as busy:
        started = time.monotonic()

        async def keep_busy():
            for _ in range(8):
                await busy.send(msg([], "still here"))
                await asyncio.sleep(0.3)

        busy_task = asyncio.create_task(keep_busy())
        rcvd = await expect_close(idle, timeout=6)
        elapsed = time.monotonic() - started
        assert rcvd.code == 1001, rcvd
        assert 0.8 <= elapsed <= 5, elapsed
        await busy_task
        # The client that kept talking is still open.
        await busy.send(msg(["busy"], "alive"))
        assert await recv(busy) == '"alive"'


@pytest.mark.parametrize(
    "args",
    [
        ["--workers", "1"],
        ["--workers", "3"],
        ["--workers", "3", "--scheduler", "thread-per-core"],
    ],
    ids=["one-thread", "work-stealing", "thread-per-core"],
)
@async_test
async def test_any_worker_layout_relays_and_shuts_down(start_server, args):
    """--workers 1 runs on tokio's single-threaded scheduler, more on the work-stealing
    one or, with --scheduler thread-per-core, one runtime and SO_REUSEPORT socket per
    thread. Twelve clients land on different threads, and every one reaches every other."""
    server = start_server(*args)
    names = [f"c{i}" for i in range(12)]
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(server, name)) for name in names]
        for n, sender in enumerate(clients):
            await sender.send(msg(names, n))
            for receiver in clients:
                assert await recv(receiver) == str(n)
        for _ in range(6):  # HTTP requests land on every thread's socket too
            assert server.http("GET", "/healthz")[0] == 200
        server.signal(signal.SIGTERM)
        for ws in clients:
            assert (await expect_close(ws)).code == 1012
    assert await asyncio.to_thread(server.wait, 10) == 0, server.logs()


@pytest.mark.parametrize("scheduler", ["work-stealing", "thread-per-core"])
def test_requests_in_progress_at_a_stop_are_answered_on_every_thread(start_server, scheduler):
    """The drain waited for the HTTP requests of the main thread's socket
    only: with thread-per-core, the requests in progress on the other
    threads' sockets were cut as soon as the main thread's were done. Twelve
    half-sent requests land on the four threads' sockets as the kernel
    spreads them; each is finished after the SIGTERM, one after another, and
    must be answered. (Which socket takes which is the kernel's choice: the
    old code passed a round only when the last request landed on the main
    thread's socket, one time in four, so three rounds.)"""
    body = json.dumps({"targets": ["nobody"], "payload": 1}).encode()
    head = (f"POST /api/v1/send HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    for _ in range(3):
        server = start_server("--workers", "4", "--scheduler", scheduler, "--shutdown-drain-secs", "10")
        pending = []
        for _ in range(12):
            s = socket.create_connection((server.host, server.port), timeout=10)
            # A first request answered: the server has taken the connection
            # (one still in the kernel's queue at the stop is never served).
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.sendall(head + body[:3])
            pending.append(s)
        time.sleep(0.1)
        server.signal(signal.SIGTERM)
        answered = []
        for s in pending:
            time.sleep(0.05)
            with s:
                s.sendall(body[3:])
                answered.append(s.recv(100)[:12])
        assert answered == [b"HTTP/1.1 200"] * 12, answered
        assert server.wait(15) == 0, server.logs()


async def workers_logged(server):
    """The worker count of the startup log line (`... workers=N`), which follows
    the `listening on` line that Server waits for."""
    for _ in range(50):
        found = re.search(r"switchboard listening.* workers=(\d+)", server.logs())
        if found:
            return int(found.group(1))
        await asyncio.sleep(0.1)
    pytest.fail(f"no startup line with workers=N in 5 s:\n{server.logs()}")


@async_test
async def test_the_default_worker_count_follows_the_cpus_the_server_may_use(start_server):
    """workers = 0 (the default) is one per CPU in the process's affinity, so a server
    pinned to one CPU (as bench/run.sh pins it) runs one worker, and relays."""
    available = os.sched_getaffinity(0)
    one = {min(available)}
    assert await workers_logged(start_server()) == len(available)
    pinned = start_server(cpus=one)
    assert await workers_logged(pinned) == 1
    assert await workers_logged(start_server("--workers", "3", cpus=one)) == 3
    async with client(pinned, "a") as a, client(pinned, "b") as b:
        await a.send(msg(["b"], "pinned"))
        assert await recv(b) == '"pinned"'


@async_test
async def test_sighup_without_tls_leaves_the_server_and_its_clients_alone(server):
    """A reload signal (log rotation, a service manager's reload) must not
    kill the process, as SIGHUP's default action would."""
    async with client(server, "a") as a:
        server.signal(signal.SIGHUP)
        await asyncio.sleep(0.3)
        assert all(node.proc.poll() is None for node in server.nodes), server.logs()
        await a.send(msg(["a"], "still here"))
        assert await recv(a) == '"still here"'
    assert server.http("GET", "/healthz")[0] == 200


@async_test
async def test_sigterm_closes_clients_1012_and_exits_0(server):
    async with client(server, "a") as a, client(server, "b", envelope=True) as b, client(server, "b") as b2:
        await a.send(msg(["a", "b"], "ready"))
        assert await recv(a) == '"ready"'
        assert (await recv_json(b))["payload"] == "ready"
        assert await recv(b2) == '"ready"'
        server.signal(signal.SIGTERM)
        for ws in (a, b, b2):
            rcvd = await expect_close(ws)
            # Service restart: clients are to come back and resume.
            assert (rcvd.code, rcvd.reason) == (1012, "server restarting"), rcvd
    code = await asyncio.to_thread(server.wait, 10)
    assert code == 0, server.logs()
    # The port no longer accepts connections.
    with pytest.raises(OSError):
        server.http("GET", "/healthz")
