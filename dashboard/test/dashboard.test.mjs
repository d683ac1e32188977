// The dashboard in a real browser: headless Chromium (Debian's, driven by playwright-core)
// against a real bus process with the scenario's four services, each a process of its own.
//
// Needs EVENTBUS_BIN (the eventbus binary) and the scenario services beside it (user-service,
// order-service, product-service, query-service in the same directory), and CHROMIUM (default
// /usr/bin/chromium). Screenshots of each view go to SCREENSHOT_DIR (default
// ../target/dashboard-screenshots; `docs/` for the README's).
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";

const here = path.dirname(new URL(import.meta.url).pathname);
const BUS = process.env.EVENTBUS_BIN ?? path.resolve(here, "../../target/debug/eventbus");
const BIN = path.dirname(BUS);
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SHOTS = path.resolve(process.env.SCREENSHOT_DIR ?? path.resolve(here, "../../target/dashboard-screenshots"));
const WAIT_MS = 30_000;

/// A port free now on 127.0.0.1.
function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/// Polls `check` until it returns a truthy value or WAIT_MS pass.
async function waitFor(what, check, timeoutMs = WAIT_MS) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (error) {
      last = error;
    }
    if (Date.now() > deadline) throw new Error(`${what}: not within ${timeoutMs} ms${last ? `: ${last.message}` : ""}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

const processes = [];
let dir;
let bus;
let admin;
let shop;
let browser;

function run(name, command, args, env = {}) {
  const child = spawn(command, args, { env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] });
  const output = [];
  child.stdout.on("data", (chunk) => output.push(chunk));
  child.stderr.on("data", (chunk) => output.push(chunk));
  child.output = () => Buffer.concat(output).toString();
  child.name = name;
  processes.push(child);
  child.on("exit", (code, signal) => {
    if (!child.stopping) console.error(`${name} exited (${code ?? signal}):\n${child.output()}`);
  });
  return child;
}

async function ok(url) {
  const response = await fetch(url);
  return response.ok;
}

before(async () => {
  dir = mkdtempSync(path.join(tmpdir(), "eventbus-dashboard-"));
  mkdirSync(SHOTS, { recursive: true });
  const [grpc, http, rr] = await Promise.all([freePort(), freePort(), freePort()]);
  bus = `http://127.0.0.1:${grpc}`;
  admin = `http://127.0.0.1:${http}`;
  shop = `http://127.0.0.1:${rr}`;
  run("eventbus", BUS, ["serve", "--listen", `127.0.0.1:${grpc}`, "--admin-listen", `127.0.0.1:${http}`, "--storage", "memory"]);
  await waitFor("the bus is ready", () => ok(`${admin}/readyz`));
  const env = { EVENTBUS_SERVER: bus };
  for (const service of ["user-service", "order-service", "product-service"]) {
    run(service, path.join(BIN, service), ["--db", path.join(dir, `${service}.db`)], env);
  }
  run("query-service", path.join(BIN, "query-service"), ["--mode", "request-reply", "--listen", `127.0.0.1:${rr}`], env);
  await waitFor("query-service answers", () => ok(`${shop}/health`));
  // The three responders are up once their query topics have subscribers.
  await waitFor("the responders subscribe", async () => {
    const overview = await (await fetch(`${admin}/api/v1/overview`)).json();
    const topics = new Map(overview.topics.map((t) => [t.name, t.subscribers]));
    return ["user.query", "order.query", "product.query"].every((t) => topics.get(t) > 0);
  });
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
});

after(async () => {
  await browser?.close();
  for (const child of processes.reverse()) {
    child.stopping = true;
    child.kill("SIGTERM");
  }
  await Promise.all(processes.map((child) => (child.exitCode !== null ? null : new Promise((resolve) => child.once("exit", resolve)))));
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/// A new page on the dashboard; the returned list collects console errors and page errors.
async function openPage(hash = "") {
  const page = await browser.newPage({ viewport: { width: 1400, height: 860 } });
  const errors = [];
  page.on("console", (message) => {
    if (message.type() === "error") errors.push(message.text());
  });
  page.on("pageerror", (error) => errors.push(error.message));
  await page.goto(`${admin}/${hash}`);
  return { page, errors };
}

/// GET /users/7/products on the request-reply query service: its correlation id.
async function scenarioGet() {
  const response = await fetch(`${shop}/users/7/products`);
  assert.equal(response.status, 200, await response.clone().text());
  const correlation = response.headers.get("x-correlation-id");
  assert.ok(correlation, "the answer names its correlation id");
  return correlation;
}

test("the event web shows the scenario's four services and their topics", async () => {
  await scenarioGet();
  const { page, errors } = await openPage("#graph");
  const names = await waitFor("the graph holds the scenario", () =>
    page.evaluate(() => {
      const cy = window.eventbusDashboard?.graph.cy;
      if (!cy) return null;
      const names = cy.nodes().map((n) => `${n.data("kind")}:${n.data("label")}`);
      const wanted = ["service:query-service", "service:user-service", "service:order-service", "service:product-service", "topic:user.query", "topic:order.query", "topic:product.query"];
      return wanted.every((w) => names.includes(w)) ? names : null;
    }),
  );
  assert.ok(names.length >= 7);
  // Replies run from each responder back to the asker.
  const replies = await page.evaluate(() =>
    window.eventbusDashboard.graph.cy.edges("[kind = 'replies']").map((e) => `${e.source().data("label")}>${e.target().data("label")}`),
  );
  for (const service of ["user-service", "order-service", "product-service"]) {
    assert.ok(replies.includes(`${service}>query-service`), `${service} replies to query-service: ${replies}`);
  }
  assert.match(await page.textContent("#graph-summary"), /4 services/);
  await page.screenshot({ path: path.join(SHOTS, "dashboard-graph.png") });
  assert.deepEqual(errors, []);
  await page.close();
});

test("the topics view lists each query topic with its subscriber", async () => {
  const { page, errors } = await openPage("#topics");
  await page.waitForSelector("#topics tr[data-topic='user.query']", { timeout: WAIT_MS });
  const row = await page.$$eval("#topics tr[data-topic='user.query'] td", (cells) => cells.map((c) => c.textContent));
  assert.equal(row[0], "user.query");
  assert.ok(Number(row[2].replace(/,/g, "")) >= 1, `published: ${row}`);
  assert.equal(row[4], "1", `one subscriber: ${row}`);
  assert.match(await page.textContent("#counters"), /queries answered/);
  await page.screenshot({ path: path.join(SHOTS, "dashboard-topics.png"), fullPage: true });
  assert.deepEqual(errors, []);
  await page.close();
});

test("the live tail shows an event published during the test, and pauses", async () => {
  const { page, errors } = await openPage("#tail");
  await page.fill("#tail-pattern", "dashboard.>");
  await page.click("#tail-start");
  await page.waitForFunction(() => document.querySelector("#tail-status").textContent.startsWith("following dashboard.>"), null, { timeout: WAIT_MS });
  execFileSync(BUS, ["publish", "--server", bus, "dashboard.test", "hello from the test"]);
  const row = await page.waitForSelector("#tail tbody tr", { timeout: WAIT_MS });
  const cells = await row.$$eval("td", (cells) => cells.map((c) => c.textContent));
  assert.equal(cells[2], "dashboard.test");
  assert.equal(cells[6], "hello from the test");

  await page.click("#tail-pause");
  execFileSync(BUS, ["publish", "--server", bus, "dashboard.test", "while paused"]);
  await page.waitForFunction(() => document.querySelector("#tail-status").textContent === "paused: 1 events held", null, { timeout: WAIT_MS });
  assert.equal(await page.locator("#tail tbody tr").count(), 1, "nothing shown while paused");
  await page.click("#tail-pause");
  await page.waitForFunction(() => document.querySelectorAll("#tail tbody tr").length === 2, null, { timeout: WAIT_MS });
  assert.equal(await page.textContent("#tail tbody tr:first-child td.data"), "while paused");

  await page.screenshot({ path: path.join(SHOTS, "dashboard-tail.png") });
  assert.deepEqual(errors, []);

  // A malformed pattern is refused with the bus's message (the browser logs the 400 itself).
  await page.fill("#tail-pattern", "dashboard..x");
  await page.click("#tail-start");
  await page.waitForFunction(() => document.querySelector("#tail-status").textContent.startsWith("pattern:"), null, { timeout: WAIT_MS });
  assert.deepEqual(errors, ["Failed to load resource: the server responded with a status of 400 (Bad Request)"]);
  await page.close();
});

test("the conversation view of one GET shows its three queries and the slowest answer", async () => {
  const correlation = await scenarioGet();
  const { page, errors } = await openPage("#conversations");
  await page.waitForSelector(`#recent a:text("${correlation}")`, { timeout: WAIT_MS });
  await page.click(`#recent a:text("${correlation}")`);
  await page.waitForSelector("#timeline .exchange", { timeout: WAIT_MS });
  const topics = await page.$$eval("#timeline .exchange", (rows) => rows.map((r) => r.dataset.topic));
  assert.deepEqual([...topics].sort(), ["order.query", "product.query", "user.query"]);
  const labels = await page.$$eval("#timeline .exchange .label", (rows) => rows.map((r) => r.textContent));
  for (const service of ["user-service", "order-service", "product-service"]) {
    assert.ok(labels.some((l) => l.includes(`→ ${service}`)), `${service} answered: ${labels}`);
  }
  assert.equal(await page.locator("#timeline .exchange.slowest").count(), 1, "one answer is the slowest");
  assert.match(await page.textContent("#conversation .hint"), /the slowest answer: \w+\.query by \w+-service/);
  await page.screenshot({ path: path.join(SHOTS, "dashboard-conversation.png"), fullPage: true });
  assert.deepEqual(errors, []);
  await page.close();
});
