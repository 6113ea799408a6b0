// The real switchboard binary, run by the tests: started on a free port (or the
// port it had, for restarts) with a data directory of its own, stopped with
// SIGTERM or killed with SIGKILL.
//
// With SWITCHBOARD_TEST_CLUSTER=N, every server is N nodes on a redis-server of
// its own (--engine redis), and each client and API request goes to the next
// node in turn: the suites then show that a cluster behaves as one server.
//
// Env: SWITCHBOARD_BIN (default: ../../target/debug/switchboard),
//      SWITCHBOARD_TEST_CLUSTER (default: one node, memory engine).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
export const BIN = process.env.SWITCHBOARD_BIN || resolve(here, "../../../target/debug/switchboard");
export const API_KEY = "test-api-key-for-the-js-client";
export const SECRET = "a-test-secret-of-at-least-32-bytes!!";
export const CLUSTER = Number(process.env.SWITCHBOARD_TEST_CLUSTER || 0);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function freePort() {
  const probe = createServer();
  await new Promise((r) => probe.listen(0, "127.0.0.1", r));
  const { port } = probe.address();
  await new Promise((r) => probe.close(r));
  return port;
}

/** A redis-server on a free port, in a temp dir, with AOF fsynced on every write. */
class Redis {
  static async start() {
    const redis = new Redis(mkdtempSync(join(tmpdir(), "switchboard-js-redis-")), await freePort());
    const argv = ["--port", String(redis.port), "--bind", "127.0.0.1", "--dir", redis.dir];
    redis.proc = spawn("redis-server", [...argv, "--appendonly", "yes", "--appendfsync", "always", "--save", ""], {
      stdio: "ignore",
    });
    for (let i = 0; i < 200 && !(await redis.command("PING")); i++) await sleep(25);
    return redis;
  }

  constructor(dir, port) {
    this.dir = dir;
    this.port = port;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  /** Sends one command (RESP); resolves with the first reply line, or null when nothing answers. */
  command(...words) {
    return new Promise((done) => {
      const socket = connect(this.port, "127.0.0.1");
      socket.on("error", () => done(null));
      socket.once("data", (data) => {
        done(data.toString().split("\r\n")[0]);
        socket.destroy();
      });
      socket.write(`*${words.length}\r\n${words.map((w) => `$${Buffer.byteLength(w)}\r\n${w}\r\n`).join("")}`);
    });
  }

  close() {
    this.proc.kill("SIGKILL");
    rmSync(this.dir, { recursive: true, force: true });
  }
}

export class Server {
  /** Starts a server (a cluster with SWITCHBOARD_TEST_CLUSTER) with `args`, an API key and, on one node, a data dir. */
  static async start(args = []) {
    const redis = CLUSTER ? await Redis.start() : null;
    const nodes = [];
    for (let i = 0; i < Math.max(CLUSTER, 1); i++) {
      const extra = redis ? ["--engine", "redis", "--redis-url", redis.url] : ["--data-dir", mkdtempSync(join(tmpdir(), "switchboard-js-"))];
      const node = new Node([...extra, ...args]);
      await node.run(0);
      nodes.push(node);
    }
    const server = new Server(nodes, redis);
    await server.ready();
    return server;
  }

  constructor(nodes, redis) {
    this.nodes = nodes;
    this.redis = redis;
    this.turn = 0;
  }

  next() {
    return this.nodes[this.turn++ % this.nodes.length];
  }

  /** The /ws URL of the next node. */
  get url() {
    return `ws://127.0.0.1:${this.next().port}/ws`;
  }

  /** Every node answers /healthz (in a cluster: has joined it). */
  async ready() {
    for (const node of this.nodes) {
      for (let i = 0; ; i++) {
        const status = await fetch(`http://127.0.0.1:${node.port}/healthz`).then((r) => r.status, () => 0);
        if (status === 200) break;
        if (i > 400) throw new Error(`a node never became ready:\n${node.stderr}`);
        await sleep(25);
      }
    }
  }

  /** POSTs `body` to the HTTP API of the next node; resolves with the parsed answer, throws on non-2xx. */
  async api(path, body) {
    const response = await fetch(`http://127.0.0.1:${this.next().port}/api/v1/${path}`, {
      method: "POST",
      headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const text = await response.text();
    if (!response.ok) throw new Error(`${path}: ${response.status} ${text}`);
    return JSON.parse(text);
  }

  /** GETs `path` of the HTTP API from the next node; the parsed answer. */
  async get(path) {
    const response = await fetch(`http://127.0.0.1:${this.next().port}/api/v1/${path}`, {
      headers: { authorization: `Bearer ${API_KEY}` },
    });
    return response.json();
  }

  /** SIGTERM to every node (a graceful stop); resolves with their exits. */
  stop() {
    return Promise.all(this.nodes.map((node) => node.signal("SIGTERM")));
  }

  /** SIGKILL to every node: a crash. On one node that loses the history; a cluster's is in Redis. */
  kill() {
    return Promise.all(this.nodes.map((node) => node.signal("SIGKILL")));
  }

  /** Starts every node again on its port, with its data dir. */
  async restart() {
    for (const node of this.nodes) await node.run(node.port);
    await this.ready();
  }

  async close() {
    for (const node of this.nodes) await node.close();
    this.redis?.close();
  }
}

/** One switchboard process. */
class Node {
  constructor(args) {
    this.args = args;
    this.stderr = "";
  }

  async run(port) {
    if (!existsSync(BIN)) throw new Error(`switchboard binary not found at ${BIN} (set SWITCHBOARD_BIN)`);
    const argv = ["serve", "--listen", `127.0.0.1:${port}`, "--api-key", API_KEY, ...this.args];
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

  signal(name) {
    this.proc.kill(name);
    return this.exited;
  }

  async close() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) await this.signal("SIGKILL");
    const dir = this.args[this.args.indexOf("--data-dir") + 1];
    if (this.args.includes("--data-dir")) rmSync(dir, { recursive: true, force: true });
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

// The temp dirs of `configFile`, removed as the test process exits.
const configDirs = [];
process.on("exit", () => {
  for (const dir of configDirs) rmSync(dir, { recursive: true, force: true });
});

/** A TOML config file with `text`, in a temp dir removed at exit; returns its path. */
export function configFile(text) {
  const dir = mkdtempSync(join(tmpdir(), "switchboard-js-config-"));
  configDirs.push(dir);
  const path = join(dir, "switchboard.toml");
  writeFileSync(path, text);
  return path;
}
