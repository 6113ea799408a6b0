/** A place in an inbox or a topic's stream, as the server names it. */
export interface Position {
  /** Names the stream's life: a new epoch means its history was lost. */
  epoch: string;
  /** The offset of the last message seen; 1 is a stream's first. */
  offset: number;
  /**
   * An inbox position's client id, once the client has connected: a position
   * kept for another id is not resumed from (the client says `recovered: false`).
   */
  client?: string;
}

/**
 * Whether a delivery at `epoch`/`offset` comes after `seen`. A reconnect can
 * overlap what was already delivered; the overlap is dropped here.
 */
export function isNew(seen: Position | undefined, epoch: string, offset: number): boolean {
  return seen === undefined || seen.epoch !== epoch || offset > seen.offset;
}
