/**
 * Why a request failed or the client stopped. `code` is the server's error code
 * (`forbidden`, `rate_limited`, `invalid_target`, ... as docs/protocol.md lists
 * them) or one of the client's own:
 *
 * - `disconnected`: the connection closed before the server answered. The
 *   request may or may not have been acted on.
 * - `closed`: the client was closed, or stopped reconnecting, before the request
 *   was sent. It was not acted on.
 * - `queue_full`: the client is offline and already holds `maxQueued` requests.
 * - `token`: `getToken` failed.
 */
export class SwitchboardError extends Error {
  /** The error code. */
  readonly code: string;

  /** An error with `code` and a message for people. */
  constructor(code: string, message: string) {
    super(message);
    this.name = "SwitchboardError";
    this.code = code;
  }
}
