// Builds the package and checks its size:
//   node build.mjs           dist/ (ESM + .d.ts), and the minified bundle the server serves
//   node build.mjs --check   the same, then fails if the server's copy differs or the
//                            minified, gzipped bundle is over the budget
//
// dist/index.js is the readable ESM bundle for bundlers; dist/switchboard.min.js the
// minified one for a <script type="module">. The server embeds the minified one as
// /client.js (crates/switchboard-server/assets/client.js, committed, so that the Rust
// build needs no Node).
import { execFileSync } from "node:child_process";
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const served = resolve(here, "../../crates/switchboard-server/assets/client.js");
const BUDGET = 6 * 1024;
const check = process.argv.includes("--check");

rmSync(resolve(here, "dist"), { recursive: true, force: true });
execFileSync(resolve(here, "node_modules/.bin/tsc"), ["-p", resolve(here, "tsconfig.json")], { stdio: "inherit" });
const common = { entryPoints: [resolve(here, "src/index.ts")], bundle: true, format: "esm", target: "es2020", logLevel: "warning" };
await build({ ...common, outfile: resolve(here, "dist/index.js") });
await build({ ...common, outfile: resolve(here, "dist/switchboard.min.js"), minify: true, legalComments: "none" });

const minified = readFileSync(resolve(here, "dist/switchboard.min.js"));
const gzipped = gzipSync(minified, { level: 9 }).length;
console.log(`dist/switchboard.min.js: ${minified.length} B minified, ${gzipped} B gzipped (budget ${BUDGET} B)`);

if (!check) {
  writeFileSync(served, minified);
  console.log(`copied to ${served}`);
} else {
  let failed = false;
  if (gzipped > BUDGET) {
    console.error(`FAIL: the minified, gzipped client is ${gzipped} B, over the ${BUDGET} B budget`);
    failed = true;
  }
  let copy = null;
  try {
    copy = readFileSync(served);
  } catch {}
  if (!copy || !copy.equals(minified)) {
    console.error(`FAIL: ${served} is not this build: run \`npm run build\` in clients/js and commit it`);
    failed = true;
  }
  if (failed) process.exit(1);
}
