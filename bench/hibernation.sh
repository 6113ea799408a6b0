#!/usr/bin/env bash
# What hibernation saves on idle connections: the figures behind "Hibernation"
# in docs/performance.md.
#
#   bench/hibernation.sh [--reps N] [--connections N] [--period SECS] [--pings [--ping-secs N]]
#
# For each repetition, the service (bench/lib.sh's flags, compression off) holds
# N idle relay connections (default 19,500) for 20 s, once with
# --hibernate-after-secs SECS (default 15, the service's default) and once with
# it off (0), alternating. A period longer than the hold (--period 600) measures what awake
# connections pay for hibernation being on. --pings keeps the service's default
# ping interval (25 s) and idle timeout (60 s), which bench/lib.sh turns off;
# --ping-secs N pings every N seconds instead, and then holds 32 s, measuring
# the last 20 (every connection is pinged within them when N is at most 10).
# Printed per run: the RSS
# growth per connection, as bench/run.sh's idle scenario measures it, and the
# server's CPU time in the measured window. (Until the
# service took jemalloc as its allocator this also read glibc's heap in use
# through gdb; jemalloc is built without statistics.) Builds nothing (run
# bench/run.sh or cargo build --release first).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

reps=3
connections=19500
period=15
pings=0
ping_secs=25
timing=(--warmup 20 --duration 2)
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --connections) connections=$2; shift 2 ;;
    --period) period=$2; shift 2 ;;
    --pings) pings=1; shift ;;
    --ping-secs) pings=1; ping_secs=$2; timing=(--warmup 12 --duration 20); shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
if [ "$pings" = 1 ]; then
  # Each of the two flags is followed by its value: replace both.
  flags=()
  for ((i = 0; i < ${#bench_serve_flags[@]}; i++)); do
    case "${bench_serve_flags[i]}" in
      --idle-timeout-secs) flags+=(--idle-timeout-secs 60); i=$((i + 1)) ;;
      --ping-interval-secs) flags+=(--ping-interval-secs "$ping_secs"); i=$((i + 1)) ;;
      *) flags+=("${bench_serve_flags[i]}") ;;
    esac
  done
  bench_serve_flags=("${flags[@]}")
fi
bin=target/release/switchboard
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# One hold: prints "RSS B/conn, CPU s" for the server started with "$@".
hold() {
  taskset -c 1 "$bin" serve "${bench_serve_flags[@]}" --compression false "$@" \
    > "$out/server.log" 2> "$out/server.err" &
  local pid=$! addr
  addr=$(wait_listening "$out/server.log" "$pid") || addr=""
  taskset -c 0 target/release/loadgen idle --addr "$addr" --pid "$pid" \
    --connections "$connections" "${timing[@]}" --out "$out/idle.jsonl" > /dev/null 2>&1
  kill "$pid"
  wait "$pid" 2> /dev/null || true
  local rss cpu
  rss=$(tail -1 "$out/idle.jsonl" | sed -n 's/.*"rss_per_conn_bytes":\([0-9.]*\).*/\1/p')
  cpu=$(tail -1 "$out/idle.jsonl" | sed -n 's/.*"server_cpu_s":\([0-9.]*\).*/\1/p')
  printf '%.0f B RSS per connection, %.2f s CPU' "$rss" "$cpu"
}

for rep in $(seq "$reps"); do
  echo "rep $rep: --hibernate-after-secs $period: $(hold --hibernate-after-secs "$period") | off: $(hold --hibernate-after-secs 0)"
done
