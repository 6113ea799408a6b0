#!/usr/bin/env bash
# Splits a server's CPU time between the kernel's TCP send and receive paths and
# everything else, with perf: the figures behind "Where the CPU goes" in
# docs/performance.md.
#
#   bench/kernel-share.sh SCENARIO SERVER
#     SCENARIO: relay-k1 | fanout-topic | echo   (bench/run.sh's full-run parameters)
#     SERVER:   switchboard | bun | floor | floor-tokio (the floor's relay on tokio)
#
# As in bench/run.sh, the server runs on CPU 1 and the load generator on CPU 0.
# `perf record -g` samples the server for 4 s after a 2 s warm-up. Sampling slows
# the server, so read the shares, not the CPU time the load generator reports.
# Needs perf (Debian: apt-get install linux-perf), and bench/peers/install.sh for Bun.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
source bench/lib.sh

scenario=${1:-}
server=${2:-}
case "$scenario" in
  relay-k1) load=(relay --clients 1000 --targets 1 --rate 10000 --size 128) ;;
  fanout-topic) load=(fanout --subscribers 2000 --rate 15 --size 128 --topic) ;;
  echo) load=(echo --connections 50 --window 10 --size 64) ;;
  *) usage; exit 2 ;;
esac
case "$server/$scenario" in
  # The toolkit's echo example echoes on any path; the relay has no echo route.
  switchboard/echo) command=(target/release/examples/echo 127.0.0.1:0); path=/ ;;
  switchboard/*) command=(target/release/switchboard serve "${bench_serve_flags[@]}" --compression false) ;;
  bun/*) command=(bench/peers/node_modules/.bin/bun bench/peers/bun-relay.js 127.0.0.1:0); path=/echo ;;
  floor/*) command=(target/release/floor-relay 127.0.0.1:0); path=/echo ;;
  floor-tokio/*) command=(target/release/floor-relay 127.0.0.1:0 --tokio); path=/echo ;;
  *) usage; exit 2 ;;
esac
[ "$scenario" = echo ] && load+=(--path "$path")
command -v perf > /dev/null || { echo "kernel-share.sh: perf is not installed" >&2; exit 1; }

cargo build --quiet --release -p switchboard-server -p switchboard-loadgen -p floor-relay
cargo build --quiet --release -p switchboard --example echo
out=target/kernel-share
mkdir -p "$out"
data="$out/$scenario-$server.data"

taskset -c 1 "${command[@]}" > "$out/server.log" 2> "$out/server.err" &
pid=$!
trap 'kill "$pid" 2> /dev/null || true' EXIT
addr=$(wait_listening "$out/server.log" "$pid")
(sleep 2; perf record -g -p "$pid" -o "$data" -- sleep 4 > /dev/null 2>&1) &
taskset -c 0 target/release/loadgen "${load[@]}" --warmup 1 --duration 5 --drain 3 --addr "$addr" \
  --pid "$pid" --server "$server" --label "kernel-share-$scenario" --rep 1 --out "$out/raw.jsonl" \
  2>&1 | grep -E "^loadgen: kernel-share" >&2
wait %2
kill "$pid"
wait "$pid" 2> /dev/null || true
trap - EXIT

# The share of all samples in the kernel, and in (below) each function.
kernel=$(perf report -i "$data" --sort dso -g none 2> /dev/null | awk '/\[kernel.kallsyms\]/ {print $1; exit}')
below() {
  perf report -i "$data" --children --sort sym -g none 2> /dev/null |
    awk -v name="$1" '$NF == name {print $1; found = 1; exit} END {if (!found) print "0%"}'
}
echo "$scenario $server: kernel $kernel, tcp_sendmsg $(below tcp_sendmsg)," \
  "tcp_recvmsg $(below tcp_recvmsg), epoll_wait $(below do_epoll_wait) of the server's samples;" \
  "net_rx_action (the receiving side of loopback, mostly inside tcp_sendmsg) $(below net_rx_action) ($data)"
