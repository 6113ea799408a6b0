// TLS from a real browser: headless Chromium loads the relay's page over
// https:// and talks to /ws over wss://, trusting a CA this test makes.
//
//   cd tests/browser && npm ci && node tls.test.mjs
//
// The CA and the server's certificate (for 127.0.0.1) are made with the
// openssl command; the CA goes into an NSS database in a HOME of the test's
// own, which is where Chromium on Linux looks for locally trusted roots. A
// second Chromium without that database must refuse the same page, so the
// first one's success is the CA's doing and not a lax browser.
//
// Env: SWITCHBOARD_BIN, CHROMIUM, ARTIFACTS (screenshots; default
// /tmp/switchboard-artifacts). Needs openssl and certutil (libnss3-tools).

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

import { launchChromium } from "./chromium.mjs";
import { installHelpers } from "./page.mjs";
import { startRelay, stopAllRelays } from "./relays.mjs";

const ARTIFACTS = process.env.ARTIFACTS || "/tmp/switchboard-artifacts";

const watchdog = setTimeout(() => {
  console.error("FATAL: TLS browser tests took longer than 120s");
  process.exit(1);
}, 120_000);
watchdog.unref();

/** A CA and a certificate it signed for 127.0.0.1 and localhost, as PEM files in `dir`. */
function makePki(dir) {
  const run = (...args) => execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  run("req", "-x509", ...ec, "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2",
    "-subj", "/CN=switchboard browser test CA");
  run("req", ...ec, "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=127.0.0.1");
  writeFileSync(join(dir, "ext.cnf"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n");
  run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
    "-out", "cert.pem", "-days", "2", "-extfile", "ext.cnf");
  return { ca: join(dir, "ca.pem"), cert: join(dir, "cert.pem"), key: join(dir, "key.pem") };
}

/** A HOME whose NSS database trusts `ca` for servers. */
function homeTrusting(dir, ca) {
  const db = join(dir, ".pki", "nssdb");
  mkdirSync(db, { recursive: true });
  execFileSync("certutil", ["-N", "-d", `sql:${db}`, "--empty-password"]);
  execFileSync("certutil", ["-A", "-d", `sql:${db}`, "-n", "switchboard test CA", "-t", "C,,", "-i", ca]);
  return dir;
}

const results = { passed: 0, failed: 0 };
async function test(name, body) {
  try {
    await body();
    results.passed += 1;
    console.log(`ok - ${name}`);
  } catch (e) {
    results.failed += 1;
    console.log(`not ok - ${name}\n  ${String(e.stack || e).replaceAll("\n", "\n  ")}`);
  }
}

const work = mkdtempSync(join(tmpdir(), "switchboard-tls-"));
const browsers = [];
try {
  const pki = makePki(work);
  const home = homeTrusting(mkdtempSync(join(work, "home-")), pki.ca);
  const relay = startRelay(["--tls-cert", pki.cert, "--tls-key", pki.key]);
  const port = await relay.ready;
  const origin = `https://127.0.0.1:${port}`;

  const trusting = await launchChromium({ env: { ...process.env, HOME: home } });
  browsers.push(trusting);

  await test("the demo page loads over https and its sockets speak wss", async () => {
    const page = await (await trusting.newContext()).newPage();
    const response = await page.goto(`${origin}/`);
    assert.equal(response.status(), 200);
    const security = await response.securityDetails();
    assert.equal(security.subjectName, "127.0.0.1");
    assert.equal(security.issuer, "switchboard browser test CA");
    await page.evaluate(installHelpers);
    await page.evaluate(() => window.sb.open("ann", "ann"));
    await page.evaluate(() => window.sb.open("bob", "bob"));
    await page.evaluate(() => window.sb.ready("ann"));
    await page.evaluate(() => window.sb.ready("bob"));
    await page.evaluate(() => window.sb.send("ann", { targets: ["bob"], payload: { over: "wss" } }));
    assert.deepEqual(JSON.parse(await page.evaluate(() => window.sb.next("bob"))), { over: "wss" });
    mkdirSync(ARTIFACTS, { recursive: true });
    await page.screenshot({ path: join(ARTIFACTS, "tls-demo.png") });
  });

  await test("the JavaScript client connects over wss", async () => {
    const page = await (await trusting.newContext()).newPage();
    await page.goto(`${origin}/`);
    const got = await page.evaluate(async (url) => {
      const { Client } = await import("/client.js");
      const client = new Client(url, { id: "carol" });
      const message = new Promise((resolve) => client.on("message", (m) => resolve(m.payload)));
      await client.connect();
      await client.send(["carol"], { n: 1 });
      const payload = await Promise.race([message, new Promise((r) => setTimeout(() => r("timeout"), 5000))]);
      client.close();
      return payload;
    }, `wss://127.0.0.1:${port}/ws`);
    assert.deepEqual(got, { n: 1 });
  });

  await test("a browser that does not trust the test CA refuses the page and the socket", async () => {
    const wary = await launchChromium({ env: { ...process.env, HOME: mkdtempSync(join(work, "home-")) } });
    browsers.push(wary);
    const context = await wary.newContext();
    await assert.rejects((await context.newPage()).goto(`${origin}/`), /ERR_CERT_AUTHORITY_INVALID/);
    const blank = await context.newPage();
    await blank.evaluate(installHelpers);
    const state = await blank.evaluate((url) => window.sb.connect("x", url), `wss://127.0.0.1:${port}/ws?id=x`);
    assert.equal(state.opened, false);
    assert.equal(state.closed.code, 1006);
  });
} catch (e) {
  results.failed += 1;
  console.log(`not ok - TLS setup\n  ${String(e.stack || e).replaceAll("\n", "\n  ")}`);
} finally {
  await Promise.all(browsers.map((b) => b.close()));
  await stopAllRelays();
  rmSync(work, { recursive: true, force: true });
}
console.log(`${results.passed} passed, ${results.failed} failed`);
process.exit(results.failed ? 1 : 0);
