#!/usr/bin/env bash
# Run with `bench/cluster.sh [--reps N] [--rate R] [--out DIR]`: what cluster mode
# costs, against the single-node figure of the same run. The relay scenario
# (1000 clients, 128-byte payloads, K=1 and K=10 targets) at the same offered load
# drives, in turn within each repetition:
#   single   one node, memory engine (the single-node figure);
#   local    one node on Redis: every delivery goes to Redis and back to the
#            same node (a local delivery in cluster mode);
#   cluster  two nodes on one Redis, the clients split across them: half of
#            the deliveries cross nodes.
# The nodes and Redis share core 1; the load generator runs on core 0. For each
# it reports node CPU per delivery (each node, and together), Redis CPU per
# delivery (its /proc times in the same window), and Redis commands per message
# (INFO commandstats over the whole run, divided by the messages sent).
# Then, once, idle connections (19,500, as bench/ab.sh's idle): the node's
# memory per connection, single and local, and Redis's (its used_memory_peak
# over the run, less what it used before, per connection).
#
# Options:
#   --reps N   repetitions (default 3)
#   --rate R   messages per second offered, K=1 (default 4000; K=10 gets R/5)
#   --out DIR  where results.md goes (default: target/bench-cluster)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

command="bench/cluster.sh $*"
reps=3 rate=4000 out=target/bench-cluster
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
command -v redis-server > /dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 2; }
cargo build --release --quiet -p switchboard-server -p switchboard-loadgen
bin=target/release/switchboard
mkdir -p "$out"
raw="$out/raw.jsonl"
: > "$raw"
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Starts a node with "$@"; sets $addr and $pid.
start_node() {
  local log
  log=$(mktemp -p "$work")
  taskset -c 1 "$bin" serve "${bench_serve_flags[@]}" --compression false "$@" > "$log" 2> /dev/null &
  pid=$!
  pids+=("$pid")
  addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/^listening on //p' "$log")
    [ -n "$addr" ] && break
    sleep 0.1
  done
  # A cluster node serves once it has joined (its /healthz says 200).
  for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$addr/healthz")" = 200 ] && return
    sleep 0.1
  done
  echo "a node never became ready" >&2
  exit 1
}

# Starts a fresh redis-server on core 1; sets $redis_port and $redis_pid.
start_redis() {
  redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  local dir
  dir=$(mktemp -d -p "$work")
  taskset -c 1 redis-server --port "$redis_port" --bind 127.0.0.1 --dir "$dir" --save "" \
    --appendonly yes --maxmemory-policy noeviction > /dev/null &
  redis_pid=$!
  pids+=("$redis_pid")
  for _ in $(seq 100); do
    redis-cli -p "$redis_port" ping > /dev/null 2>&1 && return
    sleep 0.05
  done
  echo "redis-server did not start" >&2
  exit 1
}

# Calls so far: of the script (EVALSHA), and of every command (those the
# script runs count too), as "SCRIPT ALL".
redis_calls() {
  redis-cli -p "$redis_port" info commandstats | tr -d '\r' | awk -F'[:=,]' '
    /^cmdstat_/ { all += $3; if ($1 == "cmdstat_evalsha") script += $3 }
    END { print script + 0, all + 0 }'
}

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2> /dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2> /dev/null || true; done
  pids=()
}

for rep in $(seq "$reps"); do
  for variant in single local cluster; do
    for scenario in relay-k1 relay-k10; do
      case "$scenario" in
        relay-k1) args=(relay --clients 1000 --targets 1 --rate "$rate" --size 128) ;;
        relay-k10) args=(relay --clients 1000 --targets 10 --rate "$((rate / 5))" --size 128) ;;
      esac
      targets=() side=()
      case "$variant" in
        single)
          start_node
          targets=(--addr "$addr" --pid "$pid") ;;
        local|cluster)
          start_redis
          side=(--side-pid "$redis_pid")
          nodes=1
          [ "$variant" = cluster ] && nodes=2
          for _ in $(seq "$nodes"); do
            start_node --engine redis --redis-url "redis://127.0.0.1:$redis_port/0"
            targets+=(--addr "$addr" --pid "$pid")
          done ;;
      esac
      before="0 0"
      [ "$variant" != single ] && before=$(redis_calls)
      line="$work/line.jsonl"
      : > "$line"
      taskset -c 0 target/release/loadgen "${args[@]}" "${targets[@]}" "${side[@]}" \
        --server "$variant" --label "$scenario" --rep "$rep" --out "$line" > /dev/null
      after="0 0"
      [ "$variant" != single ] && after=$(redis_calls)
      # The Redis calls of the whole run (warm-up, window and drain), kept for
      # dividing by the run's messages.
      python3 - "$line" $before $after >> "$raw" <<'EOF'
import json, sys
record = json.loads(open(sys.argv[1]).read())
b_script, b_all, a_script, a_all = map(int, sys.argv[2:])
record["redis_script_calls"] = a_script - b_script
record["redis_calls"] = a_all - b_all
print(json.dumps(record))
EOF
      stop_all
    done
  done
done

idle_raw="$out/idle.jsonl"
: > "$idle_raw"
for variant in single local; do
  redis_port=""
  if [ "$variant" = single ]; then
    start_node
  else
    start_redis
    start_node --engine redis --redis-url "redis://127.0.0.1:$redis_port/0"
  fi
  base=0
  [ -n "$redis_port" ] && base=$(redis-cli -p "$redis_port" info memory | tr -d '\r' | sed -n 's/^used_memory://p')
  line="$work/line.jsonl"
  : > "$line"
  taskset -c 0 target/release/loadgen idle --connections 19500 --concurrency 128 --addr "$addr" --pid "$pid" \
    --server "$variant" --label idle --out "$line" > /dev/null
  peak=0
  [ -n "$redis_port" ] && peak=$(redis-cli -p "$redis_port" info memory | tr -d '\r' | sed -n 's/^used_memory_peak://p')
  python3 - "$line" "$base" "$peak" >> "$idle_raw" <<'EOF'
import json, sys
record = json.loads(open(sys.argv[1]).read())
base, peak = int(sys.argv[2]), int(sys.argv[3])
record["redis_bytes_per_conn"] = (peak - base) / record["connections"] if peak else None
print(json.dumps(record))
EOF
  stop_all
done

python3 - "$raw" "$out/results.md" "$command" "$rate" "$idle_raw" <<'EOF'
import json, statistics, sys
raw, path, command, rate, idle_raw = sys.argv[1:]
runs = [json.loads(line) for line in open(raw) if line.strip()]
def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
def fmt(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"
lines = [
    "# What cluster mode costs",
    "",
    f"`{command}`: medians of {max(r['rep'] for r in runs)} repetitions, 1000 clients, 128-byte payloads,",
    f"{rate} messages/s offered at K=1 and {int(rate) // 5}/s at K=10; nodes and Redis on core 1, the load generator on core 0.",
    "Node CPU and Redis CPU are per delivery, in the measured window. Redis calls are per message, over the whole run",
    "(the messages it expected to deliver, divided by K): script calls (EVALSHA, heartbeats included) and every command",
    "(those the script runs count too, in INFO commandstats).",
    "",
    "| scenario | variant | deliveries/s | node CPU µs/delivery (all nodes) | each node | Redis CPU µs/delivery | nodes + Redis | nodes vs single | script calls/message | commands/message | lost+dup |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]
for scenario in ("relay-k1", "relay-k10"):
    base = median(r["server_cpu_us_per_op"] for r in runs if r["scenario"] == scenario and r["server"] == "single")
    for variant in ("single", "local", "cluster"):
        rs = [r for r in runs if r["scenario"] == scenario and r["server"] == variant]
        if not rs:
            continue
        node = median(r["server_cpu_us_per_op"] for r in rs)
        each = [median(r["server_cpu_each_s"][i] * 1e6 / r["ops"] for r in rs) for i in range(len(rs[0]["server_cpu_each_s"]))]
        redis = median(r.get("side_cpu_us_per_op") for r in rs)
        both = None if redis is None else node + redis
        k = 1 if scenario == "relay-k1" else 10
        messages = lambda r: max(r["expected"] / k, 1)
        scripts = median(r["redis_script_calls"] / messages(r) if r["redis_calls"] else None for r in rs)
        commands = median(r["redis_calls"] / messages(r) if r["redis_calls"] else None for r in rs)
        failed = sum(r["lost"] + r["duplicated"] + r["corrupted"] for r in rs)
        lines.append(
            f"| {scenario} | {variant} | {median(r['ops_per_s'] for r in rs):.0f} | {fmt(node)} | "
            f"{' / '.join(fmt(e) for e in each)} | {fmt(redis)} | {fmt(both)} | "
            f"{fmt(node / base if base else None)}x | {fmt(scripts)} | {fmt(commands, 1)} | {failed} |"
        )
idle = [json.loads(line) for line in open(idle_raw) if line.strip()]
lines += [
    "",
    "Idle connections (19,500, one client id each, no subprotocol):",
    "",
    "| variant | node RSS per connection, bytes | Redis memory per connection, bytes |",
    "|---|---|---|",
]
for r in idle:
    redis = r.get("redis_bytes_per_conn")
    lines.append(f"| {r['server']} | {r['rss_per_conn_bytes']:.0f} | {'-' if redis is None else f'{redis:.0f}'} |")
open(path, "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
