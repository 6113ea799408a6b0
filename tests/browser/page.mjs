// The WebSocket helpers both browser suites install into their pages with
// `page.evaluate(installHelpers)`. The function runs inside the page, so it must
// not refer to anything outside itself.
//
// window.sb.connect(name, url, protocols, ms) opens a socket and settles on open,
// on close, or after `ms`; it never rejects, so a refused handshake can be
// inspected (opened, errored, close code). window.sb.open(name, id, protocol)
// connects to this page's relay as client `id` and rejects unless it opens.
// Every message is recorded: window.sb.next(name) waits for the next one. The
// first frame of a switchboard.v1 connection, its welcome, is kept apart:
// window.sb.welcome(name) waits for it.
export function installHelpers() {
  const conns = {};
  const snapshot = (c) => ({
    opened: c.opened,
    errored: c.errored,
    closed: c.closed,
    protocol: c.ws.protocol,
    extensions: c.ws.extensions,
    readyState: c.ws.readyState,
  });
  window.sb = {
    connect(name, url, protocols, ms = 5000) {
      return new Promise((settle) => {
        const ws = protocols === undefined ? new WebSocket(url) : new WebSocket(url, protocols);
        const c = { ws, queue: [], waiters: [], opened: false, errored: false, closed: null, welcome: null, first: true };
        conns[name] = c;
        const timer = setTimeout(() => settle(snapshot(c)), ms);
        ws.onopen = () => {
          c.opened = true;
          clearTimeout(timer);
          settle(snapshot(c));
        };
        ws.onerror = () => {
          c.errored = true;
        };
        ws.onclose = (e) => {
          c.closed = { code: e.code, reason: e.reason, wasClean: e.wasClean, at: Date.now() };
          clearTimeout(timer);
          settle(snapshot(c));
        };
        ws.onmessage = (e) => {
          const first = c.first;
          c.first = false;
          if (first && ws.protocol === "switchboard.v1") {
            const welcome = JSON.parse(e.data);
            if (welcome.type !== "welcome") throw new Error(`the first frame was not a welcome: ${e.data}`);
            c.welcome = welcome;
            return;
          }
          const w = c.waiters.shift();
          if (w) w(e.data);
          else c.queue.push(e.data);
        };
      });
    },
    async open(name, id, protocol) {
      const url = `${location.origin.replace(/^http/, "ws")}/ws?id=${encodeURIComponent(id)}`;
      const state = await window.sb.connect(name, url, protocol);
      if (!state.opened) throw new Error(`websocket ${name} failed to open: ${JSON.stringify(state)}`);
      return { protocol: state.protocol, extensions: state.extensions };
    },
    state(name) {
      return snapshot(conns[name]);
    },
    // The welcome comes after the open event, as the first message: it waits.
    welcome(name, ms = 5000) {
      const c = conns[name];
      return new Promise((resolveWelcome, reject) => {
        const started = Date.now();
        const poll = () => {
          if (c.welcome) resolveWelcome(c.welcome);
          else if (Date.now() - started > ms) reject(new Error(`no welcome for ${name} within ${ms}ms`));
          else setTimeout(poll, 10);
        };
        poll();
      });
    },
    // Text and binary data go as they are; anything else as its JSON text.
    send(name, message) {
      const raw = typeof message === "string" || ArrayBuffer.isView(message) || message instanceof ArrayBuffer;
      conns[name].ws.send(raw ? message : JSON.stringify(message));
    },
    next(name, ms = 5000) {
      const c = conns[name];
      if (c.queue.length) return Promise.resolve(c.queue.shift());
      return new Promise((resolveMsg, reject) => {
        const done = (data) => {
          clearTimeout(timer);
          resolveMsg(data);
        };
        const timer = setTimeout(() => {
          c.waiters.splice(c.waiters.indexOf(done), 1);
          reject(new Error(`no message for ${name} within ${ms}ms`));
        }, ms);
        c.waiters.push(done);
      });
    },
    pending(name) {
      return conns[name].queue.slice();
    },
    closed(name, ms = 5000) {
      const c = conns[name];
      return new Promise((resolveClose, reject) => {
        const started = Date.now();
        const poll = () => {
          if (c.closed) resolveClose(c.closed);
          else if (Date.now() - started > ms) reject(new Error(`${name} not closed within ${ms}ms`));
          else setTimeout(poll, 20);
        };
        poll();
      });
    },
    close(name) {
      conns[name].ws.close(1000);
    },
    // Waits until the relay has registered the connection: a ping from the
    // browser is not available, so round-trip a harmless error frame.
    async ready(name) {
      conns[name].ws.send("{}");
      const reply = JSON.parse(await window.sb.next(name));
      if (reply.type !== "error" || reply.code !== "invalid_message") throw new Error(`unexpected ${JSON.stringify(reply)}`);
    },
  };
}
