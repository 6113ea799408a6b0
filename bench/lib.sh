# Shared by the bench scripts; source it, do not run it.

# wait_listening, which every script that starts a server needs.
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/lib.sh"

# `switchboard serve`'s flags in every benchmark, less `--compression`: the
# peers have no rate limits, idle timeouts or pings, so Switchboard runs
# without them too, with room for every load generator client under one id
# and for a fan-out to every id; no snapshot is written when a server stops.
bench_serve_flags=(--listen 127.0.0.1:0 --persist false --log-level warn
  --rate-limit-messages-per-sec 0 --rate-limit-bytes-per-sec 0
  --max-connections-per-client 100000 --idle-timeout-secs 0 --ping-interval-secs 0
  --max-outbound-bytes 67108864 --max-targets 100000)

# Prints the calling script's header comment (its usage): every line after the
# shebang up to the first that is not a comment, so it cannot fall out of step
# with the header as a fixed line range did.
usage() {
  awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"
}

# One run of the load generator against a fresh `switchboard serve` on CPU 1
# (the load generator on CPU 0), appended to a raw.jsonl:
#   bench_run_once SERVER_CMD... -- LOADGEN_ARGS...
# SERVER_CMD is the binary and its flags (bench_serve_flags and --compression
# come first); LOADGEN_ARGS follow the scenario's subcommand and end with
# --server/--label/--rep/--out. The server's stdout goes to $bench_log.
bench_run_once() {
  local server=()
  while [ "$1" != -- ]; do server+=("$1"); shift; done
  shift
  : > "$bench_log"
  taskset -c 1 "${server[0]}" serve "${bench_serve_flags[@]}" --compression false "${server[@]:1}" \
    > "$bench_log" 2> /dev/null &
  local pid=$! addr
  # A server that never listens leaves addr empty, and the load generator says so.
  addr=$(wait_listening "$bench_log" "$pid") || addr=""
  taskset -c 0 target/release/loadgen "$@" --addr "$addr" --pid "$pid" > /dev/null
  kill "$pid"
  wait "$pid" 2> /dev/null || true
}
