// Every call of the client against the real server: send, publish, subscribe
// (messages, join, leave), presence, status, unsubscribe, close, typed errors,
// requests held while offline, and the closes after which it must not reconnect.
import assert from "node:assert/strict";
import { after, afterEach, before, test } from "node:test";

import WebSocket from "ws";

import { Client, SwitchboardError } from "../dist/index.js";
import { CLUSTER, configFile, record, Server, until } from "./server.mjs";

const NAMESPACES = `
[[namespaces]]
prefix = "room:"
presence = true

[[namespaces]]
prefix = "news:"
history_size = 100
`;

let server;
const clients = [];
function client(auth, options = {}, url = server.url) {
  const c = new Client(url, { WebSocket, backoff: { initial: 50, max: 200 }, ...auth, ...options });
  clients.push(c);
  return c;
}

/** A WebSocket class that, while `away` is set, connects to a port where nothing listens: a client kept offline at will. */
function gated() {
  const gate = { away: false };
  gate.WebSocket = class extends WebSocket {
    constructor(url, protocols) {
      super(gate.away ? "ws://127.0.0.1:9/ws" : url, protocols);
    }
  };
  return gate;
}

before(async () => {
  server = await Server.start(["--config", configFile(NAMESPACES)]);
});
after(() => server.close());
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

test("send: the ack names delivered, offline and offsets; the receiver gets from, payload and offset", async () => {
  const a = client({ id: "a" });
  const b = client({ id: "b" });
  const seen = record(b);
  await Promise.all([a.connect(), b.connect()]);
  assert.equal(seen.connected[0].client, "b");
  assert.equal(seen.connected[0].resumed, false);
  assert.equal(seen.connected[0].recovered, true);
  const ack = await a.send(["b", "nobody", 7], { text: "hi" });
  assert.deepEqual(ack.delivered, ["b"]);
  assert.deepEqual(ack.offline.sort(), ["7", "nobody"]);
  assert.deepEqual(Object.keys(ack.offsets).sort(), ["7", "b", "nobody"]);
  await until(() => seen.message.length === 1, 5000, "b's message");
  const { from, payload, offset } = seen.message[0];
  assert.deepEqual({ from, payload, offset }, { from: "a", payload: { text: "hi" }, offset: ack.offsets.b });
});

test("a refused request rejects with a SwitchboardError carrying the server's code; the client keeps working", async () => {
  const a = client({ id: "errs" });
  await a.connect();
  const refused = await a.send(["a b"], 1).catch((e) => e);
  assert.ok(refused instanceof SwitchboardError, String(refused));
  assert.equal(refused.code, "invalid_target");
  assert.match(refused.message, /"a b"/);
  await assert.rejects(a.publish("nowhere:1", 1), { name: "SwitchboardError", code: "unknown_namespace" });
  await assert.rejects(a.presence("news:1"), { code: "presence_disabled" });
  assert.deepEqual((await a.send(["errs"], 2)).delivered, ["errs"]);
});

test("subscribe: messages, join and leave reach the handlers; presence; unsubscribe stops them", async () => {
  const ann = client({ id: "ann" });
  const ben = client({ id: "ben" });
  await Promise.all([ann.connect(), ben.connect()]);
  const a = { message: [], join: [], leave: [], subscribed: [] };
  const b = { message: [], subscribed: [] };
  const handlers = (into) => Object.fromEntries(Object.keys(into).map((k) => [k, (v) => into[k].push(v)]));
  ann.subscribe("room:1", handlers(a));
  await until(() => a.subscribed.length === 1, 5000, "ann's subscribe");
  assert.deepEqual(a.subscribed[0], { resumed: false, recovered: true, missed: undefined });
  const benRoom = ben.subscribe("room:1", handlers(b));
  await until(() => a.join.includes("ben"), 5000, "ben's join");
  assert.deepEqual(await ann.presence("room:1"), { ann: 1, ben: 1 });
  // One id a page: two pages, merged.
  assert.deepEqual(await ann.presence("room:1", { pageSize: 1 }), { ann: 1, ben: 1 });
  await assert.rejects(ann.presence("room:1", { pageSize: 0 }), { code: "invalid_message" });
  const ack = await ben.publish("room:1", { n: 1 });
  assert.equal(ack.subscribers, 2);
  assert.equal(ack.offset, undefined, "room: keeps no history");
  await until(() => a.message.length === 1 && b.message.length === 1, 5000, "the publish");
  assert.deepEqual(a.message[0], { topic: "room:1", from: "ben", payload: { n: 1 }, offset: undefined });
  await benRoom.unsubscribe();
  await until(() => a.leave.includes("ben"), 5000, "ben's leave");
  await ann.publish("room:1", 2);
  await until(() => a.message.length === 2, 5000, "ann's own publish");
  assert.equal(b.message.length, 1, "ben unsubscribed and got nothing more");
  assert.deepEqual(await ann.presence("room:1"), { ann: 1 });
  assert.throws(() => ann.subscribe("room:1"), /already subscribed/);
});

test("join and leave events missed while away are not replayed on resume; presence() then says who is there", async () => {
  const gate = gated();
  const ann = client({ id: "ann-away" }, { WebSocket: gate.WebSocket });
  const ben = client({ id: "ben-meanwhile" });
  const seen = record(ann);
  const joins = [];
  const subscribed = [];
  ann.subscribe("room:away", { join: (id) => joins.push(id), subscribed: (e) => subscribed.push(e) });
  await Promise.all([ann.connect(), ben.connect()]);
  await until(() => subscribed.length === 1, 5000, "ann's subscribe");
  gate.away = true;
  await server.api("disconnect", { id: "ann-away", code: 4000 });
  await until(() => seen.disconnected.length === 1, 5000, "ann's disconnect");
  let benIn = false;
  ben.subscribe("room:away", { subscribed: () => (benIn = true) });
  await until(() => benIn, 5000, "ben's subscribe");
  gate.away = false;
  await until(() => subscribed.length === 2, 5000, "ann's resubscribe");
  assert.deepEqual(subscribed[1], { resumed: true, recovered: false, missed: undefined }, "room: keeps no history");
  await new Promise((r) => setTimeout(r, 200));
  assert.ok(!joins.includes("ben-meanwhile"), `joins: ${joins}`);
  assert.deepEqual(await ann.presence("room:away"), { "ann-away": 1, "ben-meanwhile": 1 });
});

test("a topic with history: publishes carry offsets, and the subscription's messages carry them", async () => {
  const a = client({ id: "reader" });
  await a.connect();
  const got = [];
  const subscribed = [];
  a.subscribe("news:calls", { message: (m) => got.push(m), subscribed: (e) => subscribed.push(e) });
  await until(() => subscribed.length === 1);
  const first = await a.publish("news:calls", "x");
  const second = await a.publish("news:calls", "y");
  assert.deepEqual([first.offset, second.offset], [1, 2]);
  await until(() => got.length === 2);
  assert.deepEqual(got.map((m) => [m.payload, m.offset]), [["x", 1], ["y", 2]]);
});

test("a refused subscribe calls the subscription's error handler and ends it", async () => {
  const a = client({ id: "refused" });
  await a.connect();
  const errors = [];
  a.subscribe("nowhere:1", { error: (e) => errors.push(e) });
  await until(() => errors.length === 1);
  assert.ok(errors[0] instanceof SwitchboardError);
  assert.equal(errors[0].code, "unknown_namespace");
  // Over, so the topic can be subscribed to again.
  a.subscribe("nowhere:1", { error: (e) => errors.push(e) });
  await until(() => errors.length === 2);
});

test("status says which ids are online", async () => {
  const a = client({ id: "online" });
  await a.connect();
  assert.deepEqual(await a.status(["online", "ghost", 7]), { online: true, ghost: false, 7: false });
});

test("requests made before connecting are held in order and settle once connected; past maxQueued they are refused at once", async () => {
  const receiver = client({ id: "r" });
  const got = record(receiver);
  await receiver.connect();
  const sender = client({ id: "q" }, { maxQueued: 3 });
  const held = [1, 2, 3].map((n) => sender.send(["r"], n));
  await assert.rejects(sender.send(["r"], 4), { code: "queue_full" });
  await sender.connect();
  const acks = await Promise.all(held);
  assert.deepEqual(acks.map((ack) => ack.delivered), [["r"], ["r"], ["r"]]);
  await until(() => got.message.length === 3);
  assert.deepEqual(got.message.map((m) => m.payload), [1, 2, 3]);
});

test("requests held while offline go out no faster than the server's rate: 100 sends of 40 KB, each acked once and in order, and no 1008", async () => {
  const gate = gated();
  const a = client({ id: "bulk" }, { WebSocket: gate.WebSocket });
  const seen = record(a);
  const subscribed = [];
  a.subscribe("room:bulk", { subscribed: (e) => subscribed.push(e) });
  await a.connect();
  await until(() => subscribed.length === 1, 5000, "the subscribe");
  gate.away = true;
  await server.api("disconnect", { id: "bulk", code: 4000 });
  await until(() => seen.disconnected.length === 1, 5000, "the disconnect");
  // 4 MB, twice the server's default burst of 2 MiB (rate_limit_bytes_per_sec).
  const payload = "x".repeat(40_000);
  const outcomes = [];
  const track = (promise, i) => promise.then((ack) => (outcomes[i] = ack), (e) => (outcomes[i] = e.code));
  for (let i = 0; i < 100; i++) track(a.send(["bulk-inbox"], { i, payload }), i);
  // One made while the held ones go out goes out after them.
  let later;
  a.on("connected", () => (later ??= track(a.send(["bulk-inbox"], { i: 100 }), 100)));
  gate.away = false;
  await until(() => outcomes.filter(Boolean).length === 101, 10_000, "every send settled");
  assert.deepEqual(seen.disconnected.map((e) => e.code), [4000], "not closed for abuse (1008)");
  assert.deepEqual(outcomes.filter((o) => typeof o === "string"), [], "every send acked");
  const offsets = outcomes.map((ack) => ack.offsets["bulk-inbox"]);
  // One offset each, in the order they were made: none was acted on twice, or out of turn.
  assert.deepEqual(offsets, offsets.map((_, i) => offsets[0] + i));
  assert.equal(subscribed.length, 2, "resubscribed");
});

test("close(): one disconnected event, and held or later requests reject with closed", async () => {
  const a = client({ id: "closer" });
  const seen = record(a);
  await a.connect();
  a.close();
  assert.deepEqual(seen.disconnected, [{ code: 1000, reason: "", reconnect: false, why: "closed by the application" }]);
  await assert.rejects(a.send(["closer"], 1), { code: "closed" });
  assert.equal(seen.reconnecting.length, 0);
  // Held before connect(), and held while an attempt cannot connect: both rejected by close().
  const idle = client({ id: "idle" });
  const heldIdle = idle.send(["x"], 1);
  idle.close();
  await assert.rejects(heldIdle, { code: "closed" });
  const stuck = client({ id: "stuck" }, {}, "ws://127.0.0.1:9/ws");
  const connecting = stuck.connect();
  const heldConnecting = stuck.send(["x"], 1);
  stuck.close();
  await assert.rejects(heldConnecting, { code: "closed" });
  await assert.rejects(connecting, { code: "closed" });
});

test("close() from a disconnected handler stops the reconnect it would have made", async () => {
  const a = client({ id: "handler-closes" });
  const seen = record(a);
  a.on("disconnected", () => a.close());
  await a.connect();
  await server.api("disconnect", { id: "handler-closes", code: 4000 });
  await until(() => seen.disconnected.length >= 1, 5000, "the close");
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(seen.connected.length, 1, "no second connection");
  assert.equal(seen.reconnecting.length, 0);
  await assert.rejects(a.send(["x"], 1), { code: "closed" });
  assert.equal((await server.get("clients/handler-closes")).connections, 0);
});

test("client ids and static tokens are checked at once; a missing WebSocket implementation is named", async () => {
  assert.throws(() => new Client(server.url, { id: "a b" }), TypeError);
  for (const token of ["", " ", "a b", "a,b", '"ab"', 42]) {
    assert.throws(() => new Client(server.url, { token }), { name: "TypeError", message: /^invalid token: / }, String(token));
  }
  const bare = new Client(server.url, { id: "bare" });
  if (globalThis.WebSocket) {
    await bare.connect();
    bare.close();
  } else {
    await assert.rejects(bare.connect(), { code: "closed", message: /ws package/ });
  }
});

test("a backend's disconnect with 4000 is followed by a reconnect that resumes; 1000 and 4500 are not, and say why", async () => {
  const a = client({ id: "kicked" });
  const seen = record(a);
  await a.connect();
  await server.api("disconnect", { id: "kicked", code: 4000, reason: "move along" });
  await until(() => seen.connected.length === 2, 5000, "the reconnect");
  assert.deepEqual(seen.disconnected[0], { code: 4000, reason: "move along", reconnect: true });
  assert.equal(seen.connected[1].resumed, true);
  assert.equal(seen.connected[1].recovered, true);
  for (const [code, why] of [
    [4500, /for good \(4500\)/],
    [1000, /the server closed the connection/],
  ]) {
    const b = client({ id: `final-${code}` });
    const events = record(b);
    await b.connect();
    await server.api("disconnect", { id: `final-${code}`, code });
    await until(() => events.disconnected.length === 1, 5000, `the ${code} close`);
    assert.equal(events.disconnected[0].reconnect, false);
    assert.match(events.disconnected[0].why, why);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(events.reconnecting.length, 0, `no reconnect after ${code}`);
    await assert.rejects(b.send(["x"], 1), { code: "closed" });
  }
});

test("a client closed for abuse (1008) does not reconnect", async () => {
  const strict = await Server.start(["--rate-limit-messages-per-sec", "1", "--rate-limit-strikes", "2"]);
  try {
    const a = client({ id: "flood" }, {}, strict.url);
    const seen = record(a);
    await a.connect();
    const results = await Promise.allSettled(Array.from({ length: 8 }, (_, i) => a.send(["flood"], i)));
    const codes = results.map((r) => (r.status === "fulfilled" ? "ok" : r.reason.code));
    // Refused ones are answered rate_limited; in a cluster the answers that wait on
    // Redis may be overtaken by the close, and those reject with disconnected.
    assert.ok(codes.every((code) => ["ok", "rate_limited", "disconnected"].includes(code)), codes.join());
    if (!CLUSTER) assert.ok(codes.includes("rate_limited"), codes.join());
    await until(() => seen.disconnected.length === 1, 5000, "the 1008 close");
    assert.equal(seen.disconnected[0].code, 1008);
    assert.equal(seen.disconnected[0].reconnect, false);
    assert.match(seen.disconnected[0].why, /abuse/);
    await new Promise((r) => setTimeout(r, 300));
    assert.equal(seen.reconnecting.length, 0);
  } finally {
    await strict.close();
  }
});
