#!/usr/bin/env bash
# Counts the instructions Switchboard's own process executes per operation, with
# valgrind's callgrind: a figure that stays put on a noisy machine where CPU time
# does not, so it shows what a change to the hot path gained. Only user space is
# counted (the kernel's share is in the "in kernel" column of bench/run.sh).
#
#   bench/callgrind.sh relay   relay-k1: N=1,000 clients, 1,000 messages/s, 128 B
#   bench/callgrind.sh echo    the toolkit's echo example: C=50, W=10, 64 B
#   bench/callgrind.sh echo-deflate   the same with permessage-deflate: C=10, W=4, 1 KiB
#   bench/callgrind.sh storm   handshakes (connect, upgrade, close): 8 workers
#   bench/callgrind.sh fanout  fanout-topic: one publisher, 2,000 subscribers, 15/s, 128 B
#   bench/callgrind.sh fanout-targets   the same through a list of 2,000 targets
#
# `--server floor` or `--server floor-tokio` after relay, fanout or fanout-targets
# counts the floor (bench/peers/floor-relay) instead, on its own epoll loop or on
# tokio's runtime: the same relay code under both, so their difference is what
# the runtime costs. The floor has no function that runs once per operation, so
# its operations are its `send` calls (one per delivery in these scenarios).
#
# The server runs under callgrind with instrumentation off; it is switched on for
# 5 s after a 4 s warm-up, and the instructions counted are divided by the
# operations counted in the profile (calls of a function that runs once per
# message, delivery or connection). As in
# bench/run.sh, the server is pinned to CPU 1 and the load generator to CPU 0, so
# the server runs the scheduler it runs there (one worker: tokio's single-threaded
# one; unpinned, two workers of the multi-threaded one cost about 8% more). The
# profile is left in target/callgrind/ for `callgrind_annotate`. Needs valgrind
# (Debian: apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
source bench/lib.sh

scenario=${1:-}
case "$scenario" in
  relay | echo | echo-deflate | storm | fanout | fanout-targets) ;;
  *) usage; exit 2 ;;
esac
name=switchboard
if [ $# -gt 1 ]; then
  case "$scenario ${2:-} ${3:-}" in
    "relay --server floor" | "relay --server floor-tokio" | "fanout"*" --server floor" | "fanout"*" --server floor-tokio") name=$3 ;;
    *) usage; exit 2 ;;
  esac
fi
command -v valgrind > /dev/null || { echo "callgrind.sh: valgrind is not installed" >&2; exit 1; }

cargo build --quiet --release -p switchboard-server -p switchboard-loadgen -p floor-relay
cargo build --quiet --release -p switchboard --example echo
out=target/callgrind
mkdir -p "$out"
label=$scenario
[ "$name" != switchboard ] && label=$scenario-$name
rm -f "$out/$label.out"*
if [[ "$scenario" != echo* ]]; then
  server=(target/release/switchboard serve "${bench_serve_flags[@]}" --compression false)
  load=(relay --clients 1000 --targets 1 --rate 1000 --size 128)
  [ "$scenario" = storm ] && load=(storm --concurrency 8)
  [ "$scenario" = fanout ] && load=(fanout --subscribers 2000 --rate 15 --size 128 --topic)
  [ "$scenario" = fanout-targets ] && load=(fanout --subscribers 2000 --rate 15 --size 128)
  [ "$name" = floor ] && server=(target/release/floor-relay 127.0.0.1:0)
  [ "$name" = floor-tokio ] && server=(target/release/floor-relay 127.0.0.1:0 --tokio)
else
  server=(target/release/examples/echo 127.0.0.1:0)
  load=(echo --connections 50 --window 10 --size 64 --path /)
  [ "$scenario" = echo-deflate ] && load=(echo --connections 10 --window 4 --size 1024 --deflate --path /)
fi

taskset -c 1 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out/$label.out" \
  "${server[@]}" > "$out/$label.log" 2> "$out/$label.err" &
pid=$!
trap 'kill "$pid" 2> /dev/null || true' EXIT
addr=$(wait_listening "$out/$label.log" "$pid")
(sleep 4; callgrind_control -i on "$pid" > /dev/null; sleep 5; callgrind_control -i off "$pid" > /dev/null) &
summary=$(taskset -c 0 target/release/loadgen "${load[@]}" --warmup 4 --duration 5 --drain 3 --addr "$addr" \
  --pid "$pid" --server "$name" --label "callgrind-$label" --rep 1 \
  --out "$out/raw.jsonl" 2>&1 | grep -E "^loadgen: callgrind")
wait %2
kill "$pid"
wait "$pid" 2> /dev/null || true
trap - EXIT

# Operations are counted in the profile itself, as calls of a function that runs
# once per operation: the load generator's rate times 5 s can be a few percent
# off, as its window and the instrumented one do not line up exactly.
case "$scenario" in
  relay | echo*) per_op='^switchboard::telemetry::Counts::received$' ;; # one per message in
  fanout*) per_op='ErasedMailbox>::push$' ;;                             # one per delivery
  storm) per_op='^switchboard::telemetry::opened$' ;;                    # one per connection
esac
[ "$name" != switchboard ] && per_op='^(__libc_)?send$'                   # one per delivery
profile="$out/$label.out"
ops=$(awk -v pattern="$per_op" '
  /^c?fn=\(/ {
    id = $1; sub(/^c?fn=/, "", id)
    name = substr($0, index($0, ")") + 2)
    if (name != "") names[id] = name
    if ($0 ~ /^cfn=/) callee = id
    next
  }
  /^calls=/ { split(substr($0, 7), n, " "); if (names[callee] ~ pattern) total += n[1] }
  END { print total + 0 }' "$profile")
total=$(callgrind_annotate "$profile" 2> /dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "$summary" >&2
if [ "$ops" -eq 0 ]; then
  echo "callgrind.sh: no calls of $per_op in the profile (inlined?)" >&2
  exit 1
fi
echo "$label: $((total / ops)) instructions per operation ($total over $ops operations)"
