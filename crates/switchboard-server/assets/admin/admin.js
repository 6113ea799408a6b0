// The admin page, served at /admin. It logs in with an API key, follows
// GET /api/v1/admin/stream (one JSON snapshot a second as server-sent events,
// read with fetch because EventSource cannot send an Authorization header),
// and acts through the same /api/v1 endpoints as any backend.
//
// The server's Content-Security-Policy allows only this origin's scripts and
// styles (src/admin.rs): no inline script or style, so nothing here sets
// `element.style`; looks are classes in admin.css, and the chart is SVG
// attributes.

const KEY_ITEM = "switchboard.admin.key";
const WINDOW_MS = 5 * 60_000; // how much traffic history the chart keeps
const RETRY_MS = 2000; // after the stream ends or fails
const STALE_MS = 5000; // no event for this long (one comes every second): the stream is dead
const SVG = "http://www.w3.org/2000/svg";

const CLOSE_MEANINGS = {
  1000: "normal", 1001: "going away or idle timeout", 1002: "protocol error", 1007: "invalid data", 1008: "abuse (rate limits)",
  1009: "message too big", 1011: "server error", 1012: "server restart", 1013: "overloaded or slow consumer", 4001: "token expired",
};

const $ = (id) => document.getElementById(id);

let key = null; // the API key in use, or null when logged out
let stream = null; // the AbortController of the running stream
let retryTimer = 0;
let live = false; // an event arrived since the stream (re)started
let previous = null; // the last snapshot, for rates
let samples = []; // {at, in, out}: cluster rates per second, oldest first

// --- Formatting and DOM helpers

const count = (n) => Number(n ?? 0).toLocaleString("en");
const perSecond = (n) => (n >= 10 ? n.toFixed(0) : n.toFixed(1));
const clock = (ms) => new Date(ms).toLocaleTimeString("en-GB");
const plural = (n, word) => `${count(n)} ${word}${n === 1 ? "" : "s"}`;

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  for (n = Number(n ?? 0); n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function el(name, text, className) {
  const node = document.createElement(name);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function row(cells, className) {
  const tr = el("tr", undefined, className);
  for (const cell of cells) {
    const td = el("td");
    td.append(cell);
    tr.append(td);
  }
  return tr;
}

// Puts `rows` in the table body, or one row saying `empty` across its `columns`.
function fill(tbodyId, rows, columns, empty) {
  if (!rows.length) {
    const td = el("td", empty, "empty");
    td.setAttribute("colspan", columns);
    rows = [el("tr")];
    rows[0].append(td);
  }
  $(tbodyId).replaceChildren(...rows);
}

function setStatus(text, state) {
  const status = $("status");
  if (status.textContent !== text) status.textContent = text;
  status.className = state;
}

// --- Logging in and out

const authorization = () => ({ Authorization: `Bearer ${key}` });

function start(newKey) {
  stream?.abort();
  clearTimeout(retryTimer);
  key = newKey;
  $("logout").hidden = false;
  follow();
}

function logout(error = "") {
  key = null;
  sessionStorage.removeItem(KEY_ITEM);
  stream?.abort();
  stream = null;
  clearTimeout(retryTimer);
  previous = null;
  samples = [];
  $("dash").hidden = true;
  $("logout").hidden = true;
  $("login-view").hidden = false;
  $("login-error").textContent = error;
  $("key").value = "";
  setStatus("logged out", "");
  $("key").focus();
}

// `{"error":{"code","message"}}` as one line, or the status when the body is not that.
async function errorText(response) {
  try {
    const { error } = await response.json();
    return `${response.status} ${error.code}: ${error.message}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

// --- The stream

async function follow() {
  const controller = new AbortController();
  stream = controller;
  live = false;
  let stale = 0;
  const alive = () => {
    clearTimeout(stale);
    stale = setTimeout(() => controller.abort(), STALE_MS);
  };
  setStatus(previous ? "reconnecting…" : "connecting…", "waiting");
  try {
    alive();
    const response = await fetch("/api/v1/admin/stream", { headers: authorization(), signal: controller.signal, cache: "no-store" });
    if (response.status === 401) {
      const why = await errorText(response);
      if (controller === stream) logout(`The API key was refused (${why}).`);
      return;
    }
    if (!response.ok) throw new Error(await errorText(response));
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done || controller !== stream) break;
      alive();
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) receive(event);
    }
  } catch {
    // Aborted, refused, cut, or a state that would not render: retried below
    // unless logged out meanwhile.
  } finally {
    clearTimeout(stale);
    // Whatever ended this loop, the request ends too: a stream left open
    // holds one of the browser's few connections to this host.
    controller.abort();
  }
  if (controller === stream && key) {
    setStatus("reconnecting…", "waiting");
    retryTimer = setTimeout(follow, RETRY_MS);
  }
}

// One server-sent event: its `data:` lines joined are the snapshot's JSON.
function receive(event) {
  const data = event
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
    .join("\n");
  if (!data) return;
  const snapshot = JSON.parse(data);
  if (snapshot.error) {
    // The node answers, but cannot read the cluster's state (Redis is down):
    // the last state stays on screen, marked stale.
    setStatus(`${snapshot.error}; showing the last state`, "waiting");
    if (!live) $("login-error").textContent = snapshot.error;
    return;
  }
  if (!live) {
    live = true;
    sessionStorage.setItem(KEY_ITEM, key);
    const fromLogin = !$("login-view").hidden;
    $("login-view").hidden = true;
    $("login-error").textContent = "";
    $("dash").hidden = false;
    if (fromLogin) $("cluster-title").focus();
  }
  setStatus(`live from node ${snapshot.node}`, "live");
  render(snapshot);
  previous = snapshot;
}

// --- Rendering a snapshot

// Messages per second between two cumulative counters; 0 when one went back (a restart).
function rate(now, before, seconds) {
  if (before === undefined || seconds <= 0 || now < before) return 0;
  return (now - before) / seconds;
}

function render(s) {
  const c = s.cluster;
  const totals = { nodes: c.nodes, connections: c.connections, "client-ids": c.client_ids, "topics-total": c.topics };
  Object.assign(totals, { "messages-in": c.messages_in, "messages-out": c.messages_out });
  for (const [id, n] of Object.entries(totals)) $(id).textContent = count(n);

  const seconds = previous ? (s.at - previous.at) / 1000 : 0;
  if (previous && seconds > 0) {
    const was = previous.cluster;
    samples.push({ at: s.at, in: rate(c.messages_in, was.messages_in, seconds), out: rate(c.messages_out, was.messages_out, seconds) });
    samples = samples.filter((p) => p.at >= s.at - WINDOW_MS);
  }
  renderNodes(s, seconds);
  renderChart(s.at);
  renderTopics(s);
  renderCloses(s);
}

function renderNodes(s, seconds) {
  const before = new Map((previous?.nodes ?? []).map((n) => [n.id, n]));
  const rows = s.nodes.map((n) => {
    const was = before.get(n.id) ?? {};
    const self = n.id === s.node;
    return row(
      [
        self ? `${n.id} (serving this page)` : n.id,
        count(n.connections),
        perSecond(rate(n.messages_in, was.messages_in, seconds)),
        perSecond(rate(n.messages_out, was.messages_out, seconds)),
        bytes(n.bytes_in),
        bytes(n.bytes_out),
      ],
      self ? "self" : "",
    );
  });
  fill("node-rows", rows, 6, "No nodes.");
}

function renderTopics(s) {
  const rows = s.topics.map((t) => {
    const ids = el("ul", undefined, "ids");
    for (const client of t.clients) ids.append(el("li", `${client.id} (${client.connections})`));
    return row([t.topic, count(t.subscribers), t.clients.length ? ids : "none"]);
  });
  fill("topic-rows", rows, 3, "No topics.");
  const shown = s.topics.length;
  const total = s.topics_total ?? shown;
  $("topics-caption").textContent =
    shown < total ? `${count(shown)} of ${count(total)} topics, and who is subscribed` : "Topics and who is subscribed";
}

// The counts' labels besides codes: a client's own codes share one, so that
// clients cannot make thousands; "error" is an end without a close frame.
const LABEL_MEANINGS = {
  "client-3000-4999": "a client's own code",
  error: "ended without a close frame (an error, or the connection lost)",
};

function renderCloses(s) {
  // Codes in order, then the other labels.
  const order = (label) => (/^\d+$/.test(label) ? Number(label) : Infinity);
  const codes = Object.entries(s.closes ?? {}).sort(([a], [b]) => order(a) - order(b) || a.localeCompare(b));
  const meaning = (label) =>
    LABEL_MEANINGS[label] ?? CLOSE_MEANINGS[label] ?? (Number(label) >= 3000 ? "set by the API or the client" : "");
  fill("close-codes", codes.map(([label, n]) => row([label, meaning(label), count(n)])), 3, "None yet.");
  const recent = (s.recent_closes ?? []).map((r) => row([clock(r.at), r.client, r.code == null ? "none" : String(r.code), r.reason ?? ""]));
  fill("recent-closes", recent, 4, "None yet.");
}

// --- The chart: two series over the last five minutes, in SVG

const BOX = { left: 48, right: 948, top: 14, bottom: 206 }; // in the viewBox, 960 x 240

function svg(name, attributes, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// 1, 2 or 5 times a power of ten, at least `n` (and at least 1).
function niceCeiling(n) {
  if (n <= 1) return 1;
  const power = 10 ** Math.floor(Math.log10(n));
  return [1, 2, 5, 10].map((m) => m * power).find((v) => v >= n);
}

function renderChart(now) {
  const top = niceCeiling(Math.max(...samples.map((p) => Math.max(p.in, p.out)), 0));
  const x = (at) => BOX.right - ((now - at) / WINDOW_MS) * (BOX.right - BOX.left);
  const y = (v) => BOX.bottom - (v / top) * (BOX.bottom - BOX.top);
  const parts = [];
  for (const v of [0, top / 2, top]) {
    parts.push(svg("line", { x1: BOX.left, x2: BOX.right, y1: y(v), y2: y(v), class: v ? "grid" : "baseline" }));
    parts.push(svg("text", { x: BOX.left - 6, y: y(v) + 4, "text-anchor": "end" }, perSecond(v)));
  }
  for (let m = 5; m >= 0; m--) {
    const label = m ? `−${m} min` : "now";
    parts.push(svg("text", { x: x(now - m * 60_000), y: BOX.bottom + 22, "text-anchor": m === 5 ? "start" : m ? "middle" : "end" }, label));
  }
  for (const series of ["in", "out"]) {
    const points = samples.map((p) => `${x(p.at).toFixed(1)},${y(p[series]).toFixed(1)}`).join(" ");
    parts.push(svg("polyline", { points, class: `series ${series}` }));
  }
  $("chart").replaceChildren(...parts);

  const latest = samples.at(-1);
  if (!latest) {
    $("chart-caption").textContent = "Rates appear after two snapshots.";
    return;
  }
  const peak = (series) => perSecond(Math.max(...samples.map((p) => p[series])));
  $("chart-caption").textContent =
    `Now ${perSecond(latest.in)} messages/s in and ${perSecond(latest.out)} deliveries/s out; ` +
    `peak over the last 5 minutes ${peak("in")} in and ${peak("out")} out.`;
}

// --- Actions: the HTTP API, with the key, as any backend would call it

// The payload field's text as JSON text: itself when it is JSON (sent as
// written), else a JSON string of it.
function payloadJson(text) {
  try {
    JSON.parse(text);
    return text.trim();
  } catch {
    return JSON.stringify(text);
  }
}

// Into the aria-live region: the time (so a repeat is announced too), the sentence, the answer.
function report(text, answer, isError) {
  $("result").replaceChildren(el("p", `${clock(Date.now())}: ${text}`, isError ? "error" : "ok"), ...(answer ? [el("code", answer)] : []));
}

// POSTs `body` (JSON text) to `path`; `done` turns the answer into a sentence.
async function act(what, path, body, done) {
  if (!key) return;
  try {
    const headers = { ...authorization(), "Content-Type": "application/json" };
    const response = await fetch(path, { method: "POST", headers, body });
    if (response.status === 401) return logout(`The API key was refused (${await errorText(response)}).`);
    if (!response.ok) return report(`${what} failed: ${await errorText(response)}`, "", true);
    const text = await response.text();
    report(done(JSON.parse(text)), text, false);
  } catch (e) {
    report(`${what} failed: ${e.message}`, "", true);
  }
}

const value = (id) => $(id).value.trim();
const list = (items) => (items.length ? items.join(", ") : "none");

function publish() {
  const topic = value("publish-topic");
  const body = `{"topic":${JSON.stringify(topic)},"payload":${payloadJson($("publish-payload").value)}}`;
  return act("Publish", "/api/v1/publish", body, (a) => {
    const offset = a.offset === undefined ? "" : ` at offset ${a.offset}`;
    return `Published to ${topic}${offset}: ${plural(a.subscribers, "subscriber")}.`;
  });
}

function send() {
  const targets = value("send-targets").split(",").map((t) => t.trim()).filter(Boolean);
  const body = `{"targets":${JSON.stringify(targets)},"payload":${payloadJson($("send-payload").value)}}`;
  return act("Send", "/api/v1/send", body, (a) => `Sent: delivered to ${list(a.delivered)}; offline: ${list(a.offline)}.`);
}

function disconnect() {
  const id = value("disconnect-id");
  const request = { id };
  const code = value("disconnect-code");
  if (code && !/^\d+$/.test(code)) return report("Disconnect failed: the close code must be a number.", "", true);
  if (code) request.code = Number(code);
  if (value("disconnect-reason")) request.reason = value("disconnect-reason");
  const done = (a) => `Disconnected ${id}: ${plural(a.connections, "connection")} closed.`;
  return act("Disconnect", "/api/v1/disconnect", JSON.stringify(request), done);
}

function on(formId, handler) {
  $(formId).addEventListener("submit", (event) => {
    event.preventDefault();
    handler();
  });
}

on("login", () => {
  const entered = $("key").value.trim();
  if (!entered) return;
  $("login-error").textContent = "";
  start(entered);
});
on("publish", publish);
on("send", send);
on("disconnect", disconnect);
$("logout").addEventListener("click", () => logout());

const saved = sessionStorage.getItem(KEY_ITEM);
if (saved) {
  $("login-view").hidden = true;
  start(saved);
}
