// Reconnection timing, measured against TCP listeners that fail every attempt:
// full-jitter exponential backoff within its bounds, capped; abandoned attempts.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { test } from "node:test";

import WebSocket from "ws";

import { Client } from "../dist/index.js";
import { record, until } from "./server.mjs";

/** A TCP listener that records when each connection arrives and then does `handle` with it. */
async function listener(handle) {
  const arrivals = [];
  const sockets = new Set();
  const server = createServer((socket) => {
    arrivals.push(performance.now());
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    handle(socket);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const close = () => {
    for (const s of sockets) s.destroy();
    return new Promise((r) => server.close(r));
  };
  return { url: `ws://127.0.0.1:${server.address().port}/ws`, arrivals, close };
}

test("reconnects back off exponentially with full jitter, capped: each wait in [0, min(max, initial * 2^n))", async () => {
  const refusing = await listener((socket) => socket.destroy());
  const initial = 40;
  const max = 320;
  const a = new Client(refusing.url, { WebSocket, id: "backoff", backoff: { initial, max } });
  const seen = record(a);
  a.connect().catch(() => {});
  try {
    await until(() => refusing.arrivals.length >= 12, 10_000, "12 attempts");
  } finally {
    a.close();
    await refusing.close();
  }
  const delays = seen.reconnecting.map((e) => e.delay);
  seen.reconnecting.forEach((e, n) => {
    assert.equal(e.attempt, n + 1);
    const bound = Math.min(max, initial * 2 ** n);
    assert.ok(e.delay >= 0 && e.delay < bound, `attempt ${n + 1}: ${e.delay} ms not in [0, ${bound})`);
  });
  // The waits really are waited: attempt n+1 arrives after the n-th's delay (and not long after).
  for (let n = 0; n + 1 < refusing.arrivals.length && n < delays.length; n++) {
    const gap = refusing.arrivals[n + 1] - refusing.arrivals[n];
    assert.ok(gap >= delays[n] - 2, `gap ${gap.toFixed(1)} ms shorter than the delay ${delays[n]} ms`);
    assert.ok(gap <= delays[n] + 150, `gap ${gap.toFixed(1)} ms far longer than the delay ${delays[n]} ms`);
  }
  // Jitter: the capped waits are not all the same.
  assert.ok(new Set(delays.slice(4)).size > 1, `no jitter: ${delays}`);
  // The cap holds: from attempt 4 on, no wait is over max.
  assert.ok(delays.every((d) => d < max));
  assert.deepEqual(seen.connected, []);
});

test("an attempt that never completes is abandoned after connectTimeout and retried", async () => {
  const silent = await listener(() => {});
  const a = new Client(silent.url, { WebSocket, id: "patient", connectTimeout: 300, backoff: { initial: 10, max: 10 } });
  const seen = record(a);
  const started = performance.now();
  a.connect().catch(() => {});
  try {
    await until(() => seen.reconnecting.length >= 2, 5000, "two abandoned attempts");
  } finally {
    a.close();
    await silent.close();
  }
  assert.equal(seen.reconnecting[0].reason, "connect timeout");
  assert.ok(performance.now() - started >= 600, "each attempt waited connectTimeout");
  assert.ok(silent.arrivals.length >= 2);
});

test("the waits grow: at the top of each range they double up to the cap", async () => {
  const refusing = await listener((socket) => socket.destroy());
  const random = Math.random;
  Math.random = () => 0.999;
  const a = new Client(refusing.url, { WebSocket, id: "growth", backoff: { initial: 20, max: 160 } });
  const seen = record(a);
  a.connect().catch(() => {});
  try {
    await until(() => seen.reconnecting.length >= 6, 5000, "6 retries");
  } finally {
    Math.random = random;
    a.close();
    await refusing.close();
  }
  assert.deepEqual(seen.reconnecting.slice(0, 6).map((e) => e.delay), [19, 39, 79, 159, 159, 159]);
});

test("waits past setTimeout's longest (2^31 - 1 ms) are cut to it, not to 1 ms: backoff.max and connectTimeout", async () => {
  const refusing = await listener((socket) => socket.destroy());
  const silent = await listener(() => {});
  const random = Math.random;
  Math.random = () => 0.999;
  // "No cap" and "no timeout", as an application may well say them.
  const a = new Client(refusing.url, { WebSocket, id: "no-cap", backoff: { initial: 2 ** 32, max: Infinity } });
  const b = new Client(silent.url, { WebSocket, id: "no-timeout", connectTimeout: Infinity });
  const retries = record(a);
  const timeouts = record(b);
  a.connect().catch(() => {});
  b.connect().catch(() => {});
  try {
    await until(() => retries.reconnecting.length === 1, 5000, "the first failure");
    await new Promise((r) => setTimeout(r, 300));
  } finally {
    Math.random = random;
    a.close();
    b.close();
    await refusing.close();
    await silent.close();
  }
  assert.ok(retries.reconnecting[0].delay < 2 ** 31, `a wait of ${retries.reconnecting[0].delay} ms`);
  assert.equal(refusing.arrivals.length, 1, "the retry waits");
  assert.deepEqual(timeouts.reconnecting, [], "the attempt is not abandoned");
});

test("numeric options that are not numbers of the right range are refused at once; undefined is the default", () => {
  const url = "ws://127.0.0.1:1/ws";
  const bad = [
    { backoff: { initial: Number.NaN } },
    { backoff: { initial: 0 } },
    { backoff: { max: "500" } },
    { backoff: { max: null } },
    { connectTimeout: Number.NaN },
    { connectTimeout: -1 },
    { maxQueued: Number.NaN },
  ];
  for (const options of bad) {
    assert.throws(() => new Client(url, { WebSocket, id: "n", ...options }), TypeError, JSON.stringify(options));
  }
  const fine = [
    { backoff: { initial: undefined, max: undefined } },
    { backoff: { max: Infinity } },
    { connectTimeout: undefined, maxQueued: 0 },
  ];
  for (const options of fine) new Client(url, { WebSocket, id: "n", ...options });
});
