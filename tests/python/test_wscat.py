"""The wscat example (switchboard::client on the command line) against the relay.

wscat sends every line of stdin as a text message, prints every text message it
receives on its own line, and at the end of input closes cleanly and exits 0.
The relay is the real binary (SWITCHBOARD_BIN); wscat is built with the other
examples (SWITCHBOARD_EXAMPLES).
"""

import json
import os
import pathlib
import queue
import subprocess
import threading
import time

from test_relay import start_server  # noqa: F401 (a fixture)

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = pathlib.Path(os.environ.get("SWITCHBOARD_EXAMPLES", ROOT / "target" / "debug" / "examples"))
TIMEOUT = 5.0


class Wscat:
    """A running wscat, fed through stdin, read line by line with a timeout."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [str(EXAMPLES / "wscat"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # A thread reads stdout, so that a line already in a buffer is not
        # waited for on the file descriptor.
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.decode().rstrip("\n"))

    def send(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def line(self):
        """The next line on stdout, within TIMEOUT."""
        try:
            return self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"no line within {TIMEOUT}s; stderr: {self.stderr()}") from None

    def finish(self):
        """Ends the input; returns wscat's exit code (within TIMEOUT)."""
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            self.proc.kill()

    def stderr(self):
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")


def test_wscat_sends_lines_and_prints_messages(start_server):
    server = start_server()
    wscat = Wscat(server.ws_url("me"))
    # Sent to itself through the relay: the plain protocol delivers the payload as is.
    wscat.send(json.dumps({"targets": ["me"], "payload": {"n": 1}}))
    assert json.loads(wscat.line()) == {"n": 1}
    wscat.send(json.dumps({"targets": ["me"], "payload": "two"}))
    assert json.loads(wscat.line()) == "two"
    assert wscat.finish() == 0


def test_wscat_offers_subprotocols_and_sends_headers(start_server):
    # Only this origin may connect: the header must arrive for the handshake to pass.
    server = start_server("--allowed-origin", "https://app.example")
    wscat = Wscat(
        server.ws_url("me"),
        "--protocol",
        "switchboard.v1",
        "--header",
        "Origin: https://app.example",
    )
    wscat.send(json.dumps({"type": "send", "id": 7, "targets": ["me", "nobody"], "payload": 1}))
    lines = [json.loads(wscat.line()) for _ in range(3)]
    # The envelope protocol (switchboard.v1) was agreed: the welcome, then a
    # delivery and an ack.
    assert lines[0]["type"] == "welcome" and lines[0]["client"] == "me", lines
    ack = {"type": "ack", "id": 7, "delivered": ["me"], "offline": ["nobody"], "offsets": {"me": 1, "nobody": 1}}
    assert ack in lines
    assert any(m.get("type") == "message" and m.get("payload") == 1 for m in lines), lines
    assert wscat.finish() == 0


def test_wscat_says_why_a_handshake_failed(start_server):
    server = start_server("--allowed-origin", "https://app.example")
    started = time.monotonic()
    wscat = Wscat(server.ws_url("me"), "--header", "Origin: https://evil.example")
    assert wscat.finish() == 1
    assert "403" in wscat.stderr()
    assert time.monotonic() - started < TIMEOUT
