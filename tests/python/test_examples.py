"""The toolkit's examples, driven by a real non-Rust client (Python websockets).

The example binaries are built by `cargo test --workspace --all-targets`;
SWITCHBOARD_EXAMPLES names their folder (default: target/debug/examples).
"""

import asyncio
import os
import pathlib
import re
import selectors
import subprocess

import pytest
import websockets

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = pathlib.Path(os.environ.get("SWITCHBOARD_EXAMPLES", ROOT / "target" / "debug" / "examples"))
TIMEOUT = 5


def start(name, *args):
    """Starts an example on port 0 and returns (process, "host:port"). An
    example that says nothing within TIMEOUT fails the test instead of hanging it."""
    proc = subprocess.Popen([str(EXAMPLES / name), "127.0.0.1:0", *args], stdout=subprocess.PIPE, text=True)
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    match = re.match(r"listening on (\S+)", line)
    if not match:
        proc.kill()
        proc.wait()
    assert match, f"unexpected first line {line!r}"
    return proc, match.group(1)


@pytest.fixture
def timer_server():
    proc, addr = start("connection_timer", "0.3")
    yield addr
    proc.kill()
    proc.wait()


@pytest.fixture
def chat_server():
    proc, addr = start("chat")
    yield addr
    proc.kill()
    proc.wait()


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


def test_connection_timer_answers_and_alerts(timer_server):
    async def scenario():
        async with websockets.connect(f"ws://{timer_server}/ws/connection_timer/ada") as ws:
            assert await recv(ws) == "connected as ada"
            await ws.send("request_timer")
            answer = await recv(ws)
            assert re.fullmatch(r"ada: connection open for \d+ ms", answer), answer
            # The alert repeats on its own, every 0.3 s here.
            alerts = [await recv(ws) for _ in range(2)]
            assert all(a.startswith("alert: ada has been connected for") for a in alerts), alerts
            await ws.send("something else")
            while (reply := await recv(ws)).startswith("alert"):
                pass
            assert reply == "unknown request: send request_timer"

    asyncio.run(scenario())


def test_chat_rooms_are_separate_and_announce_joins_and_leaves(chat_server):
    async def scenario():
        base = f"ws://{chat_server}/chat"
        async with websockets.connect(f"{base}/lobby?name=ann") as ann:
            assert await recv(ann) == "* ann joined lobby"
            async with websockets.connect(f"{base}/lobby?name=bo") as bo, websockets.connect(
                f"{base}/kitchen?name=cy"
            ) as cy:
                assert await recv(ann) == "* bo joined lobby"
                assert await recv(bo) == "* bo joined lobby"
                assert await recv(cy) == "* cy joined kitchen"
                await bo.send("hello lobby")
                assert await recv(ann) == "bo: hello lobby"
                assert await recv(bo) == "bo: hello lobby"
                # Had the lobby's line reached cy, it would come before cy's own:
                # a connection's messages go out in the order they were sent.
                await cy.send("hello kitchen")
                assert await recv(cy) == "cy: hello kitchen"
            # cy left the kitchen, then bo the lobby: ann hears of bo only,
            # and nothing else before her own next line.
            assert await recv(ann) == "* bo left"
            await ann.send("still here")
            assert await recv(ann) == "ann: still here"

    asyncio.run(scenario())
