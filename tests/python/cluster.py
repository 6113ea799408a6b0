"""Real processes for cluster tests: redis-server instances on free ports in
temporary directories, switchboard nodes on them, and a small TCP proxy that
can cut or delay the link between a node and Redis.

Everything here is owned by the test that made it and stopped at its end.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class Redis:
    """A redis-server with AOF on (fsync every write, so a restart loses
    nothing the test wrote), `noeviction`, in a temporary directory."""

    def __init__(self):
        if not os.access(REDIS_BIN, os.X_OK):
            raise RuntimeError("redis-server not found (the test command installs Debian's redis-server)")
        self.dir = tempfile.mkdtemp(prefix="switchboard-redis-")
        self.port = free_port()
        self.proc = None
        self.start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--maxmemory-policy", "noeviction"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        if not wait_port(self.port):
            raise RuntimeError(f"redis-server did not listen on {self.port}")

    def kill(self):
        """kill -9: what was fsynced stays on disk."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
        self.log.close()

    def restart(self):
        """Killed and started again on the same port and files (AOF)."""
        self.kill()
        self.start()

    def wipe(self):
        """Killed and started again with no files: every key is gone."""
        self.kill()
        for name in os.listdir(self.dir):
            if name != "redis.log":
                path = os.path.join(self.dir, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        self.start()

    def cli(self, *args):
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, timeout=5)
        return out.stdout.decode().strip()

    def stop(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class Head:
    """What a proxied connection's client sent first, and whether the proxy
    has frozen the connection."""

    def __init__(self):
        self.sent = bytearray()
        self.frozen = False
        self.closed = False
        # What `hold` kept back, until `release`.
        self.held = None
        self.released = threading.Event()


class Proxy:
    """A TCP proxy on a free port in front of `target_port`. `cut()` closes
    every connection through it and refuses new ones until `heal()`;
    `swallow(marker)` makes new connections stop passing on what the client
    sends from the first chunk that holds `marker` on (a Redis that hangs
    at that command, or a path that stops passing data), never answering
    it, until `heal()` (the connections swallowed stay so); `freeze(marker)`
    makes the connections open now whose client has sent `marker` (in its
    first 64 KiB) pass nothing more either way and stay open, a link gone
    silent without a reset (new connections pass, and `heal()` does not thaw
    these), and answers how many it froze; `hold(marker)` keeps back, from
    the next chunk a client sends that holds `marker`, everything that
    client sends on that connection; once the client has closed it and
    `release()` is called, what was kept goes on (packets of a connection
    given up that reach the server late); `delay(seconds)` holds every chunk that long before passing it
    on."""

    def __init__(self, target_port):
        self.target = target_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.open = True
        self.swallowing = None
        self.swallowed = 0
        self.holding = None
        # Per connection: what its client sent first, and whether it is frozen.
        self.heads = []
        self.pairs = []
        self.stopped = False
        self.latency = 0.0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self):
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                if not self.open:
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target), timeout=2)
                except OSError:
                    client.close()
                    continue
                # The timeout is for the connect: a quiet link (pub/sub) is not cut.
                upstream.settimeout(None)
                self.pairs.append((client, upstream))
                marker = self.swallowing
            # What the client sent first, shared by both directions' pumps.
            head = Head()
            self.heads.append(head)
            for a, b, m, sent in ((client, upstream, marker, True), (upstream, client, None, False)):
                threading.Thread(target=self._pump, args=(a, b, m, head, sent), daemon=True).start()

    def _pump(self, src, dst, marker, head, sent):
        swallowing = False
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if sent and len(head.sent) < 65536:
                    head.sent += data[:65536 - len(head.sent)]
                if head.frozen:
                    continue
                if sent and head.held is None and self._holds(data):
                    head.held = bytearray()
                if head.held is not None and not head.released.is_set():
                    head.held += data
                    continue
                if marker is not None and not swallowing and marker in data:
                    swallowing = True
                    with self.lock:
                        self.swallowed += 1
                if swallowing:
                    continue
                if self.latency:
                    time.sleep(self.latency)
                dst.sendall(data)
            if sent and head.held is not None and head.released.wait(30):
                dst.sendall(head.held)
        except OSError:
            pass
        head.closed = True
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def swallow(self, marker):
        with self.lock:
            self.swallowing = marker

    def _holds(self, data):
        with self.lock:
            if self.holding is None or self.holding not in data:
                return False
            self.holding = None
            return True

    def hold(self, marker):
        with self.lock:
            self.holding = marker

    def release(self):
        for head in self.heads:
            head.released.set()

    def freeze(self, marker):
        with self.lock:
            frozen = [h for h in self.heads if marker in h.sent and not (h.frozen or h.closed)]
        for head in frozen:
            head.frozen = True
        return len(frozen)

    def cut(self):
        with self.lock:
            self.open = False
            for a, b in self.pairs:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                        s.close()
                    except OSError:
                        pass
            self.pairs = []

    def delay(self, seconds):
        self.latency = seconds

    def heal(self):
        with self.lock:
            self.open = True
            self.swallowing = None

    def stop(self):
        self.stopped = True
        self.cut()
        self.listener.close()
