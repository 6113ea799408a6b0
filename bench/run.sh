#!/usr/bin/env bash
# Run with `bench/run.sh` from a clean clone: every scenario against Switchboard
# and each peer (Bun, Node + ws, axum + tokio-tungstenite, and the floor: the least
# work a relay can do, bench/peers/floor-relay), servers alternating
# within each repetition, 5 repetitions, 25 minutes or more (see --max-steal). It writes
# bench/results/results.md (medians, ratios, the command, the machine) and PNG
# charts. `bench/run.sh --smoke` runs every scenario for about a second against
# Switchboard and whichever peers are installed, into target/bench-smoke/, and
# fails on any lost, duplicated or corrupted delivery: the test command runs it.
#
# Options:
#   --smoke            short runs, one repetition, debug builds, no peer install
#   --reps N           repetitions (full run: at least 3; default 5, with which the
#                      report's p can fall below 0.01; with 3 it never falls below 0.1)
#   --servers "A B"    subset of: switchboard bun node axum floor (default: all), and,
#                      not in the default set, floor-uring (the floor sending each
#                      message to all its recipients in one io_uring submission) and
#                      floor-tokio (the floor's relay on tokio's single-threaded
#                      runtime, a task per connection, as Switchboard runs)
#   --scenarios "A B"  subset of: echo relay-k1 relay-k10 fanout fanout-topic idle
#                      idle-awake storm echo-deflate fanout-deflate
#                      (idle-awake is idle with Switchboard's hibernation off,
#                      --hibernate-after-secs 0, against the floor only: the
#                      other peers have no such setting)
#   --release          smoke with release builds (full runs always use them)
#   --switchboard-args "FLAGS"  extra flags for `switchboard serve`, e.g. "--workers 1"
#   --out DIR          where the report goes (default: bench/results, smoke: target/bench-smoke)
#   --no-pin           let the scheduler place the server and the load generator
#   --max-steal PCT    run a repetition again (up to twice, after a pause) when the
#                      hypervisor took more than PCT% of the machine's time during
#                      it; the third attempt is kept whatever the steal (full run
#                      default: 5; smoke and 0: never)
#
# Each run starts a fresh server on 127.0.0.1:0 (it prints `listening on ADDR`),
# drives it with target/*/loadgen on one thread, and stops it. With two or more
# CPUs, the load generator is pinned to CPU 0 and the server to the others
# (taskset), so that every server gets the same cores and the load generator
# never competes with it; Switchboard's default worker count follows. Only 127.0.0.x
# addresses are used; every run is bounded in time by the load generator.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh

mode=full
reps=5
servers="switchboard bun node axum floor"
scenarios="echo relay-k1 relay-k10 fanout fanout-topic idle idle-awake storm echo-deflate fanout-deflate"
release=""
switchboard_args=""
out_dir=""
pin=yes
max_steal=""
command_line="bench/run.sh"
for arg in "$@"; do
  command_line+=" $(printf %q "$arg")"
done
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) mode=smoke; reps=1 ;;
    --reps) reps="$2"; shift ;;
    --servers) servers="$2"; shift ;;
    --scenarios) scenarios="$2"; shift ;;
    --release) release=yes ;;
    --switchboard-args) switchboard_args="$2"; shift ;;
    --out) out_dir="$2"; shift ;;
    --no-pin) pin="" ;;
    --max-steal) max_steal="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# Full runs always measure release builds; smoke runs use debug ones unless asked.
profile=release
[ "$mode" = smoke ] && [ -z "$release" ] && profile=debug
# On a shared host the hypervisor can take a third of the machine in one
# repetition (the "steal" column); latency tails follow it. Full runs repeat those.
[ -z "$max_steal" ] && [ "$mode" = full ] && max_steal=5
[ "$max_steal" = 0 ] && max_steal=""
if [ "$mode" = full ] && [ "$reps" -lt 3 ]; then
  echo "run.sh: a full run needs at least 3 repetitions" >&2
  exit 2
fi

step() { printf '\n==> %s\n' "$*" >&2; }

# Scenario parameters. A full run measures; a smoke run only proves the harness
# still works end to end. Rates are offered loads every server here sustains, so
# that latency is compared at the same load.
if [ "$mode" = full ]; then
  out=${out_dir:-bench/results}
  timing=(--warmup 1 --duration 5 --drain 3)
  echo_args=(--connections 50 --window 10 --size 64)
  echo_deflate_args=(--connections 50 --window 10 --size 1024)
  relay_k1_args=(--clients 1000 --targets 1 --rate 10000 --size 128)
  relay_k10_args=(--clients 1000 --targets 10 --rate 2000 --size 128)
  fanout_args=(--subscribers 2000 --rate 15 --size 128)
  # Node compresses per recipient (context takeover) and saturates above ~2/s.
  fanout_deflate_args=(--subscribers 2000 --rate 2 --size 1024)
  idle_args=(--connections 19500 --concurrency 128)
  storm_args=(--concurrency 32)
else
  out=${out_dir:-target/bench-smoke}
  timing=(--warmup 0.3 --duration 1 --drain 2)
  echo_args=(--connections 10 --window 4 --size 64)
  echo_deflate_args=(--connections 10 --window 4 --size 1024)
  relay_k1_args=(--clients 100 --targets 1 --rate 2000 --size 128)
  relay_k10_args=(--clients 100 --targets 10 --rate 300 --size 128)
  fanout_args=(--subscribers 200 --rate 10 --size 128)
  fanout_deflate_args=(--subscribers 200 --rate 10 --size 1024)
  idle_args=(--connections 500 --concurrency 64)
  storm_args=(--concurrency 8)
fi
bin=target/$profile
logs=target/bench-logs
mkdir -p "$out" "$logs"
raw="$out/raw.jsonl"
: > "$raw"
# Pinning: the load generator on CPU 0, the server on the rest. The server's
# workers default to its CPUs (sched_getaffinity), as in a container with fewer.
cpus=$(nproc)
server_pin=()
loadgen_pin=()
placement="not pinned"
if [ -n "$pin" ] && [ "$cpus" -ge 2 ] && command -v taskset > /dev/null; then
  server_pin=(taskset -c 1)
  [ "$cpus" -gt 2 ] && server_pin=(taskset -c "1-$((cpus - 1))")
  loadgen_pin=(taskset -c 0)
  placement="server pinned to CPU ${server_pin[2]}, load generator to CPU 0"
fi
# Other processes skew the figures; the report states how busy the machine was.
load_at_start=$(cut -d' ' -f1-3 /proc/loadavg)

step "Build ($profile): switchboard, the echo example, loadgen, axum-relay, floor-relay"
build=(cargo build --quiet)
[ "$profile" = release ] && build+=(--release)
# Separate invocations, so that Switchboard's binary is built with exactly its own
# dependency features, as `cargo build -p switchboard-server` builds it.
nice -n 10 "${build[@]}" -p switchboard-server
nice -n 10 "${build[@]}" -p switchboard --example echo
nice -n 10 "${build[@]}" -p switchboard-loadgen -p axum-relay -p floor-relay

if [ "$mode" = full ]; then
  step "Peers (bench/peers/install.sh)"
  bench/peers/install.sh
fi

bun=bench/peers/node_modules/.bin/bun
available() {
  case "$1" in
    switchboard|axum|floor|floor-uring|floor-tokio) return 0 ;;
    bun) [ -x "$bun" ] && "$bun" --version > /dev/null 2>&1 ;;
    node) command -v node > /dev/null && [ -f bench/peers/node_modules/ws/package.json ] ;;
    *) echo "run.sh: unknown server $1" >&2; return 1 ;;
  esac
}
active=()
for server in $servers; do
  if available "$server"; then
    active+=("$server")
  elif [ "$mode" = full ]; then
    echo "run.sh: $server is not available; run bench/peers/install.sh" >&2
    exit 1
  else
    echo "run.sh: $server is not installed; the smoke run skips it" >&2
  fi
done

# The command that serves the relay (kind=relay, or kind=awake: the relay with
# Switchboard's hibernation off) or the echo route (kind=echo), with
# permessage-deflate accepted when deflate=true (and otherwise off).
server_command() {
  local server=$1 kind=$2 deflate=$3 flag=""
  [ "$deflate" = true ] && flag=" --deflate"
  case "$server/$kind" in
    switchboard/relay)
      echo "$bin/switchboard serve ${bench_serve_flags[*]} --compression $deflate $switchboard_args" ;;
    switchboard/awake)
      echo "$bin/switchboard serve ${bench_serve_flags[*]} --compression $deflate --hibernate-after-secs 0 $switchboard_args" ;;
    # The toolkit example always accepts compression, but only when offered.
    switchboard/echo) echo "$bin/examples/echo 127.0.0.1:0" ;;
    bun/*) echo "$bun bench/peers/bun-relay.js 127.0.0.1:0$flag" ;;
    node/*) echo "node bench/peers/node-relay.mjs 127.0.0.1:0$flag" ;;
    axum/*) echo "$bin/axum-relay 127.0.0.1:0" ;;
    floor/*) echo "$bin/floor-relay 127.0.0.1:0" ;;
    floor-uring/*) echo "$bin/floor-relay 127.0.0.1:0 --uring" ;;
    floor-tokio/*) echo "$bin/floor-relay 127.0.0.1:0 --tokio" ;;
  esac
}

# tokio-tungstenite has no permessage-deflate, and the floor does no more than it must.
supports_deflate() { case "$1" in axum|floor*) return 1 ;; esac; }

# Starts a server in the background; sets server_pid and server_addr.
start_server() {
  local name=$1 kind=$2 deflate=$3 log="$logs/$1-$2"
  # Emptied here, not by the redirection below: that one runs in the background
  # child, and until it does the loop below could read the previous run's address.
  : > "$log.out"
  : > "$log.err"
  # shellcheck disable=SC2046 # the command is split into words on purpose
  "${server_pin[@]}" $(server_command "$name" "$kind" "$deflate") >> "$log.out" 2>> "$log.err" &
  server_pid=$!
  for _ in $(seq 100); do
    server_addr=$(sed -n 's/^listening on //p' "$log.out" | head -n 1)
    [ -n "$server_addr" ] && return 0
    if ! kill -0 "$server_pid" 2> /dev/null; then
      echo "run.sh: $name exited at start:" >&2
      cat "$log.err" >&2
      return 1
    fi
    sleep 0.1
  done
  echo "run.sh: $name did not print 'listening on' within 10 s" >&2
  stop_server
  return 1
}

stop_server() {
  kill "$server_pid" 2> /dev/null || true
  # Switchboard drains connections on SIGTERM; none are left by now.
  for _ in $(seq 50); do
    kill -0 "$server_pid" 2> /dev/null || break
    sleep 0.1
  done
  kill -9 "$server_pid" 2> /dev/null || true
  wait "$server_pid" 2> /dev/null || true
}

# Runs one scenario against one server: a fresh server process per run.
run_one() {
  local scenario=$1 server=$2 rep=$3 kind=relay deflate=false args=()
  local path=/echo
  [ "$server" = switchboard ] && path=/   # the toolkit example echoes on any path
  case "$scenario" in
    echo) kind=echo; args=(echo "${echo_args[@]}" --path "$path") ;;
    echo-deflate) kind=echo; deflate=true; args=(echo "${echo_deflate_args[@]}" --path "$path") ;;
    relay-k1) args=(relay "${relay_k1_args[@]}") ;;
    relay-k10) args=(relay "${relay_k10_args[@]}") ;;
    fanout) args=(fanout "${fanout_args[@]}") ;;
    fanout-topic) args=(fanout "${fanout_args[@]}" --topic) ;;
    idle) args=(idle "${idle_args[@]}") ;;
    idle-awake)
      case "$server" in
        switchboard) kind=awake ;;
        floor*) ;;
        *) echo "run.sh: $scenario skips $server (no hibernation; the floor is the yardstick)" >&2
           return 0 ;;
      esac
      args=(idle "${idle_args[@]}") ;;
    storm) args=(storm "${storm_args[@]}") ;;
    fanout-deflate) deflate=true; args=(fanout "${fanout_deflate_args[@]}") ;;
    *) echo "run.sh: unknown scenario $scenario" >&2; return 1 ;;
  esac
  if [ "$deflate" = true ]; then
    if ! supports_deflate "$server"; then
      echo "run.sh: $scenario skips $server (no permessage-deflate)" >&2
      return 0
    fi
    args+=(--deflate)
  fi
  local attempt status
  for attempt in 1 2 3; do
    local steal_limit=()
    [ -n "$max_steal" ] && [ "$attempt" -lt 3 ] && steal_limit=(--max-steal "$max_steal")
    start_server "$server" "$kind" "$deflate" || return 1
    status=0
    # The load generator's own messages (summary, warnings, errors) are kept too.
    "${loadgen_pin[@]}" "$bin/loadgen" "${args[@]}" "${timing[@]}" --addr "$server_addr" --pid "$server_pid" \
      --server "$server" --label "$scenario" --rep "$rep" --out "$raw" "${steal_limit[@]}" \
      2> >(tee "$logs/loadgen-$scenario-$server-$rep.log" >&2) || status=$?
    stop_server
    # Status 3: discarded for steal (recorded as such); let the burst pass, then again.
    [ "$status" -eq 3 ] || break
    sleep 10
  done
  return $status
}

failed=0
for rep in $(seq "$reps"); do
  step "Repetition $rep of $reps: ${active[*]}"
  for scenario in $scenarios; do
    # Servers alternate within each scenario; the order rotates each repetition
    # so that no server always runs first (on a cold machine) or last.
    count=${#active[@]}
    for i in $(seq 0 $((count - 1))); do
      server=${active[$(((i + rep - 1) % count))]}
      if ! run_one "$scenario" "$server" "$rep"; then
        echo "run.sh: $scenario against $server failed" >&2
        failed=$((failed + 1))
      fi
    done
  done
done

step "Report"
revision=$(git rev-parse --short HEAD 2> /dev/null || echo unknown)
git diff --quiet HEAD -- crates 2> /dev/null || revision="$revision with uncommitted changes in crates/"
facts=("date $(date -u '+%Y-%m-%d %H:%M UTC')" "commit $revision" "$placement" "$(rustc --version)" "repetitions $reps"
  "load average at start $load_at_start, at end $(cut -d' ' -f1-3 /proc/loadavg)")
[ -n "$max_steal" ] && facts+=("a repetition with more than $max_steal% steal was run again, at most twice")
for server in "${active[@]}"; do
  case "$server" in
    bun) facts+=("bun $("$bun" --version)") ;;
    node) facts+=("node $(node --version) with ws $(node -p 'require("./bench/peers/node_modules/ws/package.json").version')") ;;
  esac
done
report=("$bin/loadgen" report --input "$raw" --out-dir "$out" --command "$command_line")
for fact in "${facts[@]}"; do
  report+=(--fact "$fact")
done
[ "$mode" = smoke ] && report+=(--check)
"${report[@]}" || failed=$((failed + 1))

if [ "$failed" -gt 0 ]; then
  echo "run.sh: $failed step(s) failed" >&2
  exit 1
fi
echo "run.sh: results in $out/results.md" >&2
