#!/usr/bin/env bash
# Runs the Autobahn TestSuite cases (1.* to 13.*) with kosoku against the echo
# example and fails unless every case is OK, NON-STRICT or INFORMATIONAL.
#
#   scripts/autobahn.sh                 # uses .venv/bin/kosoku (scripts/test.sh installs it)
#   scripts/autobahn.sh --write-summary # also rewrites the table in docs/conformance.md
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

KOSOKU=${KOSOKU:-.venv/bin/kosoku}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=target/autobahn

cargo build --release --quiet -p switchboard --example echo
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
"$PYTHON" scripts/autobahn_summary.py "$OUT/reports/index.json" "$@"
