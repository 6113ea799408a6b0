"""What resuming costs the server: CPU per resume of N missed inbox messages.

    .venv/bin/python bench/resume.py [--bin target/release/switchboard] [--missed 1000] [--rounds 200] [--deflate]

Starts the release binary, sends N messages to an offline client id (over
one WebSocket), then R times: connects as that id with ?since=EPOCH:0, reads
the welcome and the N replayed messages, and disconnects. The same R
connections without `since` (welcome only) are measured too, and the
difference divided by R is the server CPU (utime + stime from /proc) of
replaying N messages. Prints one line with both figures. The client offers
no compression unless --deflate: each replayed message is then compressed
for it, as live ones are.
"""

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys

from websockets.asyncio.client import connect

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid, which=(11, 12)):
    """utime + stime (or the fields named) of `pid`, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in which) / TICK


async def rounds(url, count, expect, compression):
    for _ in range(count):
        options = {"subprotocols": ["switchboard.v1"], "proxy": None, "max_queue": None, "compression": compression}
        async with connect(url, **options) as ws:
            welcome = json.loads(await ws.recv())
            assert welcome["type"] == "welcome", welcome
            for _ in range(expect):
                await ws.recv()


async def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", default="target/release/switchboard")
    parser.add_argument("--missed", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    args = parser.parse_args()
    compression = "deflate" if args.deflate else None
    server = subprocess.Popen(
        [args.bin, "serve", "--listen", "127.0.0.1:0", "--persist", "false", "--log-level", "warn",
         "--inbox-size", str(args.missed), "--rate-limit-messages-per-sec", "0",
         "--rate-limit-bytes-per-sec", "0", "--max-connections-per-client", "100000"],
        stdout=subprocess.PIPE,
    )
    try:
        line = server.stdout.readline().decode()
        addr = re.match(r"listening on (\S+)", line).group(1)
        base = f"ws://{addr}/ws?id=reader"
        async with connect(base, subprotocols=["switchboard.v1"], proxy=None) as ws:
            epoch = json.loads(await ws.recv())["epoch"]
        async with connect(f"ws://{addr}/ws?id=writer", proxy=None) as writer:
            for i in range(args.missed):
                await writer.send(json.dumps({"targets": ["reader"], "payload": {"n": i, "text": "x" * 64}}))
            await writer.ping()
        await asyncio.sleep(0.5)
        before = cpu_seconds(server.pid)
        await rounds(base, args.rounds, 0, compression)
        plain = cpu_seconds(server.pid) - before
        before, user = cpu_seconds(server.pid), cpu_seconds(server.pid, (11,))
        await rounds(f"{base}&since={epoch}:0", args.rounds, args.missed, compression)
        resumed = cpu_seconds(server.pid) - before
        resumed_user = cpu_seconds(server.pid, (11,)) - user
        per_resume_ms = (resumed - plain) / args.rounds * 1000
        print(
            f"resume of {args.missed} missed messages ({'deflate' if args.deflate else 'no compression'}): {per_resume_ms:.3f} ms of server CPU each"
            f" ({resumed:.2f} s for {args.rounds} resumes, {resumed_user:.2f} s of it in user space;"
            f" {plain:.2f} s for as many plain connects;"
            f" clock tick {1000 / TICK:.0f} ms)"
        )
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
