"""Running out of file descriptors is visible, and the server recovers.

The relay runs with RLIMIT_NOFILE lowered to 64. 120 plain TCP connections
(no request: each holds a descriptor for hyper's 30 s header timeout) use up
what is left, so accepting fails with EMFILE. The server must log it (once per
10 s at most, not once per failure), count it in /api/v1/stats
(`accept_errors`), and serve again once the connections are gone.
"""

import json
import resource
import socket
import time
import urllib.request

from test_floods import BIN, Server
FD_LIMIT = 64


def stats(server):
    url = f"http://{server.host}:{server.port}/api/v1/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def test_accept_errors_are_logged_once_counted_and_survived():
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))  # noqa: E731
    server = Server([BIN, "serve", "--listen", "127.0.0.1:0", "--persist", "false"], preexec_fn=limit)
    held = []
    try:
        assert stats(server)["accept_errors"] == 0
        for _ in range(120):
            held.append(socket.create_connection((server.host, server.port), timeout=5))
        time.sleep(1.0)  # accept retries every 100 ms: about ten failures
        for sock in held:
            sock.close()
        held.clear()
        # The server closes its ends as it sees the FINs; then it serves again.
        deadline = time.monotonic() + 10
        while True:
            try:
                counts = stats(server)
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not recover"
                time.sleep(0.1)
        logs = server.logs()
        lines = [line for line in logs.splitlines() if "accepting a connection failed" in line]
        print(f"\naccept_errors {counts['accept_errors']}; log lines: {lines}")
        assert counts["accept_errors"] >= 2, counts
        assert len(lines) == 1, logs
        assert "Too many open files" in lines[0], lines
    finally:
        for sock in held:
            sock.close()
        server.stop()
