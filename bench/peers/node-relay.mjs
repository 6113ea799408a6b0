// Run with `node bench/peers/node-relay.mjs 127.0.0.1:0`
//
// Benchmark peer: the Switchboard relay protocol on Node's http server with the
// `ws` package. Prints `listening on ADDR` first, like every server of the
// benchmark.
//
//   /ws?id=N  {"targets":[..],"payload":P} sends P's JSON text to every connection
//             of each target. With subprotocol switchboard.v1, {"type":"subscribe",
//             "topic":T,"id":I} subscribes (acked) and {"type":"publish","topic":T,
//             "payload":P} reaches every subscriber as {"type":"message","topic":T,
//             "from":ID,"payload":P}.
//   /echo     every message comes back.
//
// Settings match the Switchboard run: no compression, no pings, no idle
// timeout, 64 MiB message limit. With `--deflate` after the address,
// permessage-deflate is accepted when offered, for messages of any size.

import http from "node:http";
import { WebSocketServer } from "ws";

const V1 = "switchboard.v1";
const [host, port] = (process.argv[2] ?? "127.0.0.1:0").split(":");
const deflate = process.argv.includes("--deflate");

/** Live connections by client id, and subscribers by topic. */
const clients = new Map();
const topics = new Map();

function join(map, key, ws) {
  let set = map.get(key);
  if (!set) map.set(key, (set = new Set()));
  set.add(ws);
}

function leave(map, key, ws) {
  const set = map.get(key);
  if (!set) return;
  set.delete(ws);
  if (set.size === 0) map.delete(key);
}

const wss = new WebSocketServer({
  noServer: true,
  perMessageDeflate: deflate ? { threshold: 0 } : false,
  maxPayload: 64 * 1024 * 1024,
  handleProtocols: (protocols) => (protocols.has(V1) ? V1 : false),
});

function echo(ws) {
  ws.on("message", (data, isBinary) => ws.send(data, { binary: isBinary }));
}

function relay(ws, id) {
  join(clients, id, ws);
  const subscribed = new Set();
  ws.on("message", (data) => {
    let m;
    try {
      m = JSON.parse(data);
    } catch {
      return;
    }
    switch (m.type) {
      case undefined:
      case "send": {
        const out = JSON.stringify(m.payload);
        for (const target of m.targets ?? []) {
          const conns = clients.get(String(target));
          if (conns) for (const conn of conns) conn.send(out);
        }
        break;
      }
      case "subscribe":
        join(topics, m.topic, ws);
        subscribed.add(m.topic);
        if (m.id !== undefined) ws.send(JSON.stringify({ type: "ack", id: m.id, topic: m.topic }));
        break;
      case "publish": {
        const out = JSON.stringify({ type: "message", topic: m.topic, from: id, payload: m.payload });
        const conns = topics.get(m.topic);
        if (conns) for (const conn of conns) conn.send(out);
        break;
      }
    }
  });
  ws.on("close", () => {
    leave(clients, id, ws);
    for (const topic of subscribed) leave(topics, topic, ws);
  });
}

const server = http.createServer((req, res) => {
  res.writeHead(426, { "content-type": "text/plain" });
  res.end("upgrade required");
});

server.on("upgrade", (req, socket, head) => {
  const url = new URL(req.url, "http://localhost");
  if (url.pathname === "/echo") {
    wss.handleUpgrade(req, socket, head, echo);
  } else if (url.pathname === "/ws" && url.searchParams.get("id")) {
    // Registered in the callback, before any later message is handled.
    const id = url.searchParams.get("id");
    wss.handleUpgrade(req, socket, head, (ws) => relay(ws, id));
  } else {
    socket.end("HTTP/1.1 400 Bad Request\r\n\r\n");
  }
});

server.listen(Number(port), host, () => {
  const { address, port } = server.address();
  console.log(`listening on ${address}:${port}`);
});
