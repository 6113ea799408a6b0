#!/usr/bin/env bash
# Installs the benchmark's peers from the registries:
#   bench/peers/install.sh
# - Bun (`npm install bun`: the package's postinstall puts the platform binary
#   from @oven/bun-<os>-<arch> in node_modules/bun/bin) and Node's `ws`, both
#   under bench/peers/node_modules (gitignored), at the versions package.json pins;
# - the axum + tokio-tungstenite relay is a workspace crate: run.sh builds it.
# It is idempotent and quiet when everything is there. Node and npm must exist.
set -euo pipefail
cd "$(dirname "$0")"

bun_ok() { [ -x node_modules/.bin/bun ] && node_modules/.bin/bun --version > /dev/null 2>&1; }
ws_ok() { [ -f node_modules/ws/package.json ]; }

if ! command -v npm > /dev/null; then
  echo "install.sh: npm not found; the Bun and Node peers need Node.js and npm" >&2
  exit 1
fi

if ! bun_ok || ! ws_ok; then
  echo "install.sh: npm install (bun, ws) in bench/peers" >&2
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  else
    npm install --no-audit --no-fund --loglevel=error
  fi
fi

if ! bun_ok; then
  echo "install.sh: node_modules/.bin/bun does not run: the Bun peer is unavailable" >&2
  exit 1
fi
echo "install.sh: bun $(node_modules/.bin/bun --version), node $(node --version), ws $(node -p 'require("./node_modules/ws/package.json").version')" >&2
