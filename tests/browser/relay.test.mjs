// Drives the switchboard relay from a real browser: Debian's headless Chromium
// through playwright-core. Starts the relay binary on port 0, opens its demo
// page, talks to /ws from the page (raw and switchboard.v1, compressed), and
// uses the demo chat (on the JavaScript client) in two tabs, one of which goes
// offline and comes back. Then runs auth.test.mjs (tokens, topics, origin
// allowlist; relays of its own) and admin.test.mjs (the /admin dashboard; a
// relay of its own) in the same browser.
//
//   cd tests/browser && npm ci && node relay.test.mjs
//
// Env: SWITCHBOARD_BIN (default: ../../target/debug/switchboard),
//      CHROMIUM (default: /usr/bin/chromium),
//      SCREENSHOT (default: /tmp/switchboard-demo.png).
// Prints one line per test and closes with one 'N passed, N failed' for both
// files; exits 1 on any failure.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";

import * as admin from "./admin.test.mjs";
import * as auth from "./auth.test.mjs";
import { launchChromium } from "./chromium.mjs";
import { installHelpers } from "./page.mjs";
import { withTimeout } from "./wait.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const BIN = process.env.SWITCHBOARD_BIN || resolve(here, "../../target/debug/switchboard");
const SCREENSHOT = process.env.SCREENSHOT || "/tmp/switchboard-demo.png";
const WAIT_MS = 5000;

// The whole run is bounded: never hang a CI job.
const watchdog = setTimeout(() => {
  console.error("FATAL: browser tests took longer than 240s");
  cleanup().finally(() => process.exit(1));
}, 240_000);
watchdog.unref();

// ---------------------------------------------------------------------------
// The relay process
// ---------------------------------------------------------------------------

let server = null;
let serverExit = null;
let stderrTail = "";

function startServer(args = []) {
  if (!existsSync(BIN)) throw new Error(`switchboard binary not found at ${BIN} (set SWITCHBOARD_BIN)`);
  const proc = spawn(BIN, ["serve", "--listen", "127.0.0.1:0", "--persist", "false", ...args], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  proc.stderr.on("data", (d) => {
    stderrTail = (stderrTail + d.toString()).slice(-4000);
  });
  serverExit = new Promise((resolveExit) => proc.on("exit", (code, signal) => resolveExit({ code, signal })));
  const port = new Promise((resolvePort, reject) => {
    const timer = setTimeout(() => reject(new Error(`no listening line in 15s; stderr:\n${stderrTail}`)), 15_000);
    const lines = createInterface({ input: proc.stdout });
    lines.once("line", (line) => {
      clearTimeout(timer);
      const m = /^listening on 127\.0\.0\.1:(\d+)$/.exec(line);
      if (m) resolvePort(Number(m[1]));
      else reject(new Error(`unexpected first stdout line ${JSON.stringify(line)}`));
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited early with ${code}; stderr:\n${stderrTail}`));
    });
  });
  server = proc;
  return port;
}

async function health() {
  return (await fetch(`http://127.0.0.1:${port}/healthz`)).json();
}

// ---------------------------------------------------------------------------
// A tiny test runner
// ---------------------------------------------------------------------------

const tests = [];
const test = (name, fn) => tests.push({ name, fn });
let passed = 0;
let failed = 0;

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

let port;
let browser;
let context;
let page;

// A direct delivery to a switchboard.v1 client, at `offset` of its inbox.
const delivery = (from, payload, offset, epoch) =>
  `{"type":"message","from":"${from}","offset":${offset},"epoch":"${epoch}","payload":${payload}}`;
const epochOf = async (name) => (await page.evaluate((name) => window.sb.welcome(name), name)).epoch;

const big = (tag) =>
  JSON.stringify({
    tag,
    rows: Array.from({ length: 1600 }, (_, i) => ({ i, name: "switchboard", text: "compressible text ".repeat(3) })),
  });

test("demo chat is served, and loads the JavaScript client from /client.js", async () => {
  const response = await page.goto(`http://127.0.0.1:${port}/`, { timeout: 10_000 });
  assert.equal(response.status(), 200);
  assert.equal(await page.title(), "Switchboard chat");
  for (const sel of ["#me", "#connect", "#targets", "#text", "#send", "#log", "#status"]) {
    assert.equal(await page.locator(sel).count(), 1, `${sel} on the demo page`);
  }
  const exported = await page.evaluate(async () => Object.keys(await import("/client.js")).sort());
  assert.deepEqual(exported, ["Client", "Subscription", "SwitchboardError"]);
  const script = await fetch(`http://127.0.0.1:${port}/client.js`);
  assert.match(script.headers.get("content-type"), /^text\/javascript/);
  await page.evaluate(installHelpers);
});

test("alice (raw) and bob (switchboard.v1) connect with permessage-deflate", async () => {
  const alice = await page.evaluate(() => window.sb.open("alice", "alice"));
  const bob = await page.evaluate(() => window.sb.open("bob", "bob", "switchboard.v1"));
  assert.equal(alice.protocol, "");
  assert.equal(bob.protocol, "switchboard.v1");
  for (const info of [alice, bob]) {
    assert.match(info.extensions, /permessage-deflate/, `extensions: ${info.extensions}`);
    assert.match(info.extensions, /server_no_context_takeover/, `extensions: ${info.extensions}`);
    // The server holds no inflate window between messages; the browser must agree.
    assert.match(info.extensions, /client_no_context_takeover/, `extensions: ${info.extensions}`);
  }
  await page.evaluate(() => Promise.all([window.sb.ready("alice"), window.sb.ready("bob")]));
  // Read once, right as both connections hibernate (5 ms after opening):
  // each is counted once through it (it was counted twice for a moment).
  assert.deepEqual(await health(), { status: "ok", connections: 2, clients: 2 });
  // bob's first frame was its welcome: a new inbox, at offset 0.
  const welcome = await page.evaluate(() => window.sb.welcome("bob"));
  assert.equal(welcome.client, "bob");
  assert.equal(welcome.offset, 0);
  assert.match(welcome.epoch, /^[a-z0-9]{8}$/);
  assert.equal(await page.evaluate(() => window.sb.welcome("alice", 200).catch(() => null)), null, "raw clients get no welcome");
});

test("alice -> bob arrives as an envelope, payload byte-for-byte", async () => {
  const payload = '{ "text" : "hi bob",  "n": [1, 2.50, 1e3], "u": "\\u00e9 é 😀" }';
  const got = await page.evaluate(
    async (payload) => {
      window.sb.send("alice", `{"targets":["bob"],"payload":${payload}}`);
      return window.sb.next("bob");
    },
    payload,
  );
  assert.equal(got, delivery("alice", payload, 1, await epochOf("bob")));
});

test("bob -> alice with an id: alice gets the raw payload, bob an ack", async () => {
  const [delivery, ack] = await page.evaluate(async () => {
    window.sb.send("bob", JSON.stringify({ targets: ["alice", "nobody", "alice"], payload: { text: "hi alice" }, id: "m1" }));
    return Promise.all([window.sb.next("alice"), window.sb.next("bob")]);
  });
  assert.equal(delivery, '{"text":"hi alice"}');
  const offsets = { alice: 1, nobody: 1 };
  assert.deepEqual(JSON.parse(ack), { type: "ack", id: "m1", delivered: ["alice"], offline: ["nobody"], offsets });
});

test("~100KB compressible payloads both ways", async () => {
  const a = big("from alice");
  const b = big("from bob");
  assert.ok(a.length > 100_000, `payload is ${a.length} bytes`);
  const [atBob, atAlice, ack] = await page.evaluate(
    async ([a, b]) => {
      window.sb.send("alice", `{"targets":["bob"],"payload":${a}}`);
      const atBob = await window.sb.next("bob");
      window.sb.send("bob", `{"targets":["alice"],"payload":${b},"id":2}`);
      return [atBob, await window.sb.next("alice"), await window.sb.next("bob")];
    },
    [a, b],
  );
  assert.equal(atBob, delivery("alice", a, 2, await epochOf("bob")));
  assert.equal(atAlice, b);
  assert.deepEqual(JSON.parse(ack), { type: "ack", id: 2, delivered: ["alice"], offline: [], offsets: { alice: 2 } });
});

test("the same message three times: each inflates without the ones before", async () => {
  // Were the browser to keep its compression context, the second and third copies
  // would refer back to the first, which the server no longer holds (close 1007).
  const payload = JSON.stringify({ text: "again and again ".repeat(200) });
  const got = await page.evaluate(async (payload) => {
    const out = [];
    for (let i = 0; i < 3; i++) {
      window.sb.send("alice", `{"targets":["bob"],"payload":${payload}}`);
      out.push(await window.sb.next("bob"));
    }
    return out;
  }, payload);
  const epoch = await epochOf("bob");
  got.forEach((message, i) => assert.equal(message, delivery("alice", payload, 3 + i, epoch)));
});

test("error frames in both modes; connections keep working", async () => {
  const [rawErr, envErr, after] = await page.evaluate(async () => {
    window.sb.send("alice", "not json");
    const rawErr = await window.sb.next("alice");
    // "subscribe" is a real type since topics arrived: use one that is not.
    window.sb.send("bob", JSON.stringify({ type: "teleport", id: 9, targets: ["alice"], payload: 1 }));
    const envErr = await window.sb.next("bob");
    window.sb.send("bob", JSON.stringify({ targets: ["alice"], payload: "still here" }));
    return [rawErr, envErr, await window.sb.next("alice")];
  });
  const r = JSON.parse(rawErr);
  assert.equal(r.type, "error");
  assert.equal(r.code, "invalid_json");
  const e = JSON.parse(envErr);
  assert.equal(e.code, "unknown_type");
  assert.equal(e.id, 9);
  assert.equal(after, '"still here"', "nothing else reached alice before this");
});

test("binary frame from the browser gets binary_not_supported", async () => {
  const err = await page.evaluate(async () => {
    window.sb.send("alice", new Uint8Array([1, 2, 3]));
    return window.sb.next("alice");
  });
  assert.equal(JSON.parse(err).code, "binary_not_supported");
});

// Installed in a tab before its scripts run: every WebSocket the page makes is
// kept in window.__sockets, and while window.__offline is set new ones go to a
// port where nothing listens, as if the network were gone.
function flakyNetwork() {
  const Native = window.WebSocket;
  window.__sockets = [];
  window.__offline = false;
  window.WebSocket = class extends Native {
    constructor(url, protocols) {
      super(window.__offline ? "ws://127.0.0.1:9/" : url, protocols);
      window.__sockets.push(this);
    }
  };
}

const logOf = (ui) =>
  ui.evaluate(() => [...document.querySelectorAll("#log li.message")].map((li) => [li.dataset.from, li.dataset.offset, li.textContent]));

async function chatAs(ui, name) {
  await ui.fill("#me", name);
  await ui.click("#connect");
  await ui.waitForFunction((name) => document.querySelector("#status").textContent === `connected as ${name}`, name, { timeout: WAIT_MS });
}

test("demo chat: two tabs talk; a tab that goes offline gets every message sent meanwhile, exactly once, when it is back", async () => {
  const tabs = await browser.newContext();
  await tabs.addInitScript(flakyNetwork);
  const carol = await tabs.newPage();
  const dave = await tabs.newPage();
  for (const ui of [carol, dave]) await ui.goto(`http://127.0.0.1:${port}/`, { timeout: 10_000 });
  await chatAs(carol, "carol");
  await chatAs(dave, "dave");

  // A raw client (alice, in the first page) reaches both chats.
  await page.evaluate(() => window.sb.send("alice", JSON.stringify({ targets: ["carol", "dave"], payload: { text: "hi from alice" } })));
  for (const ui of [carol, dave]) {
    await ui.waitForFunction(() => document.querySelector("#log").textContent.includes("alice: hi from alice"), null, { timeout: WAIT_MS });
  }

  // carol writes to dave, bob (switchboard.v1, in the first page) and zed (nobody), from the keyboard.
  await carol.fill("#targets", "dave, bob, zed");
  await carol.fill("#text", "hello from the chat");
  await carol.press("#text", "Enter");
  await carol.waitForFunction(() => document.querySelector("#log li.mine[data-acked]"), null, { timeout: WAIT_MS });
  assert.match(await carol.textContent("#log li.mine"), /✓ delivered to dave, bob; waiting for zed \(offline\)/);
  await dave.waitForFunction(() => document.querySelector("#log").textContent.includes("carol: hello from the chat"), null, { timeout: WAIT_MS });
  const atBob = JSON.parse(await page.evaluate(() => window.sb.next("bob")));
  assert.deepEqual([atBob.from, atBob.payload], ["carol", { text: "hello from the chat" }]);

  // dave's network goes: its socket closes and new ones cannot connect.
  await dave.evaluate(() => {
    window.__offline = true;
    for (const ws of window.__sockets) ws.close(4000, "test: offline");
  });
  await dave.waitForFunction(() => document.querySelector("#status").textContent.startsWith("reconnecting"), null, { timeout: WAIT_MS });
  await dave.waitForFunction(() => window.__sockets.length >= 2, null, { timeout: WAIT_MS });
  const missed = [];
  for (let i = 1; i <= 5; i++) {
    missed.push(`while you were away ${i}`);
    await carol.fill("#targets", "dave");
    await carol.fill("#text", missed.at(-1));
    await carol.click("#send");
  }
  await page.evaluate(() => window.sb.send("alice", JSON.stringify({ targets: ["dave"], payload: { text: "and one from alice" } })));
  await carol.waitForFunction(() => document.querySelectorAll("#log li.mine[data-acked]").length === 6, null, { timeout: WAIT_MS });
  assert.equal((await logOf(dave)).length, 2, "nothing reached dave while offline");

  // Back: the chat resumes from the last message it saw.
  await dave.evaluate(() => {
    window.__offline = false;
  });
  await dave.waitForFunction(() => document.querySelector("#status").textContent === "connected as dave", null, { timeout: 30_000 });
  await dave.waitForFunction(() => document.querySelectorAll("#log li.message").length >= 8, null, { timeout: WAIT_MS });
  await new Promise((r) => setTimeout(r, 300));
  const log = await logOf(dave);
  assert.deepEqual(
    log.map(([from, , text]) => `${from}|${text}`),
    [
      "alice|alice: hi from alice",
      "carol|carol: hello from the chat",
      ...missed.map((text) => `carol|carol: ${text}`),
      "alice|alice: and one from alice",
    ],
  );
  const offsets = log.map(([, offset]) => Number(offset));
  assert.deepEqual(offsets, offsets.map((_, i) => i + 1), "every inbox offset once, in order");
  const notes = await dave.textContent("#log");
  assert.match(notes, /Back online: 6 missed message\(s\) follow\./);
  assert.doesNotMatch(notes, /could not be recovered/);

  // dave's page reloads: it kept its place in sessionStorage, so what was sent
  // while it reloaded is there, once, and nothing from before.
  await dave.reload();
  await carol.fill("#targets", "dave");
  await carol.fill("#text", "during the reload");
  await carol.click("#send");
  await carol.waitForFunction(() => document.querySelectorAll("#log li.mine[data-acked]").length === 7, null, { timeout: WAIT_MS });
  await chatAs(dave, "dave");
  await dave.waitForFunction(() => document.querySelectorAll("#log li.message").length >= 1, null, { timeout: WAIT_MS });
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(await logOf(dave), [["carol", "9", "carol: during the reload"]]);
  assert.match(await dave.textContent("#log"), /Back online: 1 missed message\(s\) follow\./);

  await carol.screenshot({ path: SCREENSHOT.replace(/\.png$/, "-carol.png"), fullPage: true });
  await dave.screenshot({ path: SCREENSHOT, fullPage: true });
  await tabs.close();
});

test("SIGTERM: the browser's sockets close with 1012 (service restart) and the relay exits 0", async () => {
  server.kill("SIGTERM");
  const [alice, bob] = await page.evaluate(() => Promise.all([window.sb.closed("alice"), window.sb.closed("bob")]));
  assert.equal(alice.code, 1012);
  assert.equal(bob.code, 1012);
  const exit = await withTimeout(serverExit, 10_000, "relay exit after SIGTERM");
  assert.deepEqual(exit, { code: 0, signal: null });
});

// ---------------------------------------------------------------------------

async function cleanup() {
  try {
    if (browser) await withTimeout(browser.close(), 10_000, "browser close");
  } catch (e) {
    console.error(`closing the browser: ${e.message}`);
  }
  browser = null;
  if (server && server.exitCode === null && server.signalCode === null) {
    server.kill("SIGKILL");
  }
  await auth.cleanup();
  await admin.cleanup();
}

async function main() {
  try {
    port = await startServer(["--idle-timeout-secs", "120"]);
    // launch() gives Chromium a fresh temporary user-data dir of its own.
    browser = await withTimeout(launchChromium(), 40_000, "launching Chromium");
    context = await browser.newContext();
    page = await context.newPage();
    page.setDefaultTimeout(WAIT_MS * 2);
  } catch (e) {
    console.error(`setup failed: ${e.stack || e}`);
    await cleanup();
    console.log(`0 passed, ${tests.length + auth.tests.length + admin.tests.length} failed`);
    process.exit(1);
  }

  let skipRest = false;
  for (const { name, fn } of tests) {
    if (skipRest) {
      failed++;
      console.log(`not ok - ${name} (skipped after an earlier failure)`);
      continue;
    }
    try {
      await withTimeout(fn(), 60_000, name);
      passed++;
      console.log(`ok - ${name}`);
    } catch (e) {
      failed++;
      // The tests build on each other (same sockets); later ones would only cascade.
      skipRest = true;
      console.log(`not ok - ${name}`);
      console.log(String(e.stack || e).replace(/^/gm, "    "));
      if (stderrTail) console.log(`    relay stderr (tail):\n${stderrTail.replace(/^/gm, "      ")}`);
    }
  }
  // auth.test.mjs: independent of the relay above, so it runs even after a failure.
  try {
    const counts = await auth.run(browser);
    passed += counts.passed;
    failed += counts.failed;
  } catch (e) {
    failed += auth.tests.length;
    console.log(`not ok - auth.test.mjs did not run: ${e.stack || e}`);
  }
  // admin.test.mjs: likewise independent.
  try {
    const counts = await admin.run(browser);
    passed += counts.passed;
    failed += counts.failed;
  } catch (e) {
    failed += admin.tests.length;
    console.log(`not ok - admin.test.mjs did not run: ${e.stack || e}`);
  }
  await cleanup();
  console.log(`${passed} passed, ${failed} failed`);
  process.exit(failed ? 1 : 0);
}

main();
