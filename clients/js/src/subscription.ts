import { call } from "./emitter.js";
import type { SwitchboardError } from "./errors.js";
import { isNew, type Position } from "./position.js";

/** A message published to a topic. */
export interface TopicMessage {
  /** The topic. */
  topic: string;
  /** The publisher's client id; absent when a backend published through the HTTP API. */
  from?: string;
  /** The payload, as the publisher sent it. */
  payload: unknown;
  /** Its place in the topic's stream, in a namespace that keeps history. */
  offset?: number;
}

/** What a subscribe's answer said. */
export interface SubscribedEvent {
  /** False the first time; true when the client subscribed again after a reconnect. */
  resumed: boolean;
  /**
   * True when no message can have been missed: always on the first subscribe,
   * and on a resume when the server replayed everything published while the
   * client was away. False means messages were missed: reload the topic's state.
   */
  recovered: boolean;
  /** How many missed messages follow, when it recovered on a resume. */
  missed?: number;
}

/** What a subscription calls. Every handler is optional. */
export interface SubscriptionHandlers {
  /** Each message, once, in order. */
  message?(message: TopicMessage): void;
  /** A client id's first connection subscribed (namespaces with presence). */
  join?(client: string): void;
  /** A client id's last subscribed connection left (namespaces with presence). */
  leave?(client: string): void;
  /** The server accepted the subscribe, on the first connection and on every reconnect. */
  subscribed?(event: SubscribedEvent): void;
  /**
   * The server refused the subscribe (`forbidden`, `topic_full`, ...), or ended the
   * subscription (`forbidden`: a refreshed token no longer allows the topic); it is over.
   */
  error?(error: SwitchboardError): void;
}

/** A frame of a topic, as the server sends it. */
export interface TopicFrame {
  topic: string;
  from?: string;
  payload?: unknown;
  offset?: number;
  epoch?: string;
  event?: string;
  client?: string;
}

/** A subscribe's ack. */
export interface SubscribeAck {
  recovered?: boolean;
  missed?: number;
  offset?: number;
  epoch?: string;
}

/** One topic's subscription; made by `Client.subscribe`. */
export class Subscription {
  /** The topic. */
  readonly topic: string;
  /** The last message seen, in a namespace that keeps history. */
  private seen?: Position;
  /** Whether a subscribe of it was ever accepted: a later one resumes. */
  private accepted = false;
  /** Since when its resubscribes have been refused as `topic_full`. */
  private fullSince?: number;

  /**
   * Made by the client, which `leave` tells when the application
   * unsubscribes. With `since` (a `position` kept from before), the first
   * subscribe resumes from there.
   */
  constructor(
    topic: string,
    private readonly handlers: SubscriptionHandlers,
    private readonly leave: (subscription: Subscription) => Promise<void>,
    since?: Position,
  ) {
    this.topic = topic;
    this.seen = since;
    this.accepted = since !== undefined;
  }

  /** Where the topic's stream is for this subscription (in a namespace that keeps history). */
  get position(): Position | undefined {
    return this.seen && { ...this.seen };
  }

  /** Stops the subscription; settles when the server has acted on it (at once when offline). */
  unsubscribe(): Promise<void> {
    return this.leave(this);
  }

  /** Where to resume from, when there is such a place. */
  since(): Position | undefined {
    return this.seen;
  }

  /** Whether a subscribe now resumes one accepted before. */
  resuming(): boolean {
    return this.accepted;
  }

  /**
   * A new connection: its `topic_full` refusals begin a grace of their own, as
   * the connection that may hold the slot is another one (a drop and a long
   * time offline must not end the subscription at its first refusal).
   */
  reconnected(): void {
    this.fullSince = undefined;
  }

  /** How long its resubscribes have been refused as `topic_full` on this connection, counting one at `now`. */
  fullFor(now: number): number {
    this.fullSince ??= now;
    return now - this.fullSince;
  }

  /** Takes the server's answer to a subscribe sent with `since()` (or none). */
  subscribed(ack: SubscribeAck): void {
    this.fullSince = undefined;
    const resumed = this.accepted;
    // No history means no resume: a reconnect may have missed messages.
    const recovered = !resumed || ack.recovered === true;
    this.accepted = true;
    // On a recovered resume the missed messages follow and move `seen` on.
    if (!recovered || !resumed) {
      this.seen = ack.epoch === undefined ? undefined : { epoch: ack.epoch, offset: ack.offset ?? 0 };
    }
    call(this.handlers.subscribed, { resumed, recovered, missed: recovered && resumed ? ack.missed : undefined });
  }

  /** Forgets the position: the next subscribe starts afresh, and reports `recovered: false`. */
  restart(): void {
    this.seen = undefined;
  }

  /** The server refused the subscribe, or ended the subscription. */
  refused(error: SwitchboardError): void {
    call(this.handlers.error, error);
  }

  /** A message or a presence event of the topic. */
  receive(frame: TopicFrame): void {
    // Before its first ack, a frame can only be one an earlier subscription to the topic was owed.
    if (!this.accepted) return;
    if (frame.event === "join" || frame.event === "leave") {
      call(this.handlers[frame.event], frame.client as string);
      return;
    }
    if (frame.offset !== undefined && frame.epoch !== undefined) {
      if (!isNew(this.seen, frame.epoch, frame.offset)) return;
      this.seen = { epoch: frame.epoch, offset: frame.offset };
    }
    call(this.handlers.message, { topic: frame.topic, from: frame.from, payload: frame.payload, offset: frame.offset });
  }
}
