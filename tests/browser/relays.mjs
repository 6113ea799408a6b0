// Relay processes for the browser suites: `switchboard serve` on port 0 (or a
// given address), its port read from its first stdout line. Every relay started
// here is stopped here: by stopRelay/stopAllRelays, or killed when the process exits.
//
// Env: SWITCHBOARD_BIN (default: ../../target/debug/switchboard).

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { createServer as createNetServer } from "node:net";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const BIN = process.env.SWITCHBOARD_BIN || resolve(here, "../../target/debug/switchboard");

const running = new Set();

// What every relay here runs with, unless `args` sets it: clients idle for
// long test steps stay, and a stop takes at most 2 s.
function defaults(args) {
  const flags = { "--idle-timeout-secs": "120", "--shutdown-drain-secs": "2" };
  return Object.entries(flags).flatMap(([flag, value]) => (args.includes(flag) ? [] : [flag, value]));
}

export function startRelay(args, listen = "127.0.0.1:0") {
  if (!existsSync(BIN)) throw new Error(`switchboard binary not found at ${BIN} (set SWITCHBOARD_BIN)`);
  const proc = spawn(
    BIN,
    ["serve", "--listen", listen, "--persist", "false", ...defaults(args), ...args],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  const relay = { proc, port: null, stderr: "" };
  running.add(relay);
  proc.stderr.on("data", (d) => {
    relay.stderr = (relay.stderr + d.toString()).slice(-4000);
  });
  relay.exit = new Promise((done) =>
    proc.on("exit", (code, signal) => {
      running.delete(relay);
      done({ code, signal });
    }),
  );
  relay.ready = new Promise((resolvePort, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listening line in 15s; stderr:\n${relay.stderr}`)), 15_000);
    createInterface({ input: proc.stdout }).once("line", (line) => {
      clearTimeout(timer);
      const m = /^listening on 127\.0\.0\.1:(\d+)$/.exec(line);
      if (m) resolvePort((relay.port = Number(m[1])));
      else reject(new Error(`unexpected first stdout line ${JSON.stringify(line)}`));
    });
    relay.exit.then(({ code, signal }) => {
      clearTimeout(timer);
      reject(new Error(`relay exited early (${code ?? signal}); stderr:\n${relay.stderr}`));
    });
  });
  relay.ready.catch(() => {});
  return relay;
}

// SIGTERM, then SIGKILL if it has not exited within 5 s.
export async function stopRelay(relay) {
  if (!relay || !running.has(relay)) return relay && relay.exit;
  relay.proc.kill("SIGTERM");
  const timer = setTimeout(() => relay.proc.kill("SIGKILL"), 5000);
  const exit = await relay.exit;
  clearTimeout(timer);
  return exit;
}

// Every relay still running, stopped (SIGTERM, then SIGKILL after 5 s).
export function stopAllRelays() {
  return Promise.all([...running].map(stopRelay));
}

function killAllRelays() {
  for (const relay of running) relay.proc.kill("SIGKILL");
}
process.on("exit", killAllRelays);

// A port that was free a moment ago (the allowlist names the relay's own
// origin, so the port must be known before it starts).
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const s = createNetServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolvePort(port));
    });
  });
}
