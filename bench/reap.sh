#!/usr/bin/env bash
# Run with `bench/reap.sh [--connections N] [--lease SECS] [-- SERVE_FLAGS...]`:
# how long Redis is held while a live node reaps a dead one (docs/cluster.md,
# "Presence with node leases"). A fresh redis-server (free port, temp dir) gets
# a dead node's index as a node writes it: N connections (default 100,000) and
# half as many subscriptions over 100 topics, with their counts; then one
# `switchboard serve --engine redis` (target/release/switchboard, built first)
# finds the node's lease lapsed and reaps it over its heartbeats. Redis's
# SLOWLOG (every call over 1 ms) gives each heartbeat call's time. Prints how
# many calls it logged, their total, median and longest, and checks that every
# count was undone. Extra flags go to `switchboard serve`, e.g.
# `-- --client-events-size 0` to reap without `$clients` events.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

connections=100000 lease=2 serve_flags=()
while [ $# -gt 0 ]; do
  case "$1" in
    --connections) connections=$2; shift 2 ;;
    --lease) lease=$2; shift 2 ;;
    --) shift; serve_flags=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
command -v redis-server > /dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 2; }

cargo build --quiet --release -p switchboard-server
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2> /dev/null || true; rm -rf "$work"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --bind 127.0.0.1 --dir "$work" --save "" --appendonly no > "$work/redis.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$port" ping > /dev/null 2>&1 && break; sleep 0.1; done
cli() { redis-cli -p "$port" "$@"; }

# The dead node's index and what it counted (docs/cluster.md, "Keys").
python3 - "$connections" <<'PY' | redis-cli -p "$port" --pipe > /dev/null
import sys
def cmd(*args):
    out = f"*{len(args)}\r\n"
    for a in map(str, args):
        out += f"${len(a.encode())}\r\n{a}\r\n"
    sys.stdout.write(out)
for i in range(int(sys.argv[1])):
    cmd("HSET", "sb:n:dead:c", f"u{i}\n{i}", 1)
    cmd("HINCRBY", "sb:clients", f"u{i}", 1)
    if i % 2 == 0:
        topic = f"room{i % 100}"
        cmd("HSET", "sb:n:dead:t", f"{topic}\nu{i}\n{i}", 1)
        cmd("HINCRBY", "sb:topics", topic, 1)
        cmd("HINCRBY", f"sb:p:{topic}", f"u{i}", 1)
PY
cli config set slowlog-log-slower-than 1000 > /dev/null
cli config set slowlog-max-len 100000 > /dev/null

target/release/switchboard serve --listen 127.0.0.1:0 --engine redis --log-level warn \
  --redis-url "redis://127.0.0.1:$port/0" --node-lease-secs "$lease" "${serve_flags[@]}" \
  > "$work/node.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do [ -n "$(cli zrange sb:nodes 0 -1)" ] && break; sleep 0.1; done
cli slowlog reset > /dev/null
cli zadd sb:nodes 1 dead > /dev/null
# A beat every fifth of a lease, about 2,000 fields a beat.
deadline=$((SECONDS + (connections * 3 / 2 / 2000 + 1) * lease * 2 / 5 + 30))
while [ "$(cli exists sb:n:dead:c sb:n:dead:t)" != 0 ] && [ $SECONDS -lt $deadline ]; do sleep 0.5; done

python3 - "$port" <<'PY'
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"*3\r\n$7\r\nSLOWLOG\r\n$3\r\nGET\r\n$2\r\n-1\r\n")
data = b""
s.settimeout(1)
try:
    while chunk := s.recv(1 << 20):
        data += chunk
except socket.timeout:
    pass
lines = data.decode(errors="replace").split("\r\n")
at = 0
def parse():
    global at
    line = lines[at]; at += 1
    if line[0] == "*":
        return [parse() for _ in range(int(line[1:]))]
    if line[0] == ":":
        return int(line[1:])
    if line[0] == "$":
        value = lines[at]; at += 1
        return value
    return line
calls = sorted(e[2] for e in parse() if len(e[3]) > 3 and e[3][3] == "heartbeat")
if calls:
    print(f"reap: {len(calls)} heartbeat calls over 1 ms, {sum(calls) / 1000:.0f} ms in all, "
          f"median {calls[len(calls) // 2] / 1000:.1f} ms, longest {calls[-1] / 1000:.1f} ms")
else:
    print("reap: no heartbeat call took over 1 ms")
PY
left="$(cli hlen sb:clients) $(cli hlen sb:topics) $(cli exists sb:n:dead:c sb:n:dead:t) $(cli scard sb:reaping)"
if [ "$left" != "0 0 0 0" ]; then
  echo "reap.sh: not all undone (clients, topics, index keys, nodes reaping): $left" >&2
  exit 1
fi
echo "reap: every count undone"
