#!/usr/bin/env bash
# Runs the Autobahn TestSuite cases (1.* to 13.*, all 517) with kosoku twice, and
# fails unless every case is OK, NON-STRICT or INFORMATIONAL both times:
# - the server: kosoku -m fuzzingclient against the echo example;
# - the client: kosoku -m fuzzingserver, with the autobahn_client example
#   (switchboard::client) running every case it serves.
#
#   scripts/autobahn.sh                 # uses .venv/bin/kosoku (scripts/test.sh installs it)
#   scripts/autobahn.sh --write-summary # also rewrites the tables in docs/conformance.md
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

KOSOKU=${KOSOKU:-.venv/bin/kosoku}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=target/autobahn

# Every Autobahn case there is: groups 1-7, 9, 10, 12 and 13.
CASES=517

cargo build --release --quiet -p switchboard --example echo --example autobahn_client
rm -rf "$OUT"
mkdir -p "$OUT"
# Port 0: a free port, whatever else runs on this machine.
target/release/examples/echo "127.0.0.1:0" > "$OUT/echo.log" 2>&1 &
ECHO_PID=$!
trap 'kill $ECHO_PID 2>/dev/null || true' EXIT
ADDR=$(wait_listening "$OUT/echo.log" "$ECHO_PID") || { cat "$OUT/echo.log"; echo "the echo example did not start"; exit 1; }
echo "echo example on $ADDR"

# Bounded: the slowest cases (9.*, 12.*, 13.*) finish in a few minutes here.
timeout 1500 "$KOSOKU" -m fuzzingclient -p 4 -o "$OUT/reports" "$ADDR" > "$OUT/kosoku.log" 2>&1 || true
tail -n 3 "$OUT/kosoku.log"
echo "server (echo example):"
"$PYTHON" scripts/autobahn_summary.py "$OUT/reports/index.json" --expect "$CASES" "$@"

# The client. kosoku binds port 0 and says where; it exits once the client has
# asked for its reports.
timeout 1500 "$KOSOKU" -m fuzzingserver -o "$OUT/client-reports" 127.0.0.1:0 > "$OUT/fuzzingserver.log" 2>&1 &
SERVER_PID=$!
trap 'kill $ECHO_PID $SERVER_PID 2>/dev/null || true' EXIT
SERVER=""
for _ in $(seq 1 100); do
  SERVER=$(sed -n 's|^fuzzingserver listening on ws://||p' "$OUT/fuzzingserver.log")
  [ -n "$SERVER" ] && break
  sleep 0.1
done
[ -n "$SERVER" ] || { cat "$OUT/fuzzingserver.log"; echo "kosoku's fuzzing server did not start"; exit 1; }
timeout 1500 target/release/examples/autobahn_client "$SERVER" > "$OUT/client.log" 2>&1 \
  || { tail -n 20 "$OUT/client.log"; echo "the autobahn client failed"; exit 1; }
wait "$SERVER_PID" || true
tail -n 2 "$OUT/fuzzingserver.log"
echo "client (autobahn_client example):"
"$PYTHON" scripts/autobahn_summary.py "$OUT/client-reports/index.json" --expect "$CASES" --section client "$@"
