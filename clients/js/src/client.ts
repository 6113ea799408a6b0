import { BACKOFF, type Backoff, backoffDelay } from "./backoff.js";
import { Emitter } from "./emitter.js";
import { SwitchboardError } from "./errors.js";
import { isNew, type Position } from "./position.js";
import { type SubscribeAck, Subscription, type SubscriptionHandlers, type TopicFrame } from "./subscription.js";
import { expiresAt, renewAt } from "./token.js";

const PROTOCOL = "switchboard.v1";
const CLIENT_ID = /^[A-Za-z0-9._~:@-]{1,128}$/;
const EPOCH = /^[A-Za-z0-9]{1,32}$/;
/** A connection up this long resets the backoff; a shorter one (welcomed, then closed) does not. */
const STABLE_MS = 10_000;
/**
 * How long before trying again what failed for now (a subscribe refused as
 * rate_limited, a renewal), and the least wait between renewals whatever the
 * token's dates say.
 */
const AGAIN_MS = 1_000;
/**
 * How long a resubscribe refused as `topic_full` is sent again: the slot may be
 * held by this client's own connection that died without a word, which the
 * server notices within its idle timeout (60 s by default).
 */
const FULL_GRACE_MS = 90_000;
/** Server errors after which a subscribe, an unsubscribe or a token refresh is sent again. */
const TRANSIENT = ["rate_limited", "unavailable"];
/**
 * A numeric option: `fallback` when left out (or `undefined`, as a config passed
 * through may have it), else a number from `least` (Infinity too). Anything
 * else is a TypeError at once: a wait of NaN, or of 0, fires at once, and
 * the client would retry without pause; a NaN `maxQueued` would hold without
 * limit.
 */
function option(name: string, value: unknown, fallback: number, least: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== "number" || !(value >= least)) {
    throw new TypeError(`invalid ${name} ${String(value)}: a number from ${least}`);
  }
  return value;
}

/**
 * The longest wait setTimeout takes (2^31 - 1 ms, 24.8 days). Past it Node waits
 * 1 ms and browsers none, so a longer wait would end at once, again and again.
 */
const MAX_DELAY = 2 ** 31 - 1;
/**
 * What a WebSocket subprotocol may hold, an HTTP token (RFC 6455 §4.1, RFC 9110
 * §5.6.2): the WebSocket constructor throws on anything else.
 */
const SUBPROTOCOL = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
/**
 * Most held requests (resubscribes included) awaiting their answers at once as
 * they go out after a welcome. The server refuses what is over its rate
 * (`rate_limited`) and closes the connection with 1008 after
 * `rate_limit_strikes` (default 20) refusals in a row: with this few out at
 * once, a run of refusals stays short whatever the server's rates are.
 */
const WINDOW = 8;

/** `ms`, give or take half: clients refused together do not all come back together. */
function jitter(ms: number): number {
  return ms * (0.5 + Math.random());
}

/** What a WebSocket implementation must offer: the browser's, Node 22's, or the `ws` package's. */
export interface WebSocketLike {
  onopen: ((event: any) => void) | null;
  onmessage: ((event: { data: any }) => void) | null;
  onclose: ((event: { code: number; reason: string }) => void) | null;
  onerror: ((event: any) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

/** A WebSocket constructor. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/**
 * Who the client is: a client id (servers without tokens), a JWT, or a function
 * that returns a fresh JWT. Only `getToken` lets the client renew its token and
 * reconnect after the server closes an expired one (4001).
 */
export type Auth = { id: string } | { token: string } | { getToken: () => string | Promise<string> };

/** Settings; all optional. */
export interface Options {
  /** The WebSocket implementation; default `globalThis.WebSocket` (browsers, Node 22). On Node 20 pass the `ws` package's. */
  WebSocket?: WebSocketConstructor;
  /** Reconnection waits, in milliseconds (full jitter). */
  backoff?: Partial<Backoff>;
  /** Most requests held while offline; more are refused with `queue_full`. Default 100. */
  maxQueued?: number;
  /** Milliseconds a connection attempt may take before it is abandoned and retried. Default 10000. */
  connectTimeout?: number;
  /**
   * Where to resume the inbox from, as `client.inbox` gave it before (kept in
   * `sessionStorage` across a page reload, say). The first connection then
   * resumes: `connected` says whether it recovered.
   */
  inbox?: Position;
}

/** The `connected` event. */
export interface ConnectedEvent {
  /** The client id the server knows this client by (the token's `sub` with tokens). */
  client: string;
  /** False on the first connection; true on a reconnect, which resumes the inbox. */
  resumed: boolean;
  /**
   * True when no direct message can have been missed: always on the first
   * connection, and on a reconnect when the server replayed every message sent
   * while the client was away. False means some are gone: reload the state.
   */
  recovered: boolean;
  /** How many missed messages follow, when a reconnect recovered. */
  missed?: number;
}

/** The `disconnected` event. */
export interface DisconnectedEvent {
  /** The close code (1006 when the connection failed without one). */
  code: number;
  /** The close reason the server gave, if any. */
  reason: string;
  /** Whether the client will reconnect. */
  reconnect: boolean;
  /** When it will not: why. */
  why?: string;
}

/** The `reconnecting` event, before each wait for another attempt. */
export interface ReconnectingEvent {
  /** 1 for the first retry after a disconnect. */
  attempt: number;
  /** Milliseconds until the attempt. */
  delay: number;
  /** The close code of the connection or attempt that failed. */
  code: number;
  /** Its close reason. */
  reason: string;
}

/** A direct message, sent to this client's id. */
export interface Message {
  /** The sender's client id. */
  from: string;
  /** The payload, as the sender sent it. */
  payload: unknown;
  /** Its place in this client's inbox. */
  offset: number;
}

/** The client's events. */
export interface Events {
  connected: ConnectedEvent;
  disconnected: DisconnectedEvent;
  reconnecting: ReconnectingEvent;
  message: Message;
  /** An error that belongs to no request: a refused token refresh, a failing `getToken`. */
  error: SwitchboardError;
}

/** The answer to `send`. */
export interface SendAck {
  /** Targets with at least one live connection. */
  delivered: string[];
  /** Targets with none: the message waits in their inbox. */
  offline: string[];
  /** The offset each target's inbox gave the message. */
  offsets: Record<string, number>;
}

/** The answer to `publish`. */
export interface PublishAck {
  /** How many subscribed connections it reached. */
  subscribers: number;
  /** Its offset, when the topic keeps history. */
  offset?: number;
}

interface Request {
  frame: Record<string, unknown>;
  resolve(value: any): void;
  reject(error: SwitchboardError): void;
  /** The subscription a subscribe is for: not sent once it has ended, made afresh on each connection. */
  join?: Subscription;
  /** When a held request was first sent on this connection (its id then): one refused goes back to its place. */
  order?: number;
}

type State = "idle" | "connecting" | "connected" | "closed";

/** Close codes after which reconnecting would be wrong, and why. */
function final(code: number, renewable: boolean): string | undefined {
  if (code === 4001 && !renewable) return "the token expired and there is no getToken to renew it";
  if (code === 1000) return "the server closed the connection";
  if (code === 1008) return "the server closed the connection for abuse (1008)";
  if ((code >= 3500 && code < 4000) || code >= 4500) return `the server closed the connection for good (${code})`;
  return undefined;
}

/**
 * A connection to a Switchboard server that stays up: it reconnects with
 * backoff, resumes its inbox and topics without loss or duplicates (or says
 * `recovered: false`), renews its token, and holds requests made while offline.
 */
export class Client extends Emitter<Events> {
  private readonly url: URL;
  private readonly auth: Auth;
  private readonly WebSocket?: WebSocketConstructor;
  private readonly backoff: Backoff;
  private readonly maxQueued: number;
  private readonly connectTimeout: number;

  private state: State = "idle";
  /** Counts connection attempts and stops: work begun for an older one finds it changed and gives up. */
  private generation = 0;
  private ws?: WebSocketLike;
  private attempt = 0;
  private connectedAt = 0;
  private timer?: ReturnType<typeof setTimeout>;
  private renewal?: ReturnType<typeof setTimeout>;
  private token?: string;
  /** When `token` is due for renewal (local clock). */
  private renewTokenAt = 0;
  private nextId = 1;
  private readonly inflight = new Map<number, Request>();
  /** Held requests (and resubscribes), in order: they go out through the window once connected. */
  private readonly queue: Request[] = [];
  /** Held requests sent and not yet answered: at most WINDOW, one after a refusal. */
  private sending = 0;
  /** The window's pauses in a row with no answer accepted since: each waits twice as long. */
  private pauses = 0;
  /** The window's wait after a refusal for the rate. */
  private pause?: ReturnType<typeof setTimeout>;
  /** The last id sent when the window last paused: refusals of requests sent by then are part of that pause. */
  private wave = 0;
  /** A socket whose send threw: nothing more goes out on it before it is dropped. */
  private broken?: WebSocketLike;
  private readonly waiting: Array<[() => void, (error: SwitchboardError) => void]> = [];
  private readonly subscriptions = new Map<string, Subscription>();
  /** The last inbox message seen. */
  private seen?: Position;
  /** Whose inbox `seen` is in, once known. */
  private seenFor?: string;

  /**
   * A client of the server at `url` (`ws://host:4000/ws`, `wss://...`; in a page
   * also `/ws`). It does nothing until `connect()`.
   */
  constructor(url: string, options: Auth & Options) {
    super();
    this.url = new URL(url, (globalThis as any).location?.href);
    this.url.protocol = this.url.protocol.replace(/^http/, "ws");
    if ("id" in options && !CLIENT_ID.test(options.id)) {
      throw new TypeError(`invalid client id ${JSON.stringify(options.id)}: 1-128 characters of A-Z a-z 0-9 . _ ~ : @ -`);
    }
    // Not the token itself in the message: it is a secret, and errors get logged.
    if ("token" in options && (typeof options.token !== "string" || !SUBPROTOCOL.test(options.token.trim()))) {
      throw new TypeError("invalid token: it cannot be sent as a WebSocket subprotocol (empty, or with spaces, commas or quotes)");
    }
    this.auth = options;
    this.WebSocket = options.WebSocket;
    // Waits past setTimeout's longest (Infinity, say, for "no cap" or "no timeout") would end at once.
    this.backoff = {
      initial: option("backoff.initial", options.backoff?.initial, BACKOFF.initial, 1),
      max: Math.min(option("backoff.max", options.backoff?.max, BACKOFF.max, 1), MAX_DELAY),
    };
    this.maxQueued = option("maxQueued", options.maxQueued, 100, 0);
    this.connectTimeout = Math.min(option("connectTimeout", options.connectTimeout, 10_000, 1), MAX_DELAY);
    if (options.inbox != null) {
      const { epoch, offset, client } = options.inbox;
      // The server refuses a malformed `since` at the handshake, which a WebSocket cannot tell apart from a network error.
      if (typeof epoch !== "string" || !EPOCH.test(epoch) || !Number.isSafeInteger(offset) || offset < 0) {
        throw new TypeError(`invalid inbox position ${JSON.stringify(options.inbox)}: an epoch of 1-32 letters and digits, an offset from 0`);
      }
      this.seen = { epoch, offset };
      this.seenFor = client;
    }
  }

  /**
   * Where the inbox is: its last message this client saw (or the server's
   * position when it connected), and whose inbox it is, once connected.
   */
  get inbox(): Position | undefined {
    return this.seen && { ...this.seen, ...(this.seenFor !== undefined ? { client: this.seenFor } : {}) };
  }

  /**
   * Connects, and keeps connecting until `close()`. Settles on the next
   * `connected`; rejects with code `closed` when the client stops first, by a
   * close that means "stay away" or by `close()`.
   */
  connect(): Promise<void> {
    const settled = new Promise<void>((resolve, reject) => {
      if (this.state === "connected") resolve();
      else this.waiting.push([resolve, reject]);
    });
    if (this.state === "idle" || this.state === "closed") {
      this.state = "connecting";
      this.attempt = 0;
      void this.open(++this.generation);
    }
    return settled;
  }

  /**
   * Closes the connection and stops reconnecting. Requests not yet answered
   * reject with `closed` (held ones) or `disconnected` (sent ones). A later
   * `connect()` resumes the inbox and the subscriptions where they were.
   */
  close(): void {
    if (this.state !== "closed") this.stop(1000, "", "closed by the application");
  }

  /** Sends `payload` to every connection of each target id; settles with the ack. */
  send(targets: Array<string | number>, payload: unknown): Promise<SendAck> {
    return this.request({ targets, payload: payload ?? null });
  }

  /** Publishes `payload` to `topic`'s subscribers. */
  publish(topic: string, payload: unknown): Promise<PublishAck> {
    return this.request({ type: "publish", topic, payload: payload ?? null }).then((ack: any) => ({
      subscribers: ack.subscribers,
      offset: ack.offset,
    }));
  }

  /**
   * Who is subscribed to `topic`: client id to its number of subscribed connections (namespaces with presence).
   * The server answers in pages (at most 1,000 ids each, `pageSize` to ask for fewer); this asks for each
   * page in turn and merges them. An id subscribed throughout is listed; one that joins or leaves meanwhile
   * may or may not be.
   */
  async presence(topic: string, options: { pageSize?: number } = {}): Promise<Record<string, number>> {
    const clients: Record<string, number> = {};
    let cursor: string | undefined;
    do {
      const ask: Record<string, unknown> = { type: "presence", topic };
      if (options.pageSize !== undefined) ask.limit = options.pageSize;
      if (cursor !== undefined) ask.cursor = cursor;
      const page: any = await this.request(ask);
      Object.assign(clients, page.clients);
      cursor = page.next;
    } while (cursor !== undefined);
    return clients;
  }

  /** Whether each id has a live connection. */
  status(ids: Array<string | number>): Promise<Record<string, boolean>> {
    return this.request({ type: "status", clients: ids }).then((answer: any) => answer.clients);
  }

  /**
   * Subscribes to `topic`, now or as soon as the client is connected, and again
   * after every reconnect, resuming from the last message seen. One
   * subscription per topic. With `since` (a subscription's `position` kept
   * from before, across a page reload say) the first subscribe resumes too.
   */
  subscribe(topic: string, handlers: SubscriptionHandlers = {}, since?: Position): Subscription {
    if (this.subscriptions.has(topic)) throw new Error(`already subscribed to ${JSON.stringify(topic)}`);
    const subscription = new Subscription(topic, handlers, (s) => this.unsubscribe(s), since);
    this.subscriptions.set(topic, subscription);
    if (this.state === "connected") this.join(subscription);
    return subscription;
  }

  private unsubscribe(subscription: Subscription): Promise<void> {
    if (this.subscriptions.get(subscription.topic) !== subscription) return Promise.resolve();
    this.subscriptions.delete(subscription.topic);
    return this.leave(subscription.topic);
  }

  /** Tells the server to unsubscribe from `topic`, again while it refuses for now. */
  private leave(topic: string): Promise<void> {
    if (this.state !== "connected") return Promise.resolve();
    const ws = this.ws;
    return this.transmit({ type: "unsubscribe", topic }).then(
      () => undefined,
      (error: SwitchboardError) => {
        // Not acted on (the server still sends the topic, and counts this
        // connection in its presence): again, unless the connection went
        // (the next one does not subscribe) or the topic was subscribed anew.
        if (!TRANSIENT.includes(error.code)) return;
        return new Promise<void>((resolve) => setTimeout(resolve, jitter(AGAIN_MS))).then(() =>
          ws === this.ws && !this.subscriptions.has(topic) ? this.leave(topic) : undefined,
        );
      },
    );
  }

  /** Subscribes `subscription`: at once, or behind the held requests while they go out. */
  private join(subscription: Subscription): void {
    const request = this.subscribing(subscription);
    if (this.draining()) this.hold(request);
    else this.write(request);
  }

  /** The subscribe of `subscription`, and what to do with its answer. */
  private subscribing(subscription: Subscription): Request {
    const since = subscription.since();
    const frame = { type: "subscribe", topic: subscription.topic, ...(since && subscription.resuming() ? { since } : {}) };
    const current = () => this.subscriptions.get(subscription.topic) === subscription;
    // Answered in the frame's own turn, not a promise's: the messages that
    // follow the ack may arrive in the same read, and must find it taken.
    return {
      frame,
      join: subscription,
      resolve: (ack: SubscribeAck) => {
        if (current()) subscription.subscribed(ack);
      },
      reject: (error: SwitchboardError) => {
        // Cut off: the next connection subscribes again.
        if (error.code === "disconnected" || !current()) return;
        const ws = this.ws;
        const full = error.code === "topic_full" && subscription.resuming();
        if (TRANSIENT.includes(error.code) || (full && subscription.fullFor(Date.now()) < FULL_GRACE_MS)) {
          setTimeout(() => ws === this.ws && current() && this.join(subscription), jitter(AGAIN_MS));
        } else if (error.code === "invalid_since") {
          // The server's stream is behind the client's position: start over, and say so.
          subscription.restart();
          this.join(subscription);
        } else {
          this.end(subscription, error);
        }
      },
    };
  }

  /**
   * Sends `frame` when connected, or holds it until the client is; while held
   * requests go out, behind them, so that requests go out in the order made.
   */
  private request<T>(frame: Record<string, unknown>): Promise<T> {
    if (this.state === "connected" && !this.draining()) return this.transmit(frame);
    if (this.state === "closed") return Promise.reject(new SwitchboardError("closed", "the client is closed"));
    if (this.queue.filter((request) => !request.join).length >= this.maxQueued) {
      return Promise.reject(new SwitchboardError("queue_full", `${this.maxQueued} requests already wait to be sent`));
    }
    return new Promise((resolve, reject) => this.hold({ frame, resolve, reject }));
  }

  /** Whether held requests are still going out (or may be refused and go out again). */
  private draining(): boolean {
    return this.queue.length > 0 || this.sending > 0;
  }

  /** Holds `request` behind the others, and sends what the window lets out. */
  private hold(request: Request): void {
    this.queue.push(request);
    this.pump();
  }

  /**
   * Sends held requests, in order, no faster than the server takes them: at
   * most WINDOW await their answers at once, the next going out as one is
   * answered. After a refusal for the rate the window waits (`slowDown`), then
   * sends one at a time until one is accepted. A send that throws stops it:
   * those not yet written stay held for the next connection.
   */
  private pump(): void {
    while (this.state === "connected" && this.ws !== this.broken && this.pause === undefined) {
      if (this.sending >= (this.pauses > 0 ? 1 : WINDOW)) return;
      const request = this.queue.shift();
      if (!request) return;
      // A subscription that ended while its subscribe was held.
      if (request.join && this.subscriptions.get(request.join.topic) !== request.join) continue;
      request.order ??= this.nextId;
      this.sending++;
      if (!this.write(this.windowed(request, this.nextId))) return;
    }
  }

  /**
   * `request` as the window sends it, with `id`. Its answer frees its place.
   * Refused for the rate, it was not acted on: it is held again, in its place
   * before those not yet sent, and is not the application's to handle.
   */
  private windowed(request: Request, id: number): Request {
    return {
      frame: request.frame,
      resolve: (answer) => {
        this.sending--;
        this.pauses = 0;
        request.resolve(answer);
        this.pump();
      },
      reject: (error) => {
        this.sending--;
        if (error.code === "rate_limited") {
          let at = 0;
          while (at < this.queue.length && (this.queue[at].order ?? Infinity) < (request.order as number)) at++;
          this.queue.splice(at, 0, request);
          this.slowDown(id);
          // Refused after the pause it belongs to ended (a large request read
          // slowly): nothing else may come to send the rest.
          this.pump();
          return;
        }
        request.reject(error);
        // Cut off, the rest stay held for the next connection.
        if (error.code !== "disconnected") this.pump();
      },
    };
  }

  /**
   * Pauses the window after the refusal of request `id` for the rate: about a
   * second, and twice as long after each pause in a row with nothing accepted,
   * up to 8 s (each give or take half). The server charges refused messages
   * too, down to a debt of two seconds' worth, so the largest message it
   * allows (twice its byte rate) may need four seconds of silence: the fourth
   * pause in a row is at least that. After a pause the window sends one at a
   * time until one is accepted, so a run of refusals is at most the WINDOW out
   * when the first came and three more: 11, under the default 20 strikes.
   */
  private slowDown(id: number): void {
    // Sent before the last pause began: refused in the same run, already paused for.
    if (id <= this.wave) return;
    this.wave = this.nextId - 1;
    this.pause = setTimeout(
      () => {
        this.pause = undefined;
        this.pump();
      },
      jitter(AGAIN_MS * 2 ** Math.min(this.pauses++, 3)),
    );
  }

  /** Sends `frame` with a fresh id on the live connection. */
  private transmit<T>(frame: Record<string, unknown>): Promise<T> {
    return new Promise((resolve, reject) => this.write({ frame, resolve, reject }));
  }

  /**
   * Sends `request` with a fresh id on the live connection, and keeps it until
   * its answer. False when the socket's send threw: the request then rejects
   * with `disconnected` when the connection is dropped, as every request sent
   * on it does.
   */
  private write(request: Request): boolean {
    const id = this.nextId++;
    let text: string;
    try {
      text = JSON.stringify({ ...request.frame, id });
    } catch (error) {
      // This request alone: those sent with it go on.
      request.reject(new SwitchboardError("invalid_message", `the request cannot be sent as JSON: ${error}`));
      return true;
    }
    this.inflight.set(id, request);
    const ws = this.ws as WebSocketLike;
    try {
      ws.send(text);
    } catch {
      // A socket whose send throws is dropped as a closed one is, and the
      // client reconnects: refusing this request alone would leave a live
      // connection without, say, the subscribe that failed. Dropped once what
      // is under way (a welcome) is done with it; held requests wait for the
      // next connection meanwhile.
      this.broken = ws;
      queueMicrotask(() => this.lost(ws, 1006, "send failed"));
      return false;
    }
    return true;
  }

  private async open(generation: number): Promise<void> {
    const WebSocket = this.WebSocket ?? (globalThis as any).WebSocket;
    if (!WebSocket) {
      this.stop(1006, "", "no WebSocket implementation: on Node 20 pass { WebSocket } from the ws package");
      return;
    }
    // The whole attempt, getToken included, has connectTimeout.
    this.timer = setTimeout(() => this.abandon(generation), this.connectTimeout);
    const protocols = [PROTOCOL];
    if (!("id" in this.auth)) {
      let token: string;
      try {
        token = await this.currentToken();
      } catch (error) {
        if (generation !== this.generation) return;
        clearTimeout(this.timer);
        this.emit("error", new SwitchboardError("token", `getToken failed: ${error}`));
        // A handler may have closed the client.
        if (generation === this.generation) this.retry(1006, "getToken failed");
        return;
      }
      if (generation !== this.generation) return;
      // Kept only now: a token fetched for an attempt given up meanwhile is not this client's.
      if ("getToken" in this.auth && token !== this.token) this.take(token);
      const expires = expiresAt(token);
      // A minute's grace for a client clock that runs fast; the server has the last word.
      if ("token" in this.auth && expires !== undefined && expires + 60_000 <= Date.now()) {
        this.stop(4001, "", "the token has expired and there is no getToken to renew it");
        return;
      }
      protocols.push(`bearer.${token}`);
    }
    const url = new URL(this.url);
    if ("id" in this.auth) url.searchParams.set("id", this.auth.id);
    if (this.seen) url.searchParams.set("since", `${this.seen.epoch}:${this.seen.offset}`);
    let ws: WebSocketLike;
    try {
      ws = new WebSocket(url.href, protocols);
    } catch (error) {
      this.stop(1006, "", `cannot open a WebSocket: ${error}`);
      return;
    }
    this.ws = ws;
    ws.onmessage = (event) => this.receive(ws, event.data);
    ws.onclose = (event) => this.lost(ws, event.code, event.reason);
    ws.onerror = () => {};
  }

  /** Attempt `generation` took longer than connectTimeout (its socket, or getToken). */
  private abandon(generation: number): void {
    if (generation !== this.generation || this.state !== "connecting") return;
    if (this.ws) {
      this.lost(this.ws, 1006, "connect timeout");
      return;
    }
    this.generation++;
    this.retry(1006, "connect timeout");
  }

  /** The token to connect with: `getToken`'s, fetched again when it is due for renewal. */
  private async currentToken(): Promise<string> {
    // Trimmed, as getToken's are: a token read from a file or a response often ends in a newline.
    if ("token" in this.auth) return this.auth.token.trim();
    if (this.token === undefined || Date.now() >= this.renewTokenAt) return this.fetchToken();
    return this.token;
  }

  /**
   * `getToken`'s token, without the whitespace around it (`res.text()` of a
   * response that ends in a newline). One that still cannot be sent as a
   * subprotocol fails as a throwing `getToken` does, so it is reported and
   * fetched again, not left to the WebSocket constructor, whose throw would end
   * the client.
   */
  private async fetchToken(): Promise<string> {
    const token = await (this.auth as { getToken: () => string | Promise<string> }).getToken();
    const trimmed = typeof token === "string" ? token.trim() : "";
    // Not the token itself in the message: it is a secret, and errors get logged.
    if (!SUBPROTOCOL.test(trimmed)) {
      throw new Error("its token cannot be sent as a WebSocket subprotocol (empty, or with spaces, commas or quotes)");
    }
    return trimmed;
  }

  /** Keeps `token`, and when to renew it, dated by this client's clock. */
  private take(token: string): void {
    this.token = token;
    this.renewTokenAt = renewAt(token, Date.now()) ?? Infinity;
  }

  private receive(ws: WebSocketLike, data: unknown): void {
    if (ws !== this.ws) return;
    let frame: any;
    try {
      frame = JSON.parse(String(data));
    } catch {
      this.emit("error", new SwitchboardError("invalid_frame", `the server sent a frame that is not JSON: ${String(data).slice(0, 80)}`));
      return;
    }
    switch (frame.type) {
      case "welcome":
        return this.welcome(frame);
      case "message":
        if (frame.topic === undefined) return this.direct(frame);
        return this.subscriptions.get(frame.topic)?.receive(frame as TopicFrame);
      case "presence":
        if (frame.event !== undefined) return this.subscriptions.get(frame.topic)?.receive(frame as TopicFrame);
        return this.answer(frame);
      case "error":
        return this.refused(frame);
      case "unsubscribed":
        return this.revoked(frame);
      default:
        return this.answer(frame);
    }
  }

  private welcome(frame: { client: string; epoch: string; offset: number; recovered?: boolean; missed?: number }): void {
    clearTimeout(this.timer);
    this.connectedAt = Date.now();
    const resumed = this.seen !== undefined;
    // A position kept for another id (a token that now names another user, a
    // stored position of another user) says nothing of this inbox, whatever
    // the server could replay after it: start from the server's position.
    const same = this.seenFor === undefined || this.seenFor === frame.client;
    const recovered = !resumed || (same && frame.recovered === true);
    // On a recovered resume the missed messages follow and move `inbox` on.
    if (!recovered || !resumed) this.seen = { epoch: frame.epoch, offset: frame.offset };
    this.seenFor = frame.client;
    this.state = "connected";
    this.scheduleRenewal();
    // Subscriptions first: a held publish to a topic this client reads then reaches it.
    for (const subscription of this.subscriptions.values()) subscription.reconnected();
    this.queue.unshift(...Array.from(this.subscriptions.values(), (subscription) => this.subscribing(subscription)));
    this.pump();
    for (const [resolve] of this.waiting.splice(0)) resolve();
    this.emit("connected", { client: frame.client, resumed, recovered, missed: resumed && recovered ? frame.missed : undefined });
  }

  private direct(frame: { from: string; payload: unknown; offset: number; epoch: string }): void {
    if (!isNew(this.seen, frame.epoch, frame.offset)) return;
    this.seen = { epoch: frame.epoch, offset: frame.offset };
    this.emit("message", { from: frame.from, payload: frame.payload, offset: frame.offset });
  }

  private answer(frame: { id?: number }): void {
    const request = this.inflight.get(frame.id as number);
    if (!request) return;
    this.inflight.delete(frame.id as number);
    request.resolve(frame);
  }

  /** The server ended a subscription (a refreshed token no longer allows its topic). */
  private revoked(frame: { topic: string; code: string; message: string }): void {
    const subscription = this.subscriptions.get(frame.topic);
    if (subscription) this.end(subscription, new SwitchboardError(frame.code, frame.message));
  }

  /** A subscription refused or ended by the server is over: its `error` handler and the `error` event say why. */
  private end(subscription: Subscription, error: SwitchboardError): void {
    this.subscriptions.delete(subscription.topic);
    subscription.refused(error);
    this.emit("error", error);
  }

  private refused(frame: { id?: number; code: string; message: string }): void {
    const error = new SwitchboardError(frame.code, frame.message);
    const request = this.inflight.get(frame.id as number);
    if (!request) return this.emit("error", error);
    this.inflight.delete(frame.id as number);
    request.reject(error);
  }

  private scheduleRenewal(): void {
    clearTimeout(this.renewal);
    if (!("getToken" in this.auth) || this.renewTokenAt === Infinity) return;
    const wait = Math.max(AGAIN_MS, this.renewTokenAt - Date.now());
    // A token that lives for months is due later than one timer can wait: wait
    // the most it can, then look at the clock again.
    this.renewal = wait > MAX_DELAY ? setTimeout(() => this.scheduleRenewal(), MAX_DELAY) : setTimeout(() => void this.renew(), wait);
  }

  /** Fetches a token and hands it to the server before the current one expires. */
  private async renew(): Promise<void> {
    const ws = this.ws;
    const live = () => ws === this.ws && this.state === "connected";
    let token: string;
    try {
      token = await this.fetchToken();
    } catch (error) {
      if (!live()) return;
      this.emit("error", new SwitchboardError("token", `getToken failed: ${error}`));
      // Again while there is time; at expiry the server closes with 4001 and the client reconnects.
      if (live()) this.renewal = setTimeout(() => void this.renew(), AGAIN_MS);
      return;
    }
    if (!live()) return;
    // The same token again (a cache) gains nothing: ask later.
    if ((expiresAt(token) ?? Infinity) <= (expiresAt(this.token as string) ?? -Infinity)) {
      this.renewal = setTimeout(() => void this.renew(), AGAIN_MS);
      return;
    }
    try {
      await this.transmit({ type: "refresh", token });
    } catch (error) {
      const code = (error as SwitchboardError).code;
      if (code === "disconnected") return;
      this.emit("error", error as SwitchboardError);
      // Refused for now: again while there is time, as for a failing getToken.
      if (TRANSIENT.includes(code) && live()) this.renewal = setTimeout(() => void this.renew(), AGAIN_MS);
      return;
    }
    if (!live()) return;
    this.take(token);
    this.scheduleRenewal();
  }

  /** The connection (or attempt) `ws` ended with `code`. */
  private lost(ws: WebSocketLike, code: number, reason: string): void {
    if (ws !== this.ws) return;
    const why = final(code, "getToken" in this.auth);
    if (why) {
      this.stop(code, reason, why);
      return;
    }
    const wasConnected = this.state === "connected";
    this.detach();
    this.state = "connecting";
    const generation = ++this.generation;
    // A token refused at the handshake, or expired, is fetched again.
    if (!wasConnected || code === 4001) this.token = undefined;
    // Only a connection that stayed up resets the backoff: one that a server
    // welcomes and closes at once must not be retried at once, forever.
    if (wasConnected && Date.now() - this.connectedAt >= STABLE_MS) this.attempt = 0;
    if (wasConnected) this.emit("disconnected", { code, reason, reconnect: true });
    // A handler may have closed the client.
    if (generation === this.generation) this.retry(code, reason);
  }

  private retry(code: number, reason: string): void {
    const generation = this.generation;
    const delay = backoffDelay(this.attempt++, this.backoff);
    this.emit("reconnecting", { attempt: this.attempt, delay, code, reason });
    if (generation !== this.generation) return;
    this.timer = setTimeout(() => generation === this.generation && void this.open(++this.generation), delay);
  }

  /** Drops the socket and fails what was sent on it; held requests stay held, resubscribes are made again. */
  private detach(): void {
    clearTimeout(this.timer);
    clearTimeout(this.renewal);
    clearTimeout(this.pause);
    this.pause = undefined;
    this.pauses = 0;
    this.broken = undefined;
    const ws = this.ws;
    this.ws = undefined;
    if (ws) {
      ws.onmessage = ws.onclose = null;
      try {
        ws.close(1000);
      } catch {
        // Already closed, or never opened.
      }
    }
    const cut = new SwitchboardError("disconnected", "the connection closed before the server answered; it may or may not have acted");
    for (const request of this.inflight.values()) request.reject(cut);
    this.inflight.clear();
    const held = this.queue.filter((request) => !request.join);
    for (const request of held) request.order = undefined;
    this.queue.splice(0, this.queue.length, ...held);
  }

  /** Stops for good: closes, fails every held request and `connect()`, and says why. */
  private stop(code: number, reason: string, why: string): void {
    const wasConnected = this.state === "connected";
    this.detach();
    this.state = "closed";
    this.generation++;
    const error = new SwitchboardError("closed", why);
    for (const request of this.queue.splice(0)) request.reject(error);
    for (const [, reject] of this.waiting.splice(0)) reject(error);
    if (wasConnected || code !== 1000) this.emit("disconnected", { code, reason, reconnect: false, why });
  }
}
