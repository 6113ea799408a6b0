/**
 * The Switchboard client for browsers and Node: `new Client(url, { id })`, then
 * `connect()`. See docs/client-js.md.
 */
export { Client } from "./client.js";
export type {
  Auth,
  ConnectedEvent,
  DisconnectedEvent,
  Events,
  Message,
  Options,
  PublishAck,
  ReconnectingEvent,
  SendAck,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export type { Backoff } from "./backoff.js";
export { SwitchboardError } from "./errors.js";
export type { Position } from "./position.js";
export { Subscription } from "./subscription.js";
export type { SubscribedEvent, SubscriptionHandlers, TopicMessage } from "./subscription.js";
