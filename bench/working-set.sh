#!/usr/bin/env bash
# Run with `bench/working-set.sh [--reps N] [--clients "A B"] [--out DIR]`: how the
# relay's CPU per delivery grows with the number of connections it is spread over,
# for Switchboard and the floor. relay-k1 as bench/run.sh drives it (10,000
# messages/s, 128 B, one target each), spread over A, then B, ... clients (default
# "50 1000": the full run's 1,000, and 50, whose sockets and state stay in the CPU's
# caches). The servers alternate within each repetition, a fresh process per run,
# pinned as bench/run.sh pins them. DIR/results.md gives each label's medians and
# Switchboard ÷ floor with its p (the label `relay-k1-cN` is the run with N clients).
#
# What it separates: at few clients, the gap to the floor is the instructions each
# message costs (bench/callgrind.sh relay against the floor under callgrind); what
# the gap grows by at 1,000 is the memory each message touches, which is what a
# cache miss costs and an instruction count does not show.
#
# Options:
#   --reps N         repetitions (default 5)
#   --clients "A B"  the client counts (default "50 1000")
#   --out DIR        where the report goes (default: target/bench-working-set)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

command="bench/working-set.sh $*"
reps=5 clients="50 1000" out=target/bench-working-set
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) reps=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
cargo build --release --quiet -p switchboard-server -p switchboard-loadgen -p floor-relay
mkdir -p "$out"
raw="$out/raw.jsonl"
: > "$raw"
log="$out/server.out"
for rep in $(seq "$reps"); do
  for n in $clients; do
    for server in switchboard floor; do
      if [ "$server" = switchboard ]; then
        cmd=(target/release/switchboard serve "${bench_serve_flags[@]}" --compression false)
      else
        cmd=(target/release/floor-relay 127.0.0.1:0)
      fi
      taskset -c 1 "${cmd[@]}" > "$log" 2> /dev/null &
      pid=$!
      addr=$(wait_listening "$log" "$pid") || addr=""
      taskset -c 0 target/release/loadgen relay --clients "$n" --targets 1 --rate 10000 --size 128 \
        --addr "$addr" --pid "$pid" --server "$server" --label "relay-k1-c$n" --rep "$rep" \
        --out "$raw" > /dev/null
      kill "$pid"
      wait "$pid" 2> /dev/null || true
    done
  done
done
target/release/loadgen report --input "$raw" --out-dir "$out" --command "$command"
echo "bench/working-set.sh: $out/results.md"
