// What the client does with answers the real server gives only in rare states,
// from a scripted server: a replay that overlaps what was already delivered (the
// client's own guard drops it by offset; the real server never sends one, its
// tests say so), refused resubscribes, and a server that welcomes and then
// closes at once.
import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket, { WebSocketServer } from "ws";

import { Client } from "../dist/index.js";
import { jwt, record, until } from "./server.mjs";

test("a replay that overlaps what was delivered is dropped by offset, for the inbox and a topic", async () => {
  const wss = new WebSocketServer({ port: 0, host: "127.0.0.1", handleProtocols: () => "switchboard.v1" });
  const urls = [];
  const subscribes = [];
  wss.on("connection", (ws, request) => {
    const n = urls.push(request.url);
    const send = (frame) => ws.send(JSON.stringify(frame));
    const message = (offset) => send({ type: "message", from: "x", offset, epoch: "e1", payload: offset });
    const topic = (offset) => send({ type: "message", topic: "t", offset, epoch: "t1", payload: offset });
    if (n === 1) {
      send({ type: "welcome", client: "d", offset: 0, epoch: "e1" });
      message(1);
      message(2);
    } else {
      send({ type: "welcome", client: "d", recovered: true, missed: 2, offset: 3, epoch: "e1" });
      message(2);
      message(3);
    }
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      subscribes.push(frame);
      if (n === 1) {
        send({ type: "ack", id: frame.id, topic: "t", offset: 0, epoch: "t1" });
        topic(1);
        topic(2);
        setTimeout(() => ws.close(1012, "restart"), 50);
      } else {
        send({ type: "ack", id: frame.id, topic: "t", recovered: true, missed: 2, offset: 3, epoch: "t1" });
        topic(2);
        topic(3);
      }
    });
  });
  await new Promise((r) => wss.once("listening", r));
  const a = new Client(`ws://127.0.0.1:${wss.address().port}/ws`, { WebSocket, id: "d", backoff: { initial: 10, max: 10 } });
  const seen = record(a);
  const got = [];
  a.subscribe("t", { message: (m) => got.push(m.offset) });
  try {
    await a.connect();
    await until(() => seen.connected.length === 2 && got.length >= 3 && seen.message.length >= 3, 5000, "the resumed streams");
    await new Promise((r) => setTimeout(r, 100));
  } finally {
    a.close();
    await new Promise((r) => wss.close(r));
  }
  assert.deepEqual(seen.message.map((m) => m.offset), [1, 2, 3]);
  assert.deepEqual(got, [1, 2, 3]);
  assert.equal(urls[0], "/ws?id=d");
  assert.equal(urls[1], "/ws?id=d&since=e1%3A2");
  assert.deepEqual(subscribes[0], { type: "subscribe", topic: "t", id: 1 });
  assert.deepEqual(subscribes[1], { type: "subscribe", topic: "t", since: { epoch: "t1", offset: 2 }, id: 2 });
  assert.equal(seen.connected[1].missed, 2);
});

/** A WebSocket server speaking switchboard.v1 that runs `script(ws, n, request)` for its n-th connection. */
async function scripted(script) {
  const wss = new WebSocketServer({ port: 0, host: "127.0.0.1", handleProtocols: () => "switchboard.v1" });
  let n = 0;
  wss.on("connection", (ws, request) => script(ws, ++n, request));
  await new Promise((r) => wss.once("listening", r));
  return { url: `ws://127.0.0.1:${wss.address().port}/ws`, close: () => new Promise((r) => wss.close(r)) };
}

const json = (ws, frame) => ws.send(JSON.stringify(frame));

test("a resubscribe refused for now (rate_limited) is sent again; one refused for its since starts over with recovered: false", async () => {
  const asked = [];
  const server = await scripted((ws, n) => {
    json(ws, { type: "welcome", client: "s", offset: 0, epoch: "e" });
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      asked.push([n, frame.topic, frame.since ?? null]);
      const tries = asked.filter(([m, topic]) => m === n && topic === frame.topic).length;
      const ack = { type: "ack", id: frame.id, topic: frame.topic, offset: 5, epoch: "t" };
      if (n === 1) {
        json(ws, ack);
        json(ws, { type: "message", topic: frame.topic, offset: 6, epoch: "t", payload: "first" });
        if (frame.topic === "busy") setTimeout(() => ws.close(1012), 50);
      } else if (frame.topic === "busy" && tries === 1) {
        json(ws, { type: "error", id: frame.id, code: "rate_limited", message: "slow down" });
      } else if (frame.topic === "ahead" && frame.since) {
        json(ws, { type: "error", id: frame.id, code: "invalid_since", message: "since is ahead" });
      } else {
        json(ws, { ...ack, ...(frame.since ? { recovered: true, missed: 0, offset: 6 } : {}) });
        json(ws, { type: "message", topic: frame.topic, offset: 7, epoch: "t", payload: "second" });
      }
    });
  });
  const a = new Client(server.url, { WebSocket, id: "s", backoff: { initial: 10, max: 10 } });
  const events = { busy: [], ahead: [] };
  const got = { busy: [], ahead: [] };
  const errors = [];
  a.on("error", (e) => errors.push(e));
  for (const topic of ["busy", "ahead"]) {
    a.subscribe(topic, { subscribed: (e) => events[topic].push(e), message: (m) => got[topic].push(m.payload), error: (e) => errors.push(e) });
  }
  try {
    await a.connect();
    await until(() => got.busy.length === 2 && got.ahead.length === 2, 5000, "both topics back");
  } finally {
    a.close();
    await server.close();
  }
  assert.deepEqual(asked.filter(([n, topic]) => n === 2 && topic === "busy"), [[2, "busy", { epoch: "t", offset: 6 }], [2, "busy", { epoch: "t", offset: 6 }]]);
  assert.deepEqual(events.busy.at(-1), { resumed: true, recovered: true, missed: 0 });
  assert.deepEqual(asked.filter(([n, topic]) => n === 2 && topic === "ahead"), [[2, "ahead", { epoch: "t", offset: 6 }], [2, "ahead", null]]);
  assert.deepEqual(events.ahead.at(-1), { resumed: true, recovered: false, missed: undefined });
  assert.deepEqual(errors, [], "nothing was refused for good");
});

test("a server that welcomes and closes at once is retried with growing waits, not at once forever", async () => {
  const server = await scripted((ws) => {
    json(ws, { type: "welcome", client: "w", offset: 0, epoch: "e" });
    ws.close(1013, "try again later");
  });
  const a = new Client(server.url, { WebSocket, id: "w", backoff: { initial: 10, max: 80 } });
  const seen = record(a);
  try {
    await a.connect();
    await until(() => seen.reconnecting.length >= 5, 5000, "5 retries");
  } finally {
    a.close();
    await server.close();
  }
  assert.deepEqual(seen.reconnecting.slice(0, 5).map((e) => e.attempt), [1, 2, 3, 4, 5]);
});

test("a token refresh or an unsubscribe refused for now (rate_limited) is sent again", async () => {
  const tries = { refresh: 0, unsubscribe: 0 };
  const server = await scripted((ws) => {
    json(ws, { type: "welcome", client: "r", offset: 0, epoch: "e" });
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      if (frame.type === "subscribe") return json(ws, { type: "ack", id: frame.id, topic: frame.topic });
      if (++tries[frame.type] === 1) return json(ws, { type: "error", id: frame.id, code: "rate_limited", message: "slow down" });
      json(ws, { type: "ack", id: frame.id, ...(frame.topic ? { topic: frame.topic } : {}) });
    });
  });
  // Each token lives a little longer than the last, so each renewal gains something.
  let calls = 0;
  const a = new Client(server.url, { WebSocket, getToken: () => jwt("r", 2 + ++calls), backoff: { initial: 10, max: 10 } });
  const errors = [];
  a.on("error", (e) => errors.push(e.code));
  try {
    let acked = false;
    const room = a.subscribe("room", { subscribed: () => (acked = true) });
    await a.connect();
    await until(() => acked, 5000, "the subscribe's ack");
    const left = room.unsubscribe();
    await until(() => tries.refresh === 2 && tries.unsubscribe === 2, 8000, "each sent again");
    await left;
  } finally {
    a.close();
    await server.close();
  }
  // The refresh's refusal is reported (as a failing getToken's is); the unsubscribe's is not the application's to handle.
  assert.deepEqual(errors, ["rate_limited"]);
});

test("a request that cannot be sent as JSON is refused alone; those held with it go out", async () => {
  const sent = [];
  const server = await scripted((ws) => {
    json(ws, { type: "welcome", client: "j", offset: 0, epoch: "e" });
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      sent.push(frame.payload);
      json(ws, { type: "ack", id: frame.id, delivered: [], offline: [], offsets: {} });
    });
  });
  const a = new Client(server.url, { WebSocket, id: "j" });
  try {
    // Held while offline, sent at the welcome.
    const held = [a.send(["x"], "before"), a.send(["x"], 1n), a.send(["x"], "after")];
    await a.connect();
    const settled = await Promise.allSettled(held);
    assert.deepEqual(settled.map((s) => s.status), ["fulfilled", "rejected", "fulfilled"]);
    assert.equal(settled[1].reason.code, "invalid_message");
    assert.deepEqual(sent, ["before", "after"]);
  } finally {
    a.close();
    await server.close();
  }
});

test("a malformed inbox position is refused at once, not retried for ever", () => {
  for (const inbox of [{ epoch: "no spaces", offset: 1 }, { epoch: "e", offset: -1 }, { epoch: "e", offset: 1.5 }, { offset: 1 }]) {
    assert.throws(() => new Client("ws://127.0.0.1:1/ws", { WebSocket, id: "p", inbox }), TypeError, JSON.stringify(inbox));
  }
  assert.deepEqual(new Client("ws://127.0.0.1:1/ws", { WebSocket, id: "p", inbox: { epoch: "e1", offset: 0 } }).inbox, { epoch: "e1", offset: 0 });
});

/** A client `id` of `server` subscribed to "room": its payloads, and the errors of both it and the subscription. */
function subscribedToRoom(server, id) {
  const a = new Client(server.url, { WebSocket, id, backoff: { initial: 10, max: 10 } });
  const errors = [];
  const got = [];
  a.on("error", (e) => errors.push(e.code));
  a.subscribe("room", { message: (m) => got.push(m.payload), error: (e) => errors.push(e.code) });
  return { a, errors, got };
}

test("a resubscribe refused as topic_full is sent again for a while: the slot may be this client's own dead connection", async () => {
  const tries = [];
  const server = await scripted((ws, n) => {
    json(ws, { type: "welcome", client: "f", offset: 0, epoch: "e" });
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      tries.push(n);
      if (n === 2 && tries.filter((m) => m === 2).length <= 2) {
        return json(ws, { type: "error", id: frame.id, code: "topic_full", message: "full" });
      }
      json(ws, { type: "ack", id: frame.id, topic: frame.topic });
      if (n === 1) setTimeout(() => ws.close(1012), 50);
      else json(ws, { type: "message", topic: frame.topic, payload: "back" });
    });
  });
  const { a, errors, got } = subscribedToRoom(server, "f");
  try {
    await a.connect();
    await until(() => got.length === 1, 8000, "the subscription back");
  } finally {
    a.close();
    await server.close();
  }
  assert.deepEqual(tries, [1, 2, 2, 2]);
  assert.deepEqual(errors, []);
});

test("the topic_full grace starts again on each connection: a long time offline does not end the subscription at its first refusal", async () => {
  const realNow = Date.now;
  let skew = 0;
  Date.now = () => realNow() + skew;
  const tries = [];
  const server = await scripted((ws, n) => {
    json(ws, { type: "welcome", client: "g", offset: 0, epoch: "e" });
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      tries.push(n);
      if (n === 1) {
        json(ws, { type: "ack", id: frame.id, topic: frame.topic });
        setTimeout(() => ws.close(1012), 50);
      } else if (n === 2) {
        // Refused, then two minutes offline.
        json(ws, { type: "error", id: frame.id, code: "topic_full", message: "full" });
        setTimeout(() => {
          skew = 120_000;
          ws.close(1012);
        }, 100);
      } else if (tries.filter((m) => m === 3).length === 1) {
        json(ws, { type: "error", id: frame.id, code: "topic_full", message: "full" });
      } else {
        json(ws, { type: "ack", id: frame.id, topic: frame.topic });
        json(ws, { type: "message", topic: frame.topic, payload: "back" });
      }
    });
  });
  const { a, errors, got } = subscribedToRoom(server, "g");
  try {
    await a.connect();
    // Not `until`: it reads the clock this test moves.
    for (let i = 0; i < 800 && got.length === 0 && errors.length === 0; i++) await new Promise((r) => setTimeout(r, 10));
  } finally {
    Date.now = realNow;
    a.close();
    await server.close();
  }
  assert.deepEqual(errors, []);
  assert.deepEqual(tries, [1, 2, 3, 3]);
});

test("a send that throws as held requests go out: each one is sent, rejected or still held, none is lost", async () => {
  const got = [];
  const server = await scripted((ws, n) => {
    json(ws, { type: "welcome", client: "t", offset: 0, epoch: "e" });
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      got.push([n, frame.payload]);
      json(ws, { type: "ack", id: frame.id, delivered: [], offline: [], offsets: {} });
    });
  });
  let sends = 0;
  class Breaking extends WebSocket {
    send(data) {
      if (++sends === 2) throw new Error("the socket broke");
      super.send(data);
    }
  }
  const a = new Client(server.url, { WebSocket: Breaking, id: "t", backoff: { initial: 10, max: 10 } });
  const seen = record(a);
  try {
    const outcomes = [];
    [1, 2, 3].forEach((n, i) => a.send(["x"], n).then(() => (outcomes[i] = "acked"), (e) => (outcomes[i] = e.code)));
    await a.connect();
    await until(() => outcomes.filter(Boolean).length === 3, 5000, "every request settled");
    // The first went out on a connection then dropped, the second may have: both
    // are `disconnected`. The third, still held, went out on the next connection.
    assert.deepEqual(outcomes, ["disconnected", "disconnected", "acked"]);
    assert.deepEqual(got, [[1, 1], [2, 3]]);
    assert.deepEqual(seen.disconnected, [{ code: 1006, reason: "send failed", reconnect: true }]);
    assert.equal(seen.connected.length, 2);
  } finally {
    a.close();
    await server.close();
  }
});

test("a drop while held requests go out: at most 8 were out, they reject with disconnected, and the rest stay held for the next connection", async () => {
  const got = [];
  const server = await scripted((ws, n) => {
    json(ws, { type: "welcome", client: "h", offset: 0, epoch: "e" });
    // The first connection answers nothing, and drops.
    if (n === 1) setTimeout(() => ws.close(1012), 200);
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      got.push([n, frame.payload]);
      if (n > 1) json(ws, { type: "ack", id: frame.id, delivered: [], offline: [], offsets: {} });
    });
  });
  const a = new Client(server.url, { WebSocket, id: "h", backoff: { initial: 10, max: 10 } });
  try {
    const outcomes = [];
    for (let i = 0; i < 20; i++) a.send(["x"], i).then(() => (outcomes[i] = "acked"), (e) => (outcomes[i] = e.code));
    await a.connect();
    await until(() => outcomes.filter(Boolean).length === 20, 5000, "every request settled");
    const upTo = (k) => Array.from({ length: k }, (_, i) => i);
    assert.deepEqual(got.filter(([n]) => n === 1).map(([, i]) => i), upTo(8));
    assert.deepEqual(got.filter(([n]) => n === 2).map(([, i]) => i), upTo(20).slice(8));
    assert.deepEqual(outcomes, [...Array(8).fill("disconnected"), ...Array(12).fill("acked")]);
  } finally {
    a.close();
    await server.close();
  }
});

test("refusals for the rate that come after the pause they started (big held requests, read slowly) still let the rest go out", async () => {
  let refused = 0;
  const server = await scripted((ws) => {
    json(ws, { type: "welcome", client: "s", offset: 0, epoch: "e" });
    ws.on("message", (data) => {
      const { id } = JSON.parse(data);
      // The window's first wave is refused: its first at once, the rest after
      // the pause the first began (1.5 s at most) has ended.
      if (refused < 8) {
        const late = refused++ === 0 ? 0 : 1600 + refused * 20;
        setTimeout(() => json(ws, { type: "error", code: "rate_limited", message: "slow down", id }), late);
        return;
      }
      json(ws, { type: "ack", id, delivered: [], offline: ["x"], offsets: { x: 1 } });
    });
  });
  const a = new Client(server.url, { WebSocket, id: "s" });
  try {
    const outcomes = [];
    for (let i = 0; i < 12; i++) a.send(["x"], i).then(() => (outcomes[i] = "acked"), (e) => (outcomes[i] = e.code));
    await a.connect();
    await until(() => outcomes.filter(Boolean).length === 12, 8000, "every request settled");
    assert.deepEqual(outcomes, Array(12).fill("acked"));
  } finally {
    a.close();
    await server.close();
  }
});
