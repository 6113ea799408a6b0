#!/usr/bin/env bash
# Runs schemathesis against the relay's HTTP API and its OpenAPI document.
#
#   scripts/schemathesis.sh            # uses target/debug/switchboard and .venv
#   SCHEMATHESIS_EXAMPLES=500 scripts/schemathesis.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

BIN=${SWITCHBOARD_BIN:-target/debug/switchboard}
EXAMPLES=${SCHEMATHESIS_EXAMPLES:-60}
OUT=target/schemathesis
KEY="schemathesis-$$"
mkdir -p "$OUT"
# Every topic keeps history, so that /api/v1/history answers every valid topic.
printf '[[namespaces]]\nprefix = ""\nhistory_size = 10\n' > "$OUT/switchboard.toml"

"$BIN" serve --listen 127.0.0.1:0 --persist false --config "$OUT/switchboard.toml" --api-key "$KEY" \
  --log-level warn > "$OUT/server.out" 2> "$OUT/server.err" &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
ADDR=$(wait_listening "$OUT/server.out" "$SERVER_PID") || { cat "$OUT/server.err"; echo "the server did not start"; exit 1; }

timeout 900 .venv/bin/schemathesis run "http://$ADDR/api/v1/openapi.json" \
  --header "Authorization: Bearer $KEY" \
  --max-examples "$EXAMPLES" \
  --seed 1 \
  --report junit --report-dir "$OUT"
# The server must have survived everything.
kill -0 "$SERVER_PID"
