// Tokens, topics and the origin allowlist from a real browser (headless
// Chromium through playwright-core), against the relay binary.
//
// relay.test.mjs runs these after its own tests (one browser, one closing
// line); `node auth.test.mjs` runs them alone.
//
// - A relay with --jwt-hs256-secret: HS256 tokens minted here with
//   node:crypto travel as the `bearer.<jwt>` subprotocol entry; expiry (4001)
//   and `refresh`; topics between two tabs.
// - A relay with --allowed-origin set to its own origin: its demo page
//   connects, a page from another origin gets 403 (1006 in the browser).
//
// Env: SWITCHBOARD_BIN (default: ../../target/debug/switchboard), CHROMIUM.

import assert from "node:assert/strict";
import { createHmac, randomBytes } from "node:crypto";
import { createServer as createHttpServer, request as httpRequest } from "node:http";

import { freePort, startRelay, stopAllRelays, stopRelay } from "./relays.mjs";
import { installHelpers } from "./page.mjs";
import { isMain, runAlone } from "./standalone.mjs";
import { withTimeout } from "./wait.mjs";

const WAIT_MS = 5000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function health(port) {
  return (await fetch(`http://127.0.0.1:${port}/healthz`)).json();
}

async function waitForHealth(port, predicate, ms = WAIT_MS) {
  const started = Date.now();
  let last;
  while (Date.now() - started < ms) {
    last = await health(port);
    if (predicate(last)) return last;
    await sleep(20);
  }
  throw new Error(`/healthz never matched; last: ${JSON.stringify(last)}`);
}

// A WebSocket handshake from Node with the headers we choose (fetch cannot
// set Origin or upgrade). Resolves with the status and body, or 101.
function handshake(port, path, headers = {}) {
  return withTimeout(
    new Promise((resolveReply, reject) => {
      const req = httpRequest({
        host: "127.0.0.1",
        port,
        path,
        headers: {
          Connection: "Upgrade",
          Upgrade: "websocket",
          "Sec-WebSocket-Version": "13",
          "Sec-WebSocket-Key": randomBytes(16).toString("base64"),
          ...headers,
        },
      });
      req.on("upgrade", (res, socket) => {
        socket.destroy();
        resolveReply({ status: res.statusCode, headers: res.headers, body: "" });
      });
      req.on("response", (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (d) => (body += d));
        res.on("end", () => resolveReply({ status: res.statusCode, headers: res.headers, body }));
      });
      req.on("error", reject);
      req.end();
    }),
    WAIT_MS,
    `handshake ${path}`,
  );
}

// ---------------------------------------------------------------------------
// HS256 tokens, minted with node:crypto
// ---------------------------------------------------------------------------

const SECRET = `browser-suite-${randomBytes(24).toString("hex")}`; // 62 bytes
const OTHER_SECRET = `another-secret-${randomBytes(24).toString("hex")}`;

const b64url = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");

function mint(claims, secret = SECRET) {
  const signed = `${b64url({ alg: "HS256", typ: "JWT" })}.${b64url(claims)}`;
  return `${signed}.${createHmac("sha256", secret).update(signed).digest("base64url")}`;
}

const nowSecs = () => Math.floor(Date.now() / 1000);
const tokenFor = (sub, lifetimeSecs = 60) => mint({ sub, exp: nowSecs() + lifetimeSecs });
const withToken = (token) => ["switchboard.v1", `bearer.${token}`];

// A new tab at `url` with the helpers installed.
async function openPage(context, url) {
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS * 2);
  const response = await page.goto(url, { timeout: 10_000 });
  assert.equal(response.status(), 200, `GET ${url}`);
  await page.evaluate(installHelpers);
  return page;
}

const connect = (page, name, url, protocols) =>
  page.evaluate(([name, url, protocols]) => window.sb.connect(name, url, protocols ?? undefined), [name, url, protocols ?? null]);
const next = (page, name, ms = WAIT_MS) => page.evaluate(([name, ms]) => window.sb.next(name, ms), [name, ms]);
const nextJson = async (page, name) => JSON.parse(await next(page, name));
const send = (page, name, message) => page.evaluate(([name, message]) => window.sb.send(name, message), [name, message]);
const pending = (page, name) => page.evaluate((name) => window.sb.pending(name), name);

function assertOpened(state, what) {
  assert.ok(state.opened, `${what} did not open: ${JSON.stringify(state)}`);
  assert.equal(state.protocol, "switchboard.v1", `${what}: negotiated subprotocol`);
}

// A handshake the server refused: the browser reports an error, then a 1006
// close, and the socket was never open.
function assertRefused(state, what) {
  assert.equal(state.opened, false, `${what} opened: ${JSON.stringify(state)}`);
  assert.ok(state.closed, `${what} neither opened nor closed in time: ${JSON.stringify(state)}`);
  assert.equal(state.errored, true, `${what}: no error event: ${JSON.stringify(state)}`);
  assert.equal(state.closed.code, 1006, `${what}: ${JSON.stringify(state)}`);
  assert.equal(state.closed.wasClean, false, `${what}: ${JSON.stringify(state)}`);
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

export const tests = [];
const test = (name, fn) => tests.push({ name, fn });

const jwt = { relay: null, port: null, http: null, ws: null };

// Tests of a group fail fast when the group's relay did not start.
const needs = (group, what) => {
  if (!group.port) throw new Error(`the ${what} relay is not running`);
};

test("jwt: relay with --jwt-hs256-secret and --jwt-leeway-secs 0 starts", async () => {
  jwt.relay = startRelay(["--jwt-hs256-secret", SECRET, "--jwt-leeway-secs", "0"]);
  jwt.port = await jwt.relay.ready;
  jwt.http = `http://127.0.0.1:${jwt.port}`;
  jwt.ws = `ws://127.0.0.1:${jwt.port}/ws`;
});

test("jwt: a bearer.<jwt> subprotocol entry connects as switchboard.v1", async (context) => {
  needs(jwt, "jwt");
  const page = await openPage(context, `${jwt.http}/`);
  const state = await connect(page, "alice", jwt.ws, withToken(tokenFor("alice")));
  assertOpened(state, "alice with a token");
  await send(page, "alice", { type: "status", clients: ["alice"], id: 1 });
  assert.equal(await next(page, "alice"), '{"type":"status","id":1,"clients":{"alice":true}}');
  await page.close();
  await waitForHealth(jwt.port, (h) => h.connections === 0);
});

test("jwt: no token, a foreign signature or an expired token never opens (401 -> 1006)", async (context) => {
  needs(jwt, "jwt");
  await waitForHealth(jwt.port, (h) => h.connections === 0);
  const page = await openPage(context, `${jwt.http}/`);
  const attempts = [
    ["?id=alice, no subprotocol", `${jwt.ws}?id=alice`, undefined],
    ["?id=alice, switchboard.v1 only", `${jwt.ws}?id=alice`, ["switchboard.v1"]],
    ["a token signed with another secret", `${jwt.ws}?id=alice`, withToken(mint({ sub: "alice", exp: nowSecs() + 60 }, OTHER_SECRET))],
    ["a token that expired 5 s ago", `${jwt.ws}`, withToken(mint({ sub: "alice", exp: nowSecs() - 5 }))],
    ["a token whose sub is not a valid id", `${jwt.ws}`, withToken(tokenFor("not an id"))],
  ];
  for (const [what, url, protocols] of attempts) {
    assertRefused(await connect(page, what, url, protocols), what);
  }
  // What the browser hid: the status and the reason.
  const reply = await handshake(jwt.port, "/ws?id=alice", { Origin: jwt.http });
  assert.equal(reply.status, 401);
  assert.equal(reply.headers["www-authenticate"], "Bearer");
  assert.match(reply.body, /a token is required/);
  assert.deepEqual(await health(jwt.port), { status: "ok", connections: 0, clients: 0 });
  await page.close();
});

test("jwt: two tabs exchange messages; 'from' is the token's sub, not the forged ?id=", async (context) => {
  needs(jwt, "jwt");
  const [tabA, tabB] = [await openPage(context, `${jwt.http}/`), await openPage(context, `${jwt.http}/`)];
  // Each URL claims to be the other client.
  assertOpened(await connect(tabA, "alice", `${jwt.ws}?id=bob`, withToken(tokenFor("alice"))), "alice");
  assertOpened(await connect(tabB, "bob", `${jwt.ws}?id=alice`, withToken(tokenFor("bob"))), "bob");

  const epoch = (tab, name) => tab.evaluate(async (name) => (await window.sb.welcome(name)).epoch, name);
  await send(tabA, "alice", { targets: ["bob"], payload: { text: "hi bob" }, id: "a1" });
  const toBob = `{"type":"message","from":"alice","offset":1,"epoch":"${await epoch(tabB, "bob")}","payload":{"text":"hi bob"}}`;
  assert.equal(await next(tabB, "bob"), toBob);
  assert.deepEqual(await nextJson(tabA, "alice"), { type: "ack", id: "a1", delivered: ["bob"], offline: [], offsets: { bob: 1 } });

  await send(tabB, "bob", { targets: ["alice", "mallory"], payload: [1, "two"], id: 7 });
  const toAlice = `{"type":"message","from":"bob","offset":1,"epoch":"${await epoch(tabA, "alice")}","payload":[1,"two"]}`;
  assert.equal(await next(tabA, "alice"), toAlice);
  const offsets = { alice: 1, mallory: 1 };
  assert.deepEqual(await nextJson(tabB, "bob"), { type: "ack", id: 7, delivered: ["alice"], offline: ["mallory"], offsets });

  assert.deepEqual(await pending(tabA, "alice"), []);
  assert.deepEqual(await pending(tabB, "bob"), []);
  await Promise.all([tabA.close(), tabB.close()]);
  await waitForHealth(jwt.port, (h) => h.connections === 0);
});

test("jwt: exp = now+2 closes with 4001 'token expired'; a refreshed connection stays open", async (context) => {
  needs(jwt, "jwt");
  const page = await openPage(context, `${jwt.http}/`);
  const exp = nowSecs() + 2;
  assertOpened(await connect(page, "eve", jwt.ws, withToken(mint({ sub: "eve", exp }))), "eve");
  assertOpened(await connect(page, "rita", jwt.ws, withToken(mint({ sub: "rita", exp }))), "rita");

  await send(page, "rita", { type: "refresh", token: tokenFor("rita", 60), id: 1 });
  assert.equal(await next(page, "rita"), '{"type":"ack","id":1}');
  // A token for another client is refused, and does not undo the refresh.
  await send(page, "rita", { type: "refresh", token: tokenFor("eve", 60), id: 2 });
  const refused = await nextJson(page, "rita");
  assert.equal(refused.code, "invalid_token", JSON.stringify(refused));
  assert.equal(refused.id, 2);

  const closed = await page.evaluate(() => window.sb.closed("eve", 5000));
  assert.equal(closed.code, 4001, JSON.stringify(closed));
  assert.equal(closed.reason, "token expired");
  assert.equal(closed.wasClean, true);
  // Not early (leeway 0), and not long after exp.
  assert.ok(closed.at >= exp * 1000 - 50, `closed ${exp * 1000 - closed.at}ms before exp`);
  assert.ok(closed.at <= exp * 1000 + 2500, `closed ${closed.at - exp * 1000}ms after exp`);

  // Well past the original exp, rita is still open and served.
  await sleep(Math.max(0, exp * 1000 + 1500 - Date.now()));
  const rita = await page.evaluate(() => window.sb.state("rita"));
  assert.equal(rita.closed, null, JSON.stringify(rita));
  assert.equal(rita.readyState, 1);
  await send(page, "rita", { type: "status", clients: ["rita", "eve"], id: 3 });
  assert.deepEqual(await nextJson(page, "rita"), { type: "status", id: 3, clients: { rita: true, eve: false } });
  await page.close();
  await waitForHealth(jwt.port, (h) => h.connections === 0);
});

test("topics: subscribe, publish, unsubscribe between two tabs (switchboard.v1)", async (context) => {
  needs(jwt, "jwt");
  const [tabA, tabB] = [await openPage(context, `${jwt.http}/`), await openPage(context, `${jwt.http}/`)];
  assertOpened(await connect(tabA, "alice", jwt.ws, withToken(tokenFor("alice"))), "alice");
  assertOpened(await connect(tabB, "bob", jwt.ws, withToken(tokenFor("bob"))), "bob");

  await send(tabB, "bob", { type: "subscribe", topic: "chat:lobby", id: "s1" });
  assert.equal(await next(tabB, "bob"), '{"type":"ack","id":"s1","topic":"chat:lobby"}');
  await send(tabA, "alice", { type: "subscribe", topic: "chat:lobby", id: 2 });
  assert.equal(await next(tabA, "alice"), '{"type":"ack","id":2,"topic":"chat:lobby"}');

  // The payload is relayed byte for byte, to every subscriber (the publisher too).
  const payload = '{ "text" : "hello lobby", "n": [1, 2.50] }';
  await send(tabA, "alice", `{"type":"publish","topic":"chat:lobby","payload":${payload},"id":3}`);
  const delivery = `{"type":"message","topic":"chat:lobby","from":"alice","payload":${payload}}`;
  assert.equal(await next(tabB, "bob"), delivery);
  const atAlice = [await next(tabA, "alice"), await next(tabA, "alice")].sort();
  assert.deepEqual(atAlice, ['{"type":"ack","id":3,"topic":"chat:lobby","subscribers":2}', delivery].sort());

  // bob publishes back.
  await send(tabB, "bob", { type: "publish", topic: "chat:lobby", payload: "hi alice", id: 4 });
  const fromBob = '{"type":"message","topic":"chat:lobby","from":"bob","payload":"hi alice"}';
  assert.equal(await next(tabA, "alice"), fromBob);
  const atBob = [await next(tabB, "bob"), await next(tabB, "bob")].sort();
  assert.deepEqual(atBob, ['{"type":"ack","id":4,"topic":"chat:lobby","subscribers":2}', fromBob].sort());

  // bob leaves; alice's next publish reaches only alice.
  await send(tabB, "bob", { type: "unsubscribe", topic: "chat:lobby", id: "u1" });
  assert.equal(await next(tabB, "bob"), '{"type":"ack","id":"u1","topic":"chat:lobby"}');
  await send(tabA, "alice", { type: "publish", topic: "chat:lobby", payload: 5, id: 5 });
  const again = [await next(tabA, "alice"), await next(tabA, "alice")].sort();
  assert.deepEqual(
    again,
    ['{"type":"ack","id":5,"topic":"chat:lobby","subscribers":1}', '{"type":"message","topic":"chat:lobby","from":"alice","payload":5}'].sort(),
  );
  // A round trip on bob's socket: nothing from the topic arrived before it.
  await send(tabB, "bob", { type: "status", clients: ["alice"], id: 6 });
  assert.equal(await next(tabB, "bob"), '{"type":"status","id":6,"clients":{"alice":true}}');

  // A raw browser client (token in ?token=, no subprotocol) may not use topics.
  const raw = await connect(tabB, "carol", `${jwt.ws}?token=${tokenFor("carol")}`);
  assert.ok(raw.opened, JSON.stringify(raw));
  assert.equal(raw.protocol, "");
  await send(tabB, "carol", { type: "subscribe", topic: "chat:lobby", id: 1 });
  const err = await nextJson(tabB, "carol");
  assert.equal(err.code, "envelope_required", JSON.stringify(err));
  assert.equal(err.id, 1);

  await Promise.all([tabA.close(), tabB.close()]);
  await waitForHealth(jwt.port, (h) => h.connections === 0);
});

test("jwt: the relay exits 0 on SIGTERM", async () => {
  needs(jwt, "jwt");
  assert.deepEqual(await withTimeout(stopRelay(jwt.relay), 10_000, "jwt relay exit"), { code: 0, signal: null });
});

const origin = { relay: null, port: null, http: null, ws: null, other: null, otherUrl: null };

test("origin: relay with --allowed-origin naming its own origin starts", async () => {
  let lastError;
  for (let attempt = 0; attempt < 3 && !origin.port; attempt++) {
    const port = await freePort();
    const relay = startRelay(["--allowed-origin", `http://127.0.0.1:${port}`], `127.0.0.1:${port}`);
    try {
      origin.port = await relay.ready;
      origin.relay = relay;
    } catch (e) {
      lastError = e; // the port was taken in between: try another
      await stopRelay(relay);
    }
  }
  if (!origin.port) throw lastError;
  origin.http = `http://127.0.0.1:${origin.port}`;
  origin.ws = `ws://127.0.0.1:${origin.port}/ws`;
  // Another origin: a tiny page from a Node server on another port.
  origin.other = createHttpServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
    res.end("<!doctype html><title>elsewhere</title><p>another origin</p>");
  });
  await new Promise((ok, fail) => {
    origin.other.once("error", fail);
    origin.other.listen(0, "127.0.0.1", ok);
  });
  origin.otherUrl = `http://127.0.0.1:${origin.other.address().port}`;
});

test("origin: the relay's own demo page (same origin) connects", async (context) => {
  needs(origin, "origin");
  const page = await openPage(context, `${origin.http}/`);
  assertOpened(await connect(page, "home", `${origin.ws}?id=home`, ["switchboard.v1"]), "same-origin page");
  await send(page, "home", { targets: ["home"], payload: "echo", id: 1 });
  const frames = [await next(page, "home"), await next(page, "home")].sort();
  const epoch = await page.evaluate(async () => (await window.sb.welcome("home")).epoch);
  const ack = '{"type":"ack","id":1,"delivered":["home"],"offline":[],"offsets":{"home":1}}';
  const echo = `{"type":"message","from":"home","offset":1,"epoch":"${epoch}","payload":"echo"}`;
  assert.deepEqual(frames, [ack, echo].sort());
  await page.close();
  await waitForHealth(origin.port, (h) => h.connections === 0);
});

test("origin: a page from another origin is refused (403 -> error, 1006)", async (context) => {
  needs(origin, "origin");
  const page = await openPage(context, `${origin.otherUrl}/`);
  assert.equal(await page.title(), "elsewhere");
  assertRefused(await connect(page, "raw", `${origin.ws}?id=intruder`), "raw from another origin");
  assertRefused(await connect(page, "v1", `${origin.ws}?id=intruder`, ["switchboard.v1"]), "switchboard.v1 from another origin");
  await page.close();

  // The same relay's page under another host name is another origin too.
  const byName = await openPage(context, `http://localhost:${origin.port}/`);
  assertRefused(await connect(byName, "v1", `${origin.ws}?id=intruder`, ["switchboard.v1"]), "http://localhost origin");
  await byName.close();

  assert.deepEqual(await health(origin.port), { status: "ok", connections: 0, clients: 0 });
  // What the browser hid, and the allowed origin's handshake for contrast.
  const refused = await handshake(origin.port, "/ws?id=intruder", { Origin: origin.otherUrl });
  assert.equal(refused.status, 403);
  assert.match(refused.body, /origin not allowed/);
  assert.equal((await handshake(origin.port, "/ws?id=ok", { Origin: origin.http })).status, 101);
});

test("origin: the relay exits 0 on SIGTERM", async () => {
  needs(origin, "origin");
  assert.deepEqual(await withTimeout(stopRelay(origin.relay), 10_000, "origin relay exit"), { code: 0, signal: null });
});

// ---------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------

/** Stops whatever this file started (relays, the other-origin server). */
export async function cleanup() {
  if (origin.other) {
    origin.other.closeAllConnections?.();
    origin.other.close();
    origin.other = null;
  }
  await stopAllRelays();
}

/**
 * Runs every test with `browser` (one context per test); prints one line per
 * test. Returns the counts; prints no summary line.
 */
export async function run(browser) {
  let passed = 0;
  let failed = 0;
  for (const { name, fn } of tests) {
    let context = null;
    try {
      context = await withTimeout(browser.newContext(), 10_000, "a new browser context");
      await withTimeout(fn(context), 60_000, name);
      passed++;
      console.log(`ok - ${name}`);
    } catch (e) {
      failed++;
      console.log(`not ok - ${name}`);
      console.log(String(e.stack || e).replace(/^/gm, "    "));
      for (const relay of [jwt.relay, origin.relay]) {
        if (relay && relay.stderr) console.log(`    relay :${relay.port} stderr (tail):\n${relay.stderr.replace(/^/gm, "      ")}`);
      }
    } finally {
      if (context) await withTimeout(context.close(), 10_000, "closing a browser context").catch((e) => console.error(e.message));
    }
  }
  await cleanup();
  return { passed, failed };
}

// `node auth.test.mjs`: these tests alone, with their own browser.
if (isMain(import.meta.url)) await runAlone("auth", { tests, run, cleanup });
