#!/usr/bin/env bash
# Run with `bench/ab.sh --old BIN --new BIN [--new-args "ARGS"] [--reps N] [--scenarios "A B"] [--out DIR]`:
# the relay's server CPU per delivery (relay-k1 and relay-k10, as bench/run.sh's
# full run drives them; `idle`, `echo`, `fanout` and `fanout-topic` too on request) of two `switchboard` binaries, alternating within each
# repetition, with the same load generator (target/release/loadgen). It writes
# DIR/results.md with `new`'s medians divided by `old`'s and their p, for a
# change's before and after, or of one binary with and without a setting (`--old`
# and `--new` the same binary, `--new-args` the setting). Build the old binary from a worktree, e.g.
#   git worktree add /tmp/old REV && (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target \
#     cargo build --release -p switchboard-server)
#
# Options:
#   --old BIN   the binary before the change
#   --new BIN   the binary after it (default: target/release/switchboard)
#   --new-args "ARGS"  flags added to `switchboard serve` for the new binary only
#               (e.g. "--inbox-size 0": what the relay's inboxes cost)
#   --reps N    repetitions (default 6)
#   --scenarios "A B"  subset of: relay-k1 relay-k10 idle echo fanout fanout-topic storm (default: relay-k1 relay-k10;
#               idle holds 19,500 connections, as the full run does; echo is the
#               service's --echo-path, with the full run's echo load; storm is
#               the full run's connect storm)
#   --out DIR   where the report goes (default: target/bench-ab)
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

command="bench/ab.sh $(printf '%q ' "$@")"
old="" new=target/release/switchboard new_args="" reps=6 out=target/bench-ab scenarios="relay-k1 relay-k10"
while [ $# -gt 0 ]; do
  case "$1" in
    --old) old=$2; shift 2 ;;
    --new) new=$2; shift 2 ;;
    --new-args) new_args=$2; shift 2 ;;
    --reps) reps=$2; shift 2 ;;
    --scenarios) scenarios=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; exit 2 ;;
  esac
done
[ -x "$old" ] && [ -x "$new" ] || { usage >&2; exit 2; }
cargo build --release --quiet -p switchboard-loadgen
mkdir -p "$out"
raw="$out/raw.jsonl"
: > "$raw"
bench_log="$out/server.out"
for rep in $(seq "$reps"); do
  for which in old new; do
    bin=$new extra=()
    [ "$which" = new ] && read -ra extra <<< "$new_args"
    [ "$which" = old ] && bin=$old
    for scenario in $scenarios; do
      case "$scenario" in
        relay-k1) args=(relay --clients 1000 --targets 1 --rate 10000 --size 128) ;;
        relay-k10) args=(relay --clients 1000 --targets 10 --rate 2000 --size 128) ;;
        idle) args=(idle --connections 19500 --concurrency 128) ;;
        echo) args=(echo --connections 50 --window 10 --size 64 --path /echo) ;;
        fanout) args=(fanout --subscribers 2000 --rate 15 --size 128) ;;
        fanout-topic) args=(fanout --subscribers 2000 --rate 15 --size 128 --topic) ;;
        storm) args=(storm --concurrency 32) ;;
        *) usage >&2; exit 2 ;;
      esac
      bench_run_once "$bin" --echo-path /echo "${extra[@]}" -- "${args[@]}" --server "$which" --label "$scenario" \
        --rep "$rep" --out "$raw"
    done
  done
done
target/release/loadgen report --input "$raw" --baseline new --out-dir "$out" --command "$command"
