/**
 * When a JWT just received should be replaced, by this client's clock, in
 * milliseconds since the Unix epoch: a fifth of its life before it ends, and at
 * most 30 s before. Its life is `exp - iat` counted from `now`, so a client
 * clock that is slow does not matter; without `iat`, it is `exp` read against
 * the local clock. A token from a cache may be well into its life: `exp` read
 * against the local clock ends it sooner, unless that clock is so fast the
 * token looks expired already. Undefined for a token with no readable `exp`.
 * The client only reads the claims; the server verifies the token.
 */
export function renewAt(token: string, now: number): number | undefined {
  const { exp, iat } = claims(token);
  if (typeof exp !== "number") return undefined;
  const byClock = exp * 1000;
  const byLife = typeof iat === "number" ? now + (exp - iat) * 1000 : byClock;
  const ends = byClock > now ? Math.min(byLife, byClock) : byLife;
  return ends - Math.min(30_000, Math.max(0, ends - now) / 5);
}

/** A JWT's `exp` claim, in milliseconds since the Unix epoch. */
export function expiresAt(token: string): number | undefined {
  const { exp } = claims(token);
  return typeof exp === "number" ? exp * 1000 : undefined;
}

function claims(token: string): { exp?: unknown; iat?: unknown } {
  try {
    return JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))) ?? {};
  } catch {
    return {};
  }
}
