/**
 * Calls an application's handler. A handler that throws must not break the
 * client's bookkeeping of the frame being handled, so its error is rethrown on
 * its own turn, where the host reports it as uncaught.
 */
export function call<T>(handler: ((value: T) => void) | undefined, value: T): void {
  if (!handler) return;
  try {
    handler(value);
  } catch (error) {
    setTimeout(() => {
      throw error;
    });
  }
}

/** Named events, each with one kind of value. */
export class Emitter<Events> {
  private handlers: { [K in keyof Events]?: Array<(value: Events[K]) => void> } = {};

  /** Calls `handler` on every `event`; the function returned stops it. */
  on<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): () => void {
    const list = (this.handlers[event] ??= []);
    list.push(handler);
    return () => {
      const at = list.indexOf(handler);
      if (at >= 0) list.splice(at, 1);
    };
  }

  protected emit<K extends keyof Events>(event: K, value: Events[K]): void {
    for (const handler of [...(this.handlers[event] ?? [])]) call(handler, value);
  }
}
