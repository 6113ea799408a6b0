#!/usr/bin/env bash
# The one command that runs every test, on a fresh machine that has Rust:
#   scripts/test.sh
# It installs what the tests need: a Python venv (.venv) with pytest, websockets, trustme,
# kosoku and schemathesis; Debian's redis-server for the cluster tests, prometheus
# for promtool, chromium, libnss3-tools and openssl for the browser tests; playwright-core, and the JS
# client's build tools, via npm.
#
# Steps: Rust unit, property and integration tests (and the relay, topic and API
# suites again on a 3-node cluster); the fuzz targets, briefly; the Python client
# suite (with the cluster's failure tests; relay and history again on 3 nodes);
# the JavaScript client's build, size check and Node tests; schemathesis against
# the HTTP API; a smoke run of the benchmark harness; the
# Autobahn conformance cases via kosoku; headless Chromium interop.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Debian packages: redis-server (cluster tests start their own instances), prometheus (promtool checks /metrics)"
if ! command -v redis-server > /dev/null || ! command -v promtool > /dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq redis-server prometheus > /dev/null
fi

step "Rust tests (unit, property, integration, examples build)"
cargo test --workspace --all-targets

step "Rust relay, topic and API suites against a 3-node cluster on Redis"
SWITCHBOARD_TEST_CLUSTER=3 cargo test -p switchboard-server --test relay --test topics --test api
cargo test --workspace --doc
# The Python suite runs the binary and the examples themselves.
cargo build --workspace --bins --examples

step "Fuzz targets build and run, 20 s each (scripts/fuzz.sh: stable Rust, libFuzzer)"
FUZZ_SECONDS=20 scripts/fuzz.sh

step "Python environment (.venv)"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

step "Python client tests (websockets)"
export SWITCHBOARD_BIN="$PWD/target/debug/switchboard"
export SWITCHBOARD_EXAMPLES="$PWD/target/debug/examples"
.venv/bin/python -m pytest -q tests/python

step "Python relay and history suites against a 3-node cluster on Redis"
SWITCHBOARD_TEST_CLUSTER=3 .venv/bin/python -m pytest -q tests/python/test_relay.py tests/python/test_history.py

step "JavaScript client (clients/js): build, size budget, node:test against the binary, then on a 3-node cluster"
(cd clients/js && npm ci --silent --no-audit --no-fund && npm test && npm run test:cluster)

step "HTTP API contract (schemathesis against docs/openapi.json)"
scripts/schemathesis.sh

step "Benchmark harness smoke run (bench/run.sh --smoke)"
bench/run.sh --smoke

step "Autobahn conformance (kosoku)"
scripts/autobahn.sh

step "Browser interop (headless Chromium; over TLS with a test CA that openssl makes and certutil trusts)"
if [ ! -x /usr/bin/chromium ] || ! command -v certutil > /dev/null || ! command -v openssl > /dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium libnss3-tools openssl > /dev/null
fi
(cd tests/browser && npm ci --silent --no-audit --no-fund && node relay.test.mjs && node tls.test.mjs)
