"""Floods from a client that never reads: the server's memory stays bounded.

A raw-socket client (Python `socket`, hand-built handshake and masked frames)
sends 400 MiB of pings, or of text messages, to the echo example and to the
relay, and never reads what the server sends back. Meanwhile:

- a thread samples the server's RSS (/proc/PID/status VmRSS); the largest
  sample may exceed the one taken before the flood by less than 32 MiB;
- a second, well-behaved client (websockets, sync API, in a thread) makes a
  round trip every 100 ms for the whole flood; each must complete within 2 s.

The server either keeps reading (pings: while a pong is stuck unwritten it
answers only the latest ping, so a ping flood queues at most one read's worth
of pongs) or, once more than
max_outbound_bytes waits to be written, stops reading, and TCP's backpressure
stalls the flooder's sends. Sends use a 0.5 s timeout and are retried until the
whole flood is sent, FLOOD_SECS pass or the connection is closed; the bytes
actually sent are printed (pytest -s) with the RSS and CPU figures.

The relay counts pings against its rate limit: the flood tests turn the
limits off so that backpressure is what bounds memory, and one test with the
defaults checks that a ping flood is closed with 1008. Where a close code is
checked or printed, the flooder reads its socket after the flood, never during.
A last relay test, beyond the issue's cases, floods with messages whose
envelope acks pile up: reading pauses, and the slow-consumer timeout closes.

Binaries: SWITCHBOARD_BIN (default target/debug/switchboard) and
SWITCHBOARD_EXAMPLES (default target/debug/examples, for `echo`).
"""

import base64
import hashlib
import json
import os
import pathlib
import re
import selectors
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time

import pytest
from websockets.sync.client import connect

ROOT = pathlib.Path(__file__).resolve().parents[2]
BIN = os.environ.get("SWITCHBOARD_BIN", str(ROOT / "target" / "debug" / "switchboard"))
EXAMPLES = pathlib.Path(os.environ.get("SWITCHBOARD_EXAMPLES", ROOT / "target" / "debug" / "examples"))

MiB = 1 << 20
FLOOD_BYTES = 400 * MiB
FLOOD_SECS = 20.0  # wall-clock bound on each flood
SEND_TIMEOUT = 0.5  # one send call; a stalled send is retried until FLOOD_SECS
CHUNK_BYTES = 1 * MiB  # one pre-built buffer of masked frames, sent over and over
RSS_GROWTH_LIMIT = 32 * MiB
ROUND_TRIP_EVERY = 0.1
ROUND_TRIP_LIMIT = 2.0
SETTLE_SECS = 0.5  # after the flood, keep sampling while the server reads what is left
RELAY_NO_LIMITS = ("--rate-limit-messages-per-sec", "0", "--rate-limit-bytes-per-sec", "0")

OP_TEXT, OP_CLOSE, OP_PING = 0x1, 0x8, 0x9
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# The server under test
# --------------------------------------------------------------------------


class Server:
    """A server process started on port 0; its first stdout line names the port."""

    def __init__(self, argv, **popen):
        if not os.access(argv[0], os.X_OK):
            pytest.fail(f"binary not found at {argv[0]} (set SWITCHBOARD_BIN / SWITCHBOARD_EXAMPLES)")
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr, **popen
        )
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        ready = sel.select(15)
        sel.close()
        line = self.proc.stdout.readline().decode().rstrip("\n") if ready else ""
        match = re.match(r"listening on (\S+):(\d+)$", line)
        if not match:
            self.stop()
            pytest.fail(f"unexpected first stdout line {line!r}; stderr:\n{self.logs()}")
        self.host, self.port = match.group(1), int(match.group(2))
        self.pid = self.proc.pid

    def logs(self):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-4000:]

    def rss(self):
        """Resident set size in bytes (VmRSS)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def cpu_seconds(self):
        """utime + stime, all threads."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # fields[0] is field 3 (state): utime and stime are fields 14 and 15.
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=5)
        self.proc.stdout.close()
        self.stderr.close()


@pytest.fixture
def start_server():
    """start_server(argv) starts a server; all are killed at the end."""
    servers = []

    def start(argv):
        s = Server([str(a) for a in argv])
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def echo(start_server):
    return start_server([EXAMPLES / "echo", "127.0.0.1:0"])


def relay(start_server, *flags):
    return start_server([BIN, "serve", "--listen", "127.0.0.1:0", "--persist", "false", *flags])


# --------------------------------------------------------------------------
# The flooder: a raw socket that never reads after the handshake
# --------------------------------------------------------------------------


def mask_frame(opcode, payload):
    """One final, masked client frame with a fresh random mask."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    stream = (key * (n // 4 + 1))[:n]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")
    return head + key + masked


def frames_chunk(opcode, payload, size=CHUNK_BYTES):
    """As many whole frames of `payload` as fit in `size` bytes, each with its
    own mask: a buffer sent over and over."""
    frame_len = len(mask_frame(opcode, payload))
    return b"".join(mask_frame(opcode, payload) for _ in range(size // frame_len))


def handshake(sock, host, port, path, extra_headers=()):
    """Sends a WebSocket upgrade request on `sock` and reads the response head
    (bounded by the socket's timeout). Returns (status, headers with lower-case
    names, the bytes read past the head); on 101 the accept key is checked."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        + "".join(f"{h}\r\n" for h in extra_headers)
        + "\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        data = sock.recv(4096)
        assert data, f"connection closed during the handshake: {head!r}"
        head += data
    head, unread = head.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
    if status == 101:
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        assert headers.get("sec-websocket-accept") == accept.decode(), lines
    return status, headers, unread


def split_frame(buf):
    """Takes the first whole server frame off `buf` (a bytearray) and returns
    (fin, rsv1, opcode, payload); None while the frame is not whole yet."""
    if len(buf) < 2:
        return None
    assert not buf[1] & 0x80, "server frames must not be masked"
    n, at = buf[1] & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, at = struct.unpack("!H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, at = struct.unpack("!Q", buf[2:10])[0], 10
    if len(buf) < at + n:
        return None
    b0, payload = buf[0], bytes(buf[at : at + n])
    del buf[: at + n]
    return bool(b0 & 0x80), bool(b0 & 0x40), b0 & 0x0F, payload


class Flooder:
    def __init__(self, host, port, path, extra_headers=()):
        self.sock = socket.create_connection((host, port), timeout=5)
        status, self.headers, self.unread = handshake(self.sock, host, port, path, extra_headers)
        assert status == 101, (status, self.headers)

    def flood(self, chunk, total=FLOOD_BYTES, seconds=FLOOD_SECS):
        """Sends `chunk` over and over without ever reading, until `total` bytes
        (rounded up to whole chunks) went out, `seconds` passed or the connection
        was closed. Returns a dict of what happened."""
        total = -(-total // len(chunk)) * len(chunk)
        self.sock.settimeout(SEND_TIMEOUT)
        view = memoryview(chunk)
        sent = offset = stalls = 0
        stalled_secs = 0.0
        started = time.monotonic()
        deadline = started + seconds
        outcome = "sent all"
        while sent < total:
            if time.monotonic() >= deadline:
                outcome = "time bound"
                break
            before = time.monotonic()
            try:
                n = self.sock.send(view[offset : offset + min(len(chunk) - offset, total - sent)])
            except socket.timeout:
                stalls += 1
                stalled_secs += time.monotonic() - before
                continue
            except OSError as e:  # reset, broken pipe: the server closed the connection
                outcome = f"closed by server ({type(e).__name__})"
                break
            sent += n
            offset = (offset + n) % len(chunk)
        return {
            "sent": sent,
            "secs": time.monotonic() - started,
            "outcome": outcome,
            "stalls": stalls,
            "stalled_secs": stalled_secs,
        }

    def read_close_code(self, timeout=5.0, max_bytes=64 * MiB):
        """Reads frames (now, after the flood) until the server's close frame;
        returns its code, or None if none came within `timeout` / `max_bytes`."""
        self.sock.settimeout(timeout)
        buf = bytearray(self.unread)
        read = 0
        deadline = time.monotonic() + timeout
        while read < max_bytes and time.monotonic() < deadline:
            while (frame := split_frame(buf)) is not None:
                _, _, opcode, payload = frame
                if opcode == OP_CLOSE:
                    assert len(payload) >= 2, f"close frame without a code: {payload!r}"
                    return struct.unpack("!H", payload[:2])[0]
            try:
                data = self.sock.recv(1 << 16)
            except (socket.timeout, OSError):
                return None
            if not data:
                return None
            read += len(data)
            buf += data
        return None

    def close(self):
        self.sock.close()


# --------------------------------------------------------------------------
# Watching the server, and the well-behaved client
# --------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples the server's RSS every 10 ms until stopped; keeps the largest."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.max, self.samples = server, 0, 0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                self.max = max(self.max, self.server.rss())
                self.samples += 1
            except (OSError, AssertionError):
                return
            self.halt.wait(0.01)

    def stop(self):
        self.halt.set()
        self.join(5)


class GoodClient(threading.Thread):
    """Connects with `websockets`, then makes a round trip every 100 ms until
    stopped: sends make_message(i), waits for expected(i). Records latencies."""

    def __init__(self, url, make_message, expected):
        super().__init__(daemon=True)
        self.make_message, self.expected = make_message, expected
        self.latencies, self.error = [], None
        self.halt = threading.Event()
        self.ws = connect(
            url, open_timeout=5, close_timeout=2, ping_interval=None, proxy=None, compression=None, legacy=True
        )
        # The pong comes from the connection's task, once it runs (and, in the
        # relay, once the id is registered).
        assert self.ws.ping().wait(5), "no pong to the good client's first ping"

    def run(self):
        i = 0
        try:
            while not self.halt.is_set() and i < 100_000:
                started = time.monotonic()
                self.ws.send(self.make_message(i))
                got = self.ws.recv(timeout=ROUND_TRIP_LIMIT)
                latency = time.monotonic() - started
                assert got == self.expected(i), (got, self.expected(i))
                self.latencies.append(latency)
                i += 1
                self.halt.wait(max(0.0, ROUND_TRIP_EVERY - latency))
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(ROUND_TRIP_LIMIT + 3)
        self.ws.close()


def echo_good_client(server):
    return GoodClient(f"ws://{server.host}:{server.port}/", lambda i: f"hello {i}", lambda i: f"hello {i}")


def relay_good_client(server, me="good"):
    # The relay passes the payload on byte for byte: the delivery is its text.
    return GoodClient(
        f"ws://{server.host}:{server.port}/ws?id={me}",
        lambda i: json.dumps({"targets": [me], "payload": {"n": i, "from": me}}),
        lambda i: json.dumps({"n": i, "from": me}),
    )


def ping_chunk():
    return frames_chunk(OP_PING, b"p" * 125)


def text_chunk(text):
    return frames_chunk(OP_TEXT, text)


def relay_text(target, size=16 * 1024):
    prefix, suffix = '{"targets":["' + target + '"],"payload":"', '"}'
    return (prefix + "x" * (size - len(prefix) - len(suffix)) + suffix).encode()


# --------------------------------------------------------------------------
# The scenario
# --------------------------------------------------------------------------


def run_flood(name, server, flooder, good, chunk, read_close=False):
    """Floods with `chunk` while sampling RSS and running the good client;
    prints the figures and checks the good client was served throughout.
    Returns (figures, close code or None)."""
    time.sleep(0.2)  # let the server settle after the connections
    rss_before = server.rss()
    cpu_before = server.cpu_seconds()
    sampler = RssSampler(server)
    sampler.max = rss_before
    sampler.start()
    good.start()
    try:
        result = flooder.flood(chunk)
        time.sleep(SETTLE_SECS)
    finally:
        good.stop()
        sampler.stop()
    cpu = server.cpu_seconds() - cpu_before
    code = flooder.read_close_code() if read_close else None
    flooder.close()
    lat = good.latencies
    figures = {
        **result,
        "rss_before": rss_before,
        "rss_max": sampler.max,
        "growth": sampler.max - rss_before,
        "cpu": cpu,
        "round_trips": len(lat),
        "max_latency": max(lat) if lat else None,
    }
    mb = 1e6
    print(
        f"\n[{name}] sent {result['sent'] / mb:.1f} MB ({result['sent'] / MiB:.1f} MiB) in {result['secs']:.1f} s"
        f" = {result['sent'] / mb / max(result['secs'], 1e-9):.1f} MB/s; {result['outcome']};"
        f" {result['stalls']} send timeouts ({result['stalled_secs']:.1f} s stalled)\n"
        f"[{name}] server RSS before {rss_before / MiB:.1f} MiB, max {sampler.max / MiB:.1f} MiB,"
        f" growth {figures['growth'] / MiB:.1f} MiB ({sampler.samples} samples);"
        f" server CPU {cpu:.2f} s ({cpu / max(result['secs'], 1e-9) * 100:.0f}% of the flood's wall time)\n"
        f"[{name}] good client: {len(lat)} round trips, max {figures['max_latency'] or 0:.3f} s,"
        f" mean {sum(lat) / max(len(lat), 1):.3f} s"
        + (f"; flooder's close code: {code}" if read_close else "")
    )
    assert good.error is None, f"good client failed: {good.error!r}; server stderr:\n{server.logs()}"
    # At least half the round trips the flood's duration allows, and a few.
    want = max(5, int(result["secs"] / ROUND_TRIP_EVERY * 0.5))
    assert len(lat) >= want, f"only {len(lat)} round trips in {result['secs']:.1f} s (want {want})"
    assert max(lat) < ROUND_TRIP_LIMIT, max(lat)
    return figures, code


def assert_rss_bounded(figures):
    assert figures["growth"] < RSS_GROWTH_LIMIT, (
        f"server RSS grew by {figures['growth'] / MiB:.1f} MiB during the flood"
        f" ({figures['rss_before'] / MiB:.1f} -> {figures['rss_max'] / MiB:.1f} MiB)"
    )


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_echo_ping_flood(echo):
    good = echo_good_client(echo)
    flooder = Flooder(echo.host, echo.port, "/")
    figures, _ = run_flood("echo, pings", echo, flooder, good, ping_chunk())
    assert_rss_bounded(figures)
    # The server kept reading: the pings went through, not just a socket buffer's worth.
    assert figures["sent"] >= 64 * MiB, figures


def test_echo_text_flood(echo):
    good = echo_good_client(echo)
    flooder = Flooder(echo.host, echo.port, "/")
    figures, _ = run_flood("echo, text", echo, flooder, good, text_chunk(b"t" * (16 * 1024 - 8)))
    assert_rss_bounded(figures)


def test_relay_ping_flood_without_rate_limits(start_server):
    server = relay(start_server, *RELAY_NO_LIMITS)
    good = relay_good_client(server)
    flooder = Flooder(server.host, server.port, "/ws?id=flooder")
    figures, _ = run_flood("relay, pings, no rate limits", server, flooder, good, ping_chunk())
    assert_rss_bounded(figures)
    assert figures["sent"] >= 64 * MiB, figures


def test_relay_text_flood_to_self_without_rate_limits(start_server):
    server = relay(start_server, *RELAY_NO_LIMITS)
    good = relay_good_client(server)
    flooder = Flooder(server.host, server.port, "/ws?id=flooder")
    figures, code = run_flood(
        "relay, text to itself, no rate limits",
        server,
        flooder,
        good,
        text_chunk(relay_text("flooder")),
        read_close=True,
    )
    assert_rss_bounded(figures)


def test_relay_ping_flood_with_default_limits_is_closed_1008(start_server):
    server = relay(start_server)
    good = relay_good_client(server)
    flooder = Flooder(server.host, server.port, "/ws?id=flooder")
    figures, code = run_flood(
        "relay, pings, default limits", server, flooder, good, ping_chunk(), read_close=True
    )
    assert code == 1008, f"close code {code}; server stderr:\n{server.logs()}"
    assert_rss_bounded(figures)


def test_relay_acks_to_a_flooder_pause_reading_then_slow_consumer_close(start_server):
    """Not one of the issue's cases: where the relay's own replies (envelope acks)
    pile up for a client that never reads, reading pauses over max_outbound_bytes
    (the flooder's sends stall) and after --slow-consumer-timeout-secs the
    connection is closed; the close frame waits behind the unread acks, so the
    flooder sees the connection reset rather than a 1013."""
    server = relay(start_server, *RELAY_NO_LIMITS, "--slow-consumer-timeout-secs", "3")
    good = relay_good_client(server)
    flooder = Flooder(
        server.host, server.port, "/ws?id=flooder", ["Sec-WebSocket-Protocol: switchboard.v1"]
    )
    assert flooder.headers.get("sec-websocket-protocol") == "switchboard.v1", flooder.headers
    # Each message (~50 bytes) is acked ({"type":"ack","id":1,"delivered":[],"offline":["nobody"]}).
    message = b'{"targets":["nobody"],"payload":0,"id":1}'
    figures, _ = run_flood("relay, envelope acks, slow-consumer timeout 3 s", server, flooder, good,
                           frames_chunk(OP_TEXT, message))
    assert_rss_bounded(figures)
    assert figures["stalls"] > 0, figures
    # Closed after the 3 s timeout plus the 5 s close timeout, well within the time bound.
    assert figures["outcome"].startswith("closed by server"), figures
    assert figures["secs"] < FLOOD_SECS - 5, figures
