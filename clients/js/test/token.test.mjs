// Tokens against the real server (HS256, no leeway): a static token's sub is the
// client id and its expiry ends the client; getToken renews before expiry on the
// same connection, and brings the client back after a 4001.
import assert from "node:assert/strict";
import { after, afterEach, before, test } from "node:test";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { jwt, record, SECRET, Server, until } from "./server.mjs";

let server;
const clients = [];
function client(auth) {
  const c = new Client(server.url, { WebSocket, backoff: { initial: 50, max: 200 }, ...auth });
  clients.push(c);
  return c;
}

before(async () => {
  server = await Server.start(["--jwt-hs256-secret", SECRET, "--jwt-leeway-secs", "0"]);
});
after(() => server.close());
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

test("a static token: the client is its sub; at expiry the server closes 4001 and the client stops, saying why", async () => {
  const a = client({ token: jwt("static", 2) });
  const seen = record(a);
  await a.connect();
  assert.equal(seen.connected[0].client, "static");
  await until(() => seen.disconnected.length === 1, 5000, "the 4001 close");
  assert.equal(seen.disconnected[0].code, 4001);
  assert.equal(seen.disconnected[0].reconnect, false);
  assert.match(seen.disconnected[0].why, /getToken/);
  assert.equal(seen.reconnecting.length, 0);
});

test("an expired static token is not even tried", async () => {
  // Past exp by more than the minute of grace the client allows a fast clock.
  const a = client({ token: jwt("late", -120) });
  const seen = record(a);
  await assert.rejects(a.connect(), { code: "closed", message: /expired/ });
  assert.equal(seen.disconnected[0].reconnect, false);
});

test("getToken: short-lived tokens are renewed before they expire, on the same connection", async () => {
  let calls = 0;
  const a = client({
    getToken: async () => {
      calls++;
      return jwt("renewed", 3);
    },
  });
  const seen = record(a);
  const sender = client({ token: jwt("sender", 60) });
  await Promise.all([a.connect(), sender.connect()]);
  // Past two lifetimes of a token: only renewals keep the connection.
  await new Promise((r) => setTimeout(r, 6500));
  assert.ok(calls >= 3, `getToken called ${calls} times`);
  assert.deepEqual(seen.disconnected, []);
  assert.equal(seen.connected.length, 1);
  await sender.send(["renewed"], "still here");
  await until(() => seen.message.length === 1, 5000, "a message on the renewed connection");
});

test("getToken: a token from a cache, issued long ago, is renewed by its exp, not a whole life from now", async () => {
  let calls = 0;
  const a = client({
    getToken: async () => {
      calls++;
      // The first is 50 s into a 53 s life, as a cache may hand one back.
      const ago = calls === 1 ? 50 : 0;
      return jwt("cached", 3, { iat: Math.floor(Date.now() / 1000) - ago });
    },
  });
  const seen = record(a);
  await a.connect();
  await new Promise((r) => setTimeout(r, 4500));
  assert.deepEqual(seen.disconnected, [], "renewed before the server's 4001");
  assert.ok(calls >= 2, `getToken called ${calls} times`);
});

test("getToken: a token that lives longer than setTimeout's longest wait (2^31 ms, 24.8 days) is not renewed at once, again and again", async () => {
  let calls = 0;
  const a = client({
    getToken: async () => {
      calls++;
      return jwt("long-lived", 60 * 86_400);
    },
  });
  const seen = record(a);
  await a.connect();
  // Its renewal is due in 60 days; a wait cut to 1 ms renewed at once, then every second.
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(calls, 1);
  assert.deepEqual(seen.error, []);
});

test("getToken: a renewed token that no longer allows a topic ends that subscription; the others go on", async () => {
  let calls = 0;
  const a = client({
    getToken: async () =>
      jwt("narrowed", 3, { switchboard: { subscribe: ++calls === 1 ? ["chat:*", "news:*"] : ["chat:*"] } }),
  });
  const sender = client({ token: jwt("publisher", 60) });
  await Promise.all([a.connect(), sender.connect()]);
  const errors = [];
  const got = [];
  const subscribed = [];
  for (const topic of ["news:1", "chat:1"]) {
    a.subscribe(topic, {
      subscribed: () => subscribed.push(topic),
      error: (e) => errors.push(e),
      message: (m) => got.push(m.payload),
    });
  }
  await until(() => subscribed.length === 2);
  await until(() => errors.length === 1, 6000, "the end of the news subscription");
  assert.equal(calls, 2, "ended by the first renewal");
  assert.equal(errors[0].code, "forbidden");
  assert.match(errors[0].message, /no longer allows subscribing to "news:1"/);
  await sender.publish("news:1", "news");
  await sender.publish("chat:1", "chat");
  await until(() => got.length === 1);
  assert.deepEqual(got, ["chat"]);
  // Over on the client too: subscribing again is asked of the server, which refuses.
  a.subscribe("news:1", { error: (e) => errors.push(e) });
  await until(() => errors.length === 2);
  assert.equal(errors[1].code, "forbidden");
});

test("getToken: a token the server let expire (4001) is replaced, and the client reconnects and resumes", async () => {
  const started = Date.now();
  let calls = 0;
  const a = client({
    // Renewals fail for the first 2.5 s, so the first token (2 s) runs out.
    getToken: async () => {
      calls++;
      if (calls > 1 && Date.now() - started < 2500) throw new Error("the auth service is down");
      return jwt("comeback", calls === 1 ? 2 : 30);
    },
  });
  const seen = record(a);
  await a.connect();
  await until(() => seen.connected.length === 2, 8000, "the reconnect with a fresh token");
  assert.equal(seen.disconnected[0].code, 4001);
  assert.equal(seen.disconnected[0].reconnect, true);
  assert.ok(seen.error.some((e) => e.code === "token" && /auth service is down/.test(e.message)), "getToken's failures are reported");
  assert.equal(seen.connected[1].resumed, true);
  assert.equal(seen.connected[1].recovered, true);
});

test("a token with whitespace around it (res.text() of a response ending in a newline) is trimmed, from getToken or static", async () => {
  for (const auth of [{ getToken: async () => `${jwt("padded", 60)}\n` }, { token: ` ${jwt("padded-static", 60)}\r\n` }]) {
    const a = client(auth);
    const seen = record(a);
    await a.connect();
    assert.deepEqual([seen.error, seen.reconnecting], [[], []]);
  }
});

test("a token from getToken that cannot be sent as a subprotocol is a failing getToken: reported, and tried again with backoff", async () => {
  let calls = 0;
  const a = client({ getToken: async () => (++calls === 1 ? "secret token, with spaces" : jwt("usable", 60)) });
  const seen = record(a);
  await a.connect();
  assert.equal(calls, 2);
  assert.equal(seen.connected[0].client, "usable");
  assert.equal(seen.error.length, 1);
  assert.equal(seen.error[0].code, "token");
  assert.match(seen.error[0].message, /getToken failed: .*subprotocol/);
  // The token is a secret: the error does not show it.
  assert.doesNotMatch(seen.error[0].message, /secret token/);
  assert.deepEqual(seen.reconnecting.map((e) => e.reason), ["getToken failed"]);
});

test("connect(), close(), connect() while getToken is pending makes one connection, not two", async () => {
  const a = client({ getToken: async () => jwt("strict-mode", 60) });
  const seen = record(a);
  a.connect().catch(() => {});
  a.close();
  await a.connect();
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(seen.connected.length, 1);
  assert.equal((await server.get("clients/strict-mode")).connections, 1);
});

test("close() while getToken is pending: nothing opens and nothing retries, whether it resolves or throws", async () => {
  for (const outcome of ["resolve", "throw"]) {
    let settle;
    const pending = (ok, fail) => {
      settle = outcome === "resolve" ? () => ok(jwt("late-token", 60)) : () => fail(new Error("no"));
    };
    const a = client({ getToken: () => new Promise(pending) });
    const seen = record(a);
    a.connect().catch(() => {});
    await until(() => settle, 1000, "getToken's call");
    a.close();
    settle();
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual([seen.connected.length, seen.reconnecting.length, seen.error.length], [0, 0, 0], outcome);
    assert.equal((await server.get("clients/late-token")).connections, 0);
  }
});

test("a getToken that hangs is abandoned after connectTimeout, and the next attempt calls it again", async () => {
  let calls = 0;
  const a = new Client(server.url, {
    WebSocket,
    backoff: { initial: 10, max: 10 },
    connectTimeout: 300,
    getToken: () => (++calls === 1 ? new Promise(() => {}) : jwt("hung", 60)),
  });
  clients.push(a);
  const seen = record(a);
  await a.connect();
  assert.equal(calls, 2);
  assert.equal(seen.reconnecting[0].reason, "connect timeout");
});

test("close() from the error handler of a failing getToken stops the client: nothing reconnects", async () => {
  let calls = 0;
  const a = client({
    getToken: async () => {
      calls++;
      throw new Error("signed out");
    },
  });
  const seen = record(a);
  // The application gives up when the user has signed out.
  a.on("error", () => a.close());
  await assert.rejects(a.connect(), { code: "closed" });
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual([calls, seen.reconnecting.length, seen.connected.length], [1, 0, 0]);
});

test("a token that names another user: the inbox position kept is not resumed from, and the client says recovered: false", async () => {
  let user = "first-user";
  const a = client({ getToken: async () => jwt(user, 60) });
  const seen = record(a);
  const sender = client({ token: jwt("sender-of-both", 60) });
  await Promise.all([a.connect(), sender.connect()]);
  for (const n of [1, 2, 3]) await sender.send(["first-user"], n);
  for (const n of [1, 2, 3, 4, 5]) await sender.send(["second-user"], n);
  await until(() => seen.message.length === 3, 5000, "the first user's messages");
  // The next token names another user; the server ends this one's (4001).
  user = "second-user";
  await server.api("disconnect", { id: "first-user", code: 4001, reason: "token expired" });
  await until(() => seen.connected.length === 2, 5000, "the reconnect");
  assert.equal(seen.connected[1].client, "second-user");
  assert.deepEqual([seen.connected[1].resumed, seen.connected[1].recovered], [true, false]);
  await new Promise((r) => setTimeout(r, 300));
  // The second user's messages after the first user's offset are not shown as
  // if the inbox went on from there (its first three would be missing, unsaid).
  assert.deepEqual(seen.message.map((m) => m.payload), [1, 2, 3]);
  assert.deepEqual(a.inbox, { ...a.inbox, client: "second-user", offset: 5 });
});
