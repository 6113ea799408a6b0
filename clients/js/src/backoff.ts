/** How long to wait between reconnection attempts, in milliseconds. */
export interface Backoff {
  /** The ceiling of the first wait. Default 500. */
  initial: number;
  /** The ceiling of every wait. Default 20000. */
  max: number;
}

/** The defaults. */
export const BACKOFF: Backoff = { initial: 500, max: 20_000 };

/**
 * The wait before attempt `attempt` (0 for the first retry): exponential backoff
 * with full jitter, uniform in [0, min(max, initial * 2^attempt)). Jitter spreads
 * the clients that a restart dropped at once, so they do not all come back at once.
 */
export function backoffDelay(attempt: number, backoff: Backoff, random: () => number = Math.random): number {
  return Math.floor(random() * Math.min(backoff.max, backoff.initial * 2 ** Math.min(attempt, 30)));
}
