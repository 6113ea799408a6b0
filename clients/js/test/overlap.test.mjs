// What the client does with a replay that overlaps what it already had. The real
// server never sends one (its tests say so); this scripted server does, to show
// that the client's own guard drops a duplicate by offset, and what it asks for
// when it resumes (since in the URL and in the subscribe).
import assert from "node:assert/strict";
import { test } from "node:test";

import WebSocket, { WebSocketServer } from "ws";

import { Client } from "../dist/index.js";
import { record, until } from "./server.mjs";

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
