/**
 * When a JWT should be replaced, in milliseconds since the Unix epoch: a fifth
 * of its remaining life before it expires, and at most 30 s before. Undefined
 * for a token with no readable `exp`. The client only reads the claim; the
 * server verifies the token.
 */
export function renewAt(token: string, now: number = Date.now()): number | undefined {
  const expires = expiresAt(token);
  if (expires === undefined) return undefined;
  return expires - Math.min(30_000, Math.max(0, expires - now) / 5);
}

/** A JWT's `exp` claim, in milliseconds since the Unix epoch. */
export function expiresAt(token: string): number | undefined {
  try {
    const claims = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const exp = JSON.parse(atob(claims)).exp;
    return typeof exp === "number" ? exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}
