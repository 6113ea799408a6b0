"""TLS (docs/operations.md, "TLS"): --tls-cert and --tls-key serve wss:// and https://
on the client and API listeners, and SIGHUP swaps the certificate for new connections
while the live ones go on. Each test makes its own CAs (trustme) and trusts only them."""

import asyncio
import datetime
import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest
import trustme
from websockets.asyncio.client import connect

from test_relay import (  # noqa: F401 (start_server is a fixture)
    BIN,
    RECV_TIMEOUT,
    async_test,
    recv,
    single_node,
    start_server,
)

KEY = "tls-test-api-key"


class Pki:
    """A CA of the test's own and a server certificate it signed for 127.0.0.1, as files."""

    def __init__(self, directory, name):
        self.ca = trustme.CA(organization_name=f"switchboard test CA {name}")
        self.leaf = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert = directory / f"{name}-cert.pem"
        self.key = directory / f"{name}-key.pem"
        self.leaf.cert_chain_pems[0].write_to_path(str(self.cert))
        self.leaf.private_key_pem.write_to_path(str(self.key))

    def context(self):
        """A client context that trusts this CA only."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies, and trusts nothing yet
        self.ca.configure_trust(context)
        return context

    def leaf_der(self):
        return ssl.PEM_cert_to_DER_cert(self.leaf.cert_chain_pems[0].bytes().decode())


@pytest.fixture
def pki(tmp_path):
    return lambda name: Pki(tmp_path, name)


def start_tls(start_server, first, *args):
    return start_server("--tls-cert", str(first.cert), "--tls-key", str(first.key), "--api-key", KEY, *args)


def wss(server, client_id):
    return f"wss://127.0.0.1:{server.port}/ws?id={client_id}"


def wss_client(server, client_id, context):
    return connect(wss(server, client_id), ssl=context, open_timeout=5, close_timeout=2, ping_interval=None, proxy=None)


async def registered(ws):
    """Waits until the server runs the connection (and so knows its id)."""
    await asyncio.wait_for(await ws.ping(), RECV_TIMEOUT)
    return ws


def https(server, path, context, body=None):
    request = urllib.request.Request(
        f"https://127.0.0.1:{server.port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=RECV_TIMEOUT, context=context) as response:
        return response.status, response.read().decode()


def served_certificate(server, context):
    """The DER certificate a new TLS connection is answered with."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=RECV_TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def metric(text, name):
    found = re.search(rf"^{re.escape(name)} (\d+)$", text, re.M)
    return int(found.group(1)) if found else 0


@single_node
@pytest.mark.parametrize("scheduler", ["work-stealing", "thread-per-core"])
@async_test
async def test_clients_relay_over_wss_and_backends_push_over_https(start_server, pki, scheduler):
    first = pki("first")
    server = start_tls(start_server, first, "--workers", "2", "--scheduler", scheduler)
    context = first.context()
    # As a browser may: offer HTTP/2 first. The server picks HTTP/1.1, the
    # only protocol it serves (a WebSocket over HTTP/2 is another handshake).
    context.set_alpn_protocols(["h2", "http/1.1"])
    async with wss_client(server, "ann", context) as ann, wss_client(server, "bob", context) as bob:
        await registered(ann)
        await registered(bob)
        # bob is idle while ann's message reaches him: under TLS it goes
        # through his connection's task (no direct write), and arrives all the same.
        await ann.send(json.dumps({"targets": ["bob"], "payload": {"n": 1}}))
        assert json.loads(await recv(bob)) == {"n": 1}
        status, _ = await asyncio.to_thread(https, server, "/api/v1/send", context, {"targets": ["ann"], "payload": "hi"})
        assert status == 200
        assert json.loads(await recv(ann)) == "hi"
        assert bob.transport.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    status, text = await asyncio.to_thread(https, server, "/metrics", context)
    assert status == 200 and metric(text, "switchboard_connections_opened_total") == 2
    # A client that speaks HTTP/2 only is refused in the TLS handshake.
    h2_only = first.context()
    h2_only.set_alpn_protocols(["h2"])
    with pytest.raises(ssl.SSLError, match="(?i)no.application.protocol"):
        await asyncio.to_thread(served_certificate, server, h2_only)


@single_node
@async_test
async def test_a_separate_api_listener_speaks_tls_too(start_server, pki):
    first = pki("first")
    api_port = free_port()
    server = start_tls(start_server, first, "--api-listen", f"127.0.0.1:{api_port}")
    context = first.context()

    class Api:
        port = api_port

    async with wss_client(server, "ann", context) as ann:
        await registered(ann)
        status, _ = await asyncio.to_thread(https, Api, "/api/v1/send", context, {"targets": ["ann"], "payload": 7})
        assert status == 200
        assert json.loads(await recv(ann)) == 7
    with pytest.raises(NOT_HTTP):
        await asyncio.to_thread(plain_http, api_port)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a plain-HTTP request to a TLS listener gets: a TLS alert (not an HTTP
# status line), or the connection closed.
NOT_HTTP = (OSError, http.client.HTTPException)


def plain_http(port):
    """A plain-HTTP request, which a TLS listener refuses."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=RECV_TIMEOUT) as response:
        return response.status


@single_node
@async_test
async def test_clients_that_do_not_speak_tls_or_stall_in_the_handshake_harm_no_one(start_server, pki):
    first = pki("first")
    server = start_tls(start_server, first)
    context = first.context()
    # Ten sockets that never start a handshake, and a plain HTTP request.
    stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10)]
    try:
        with pytest.raises(NOT_HTTP):
            await asyncio.to_thread(plain_http, server.port)
        async with wss_client(server, "ann", context) as ann:
            await registered(ann)
            await ann.send(json.dumps({"targets": ["ann"], "payload": 1}))
            assert json.loads(await recv(ann)) == 1
    finally:
        for s in stalled:
            s.close()
    assert server.proc.poll() is None


@single_node
def test_a_socket_that_never_finishes_its_tls_handshake_is_dropped_after_10_seconds(start_server, pki):
    server = start_tls(start_server, pki("first"))
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as stalled:
        started = time.monotonic()
        assert stalled.recv(1) == b"", "the server closes it without a word"
        waited = time.monotonic() - started
    assert 9.5 < waited < 12, waited


@single_node
@async_test
async def test_sighup_swaps_the_certificate_for_new_connections_and_keeps_live_ones(start_server, pki):
    first, second = pki("first"), pki("second")
    server = start_tls(start_server, first)
    old, new = first.context(), second.context()
    async with wss_client(server, "ann", old) as ann:
        await registered(ann)
        # The same files, now holding a certificate from another CA.
        os.replace(second.cert, first.cert)
        os.replace(second.key, first.key)
        server.signal(signal.SIGHUP)
        await wait_for(lambda: served_certificate_or_none(server, new) == second.leaf_der())
        # New connections get the new certificate: a client that trusts only
        # the old CA is refused, one that trusts the new one connects.
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(served_certificate, server, old)
        async with wss_client(server, "bob", new) as bob:
            await registered(bob)
            # ann's connection, made under the old certificate, goes on both ways.
            await bob.send(json.dumps({"targets": ["ann"], "payload": "after"}))
            assert json.loads(await recv(ann)) == "after"
            await ann.send(json.dumps({"targets": ["bob"], "payload": "still here"}))
            assert json.loads(await recv(bob)) == "still here"
        _, text = await asyncio.to_thread(https, server, "/metrics", new)
        assert metric(text, 'switchboard_tls_reloads_total{result="ok"}') == 1

        # A reload that fails (a key that is not PEM) keeps the last good certificate.
        first.key.write_text("not a key\n")
        server.signal(signal.SIGHUP)
        await wait_for(lambda: "TLS certificate not reloaded" in server.logs())
        assert await asyncio.to_thread(served_certificate, server, new) == second.leaf_der()
        _, text = await asyncio.to_thread(https, server, "/metrics", new)
        assert metric(text, 'switchboard_tls_reloads_total{result="error"}') == 1
        await ann.send(json.dumps({"targets": ["ann"], "payload": "last"}))
        assert json.loads(await recv(ann)) == "last"


def served_certificate_or_none(server, context):
    try:
        return served_certificate(server, context)
    except ssl.SSLError:
        return None


async def wait_for(condition, timeout=RECV_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (lambda p: ["--tls-cert", str(p.cert)], "give tls_cert and tls_key together"),
        (lambda p: ["--tls-key", str(p.key)], "give tls_cert and tls_key together"),
        (lambda p: ["--tls-cert", str(p.cert), "--tls-key", str(p.other_key)], "does not fit tls_cert"),
        (lambda p: ["--tls-cert", str(p.key), "--tls-key", str(p.key)], "holds no PEM certificate"),
        (lambda p: ["--tls-cert", "/nonexistent.pem", "--tls-key", str(p.key)], "reading tls_cert /nonexistent.pem"),
        # Each said "does not fit": a key of a kind rustls cannot sign with, an
        # encrypted key, and a certificate that is not one.
        (lambda p: ["--tls-cert", str(p.p521_cert), "--tls-key", str(p.p521_key)], "a key this server cannot use"),
        (lambda p: ["--tls-cert", str(p.cert), "--tls-key", str(p.encrypted_key)], "not encrypted"),
        (lambda p: ["--tls-cert", str(p.garbled_cert), "--tls-key", str(p.key)], "cannot be read"),
    ],
)
def test_certificate_files_that_cannot_serve_stop_the_start_with_a_clear_error(pki, tmp_path, flags, expected):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    first, other = pki("first"), pki("other")
    first.other_key = other.key
    p521 = ec.generate_private_key(ec.SECP521R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "p521")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(p521.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(p521, hashes.SHA256()))
    first.p521_cert, first.p521_key = tmp_path / "p521-cert.pem", tmp_path / "p521-key.pem"
    first.p521_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    plain = serialization.NoEncryption()
    first.p521_key.write_bytes(p521.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, plain))
    key = serialization.load_pem_private_key(first.key.read_bytes(), None)
    first.encrypted_key = tmp_path / "encrypted-key.pem"
    first.encrypted_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.BestAvailableEncryption(b"secret")))
    first.garbled_cert = tmp_path / "garbled-cert.pem"
    first.garbled_cert.write_text("-----BEGIN CERTIFICATE-----\nAAAAAAAA\n-----END CERTIFICATE-----\n")
    run = subprocess.run(
        [BIN, "serve", "--listen", "127.0.0.1:0", "--persist", "false", *flags(first)],
        capture_output=True,
        timeout=10,
        text=True,
    )
    assert run.returncode == 2, run
    assert expected in run.stderr, run.stderr


def masked_text(payload: bytes):
    """A masked text frame, as a client sends it."""
    mask = os.urandom(4)
    n = len(payload)
    assert 126 <= n < 65536
    head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


@single_node
def test_a_wss_client_that_stopped_reading_is_let_go_at_the_close_timeout(start_server, pki):
    """Over TLS the encrypted bytes rustls still holds for a full socket kept
    the writer from ever counting as flushed: once the close handshake's time
    (5 s) was up, the connection neither ended nor slept, its task spinning on
    a deadline already past, and the client stayed online for good. Now it
    ends there, as over plain TCP."""
    first = pki("first")
    server = start_tls(
        start_server,
        first,
        *("--max-outbound-bytes", "65536", "--max-message-size", "32768"),
        *("--rate-limit-bytes-per-sec", "0", "--rate-limit-messages-per-sec", "0"),
        *("--slow-consumer-timeout-secs", "1", "--hibernate-after-secs", "0"),
    )
    context = first.context()
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.connect(("127.0.0.1", server.port))
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(
            f"GET /ws?id=reader HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += tls.recv(1)
        assert answer.startswith(b"HTTP/1.1 101"), answer
        # Each one is answered with an error of 30 KB, which it never reads.
        unknown = masked_text(json.dumps({"type": "teleport", "id": "x" * 30_000}).encode())
        tls.settimeout(0.5)
        flooding = time.monotonic() + 10
        while time.monotonic() < flooding:
            try:
                tls.sendall(unknown)
            except (ssl.SSLWantWriteError, OSError):  # a timeout: the server stopped reading
                break
        else:
            pytest.fail("the server kept reading from a client that does not read")

        def connections():
            status, body = https(server, "/api/v1/clients/reader", context)
            assert status == 200, body
            return json.loads(body)["connections"]

        assert connections() == 1
        # The slow consumer's time (1 s), then the close handshake's (5 s).
        deadline = time.monotonic() + 15
        while connections() and time.monotonic() < deadline:
            time.sleep(0.25)
        assert connections() == 0, "still online 15 s after it was closed as a slow consumer"
