// Node-side waiting shared by the browser suites.

// `promise`, or a rejection naming `what` once `ms` pass first.
export function withTimeout(promise, ms, what) {
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms}ms: ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(timer));
}
