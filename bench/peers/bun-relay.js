// Run with `bench/peers/node_modules/.bin/bun bench/peers/bun-relay.js 127.0.0.1:0`
//
// Benchmark peer: the Switchboard relay protocol on Bun.serve, whose WebSocket
// server is uWebSockets. Prints `listening on ADDR` first, like every server of
// the benchmark.
//
//   /ws?id=N  {"targets":[..],"payload":P} sends P's JSON text to every connection
//             of each target. With subprotocol switchboard.v1, {"type":"subscribe",
//             "topic":T,"id":I} subscribes (acked) and {"type":"publish","topic":T,
//             "payload":P} reaches every subscriber as {"type":"message","topic":T,
//             "from":ID,"payload":P}, through uWebSockets' own topics.
//   /echo     every message comes back.
//
// Settings match the Switchboard run: no compression, no server pings, no idle
// timeout, 64 MiB message and backpressure limits. With `--deflate` after the
// address, permessage-deflate is accepted when offered and every send compresses
// (Bun compresses only sends that ask to).

const V1 = "switchboard.v1";
const [host, port] = (process.argv[2] ?? "127.0.0.1:0").split(":");
const deflate = process.argv.includes("--deflate");

/** Live connections by client id. */
const clients = new Map();

const server = Bun.serve({
  hostname: host,
  port: Number(port),
  fetch(req, server) {
    const url = new URL(req.url);
    if (url.pathname === "/echo") {
      if (server.upgrade(req, { data: { echo: true } })) return;
      return new Response("upgrade required", { status: 426 });
    }
    if (url.pathname === "/ws") {
      const id = url.searchParams.get("id");
      if (!id) return new Response("missing id", { status: 400 });
      const offered = (req.headers.get("sec-websocket-protocol") ?? "").split(",");
      const v1 = offered.some((p) => p.trim() === V1);
      const headers = v1 ? { "Sec-WebSocket-Protocol": V1 } : undefined;
      if (server.upgrade(req, { data: { id }, headers })) return;
      return new Response("upgrade required", { status: 426 });
    }
    return new Response("not found", { status: 404 });
  },
  websocket: {
    perMessageDeflate: deflate,
    sendPings: false,
    idleTimeout: 0,
    maxPayloadLength: 64 * 1024 * 1024,
    backpressureLimit: 64 * 1024 * 1024,
    open(ws) {
      if (ws.data.echo) return;
      let conns = clients.get(ws.data.id);
      if (!conns) clients.set(ws.data.id, (conns = new Set()));
      conns.add(ws);
    },
    message(ws, message) {
      if (ws.data.echo) {
        ws.send(message, deflate);
        return;
      }
      let m;
      try {
        m = JSON.parse(message);
      } catch {
        return;
      }
      switch (m.type) {
        case undefined:
        case "send": {
          const out = JSON.stringify(m.payload);
          for (const target of m.targets ?? []) {
            const conns = clients.get(String(target));
            if (conns) for (const conn of conns) conn.send(out, deflate);
          }
          break;
        }
        case "subscribe":
          ws.subscribe(m.topic);
          if (m.id !== undefined) ws.send(JSON.stringify({ type: "ack", id: m.id, topic: m.topic }));
          break;
        case "publish":
          server.publish(
            m.topic,
            JSON.stringify({ type: "message", topic: m.topic, from: ws.data.id, payload: m.payload }),
            deflate,
          );
          break;
      }
    },
    close(ws) {
      if (ws.data.echo) return;
      const conns = clients.get(ws.data.id);
      if (!conns) return;
      conns.delete(ws);
      if (conns.size === 0) clients.delete(ws.data.id);
    },
  },
});

console.log(`listening on ${server.hostname}:${server.port}`);
