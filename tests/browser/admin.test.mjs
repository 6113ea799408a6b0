// The admin dashboard (/admin) from a real browser (headless Chromium through
// playwright-core), against the relay binary started with --api-key.
//
// A wrong key is refused on the page; the right one shows the live dashboard.
// Two WebSocket clients opened from Node move its connection count 0 -> 2 and
// back; a topic one of them subscribes to shows with its presence. From the
// keyboard alone the page publishes, sends and disconnects, and the clients
// get what it sent (and the close code). The rate chart gets non-zero points,
// the recent closes show the disconnect, and no request leaves 127.0.0.1.
//
// relay.test.mjs runs these after auth.test.mjs (one browser, one closing
// line); `node admin.test.mjs` runs them alone.
//
// Env: SWITCHBOARD_BIN (default: ../../target/debug/switchboard), CHROMIUM,
//      ARTIFACTS (screenshots; default: /tmp/switchboard-artifacts).

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

import { freePort, startRelay, stopRelay } from "./relays.mjs";
import { isMain, runAlone } from "./standalone.mjs";
import { withTimeout } from "./wait.mjs";

const ARTIFACTS = process.env.ARTIFACTS || "/tmp/switchboard-artifacts";
const WAIT_MS = 5000;
const KEY = `admin-suite-${randomBytes(16).toString("hex")}`;

// Node 22 has a WebSocket global; Node 20 only behind a flag, so the `ws`
// package stands in. Both give the same onopen/onmessage/onclose API.
const NodeWebSocket = globalThis.WebSocket ?? (await import("ws")).WebSocket;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// ---------------------------------------------------------------------------
// The relay (relays.mjs starts it and stops it)
// ---------------------------------------------------------------------------

let relay = null; // { proc, port, stderr, exit } from startRelay
let http = null; // its origin, http://127.0.0.1:PORT

const api = (path, key = KEY) => fetch(`${http}${path}`, { headers: key ? { Authorization: `Bearer ${key}` } : {} });

// ---------------------------------------------------------------------------
// WebSocket clients, from Node
// ---------------------------------------------------------------------------

const clients = new Set();

// Opens client `id` (raw, or with `protocol`); rejects unless it opens. Every
// message is queued for next(); a switchboard.v1 welcome is kept apart.
function openClient(id, protocol) {
  const url = `ws://127.0.0.1:${relay.port}/ws?id=${encodeURIComponent(id)}`;
  const ws = protocol ? new NodeWebSocket(url, [protocol]) : new NodeWebSocket(url);
  const c = { id, ws, queue: [], waiters: [], welcome: null, closed: null, onClosed: [] };
  clients.add(c);
  const opened = new Promise((resolveOpen, reject) => {
    ws.onopen = () => resolveOpen(c);
    ws.onerror = () => {};
    ws.onclose = (e) => {
      c.closed = { code: e.code, reason: String(e.reason) };
      clients.delete(c);
      for (const done of c.onClosed) done(c.closed);
      reject(new Error(`${id} closed (${e.code}) before it opened`));
    };
  });
  ws.onmessage = (e) => {
    const data = String(e.data);
    if (protocol && !c.welcome) {
      c.welcome = JSON.parse(data);
      assert.equal(c.welcome.type, "welcome", `${id}'s first frame: ${data}`);
      return;
    }
    const waiter = c.waiters.shift();
    if (waiter) waiter(data);
    else c.queue.push(data);
  };
  return withTimeout(opened, WAIT_MS, `client ${id} opening`);
}

function next(c, ms = WAIT_MS) {
  if (c.queue.length) return Promise.resolve(c.queue.shift());
  return withTimeout(new Promise((got) => c.waiters.push(got)), ms, `a message for ${c.id}`);
}

const nextJson = async (c) => JSON.parse(await next(c));
const closed = (c, ms = WAIT_MS) =>
  c.closed ? Promise.resolve(c.closed) : withTimeout(new Promise((done) => c.onClosed.push(done)), ms, `${c.id} closing`);

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

const state = { context: null, page: null, alice: null, bob: null, requests: [], offHost: [], problems: [] };

// Every request the page makes is recorded; one to another host is aborted and
// fails the last test. CSP violations and uncaught errors are recorded too.
async function newDashboardContext(browser) {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
  context.on("request", (request) => {
    state.requests.push(request.url());
    if (new URL(request.url()).hostname !== "127.0.0.1") state.offHost.push(request.url());
  });
  await context.route(
    (url) => url.hostname !== "127.0.0.1",
    (route) => route.abort("blockedbyclient"),
  );
  return context;
}

function watchPage(page) {
  page.on("pageerror", (e) => state.problems.push(`page error: ${e.message}`));
  page.on("console", (message) => {
    if (/Content Security Policy|Refused to (load|apply|execute|connect)/.test(message.text())) {
      state.problems.push(`console: ${message.text()}`);
    }
  });
}

const waitFor = (fn, arg, ms = WAIT_MS) => state.page.waitForFunction(fn, arg, { timeout: ms });
const textOf = (selector) => state.page.locator(selector).innerText();

// The dashboard's figure `id` becomes `value` (snapshots come every second).
const figureBecomes = (id, value) => waitFor(([id, value]) => document.getElementById(id).textContent === value, [id, value]);

// Table rows of `tbodyId` as arrays of cell texts.
const rowsOf = (tbodyId) =>
  state.page.evaluate((id) => [...document.querySelectorAll(`#${id} tr`)].map((tr) => [...tr.cells].map((td) => td.innerText.trim())), tbodyId);

// Tabs from wherever the focus is until element `id` has it: the control is
// reachable from the keyboard. Then selects its text and types `text` over it.
async function typeInto(id, text) {
  const { page } = state;
  for (let presses = 0; ; presses++) {
    if ((await page.evaluate(() => document.activeElement?.id)) === id) break;
    if (presses === 40) throw new Error(`#${id} not reached with Tab`);
    await page.keyboard.press("Tab");
  }
  await page.keyboard.press("ControlOrMeta+A");
  await page.keyboard.press("Delete");
  await page.keyboard.type(text);
}

const resultMatches = (pattern) =>
  waitFor((source) => new RegExp(source).test(document.getElementById("result").textContent), pattern.source);

function screenshot(name) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return state.page.screenshot({ path: join(ARTIFACTS, name), fullPage: true });
}

// ---------------------------------------------------------------------------
// Tests (in order: each builds on the ones before)
// ---------------------------------------------------------------------------

export const tests = [];
const test = (name, fn) => tests.push({ name, fn });

test("admin: the relay serves /admin and its assets without a key, the page under a self-only CSP", async () => {
  // A long drain: the last test shows that an open admin stream does not hold a stop.
  relay = startRelay(["--api-key", KEY, "--shutdown-drain-secs", "30"]);
  http = `http://127.0.0.1:${await relay.ready}`;
  const types = { "/admin": /^text\/html/, "/admin/admin.js": /^(text|application)\/javascript/, "/admin/admin.css": /^text\/css/ };
  for (const [path, type] of Object.entries(types)) {
    const response = await fetch(`${http}${path}`);
    assert.equal(response.status, 200, `GET ${path}`);
    assert.match(response.headers.get("content-type"), type, `GET ${path}`);
    const text = await response.text();
    if (path === "/admin") {
      const policy = response.headers.get("content-security-policy") ?? "";
      assert.match(policy, /default-src 'none'/, "the page's CSP");
      assert.match(policy, /script-src 'self'/, "the page's CSP");
      assert.doesNotMatch(policy, /unsafe/, "the page's CSP");
      // Nothing inline: CSP would refuse it. Everything from this origin.
      assert.doesNotMatch(text, /<style|\sstyle=|\son[a-z]+=|<script(?![^>]*\ssrc=)/i, "inline style, handler or script");
      assert.doesNotMatch(text, /(src|href)="(https?:)?\/\//i, "an asset from elsewhere");
    }
  }
});

test("admin: the stream needs the key (401 unauthorized) and sends a snapshot at once", async () => {
  for (const key of [null, "not-the-key"]) {
    const refused = await api("/api/v1/admin/stream", key);
    assert.equal(refused.status, 401);
    assert.equal((await refused.json()).error.code, "unauthorized");
  }
  const controller = new AbortController();
  const response = await fetch(`${http}/api/v1/admin/stream`, {
    headers: { Authorization: `Bearer ${KEY}` },
    signal: controller.signal,
  });
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type"), /^text\/event-stream/);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!text.includes("\n\n")) {
    const { value, done } = await withTimeout(reader.read(), 2000, "the first snapshot");
    if (done) break;
    text += value;
  }
  controller.abort();
  const data = text.split("\n\n")[0].split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5)).join("\n");
  const snapshot = JSON.parse(data);
  for (const field of ["at", "node", "cluster", "nodes", "topics", "topics_total", "closes", "recent_closes"]) {
    assert.ok(field in snapshot, `the snapshot has no ${field}: ${data}`);
  }
  assert.equal(snapshot.cluster.nodes, 1);
  assert.equal(snapshot.cluster.connections, 0);
  assert.deepEqual(snapshot.nodes.map((n) => n.id), [snapshot.node]);
});

test("admin: a wrong key shows an error and no data", async () => {
  state.page = await state.context.newPage();
  state.page.setDefaultTimeout(WAIT_MS * 2);
  watchPage(state.page);
  const { page } = state;
  const response = await page.goto(`${http}/admin`, { timeout: 10_000 });
  assert.equal(response.status(), 200);
  assert.equal(await page.title(), "Switchboard admin");
  assert.equal(await page.getByLabel("API key").getAttribute("type"), "password");
  await page.getByLabel("API key").fill("not-the-key");
  await page.getByLabel("API key").press("Enter");
  await waitFor(() => document.getElementById("login-error").textContent !== "");
  assert.match(await textOf("#login-error"), /refused.*401 unauthorized/);
  assert.equal(await page.isVisible("#login-error"), true);
  assert.equal(await page.isVisible("#dash"), false);
  assert.deepEqual(await rowsOf("node-rows"), []);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  await screenshot("admin-login.png");
});

test("admin: the right key shows the live dashboard, kept across a reload", async () => {
  const { page } = state;
  await page.getByLabel("API key").fill(KEY);
  await page.getByLabel("API key").press("Enter");
  await page.locator("#dash").waitFor({ state: "visible", timeout: WAIT_MS });
  assert.equal(await page.isVisible("#login-view"), false);
  assert.equal(await page.isVisible("#login-error"), false);
  assert.match(await textOf("#status"), /^live from node \S+$/);
  assert.equal(await textOf("#connections"), "0");
  assert.equal(await textOf("#nodes"), "1");
  const nodes = await rowsOf("node-rows");
  assert.equal(nodes.length, 1);
  assert.match(nodes[0][0], /\(serving this page\)$/);
  assert.equal(await page.locator("#node-rows tr.self").count(), 1);

  await page.reload();
  await page.locator("#dash").waitFor({ state: "visible", timeout: WAIT_MS });
  assert.equal(await page.isVisible("#login-view"), false);
});

test("admin: the connection count goes 0 -> 2 as two Node clients connect, and down as one leaves", async () => {
  await figureBecomes("connections", "0");
  state.alice = await openClient("alice", "switchboard.v1");
  state.bob = await openClient("bob");
  await figureBecomes("connections", "2");
  await figureBecomes("client-ids", "2");
  state.bob.ws.close(1000);
  assert.equal((await closed(state.bob)).code, 1000);
  await figureBecomes("connections", "1");
  await figureBecomes("client-ids", "1");
  state.bob = await openClient("bob");
  await figureBecomes("connections", "2");
  assert.equal((await rowsOf("node-rows"))[0][1], "2", "the node's row");
});

test("admin: a topic a client subscribes to shows with its presence", async () => {
  state.alice.ws.send(JSON.stringify({ type: "subscribe", topic: "room", id: 1 }));
  assert.deepEqual(await nextJson(state.alice), { type: "ack", id: 1, topic: "room" });
  await waitFor(() => [...document.querySelectorAll("#topic-rows tr")].some((tr) => tr.cells[0].textContent === "room"));
  const room = (await rowsOf("topic-rows")).find(([topic]) => topic === "room");
  assert.equal(room[1], "1", "subscribers");
  assert.match(room[2], /\balice \(1\)/);
  await figureBecomes("topics-total", "1");
});

test("admin: publishing from the page, from the keyboard alone, reaches the subscriber", async () => {
  await typeInto("publish-topic", "room");
  await typeInto("publish-payload", '{"text": "hello room", "n": [1, 2]}');
  await state.page.keyboard.press("Enter");
  const delivery = await nextJson(state.alice);
  assert.equal(delivery.type, "message");
  assert.equal(delivery.topic, "room");
  assert.deepEqual(delivery.payload, { text: "hello room", n: [1, 2] });
  await resultMatches(/Published to room: 1 subscriber\./);
  assert.equal(await state.page.locator("#result p.ok").count(), 1);
});

test("admin: sending to an id from the page (keyboard); text that is not JSON goes as a JSON string", async () => {
  await typeInto("send-targets", "bob, nobody");
  await typeInto("send-payload", "hello bob");
  await state.page.keyboard.press("Enter");
  assert.equal(await next(state.bob), '"hello bob"');
  await resultMatches(/Sent: delivered to bob; offline: nobody\./);
  assert.deepEqual(state.alice.queue, [], "nothing reached alice");
});

test("admin: an API error shows with its code and message", async () => {
  await typeInto("publish-topic", "not a topic");
  await typeInto("publish-payload", "1");
  await state.page.keyboard.press("Enter");
  await resultMatches(/Publish failed: 400 invalid_topic: \S/);
  assert.equal(await state.page.locator("#result p.error").count(), 1);
});

test("admin: the rate chart gets non-zero points for messages in and deliveries out", async () => {
  // A client's messages count as messages in, their deliveries as messages out:
  // alice publishes to a topic she is subscribed to (no id, so no acks).
  for (let i = 0; i < 5; i++) state.alice.ws.send(JSON.stringify({ type: "publish", topic: "room", payload: i }));
  for (let i = 0; i < 5; i++) assert.equal((await nextJson(state.alice)).payload, i);
  await waitFor(
    () => {
      const base = Number(document.querySelector("#chart .baseline").getAttribute("y1"));
      const raised = (series) =>
        (document.querySelector(`#chart polyline.${series}`).getAttribute("points") || "")
          .split(" ")
          .filter(Boolean)
          .some((point) => Number(point.split(",")[1]) < base - 0.5);
      return raised("in") && raised("out");
    },
    null,
    WAIT_MS,
  );
  const caption = await textOf("#chart-caption");
  const m = /peak over the last 5 minutes ([\d.]+) in and ([\d.]+) out/.exec(caption);
  assert.ok(m, caption);
  assert.ok(Number(m[1]) > 0 && Number(m[2]) > 0, caption);
  assert.equal(await state.page.getAttribute("#chart", "role"), "img");
});

test("admin: disconnecting from the page closes the client's socket with the form's code", async () => {
  assert.equal(await state.page.inputValue("#disconnect-code"), "4000");
  await typeInto("disconnect-id", "bob");
  await state.page.keyboard.press("Enter");
  assert.deepEqual(await closed(state.bob), { code: 4000, reason: "disconnected by an operator" });
  await resultMatches(/Disconnected bob: 1 connection closed\./);
  await figureBecomes("connections", "1");
});

test("admin: recent closes show the disconnected client and its code", async () => {
  await waitFor(() => [...document.querySelectorAll("#recent-closes tr")].some((tr) => tr.cells[2]?.textContent === "4000"));
  const recent = await rowsOf("recent-closes");
  assert.deepEqual(recent[0].slice(1), ["bob", "4000", "disconnected by an operator"], JSON.stringify(recent));
  assert.ok(recent.some(([, client, code]) => client === "bob" && code === "1000"), "bob's own close: " + JSON.stringify(recent));
  const codes = Object.fromEntries((await rowsOf("close-codes")).map(([code, , n]) => [code, n]));
  assert.equal(codes["4000"], "1");
  assert.equal(codes["1000"], "1");
  // A client's own code counts under one label, shown after the codes, with its meaning.
  const carol = await openClient("carol");
  carol.ws.close(3001);
  await closed(carol);
  await waitFor(() => [...document.querySelectorAll("#close-codes tr")].some((tr) => tr.cells[0]?.textContent === "client-3000-4999"));
  const rows = await rowsOf("close-codes");
  assert.deepEqual(rows.map(([label]) => label), ["1000", "4000", "client-3000-4999"], JSON.stringify(rows));
  assert.equal(rows[2][1], "a client's own code");
  await screenshot("admin-live.png");
});

test("admin: every control is labelled, tables have header scopes, results are announced", async () => {
  const report = await state.page.evaluate(() => ({
    unlabelled: [...document.querySelectorAll("input")].filter((i) => !i.labels.length).map((i) => i.id),
    nameless: [...document.querySelectorAll("button")].filter((b) => !b.textContent.trim()).length,
    unscoped: [...document.querySelectorAll("th")].filter((th) => !th.getAttribute("scope")).length,
    live: document.getElementById("result").getAttribute("aria-live"),
    chart: document.getElementById(document.getElementById("chart").getAttribute("aria-labelledby"))?.textContent,
    // (Playwright's screenshots leave an empty style="" on inputs.)
    inlineStyles: document.querySelectorAll('[style]:not([style=""])').length,
  }));
  assert.deepEqual(report.unlabelled, []);
  assert.equal(report.nameless, 0);
  assert.equal(report.unscoped, 0);
  assert.equal(report.live, "polite");
  assert.match(report.chart, /messages\/s in/);
  assert.equal(report.inlineStyles, 0);
  assert.deepEqual(state.problems, [], "no CSP violation or page error");
});

test("admin: log out forgets the key and stops the stream", async () => {
  const { page } = state;
  await page.focus("#logout");
  await page.keyboard.press("Enter");
  await page.locator("#login-view").waitFor({ state: "visible", timeout: WAIT_MS });
  assert.equal(await page.isVisible("#dash"), false);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  assert.equal(await page.evaluate(() => document.activeElement.id), "key");
  const streams = () => state.requests.filter((url) => url.endsWith("/api/v1/admin/stream")).length;
  const before = streams();
  await sleep(2500);
  assert.equal(streams(), before, "no stream request after logging out");
});

test("admin: no request left 127.0.0.1", async () => {
  assert.ok(state.requests.length >= 5, `requests: ${state.requests}`);
  assert.deepEqual(state.offHost, []);
});

test("admin: on SIGTERM an open admin stream ends, the clients get 1012, and the relay exits 0 at once", async () => {
  const alice = state.alice;
  const response = await api("/api/v1/admin/stream");
  const reader = response.body.getReader();
  assert.equal((await reader.read()).done, false, "a first state");
  const stopped = Date.now();
  relay.proc.kill("SIGTERM");
  assert.equal((await closed(alice, 10_000)).code, 1012);
  // Drained to its end, which must come although the drain time is 30 s.
  while (!(await withTimeout(reader.read(), 5_000, "the stream's end")).done);
  assert.deepEqual(await withTimeout(relay.exit, 5_000, "relay exit"), { code: 0, signal: null });
  assert.ok(Date.now() - stopped < 5_000, `the stop took ${Date.now() - stopped} ms`);
});

test("admin: with Redis unreachable the page says so, and holds one stream, not one per retry", async () => {
  // A cluster node whose Redis is not there: it serves, but every state is an error.
  const down = startRelay(["--api-key", KEY, "--engine", "redis", "--redis-url", `redis://127.0.0.1:${await freePort()}/0`]);
  try {
    const page = await state.context.newPage();
    await page.goto(`http://127.0.0.1:${await down.ready}/admin`);
    await page.getByLabel("API key").fill(KEY);
    await page.getByLabel("API key").press("Enter");
    await page.waitForFunction(() => /state is unavailable/.test(document.body.textContent), null, { timeout: WAIT_MS });
    // Long enough for four retries: had each left its stream open, Chromium's
    // six connections to this host would be spent and this request would wait.
    await sleep(9000);
    const status = await withTimeout(page.evaluate(async () => (await fetch("/healthz")).status), 3000, "a request beside the stream");
    assert.equal(status, 503, "not ready without Redis");
    await page.close();
  } finally {
    await stopRelay(down);
  }
});

// ---------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------

/** Stops whatever this file started: the browser context, clients, the relay. */
export async function cleanup() {
  if (state.context) {
    await withTimeout(state.context.close(), 10_000, "closing the admin context").catch((e) => console.error(e.message));
    state.context = null;
  }
  for (const c of clients) c.ws.close();
  clients.clear();
  await stopRelay(relay);
}

/**
 * Runs every test with `browser` (one context, one page: the tests build on
 * each other, so after a failure the rest are skipped). Prints one line per
 * test; returns the counts and prints no summary line.
 */
export async function run(browser) {
  let passed = 0;
  let failed = 0;
  let broken = false;
  try {
    state.context = await withTimeout(newDashboardContext(browser), 10_000, "a new browser context");
  } catch (e) {
    console.log(`not ok - admin: setup: ${e.stack || e}`);
    broken = true;
  }
  for (const { name, fn } of tests) {
    if (broken) {
      failed++;
      console.log(`not ok - ${name} (skipped after an earlier failure)`);
      continue;
    }
    try {
      await withTimeout(fn(), 30_000, name);
      passed++;
      console.log(`ok - ${name}`);
    } catch (e) {
      failed++;
      broken = true;
      console.log(`not ok - ${name}`);
      console.log(String(e.stack || e).replace(/^/gm, "    "));
      if (relay?.stderr) console.log(`    relay stderr (tail):\n${relay.stderr.replace(/^/gm, "      ")}`);
      if (state.page) await withTimeout(screenshot("admin-failure.png"), 5000, "failure screenshot").catch(() => {});
    }
  }
  await cleanup();
  return { passed, failed };
}

// `node admin.test.mjs`: these tests alone, with their own browser.
if (isMain(import.meta.url)) await runAlone("admin", { tests, run, cleanup });
