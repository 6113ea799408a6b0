// The one way the browser suites launch Chromium: Debian's /usr/bin/chromium,
// headless, with a fresh temporary user-data dir of its own (playwright's launch()).
//
// Env: CHROMIUM (default: /usr/bin/chromium).

import { chromium } from "playwright-core";

export const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

export const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

// `env`: the browser's environment (tls.test.mjs gives it a HOME whose NSS
// database trusts a test CA); default: this process's.
export function launchChromium({ env } = {}) {
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS, timeout: 30_000, env });
}
