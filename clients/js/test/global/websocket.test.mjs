// The client on the platform's own WebSocket, with no implementation passed in:
// run with `node --experimental-websocket` on Node 20, whose global WebSocket is
// the one Node 22 turns on by default (undici's).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Client } from "../../dist/index.js";
import { record, Server, until } from "../server.mjs";

let server;
before(async () => {
  assert.ok(globalThis.WebSocket, "no global WebSocket: run with node --experimental-websocket (Node 20) or on Node 22");
  server = await Server.start([]);
});
after(() => server.close());

test("the global WebSocket: messages, a reconnect, and the missed messages replayed once", async () => {
  const a = new Client(server.url, { id: "global-a", backoff: { initial: 50, max: 200 } });
  const b = new Client(server.url, { id: "global-b", backoff: { initial: 50, max: 200 } });
  const seen = record(b);
  try {
    await Promise.all([a.connect(), b.connect()]);
    await a.send(["global-b"], 1);
    await until(() => seen.message.length === 1);
    await server.api("disconnect", { id: "global-b", code: 4000 });
    await until(() => seen.disconnected.length === 1);
    for (const n of [2, 3]) await a.send(["global-b"], n);
    await until(() => seen.connected.length === 2 && seen.message.length === 3, 5000, "the resume");
    assert.deepEqual(seen.message.map((m) => m.payload), [1, 2, 3]);
    assert.equal(seen.connected[1].recovered, true);
  } finally {
    a.close();
    b.close();
  }
});
