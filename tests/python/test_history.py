"""Inboxes and resuming (docs/protocol.md, "Inboxes, offsets and resuming"),
with a client that is not written in Rust (Python `websockets`).

A connects and gets a welcome, receives messages, disconnects. B sends A
messages over the WebSocket and over the HTTP API while A is away. A
reconnects with `?since=EPOCH:OFFSET` and gets exactly those, in order, then
live ones. Positions that cannot be recovered are said so; bad `since` values
are refused before the upgrade.
"""

import asyncio
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from test_amplification import OP_TEXT, frame
from test_relay import (  # noqa: F401 (server and start_server are fixtures)
    BIN,
    CLUSTER,
    RECV_TIMEOUT,
    async_test,
    client,
    msg,
    nothing_before_marker,
    recv,
    recv_json,
    server,
    start_server,
)


def api_post(server, path, body, key=None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Idempotency-Key"] = key
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}", data=json.dumps(body).encode(), headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=RECV_TIMEOUT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def api_send(server, targets, payload):
    status, body = api_post(server, "/api/v1/send", {"targets": targets, "payload": payload})
    assert status == 200, body
    return body


async def gone(server, client_id):
    """Waits until `client_id` counts as offline: at once on one node; in a
    cluster, once its node has told Redis (a round trip after the close)."""
    for _ in range(100):
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/v1/clients/{client_id}", timeout=5) as r:
            if not json.load(r)["online"]:
                return
        await asyncio.sleep(0.02)
    pytest.fail(f"{client_id} still counts as online")


def resume_url(server, client_id, epoch, offset):
    return f"{server.ws_url(client_id)}&since={epoch}:{offset}"


async def positions(ws, count):
    """The next `count` deliveries to `ws`: (offset, payload) each, one epoch."""
    got = [await recv_json(ws) for _ in range(count)]
    assert all(m["type"] == "message" and m["epoch"] == ws.welcome["epoch"] for m in got), got
    return [(m["offset"], m["payload"]) for m in got]


@async_test
async def test_a_client_away_gets_exactly_what_it_missed_then_live_messages(server):
    async with client(server, "b", envelope=True) as b:
        async with client(server, "a", envelope=True) as a:
            assert a.welcome == {"type": "welcome", "client": "a", "offset": 0, "epoch": a.welcome["epoch"]}
            for i in range(10):
                await b.send(msg(["a"], {"n": i}))
            assert await positions(a, 10) == [(i + 1, {"n": i}) for i in range(10)]
            epoch = a.welcome["epoch"]
        await gone(server, "a")
        # A is away: 50 over the WebSocket, 20 over HTTP.
        for i in range(10, 60):
            await b.send(msg(["a"], {"n": i}, id=i))
            ack = await recv_json(b)
            assert ack["offline"] == ["a"] and ack["offsets"] == {"a": i + 1}, ack
        for i in range(60, 80):
            result = await asyncio.to_thread(api_send, server, ["a"], {"n": i})
            assert result == {"delivered": [], "offline": ["a"], "offsets": {"a": i + 1}}, result

        async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, 10)) as a:
            assert a.welcome == {
                "type": "welcome",
                "client": "a",
                "recovered": True,
                "missed": 70,
                "offset": 80,
                "epoch": epoch,
            }
            missed = await positions(a, 70)
            assert missed == [(i + 1, {"n": i}) for i in range(10, 80)]
            await b.send(msg(["a"], "live"))
            assert await positions(a, 1) == [(81, "live")]
            # Nothing twice: the next message is a fresh marker.
            await nothing_before_marker(server, a, "a")


@async_test
async def test_resuming_at_the_latest_offset_misses_nothing(server):
    async with client(server, "a", envelope=True) as a:
        epoch, offset = a.welcome["epoch"], a.welcome["offset"]
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, offset)) as a:
        assert (a.welcome["recovered"], a.welcome["missed"], a.welcome["offset"]) == (True, 0, offset)


@async_test
async def test_a_position_that_cannot_be_recovered_is_said_so_and_nothing_is_replayed(start_server):
    server = start_server("--inbox-size", "5")
    async with client(server, "a", envelope=True) as a:
        epoch = a.welcome["epoch"]
    for i in range(8):
        await asyncio.to_thread(api_send, server, ["a"], i)
    # The inbox keeps 5: messages 4-8. From 3, all of them are there.
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, 3)) as a:
        assert (a.welcome["recovered"], a.welcome["missed"]) == (True, 5)
        assert [m[1] for m in await positions(a, 5)] == [3, 4, 5, 6, 7]
    # Messages 1-3 are gone: resuming from 0 or 2 cannot be whole. (Each marker
    # sent to prove that nothing was replayed takes an offset too.)
    for top, since in ((8, 0), (9, 2)):
        async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, since)) as a:
            assert a.welcome == {"type": "welcome", "client": "a", "recovered": False, "offset": top, "epoch": epoch}
            await nothing_before_marker(server, a, "a")
    # Another epoch: not recovered.
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", "zzzzzzzz", 3)) as a:
        assert a.welcome["recovered"] is False and a.welcome["epoch"] == epoch


@async_test
async def test_a_position_given_for_one_id_is_not_recovered_for_another(server):
    """Each inbox has its own epoch: a client that presents a position of
    another id (a token that switched users, a shared device) is told
    recovered:false, never handed that id's later messages as the ones it
    missed."""
    await asyncio.to_thread(api_send, server, ["a"], "for a")
    async with client(server, "a", envelope=True) as a:
        epoch, offset = a.welcome["epoch"], a.welcome["offset"]
    assert offset == 1
    for i in range(3):
        await asyncio.to_thread(api_send, server, ["b"], i)
    async with client(server, "b", envelope=True, uri=resume_url(server, "b", epoch, offset)) as b:
        assert b.welcome == {"type": "welcome", "client": "b", "recovered": False, "offset": 3, "epoch": b.welcome["epoch"]}
        assert b.welcome["epoch"] != epoch
        await nothing_before_marker(server, b, "b")
    # Nor in an inbox never written, from its start under a's epoch.
    async with client(server, "c", envelope=True, uri=resume_url(server, "c", epoch, 0)) as c:
        assert c.welcome["recovered"] is False and c.welcome["epoch"] != epoch, c.welcome


@pytest.mark.parametrize(
    "since,reason",
    [
        ("nonsense", "invalid since"),
        ("abc:", "invalid since"),
        (":5", "invalid since"),
        ("abc:-1", "invalid since"),
        ("abc:1.5", "invalid since"),
        ("ab$c:1", "invalid since"),
        ("abc:99999999999999999999999", "invalid since"),
        ("x" * 33 + ":1", "invalid since"),
    ],
)
@async_test
async def test_malformed_since_is_refused_with_400(server, since, reason):
    with pytest.raises(InvalidStatus) as refused:
        await connect(f"{server.ws_url('a')}&since={since}", subprotocols=["switchboard.v1"], proxy=None)
    assert refused.value.response.status_code == 400
    assert reason in refused.value.response.body.decode(), refused.value.response.body


@async_test
async def test_an_offset_from_the_future_is_not_recovered_and_since_on_a_raw_connection_is_refused(server):
    """An offset past the inbox's last under its epoch means the store lost
    what it had given (Redis losing its last writes, or history restored from
    an older copy): the client is told `recovered: false`, with the inbox's
    position. It used to be refused with 400, which a browser cannot read: a
    client resuming from there retried for ever."""
    async with client(server, "a", envelope=True) as a:
        epoch = a.welcome["epoch"]
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, 5)) as a:
        assert (a.welcome["recovered"], a.welcome["epoch"], a.welcome["offset"]) == (False, epoch, 0), a.welcome
    with pytest.raises(InvalidStatus) as raw:
        await connect(resume_url(server, "a", epoch, 0), proxy=None)
    assert raw.value.response.status_code == 400
    assert b"since needs the switchboard.v1 subprotocol" in raw.value.response.body
    # Nothing else was affected: the inbox still takes and gives messages.
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, 0)) as a:
        assert a.welcome["recovered"] is True


@async_test
async def test_two_senders_at_once_reach_a_client_in_offset_order(start_server):
    """Appends to one inbox from two connections (two server threads) go out in
    the order of their offsets: a client that resumes by offset never sees one
    pass another."""
    server = start_server("--rate-limit-messages-per-sec", "0")
    async with client(server, "a", envelope=True) as a, client(server, "s1") as s1, client(server, "s2") as s2:
        count = 300

        async def flood(ws, tag):
            for i in range(count):
                await ws.send(msg(["a"], [tag, i]))

        await asyncio.gather(flood(s1, "s1"), flood(s2, "s2"))
        got = await positions(a, 2 * count)
        assert [offset for offset, _ in got] == list(range(1, 2 * count + 1))
        for tag in ("s1", "s2"):
            assert [p[1] for _, p in got if p[0] == tag] == list(range(count)), tag


# --------------------------------------------------------------------------
# Restarts: a snapshot across a graceful one, honesty after a crash
# --------------------------------------------------------------------------


def stop_gracefully(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0, server.logs()


def crash(server):
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait(timeout=5)


@async_test
async def test_history_survives_a_graceful_restart_and_a_crash_is_said_so(start_server, tmp_path):
    """Graceful restart: clients are closed with 1012, resume on the new
    process with recovered:true and miss nothing. Then more traffic, then
    kill -9: the snapshot was used up by the start, so the epochs are new and
    resuming says recovered:false (never offsets reused under an old epoch)."""
    data = str(tmp_path / "data")
    server = start_server("--data-dir", data)
    # An inbox never written keeps its epoch across the graceful restart too.
    async with client(server, "idle", envelope=True) as idle:
        idle_epoch = idle.welcome["epoch"]
    async with client(server, "a", envelope=True) as a:
        epoch = a.welcome["epoch"]
        for i in range(5):
            await asyncio.to_thread(api_send, server, ["a"], i)
        assert [p for _, p in await positions(a, 5)] == list(range(5))
        stop_gracefully(server)
        closed = await a.wait_closed() or a.close_code
        assert (a.close_code, a.close_reason) == (1012, "server restarting"), closed
    snapshot = tmp_path / "data" / "streams.snapshot"
    assert snapshot.exists() and snapshot.stat().st_mode & 0o777 == 0o600, "readable by its user only"

    server = start_server("--data-dir", data)
    assert not (tmp_path / "data" / "streams.snapshot").exists(), "a snapshot is used once"
    for i in range(5, 8):
        await asyncio.to_thread(api_send, server, ["a"], i)
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, 5)) as a:
        assert a.welcome == {
            "type": "welcome",
            "client": "a",
            "recovered": True,
            "missed": 3,
            "offset": 8,
            "epoch": epoch,
        }
        assert await positions(a, 3) == [(6, 5), (7, 6), (8, 7)]
    async with client(server, "idle", envelope=True, uri=resume_url(server, "idle", idle_epoch, 0)) as idle:
        assert (idle.welcome["recovered"], idle.welcome["missed"]) == (True, 0), idle.welcome

    # More traffic, then a crash: no snapshot is written, and none is left.
    for i in range(8, 10):
        await asyncio.to_thread(api_send, server, ["a"], i)
    crash(server)
    server = start_server("--data-dir", data)
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, 8)) as a:
        assert a.welcome["recovered"] is False, a.welcome
        assert a.welcome["epoch"] != epoch and a.welcome["offset"] == 0, a.welcome


def run_binary(*args):
    return subprocess.run([BIN, "serve", "--listen", "127.0.0.1:0", *args], capture_output=True, timeout=20)


def test_a_corrupt_snapshot_stops_the_start_unless_told_to_start_fresh(start_server, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    snapshot = data / "streams.snapshot"
    snapshot.write_text('{"format":"switchboard-streams","version":1,"epoch":"abc"}\n{"kind":"inbox"')
    refused = run_binary("--data-dir", str(data))
    stderr = refused.stderr.decode()
    assert refused.returncode == 1, stderr
    assert b"listening" not in refused.stdout
    assert stderr.count("\n") == 1 and "is corrupt at line 2" in stderr and "--start-fresh" in stderr, stderr
    assert snapshot.exists(), "never discarded"

    server = start_server("--data-dir", str(data), "--start-fresh")
    assert not snapshot.exists()
    aside = [p.name for p in data.iterdir() if p.name.startswith("streams.snapshot.unreadable-")]
    assert len(aside) == 1, aside
    assert "could not be read" in server.logs()


async def one_message_kept(start_server, tmp_path, client_id, payload):
    """A server on `tmp_path/data` that delivers `payload` to `client_id` and
    stops gracefully: the data directory, and the inbox's epoch."""
    data = str(tmp_path / "data")
    server = start_server("--data-dir", data)
    async with client(server, client_id, envelope=True) as ws:
        epoch = ws.welcome["epoch"]
        await asyncio.to_thread(api_send, server, [client_id], payload)
        assert [p for _, p in await positions(ws, 1)] == [payload]
    stop_gracefully(server)
    return data, epoch


@pytest.mark.parametrize("path", ["/admin", "/metrics", "/client.js", "/admin/admin.js", "/e/:x"])
@async_test
async def test_a_start_refused_for_its_echo_path_keeps_the_snapshot(start_server, tmp_path, path):
    """An echo path another route holds stopped the start with a panic after
    binding, and the snapshot, used up by then, was lost. It is refused with
    the configuration errors now, and the next start restores the history."""
    data, epoch = await one_message_kept(start_server, tmp_path, "kept", "before")

    refused = run_binary("--data-dir", data, "--echo-path", path)
    stderr = refused.stderr.decode()
    assert refused.returncode == 2, stderr
    assert stderr.count("\n") == 1 and "echo_path" in stderr and "panicked" not in stderr, stderr
    assert (tmp_path / "data" / "streams.snapshot").exists(), "not used up by a start that failed"

    server = start_server("--data-dir", data)
    async with client(server, "kept", envelope=True, uri=resume_url(server, "kept", epoch, 0)) as kept:
        assert (kept.welcome["recovered"], kept.welcome["missed"]) == (True, 1), kept.welcome


STARTED = []


@pytest.fixture(autouse=True)
def _kill_what_started():
    """What `started` ran is killed after each test, passed or failed (a
    server that ignores SIGTERM must not outlive its test)."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def started(data, *args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL):
    """A persisting server on `data`, not through the fixture: these tests
    need its standard streams and its exit."""
    proc = subprocess.Popen([BIN, "serve", "--data-dir", data, *args], stdin=subprocess.DEVNULL,
                            stdout=stdout, stderr=stderr)
    STARTED.append(proc)
    return proc


def snapshot_with_history(tmp_path):
    """A data directory holding a snapshot with one message for "a"."""
    data = str(tmp_path / "data")
    proc = started(data, "--listen", "127.0.0.1:0")
    port = int(proc.stdout.readline().decode().rsplit(":", 1)[1])
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1/send", method="POST",
                                     data=json.dumps({"targets": ["a"], "payload": 1}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert (tmp_path / "data" / "streams.snapshot").exists()
    return data


def test_a_stop_signal_as_soon_as_it_listens_is_a_graceful_stop(tmp_path):
    """The stop signals' handlers were installed after the snapshot was used
    up and `listening on` printed: a SIGTERM then killed the process (the
    history gone) or was lost. Now they are installed first."""
    data = snapshot_with_history(tmp_path)
    for attempt in range(8):
        proc = started(data, "--listen", "127.0.0.1:0")
        assert proc.stdout.readline().startswith(b"listening on")
        proc.send_signal(signal.SIGTERM if attempt % 2 else signal.SIGINT)
        assert proc.wait(timeout=15) == 0, attempt
        assert (tmp_path / "data" / "streams.snapshot").exists(), attempt


def test_closed_output_streams_never_keep_the_service_from_stopping_nor_lose_history(tmp_path):
    """stderr a closed pipe: a log line that could not be written panicked
    the task that logged it, the shutdown's among them, and SIGTERM did
    nothing. stdout that cannot be written (a reader gone, /dev/full): the
    `listening on` line panicked the start after the snapshot was used up."""
    data = snapshot_with_history(tmp_path)
    proc = started(data, "--listen", "127.0.0.1:0", "--log-level", "debug", stderr=subprocess.PIPE)
    port = int(proc.stdout.readline().decode().rsplit(":", 1)[1])
    proc.stderr.close()
    # Connections log as they open and close.
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert (tmp_path / "data" / "streams.snapshot").exists()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with open("/dev/full", "w") as full:
        proc = started(data, "--listen", f"127.0.0.1:{port}", stdout=full)
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, "the start failed"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "never listened"
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    assert (tmp_path / "data" / "streams.snapshot").exists()


def test_a_second_stop_signal_cuts_the_drain_short_and_history_is_kept(tmp_path):
    """A request that stalls holds the drain for up to shutdown_drain_secs
    (ten years at most): a second signal was ignored, and only SIGKILL, which
    loses the history, was left. It ends the drain now; history is saved."""
    data = snapshot_with_history(tmp_path)
    proc = started(data, "--listen", "127.0.0.1:0", "--shutdown-drain-secs", "600")
    port = int(proc.stdout.readline().decode().rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as stalled:
        stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow:")
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert proc.poll() is None, "the stalled request holds the drain"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=5) == 0
    assert (tmp_path / "data" / "streams.snapshot").exists()


@async_test
async def test_a_run_that_does_not_persist_sets_the_snapshot_aside(start_server, tmp_path):
    """A run with --persist false in between serves without the snapshot: a
    later start restored it, and told a client that missed what that run sent
    it that it had missed nothing. The run sets it aside, so the later start
    says recovered:false."""
    data, epoch = await one_message_kept(start_server, tmp_path, "alice", "first run")
    assert (tmp_path / "data" / "streams.snapshot").exists()

    server = start_server("--data-dir", data, "--persist", "false")
    await asyncio.to_thread(api_send, server, ["alice"], "sent while she was away")
    stop_gracefully(server)
    aside = [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith("streams.snapshot.unused-")]
    assert len(aside) == 1 and not (tmp_path / "data" / "streams.snapshot").exists(), aside
    assert "moved aside" in server.logs()

    server = start_server("--data-dir", data)
    async with client(server, "alice", envelope=True, uri=resume_url(server, "alice", epoch, 1)) as alice:
        assert alice.welcome["recovered"] is False, alice.welcome
        assert alice.welcome["epoch"] != epoch


# --------------------------------------------------------------------------
# Topics with history (a namespace's history_size)
# --------------------------------------------------------------------------

NAMESPACES = """
[[namespaces]]
prefix = "news:"
history_size = 100

[[namespaces]]
prefix = "chat:"
"""


@pytest.fixture
def topics_server(start_server, tmp_path):
    config = tmp_path / "switchboard.toml"
    config.write_text(NAMESPACES)
    return lambda *flags: start_server("--config", str(config), *flags)


def api_publish(server, topic, payload):
    status, body = api_post(server, "/api/v1/publish", {"topic": topic, "payload": payload})
    assert status == 200, body
    return body


async def subscribe(ws, topic, since=None, id=1):
    message = {"type": "subscribe", "topic": topic, "id": id}
    if since is not None:
        message["since"] = since
    await ws.send(json.dumps(message))
    return await recv_json(ws)


@async_test
async def test_a_topic_subscriber_away_gets_exactly_what_it_missed_then_live_ones(topics_server):
    server = topics_server()
    async with client(server, "b", envelope=True) as b:
        async with client(server, "a", envelope=True) as a:
            # A plain subscribe to a topic with history says where the topic is.
            subscribed = await subscribe(a, "news:1")
            assert subscribed == {"type": "ack", "id": 1, "topic": "news:1", "offset": 0, "epoch": subscribed["epoch"]}
            for i in range(3):
                await b.send(json.dumps({"type": "publish", "topic": "news:1", "payload": i, "id": i}))
                ack = await recv_json(b)
                assert (ack["subscribers"], ack["offset"]) == (1, i + 1), ack
            got = [await recv_json(a) for _ in range(3)]
            assert [(m["topic"], m["offset"], m["payload"]) for m in got] == [("news:1", i + 1, i) for i in range(3)]
            epoch = got[0]["epoch"]
            assert epoch == subscribed["epoch"]
        for i in range(3, 8):
            await b.send(json.dumps({"type": "publish", "topic": "news:1", "payload": i}))
        for i in range(8, 11):
            result = await asyncio.to_thread(api_publish, server, "news:1", i)
            assert result == {"subscribers": 0, "offset": i + 1}, result
        async with client(server, "a", envelope=True) as a:
            ack = await subscribe(a, "news:1", {"epoch": epoch, "offset": 3}, id=2)
            assert ack == {
                "type": "ack",
                "id": 2,
                "topic": "news:1",
                "recovered": True,
                "missed": 8,
                "offset": 11,
                "epoch": epoch,
            }
            missed = [await recv_json(a) for _ in range(8)]
            assert [(m["offset"], m["payload"], m["epoch"]) for m in missed] == [(i + 1, i, epoch) for i in range(3, 11)]
            await b.send(json.dumps({"type": "publish", "topic": "news:1", "payload": "live"}))
            live = await recv_json(a)
            assert (live["offset"], live["payload"]) == (12, "live")


@async_test
async def test_a_subscriber_that_saw_no_message_resumes_from_its_subscribe_ack(topics_server):
    server = topics_server()
    await asyncio.to_thread(api_publish, server, "news:4", "before")
    async with client(server, "a", envelope=True) as a:
        ack = await subscribe(a, "news:4")
        assert ack["offset"] == 1, ack
        # Away before any message reached it.
    for i in range(2):
        await asyncio.to_thread(api_publish, server, "news:4", i)
    async with client(server, "a", envelope=True) as a:
        resumed = await subscribe(a, "news:4", {"epoch": ack["epoch"], "offset": ack["offset"]}, id=2)
        assert (resumed["recovered"], resumed["missed"], resumed["offset"]) == (True, 2, 3), resumed
        missed = [await recv_json(a) for _ in range(2)]
        assert [(m["offset"], m["payload"]) for m in missed] == [(2, 0), (3, 1)]
    async with client(server, "c", envelope=True) as c:
        # No history in chat:, so no position either.
        assert await subscribe(c, "chat:y") == {"type": "ack", "id": 1, "topic": "chat:y"}


@async_test
async def test_topic_resumes_that_cannot_be_whole_or_are_wrong_are_said_so(topics_server):
    server = topics_server()
    async with client(server, "a", envelope=True) as a:
        # No history kept in chat:, so nothing can be recovered, and no position is given.
        ack = await subscribe(a, "chat:x", {"epoch": "abc", "offset": 1})
        assert ack == {"type": "ack", "id": 1, "topic": "chat:x", "recovered": False}
        await asyncio.to_thread(api_publish, server, "news:2", "first")
        ahead = await subscribe(a, "news:2", {"epoch": "zzzz", "offset": 5}, id=2)
        assert (ahead["type"], ahead["recovered"], ahead["offset"]) == ("ack", False, 1), ahead
        epoch = ahead["epoch"]
    async with client(server, "c", envelope=True) as c:
        error = await subscribe(c, "news:2", {"epoch": epoch, "offset": 7}, id=3)
        assert (error["type"], error["code"], error["id"]) == ("error", "invalid_since", 3), error
        assert "offset 7 > 1" in error["message"], error
        for bad, code in (
            ({"epoch": "a b", "offset": 1}, "invalid_since"),
            ({"epoch": "abc"}, "invalid_message"),
            ({"epoch": "abc", "offset": -1}, "invalid_message"),
            ("abc:1", "invalid_message"),
        ):
            error = await subscribe(c, "news:3", bad, id=4)
            assert (error["type"], error["code"]) == ("error", code), (bad, error)
        # The connection still works.
        assert (await subscribe(c, "news:3", id=5))["type"] == "ack"


@async_test
async def test_topic_history_survives_a_graceful_restart(topics_server, tmp_path):
    data = str(tmp_path / "data")
    server = topics_server("--data-dir", data)
    first = await asyncio.to_thread(api_publish, server, "news:9", "before")
    assert first["offset"] == 1
    async with client(server, "a", envelope=True) as a:
        ack = await subscribe(a, "news:9", {"epoch": "x", "offset": 0})
        assert (ack["recovered"], ack["offset"]) == (False, 1), ack
        epoch = ack["epoch"]
    stop_gracefully(server)
    server = topics_server("--data-dir", data)
    await asyncio.to_thread(api_publish, server, "news:9", "after")
    async with client(server, "a", envelope=True) as a:
        ack = await subscribe(a, "news:9", {"epoch": epoch, "offset": 1})
        assert (ack["recovered"], ack["missed"], ack["epoch"]) == (True, 1, epoch), ack
        assert (await recv_json(a))["payload"] == "after"


# --------------------------------------------------------------------------
# The HTTP API: reading history, and idempotency keys
# --------------------------------------------------------------------------


def api_get(server, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=RECV_TIMEOUT) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_history_pages_through_a_topic_and_an_inbox(topics_server):
    server = topics_server()
    for i in range(5):
        api_publish(server, "news:h", {"n": i})
        api_send(server, ["ada"], {"n": i})
    status, latest = api_get(server, "/api/v1/history/news:h?limit=2")
    assert status == 200, latest
    epoch = latest["epoch"]
    assert latest == {
        "topic": "news:h",
        "epoch": epoch,
        "offset": 5,
        "recovered": True,
        "messages": [
            {"offset": 4, "from": None, "payload": {"n": 3}},
            {"offset": 5, "from": None, "payload": {"n": 4}},
        ],
    }
    status, page = api_get(server, f"/api/v1/history/news:h?since={epoch}:1&limit=2")
    assert [m["offset"] for m in page["messages"]] == [2, 3], page
    status, inbox = api_get(server, "/api/v1/clients/ada/inbox")
    assert (status, inbox["client"], inbox["offset"]) == (200, "ada", 5), inbox
    assert [m["payload"]["n"] for m in inbox["messages"]] == [0, 1, 2, 3, 4]
    status, lost = api_get(server, "/api/v1/history/news:h?since=zzzz:1")
    assert (status, lost["recovered"], lost["messages"]) == (200, False, []), lost
    for path, code in (
        (f"/api/v1/history/news:h?since={epoch}:6", "invalid_since"),
        ("/api/v1/history/news:h?since=nonsense", "invalid_since"),
        ("/api/v1/history/news:h?limit=1001", "invalid_request"),
        ("/api/v1/history/news:h?limit=0", "invalid_request"),
        ("/api/v1/history/chat:x", "history_disabled"),
        ("/api/v1/history/other:x", "unknown_namespace"),
        ("/api/v1/clients/bad%20id/inbox", "invalid_id"),
    ):
        status, body = api_get(server, path)
        assert (status, body["error"]["code"]) == (400, code), (path, body)


def test_a_history_page_stops_at_4_mib_of_payloads_and_pages_on(topics_server):
    """1,000 messages of 1 MiB would make one answer of a gigabyte: a page
    holds the messages that fit 4 MiB (the latest, or those after `since`),
    and the caller pages on from the last one it got."""
    server = topics_server()
    big = "x" * 900_000
    for i in range(6):
        api_publish(server, "news:big", f"{i}{big}")
    status, latest = api_get(server, "/api/v1/history/news:big?limit=100")
    assert status == 200 and latest["offset"] == 6, latest
    assert [m["offset"] for m in latest["messages"]] == [3, 4, 5, 6]
    epoch = latest["epoch"]
    offsets = []
    since = 0
    for _ in range(4):
        status, page = api_get(server, f"/api/v1/history/news:big?since={epoch}:{since}&limit=100")
        got = [m["offset"] for m in page["messages"]]
        if not got:
            break
        offsets.append(got)
        assert all(m["payload"] == f"{m['offset'] - 1}{big}" for m in page["messages"])
        since = got[-1]
    assert offsets == [[1, 2, 3, 4], [5, 6]], offsets


def test_topics_with_a_slash_are_reachable_and_bad_paths_get_json_errors(topics_server):
    """A topic may hold `/`: the rest of the path names it, as is or
    percent-encoded. A path segment that is not UTF-8 gets the API's JSON
    error, like every other refusal."""
    server = topics_server()
    api_publish(server, "news:eu/west", "hello")
    for path in ("news:eu/west", "news:eu%2Fwest"):
        status, page = api_get(server, f"/api/v1/history/{path}")
        assert (status, page["topic"], page["offset"]) == (200, "news:eu/west", 1), page
        status, presence = api_get(server, f"/api/v1/presence/{path}")
        assert (status, presence["topic"], presence["subscribers"]) == (200, "news:eu/west", 0), presence
    for path in ("/api/v1/clients/%FF", "/api/v1/clients/%FF/inbox", "/api/v1/history/news:%FF"):
        status, body = api_get(server, path)
        assert (status, body["error"]["code"]) == (400, "invalid_request"), (path, body)


def test_an_idempotency_key_makes_a_retry_append_nothing(topics_server):
    server = topics_server()
    first = api_post(server, "/api/v1/send", {"targets": ["ada"], "payload": 1}, key="order-1")
    again = api_post(server, "/api/v1/send", {"targets": ["ada"], "payload": 1}, key="order-1")
    assert first == again == (200, {"delivered": [], "offline": ["ada"], "offsets": {"ada": 1}})
    other = api_post(server, "/api/v1/send", {"targets": ["ada"], "payload": 2}, key="order-2")
    assert other[1]["offsets"] == {"ada": 2}
    assert api_get(server, "/api/v1/clients/ada/inbox")[1]["offset"] == 2, "appended once per key"
    published = [api_post(server, "/api/v1/publish", {"topic": "news:i", "payload": 1}, key="order-1") for _ in range(2)]
    assert published[0] == published[1] == (200, {"subscribers": 0, "offset": 1}), published
    assert api_get(server, "/api/v1/history/news:i")[1]["offset"] == 1
    status, body = api_post(server, "/api/v1/send", {"targets": ["ada"], "payload": 1}, key="has space")
    assert (status, body["error"]["code"]) == (400, "invalid_request"), body


@async_test
async def test_a_resume_too_large_for_the_outbound_queue_is_not_recovered_rather_than_cut(start_server):
    """Missed messages go into the connection's outbound queue at once: a
    replay over half of max_outbound_bytes says recovered:false instead of
    being cut short as a slow consumer after claiming recovery."""
    server = start_server("--max-message-size", "16384", "--max-outbound-bytes", "65536")
    async with client(server, "a", envelope=True) as a:
        epoch = a.welcome["epoch"]
    for i in range(20):  # 20 x 4 KB: more than the 32 KiB budget
        await asyncio.to_thread(api_send, server, ["a"], "x" * 4000)
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, 0)) as a:
        assert (a.welcome["recovered"], a.welcome["offset"]) == (False, 20), a.welcome
    async with client(server, "a", envelope=True, uri=resume_url(server, "a", epoch, 15)) as a:
        assert (a.welcome["recovered"], a.welcome["missed"]) == (True, 5), a.welcome
        assert [m[0] for m in await positions(a, 5)] == [16, 17, 18, 19, 20]


@async_test
async def test_resumes_of_several_topics_at_once_share_the_outbound_queue_and_none_is_cut(topics_server):
    """Each resume's replay fits half of max_outbound_bytes, but three at once
    do not fit it: a replay is checked against the room the connection has
    left (what waits to be written, and replays admitted but not yet queued),
    and one that does not fit says recovered:false. None is cut short, and
    the client is not closed as a slow consumer, however the subscribes
    arrive (here all four in one write, so that they are read together).
    Replays together keep within half of the budget (the other half is for
    live deliveries): one node handles the four in that read, one after
    another, and has room for one; in a cluster each waits for Redis, and the
    replays written meanwhile may leave room for more. Without compression:
    compressed, a replay of these payloads takes a few hundred bytes once it
    is queued for writing, and all four fit."""
    server = topics_server("--max-message-size", "16384", "--max-outbound-bytes", "65536")
    topics = [f"news:r{i}" for i in range(4)]
    async with client(server, "a", envelope=True) as a:
        positions = {t: await subscribe(a, t, id=t) for t in topics}
    for topic in topics:  # 7 x 4 KB each: about 29 KB a replay, under the 32 KiB budget
        for i in range(7):
            await asyncio.to_thread(api_publish, server, topic, "x" * 4000)
    async with client(server, "a", envelope=True, max_queue=None, compression=None) as a:
        asks = [
            {"type": "subscribe", "topic": t, "id": t,
             "since": {"epoch": positions[t]["epoch"], "offset": positions[t]["offset"]}}
            for t in topics
        ]
        a.transport.write(b"".join(frame(OP_TEXT, json.dumps(m).encode()) for m in asks))
        acks, replayed = {}, {t: [] for t in topics}
        while len(acks) < 4 or any(len(replayed[t]) < 7 for t, ack in acks.items() if ack["recovered"]):
            m = await recv_json(a)
            if m["type"] == "ack":
                acks[m["topic"]] = m
            else:
                assert m["type"] == "message", m
                replayed[m["topic"]].append(m["offset"])
        recovered = [t for t in topics if acks[t]["recovered"]]
        assert 1 <= len(recovered) <= (4 if CLUSTER else 1), acks
        for t in topics:
            top = positions[t]["offset"] + 7
            expected = list(range(top - 6, top + 1)) if t in recovered else []
            assert replayed[t] == expected, (t, acks[t], replayed[t])
            assert acks[t]["offset"] == top, acks[t]
        # Still open: the connection answers.
        assert (await subscribe(a, "news:r9", id="last"))["id"] == "last"


def test_the_history_api_gives_payloads_byte_for_byte(topics_server):
    server = topics_server()
    payloads = ["1e999999", '"\\ud800"', '{"x":1,"x":2}', "9007199254740993", '{\n "a" :\t[1 ,2]\n}']
    for text in payloads:
        body = ('{"topic":"news:raw","payload":' + text + "}").encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{server.port}/api/v1/publish", data=body, headers={"Content-Type": "application/json"}
        )
        urllib.request.urlopen(request, timeout=RECV_TIMEOUT).close()
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/api/v1/history/news:raw", timeout=5) as response:
        text = response.read().decode()
    for payload in payloads:
        assert '"payload":' + payload + "}" in text, (payload, text)


def test_one_data_directory_serves_one_process(start_server, tmp_path):
    data = str(tmp_path / "data")
    start_server("--data-dir", data)
    second = run_binary("--data-dir", data)
    stderr = second.stderr.decode()
    assert second.returncode == 1 and "another switchboard is using the data directory" in stderr, stderr
    assert oct((tmp_path / "data").stat().st_mode & 0o777) == "0o700"


@async_test
async def test_history_turned_off_and_on_across_restarts_is_not_recovered(start_server, tmp_path):
    """A topic's history kept through a restart whose configuration keeps none
    would hide what was published meanwhile: such streams are dropped at the
    start, with a new epoch for the next one."""
    data = str(tmp_path / "data")
    kept, not_kept = tmp_path / "kept.toml", tmp_path / "not-kept.toml"
    kept.write_text('[[namespaces]]\nprefix = "news:"\nhistory_size = 100\n')
    not_kept.write_text('[[namespaces]]\nprefix = "news:"\n')
    server = start_server("--config", str(kept), "--data-dir", data)
    for i in range(3):
        assert (await asyncio.to_thread(api_publish, server, "news:t", i))["offset"] == i + 1
    epoch = api_get(server, "/api/v1/history/news:t")[1]["epoch"]
    stop_gracefully(server)

    server = start_server("--config", str(not_kept), "--data-dir", data)
    assert await asyncio.to_thread(api_publish, server, "news:t", "unkept") == {"subscribers": 0}
    stop_gracefully(server)

    server = start_server("--config", str(kept), "--data-dir", data)
    await asyncio.to_thread(api_publish, server, "news:t", "again")
    async with client(server, "a", envelope=True) as a:
        ack = await subscribe(a, "news:t", {"epoch": epoch, "offset": 3})
        assert ack["recovered"] is False and ack["epoch"] != epoch, ack
