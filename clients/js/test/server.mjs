// The real switchboard binary, run by the tests: started on a free port (or the
// port it had, for restarts) with a data directory of its own, stopped with
// SIGTERM or killed with SIGKILL.
//
// Env: SWITCHBOARD_BIN (default: ../../target/debug/switchboard).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.SWITCHBOARD_BIN || resolve(here, "../../../target/debug/switchboard");
export const API_KEY = "test-api-key-for-the-js-client";
export const SECRET = "a-test-secret-of-at-least-32-bytes!!";

export class Server {
  /** Starts a server with `args` on top of a free port, a fresh data dir and an API key. */
  static async start(args = []) {
    const server = new Server(args, mkdtempSync(join(tmpdir(), "switchboard-js-")));
    await server.run(0);
    return server;
  }

  constructor(args, dataDir) {
    this.args = args;
    this.dataDir = dataDir;
    this.stderr = "";
  }

  async run(port) {
    if (!existsSync(BIN)) throw new Error(`switchboard binary not found at ${BIN} (set SWITCHBOARD_BIN)`);
    const argv = ["serve", "--listen", `127.0.0.1:${port}`, "--data-dir", this.dataDir, "--api-key", API_KEY, ...this.args];
    const proc = spawn(BIN, argv, { stdio: ["ignore", "pipe", "pipe"] });
    proc.stderr.on("data", (d) => {
      this.stderr = (this.stderr + d).slice(-4000);
    });
    this.exited = new Promise((done) => proc.on("exit", (code, signal) => done({ code, signal })));
    this.proc = proc;
    this.port = await new Promise((ok, fail) => {
      const timer = setTimeout(() => fail(new Error(`no listening line in 15 s:\n${this.stderr}`)), 15_000);
      createInterface({ input: proc.stdout }).once("line", (line) => {
        clearTimeout(timer);
        const m = /^listening on 127\.0\.0\.1:(\d+)$/.exec(line);
        m ? ok(Number(m[1])) : fail(new Error(`unexpected first line ${line}`));
      });
      proc.once("exit", (code) => fail(new Error(`server exited with ${code}:\n${this.stderr}`)));
    });
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  /** POSTs `body` to the HTTP API; resolves with the parsed answer, throws on non-2xx. */
  async api(path, body) {
    const response = await fetch(`http://127.0.0.1:${this.port}/api/v1/${path}`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`${path}: ${response.status} ${text}`);
    return JSON.parse(text);
  }

  /** SIGTERM (a graceful stop, which writes the history snapshot), then waits for the exit. */
  async stop() {
    this.proc.kill("SIGTERM");
    return this.exited;
  }

  /** SIGKILL: a crash, no snapshot. */
  async kill() {
    this.proc.kill("SIGKILL");
    return this.exited;
  }

  /** Starts again on the same port with the same data dir. */
  async restart() {
    await this.run(this.port);
  }

  async close() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) await this.kill();
    rmSync(this.dataDir, { recursive: true, force: true });
  }
}

/** An HS256 JWT for `sub`, valid for `seconds` (whole seconds: `exp` is in seconds). */
export function jwt(sub, seconds, extra = {}) {
  const b64 = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, exp: now + seconds, iat: now, ...extra })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

/** Resolves once `predicate()` is truthy (polled every 10 ms); rejects after `ms`. */
export async function until(predicate, ms = 5000, what = "condition") {
  const started = Date.now();
  while (!predicate()) {
    if (Date.now() - started > ms) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Records every value of each of `client`'s `events`: `record.connected`, `record.message`, ... */
export function record(client, events = ["connected", "disconnected", "reconnecting", "message", "error"]) {
  const seen = {};
  for (const event of events) {
    seen[event] = [];
    client.on(event, (value) => seen[event].push(value));
  }
  return seen;
}

/** A TOML config file with `text`, in a temp dir; returns its path. */
export function configFile(text) {
  const dir = mkdtempSync(join(tmpdir(), "switchboard-js-config-"));
  const path = join(dir, "switchboard.toml");
  writeFileSync(path, text);
  return path;
}
