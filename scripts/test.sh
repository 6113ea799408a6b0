#!/usr/bin/env bash
# The one command that runs every test, on a fresh machine that has Rust:
#   scripts/test.sh
# It installs what the tests need: a Python venv (.venv) with pytest, websockets,
# kosoku and schemathesis; Debian's chromium for the browser test; playwright-core via npm.
#
# Steps: Rust unit, property and integration tests; the fuzz targets, briefly;
# the Python client suite;
# schemathesis against the HTTP API; a smoke run of the benchmark harness; the
# Autobahn conformance cases via kosoku; headless Chromium interop.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "Rust tests (unit, property, integration, examples build)"
cargo test --workspace --all-targets
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

step "HTTP API contract (schemathesis against docs/openapi.json)"
scripts/schemathesis.sh

step "Benchmark harness smoke run (bench/run.sh --smoke)"
bench/run.sh --smoke

step "Autobahn conformance (kosoku)"
scripts/autobahn.sh

step "Browser interop (headless Chromium)"
if [ ! -x /usr/bin/chromium ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium > /dev/null
fi
(cd tests/browser && npm ci --silent --no-audit --no-fund && node relay.test.mjs)
