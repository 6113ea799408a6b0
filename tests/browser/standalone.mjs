// Running one browser suite alone (`node auth.test.mjs`, `node admin.test.mjs`):
// its own Chromium, a watchdog, one closing line, and exit 1 on any failure.
// relay.test.mjs runs the same suites in its own browser instead.

import { pathToFileURL } from "node:url";

import { launchChromium } from "./chromium.mjs";
import { withTimeout } from "./wait.mjs";

/** Whether the module at `url` is the script node was started with. */
export function isMain(url) {
  return url === pathToFileURL(process.argv[1]).href;
}

/** Runs `suite` ({tests, run, cleanup}) in a browser of its own and exits. */
export async function runAlone(name, suite) {
  const watchdog = setTimeout(() => {
    console.error(`FATAL: ${name} browser tests took longer than 120s`);
    suite.cleanup().finally(() => process.exit(1));
  }, 120_000);
  watchdog.unref();
  let browser;
  let counts = { passed: 0, failed: suite.tests.length };
  try {
    browser = await withTimeout(launchChromium(), 40_000, "launching Chromium");
    counts = await suite.run(browser);
  } catch (e) {
    console.error(`setup failed: ${e.stack || e}`);
  } finally {
    if (browser) await withTimeout(browser.close(), 10_000, "browser close").catch((e) => console.error(e.message));
    await suite.cleanup();
  }
  console.log(`${counts.passed} passed, ${counts.failed} failed`);
  process.exit(counts.failed ? 1 : 0);
}
