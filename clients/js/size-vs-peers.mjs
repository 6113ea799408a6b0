// The client's size against the clients users of such systems know: each package
// bundled for the browser (everything it exports, with its dependencies),
// minified, then gzipped, the same way build.mjs measures ours.
//
//   npm install --no-save phoenix@1.8.16 centrifuge@5.8.0 socket.io-client@4.8.4
//   node size-vs-peers.mjs
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { gzipSync } from "node:zlib";

import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const entries = {
  "@switchboard/client": `export * from ${JSON.stringify(resolve(here, "src/index.ts"))};`,
  phoenix: 'export * from "phoenix";',
  centrifuge: 'export * from "centrifuge";',
  "socket.io-client": 'export * from "socket.io-client";',
};

console.log("| package | minified | minified + gzip |\n|---|---|---|");
for (const [name, contents] of Object.entries(entries)) {
  const result = await build({
    stdin: { contents, resolveDir: here, loader: "ts" },
    bundle: true,
    minify: true,
    format: "esm",
    platform: "browser",
    target: "es2020",
    write: false,
    legalComments: "none",
    logLevel: "error",
  });
  const code = result.outputFiles[0].contents;
  console.log(`| ${name} | ${code.length} B | ${gzipSync(code, { level: 9 }).length} B |`);
}
