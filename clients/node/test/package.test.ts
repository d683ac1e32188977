/**
 * The package as users get it: `npm pack`, then `npm install <tarball>` into an empty project
 * (its dependencies from the registry), then a small program with `import` and one with
 * `require` against a real bus, and a type check of both with the package's own declarations.
 * Bounded: each npm step has a time limit, and the project is deleted at the end.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { promisify } from "node:util";
import { after, before, describe, test } from "node:test";

import { BusProcess } from "../src/testing";

const run = promisify(execFile);
const PACKAGE_DIR = path.join(__dirname, "..", "..");
const NPM = process.platform === "win32" ? "npm.cmd" : "npm";
const TSC = path.join(PACKAGE_DIR, "node_modules", "typescript", "bin", "tsc");

/** The same program in both module systems: publish, replay it, and check that errors keep
 * their classes (one module instance either way). Prints one JSON line. */
const PROGRAM = (load: string) => `${load}
async function main() {
  const bus = new Bus(process.argv[2], { source: "pack-check" });
  await bus.waitReady(10000);
  const sequence = await bus.publish("pack.check", { hello: "world" });
  const subscription = await bus.subscribe("pack.check", { start: "earliest" });
  const event = await subscription.next(5000);
  subscription.close();
  let noResponders = false;
  try { await bus.query("pack.nobody", "?", { timeoutMs: 1000 }); }
  catch (error) { noResponders = error instanceof NoRespondersError && error instanceof BusError; }
  bus.close();
  console.log(JSON.stringify({ sequence: String(sequence), data: event.json(), noResponders }));
}
main().catch((error) => { console.error(error); process.exit(1); });
`;

describe("npm pack", () => {
  let work: string;
  let tarball: string;
  let bus: BusProcess;

  before(async () => {
    work = mkdtempSync(path.join(tmpdir(), "eventbus-pack-"));
    // --ignore-scripts: the test runs after `npm run build`; prepack would rebuild dist/ under
    // the running tests.
    const { stdout } = await run(NPM, ["pack", "--ignore-scripts", "--json", "--pack-destination", work],
      { cwd: PACKAGE_DIR, timeout: 60_000 });
    tarball = path.join(work, JSON.parse(stdout)[0].filename);
    bus = await BusProcess.start();
  });
  after(async () => {
    await bus?.stop();
    if (work) rmSync(work, { recursive: true, force: true });
  });

  test("the tarball holds the compiled code for both module systems, types and the proto", async () => {
    const { stdout } = await run("tar", ["-tzf", tarball]);
    const files = stdout.split("\n").filter(Boolean);
    for (const file of [
      "package/package.json", "package/README.md",
      "package/dist/src/index.js", "package/dist/src/index.d.ts",
      "package/dist/esm/index.mjs", "package/dist/esm/index.d.mts",
      "package/dist/proto/eventbus/v1/eventbus.proto", "package/dist/proto/grpc/health/v1/health.proto",
    ]) assert.ok(files.includes(file), `${file} missing from the tarball`);
    assert.ok(!files.some((file) => /testing|\/test\/|node_modules/.test(file)), files.join("\n"));
  });

  test("installs into an empty project and runs with import and require", async () => {
    const project = path.join(work, "project");
    await run("mkdir", ["-p", project]);
    writeFileSync(path.join(project, "package.json"), JSON.stringify({ name: "pack-check", private: true }));
    await run(NPM, ["install", "--no-audit", "--no-fund", "--loglevel=error", tarball],
      { cwd: project, timeout: 180_000 });
    writeFileSync(path.join(project, "esm.mjs"),
      PROGRAM('import { Bus, BusError, NoRespondersError } from "eventbus-client";'));
    writeFileSync(path.join(project, "cjs.cjs"),
      PROGRAM('const { Bus, BusError, NoRespondersError } = require("eventbus-client");'));
    for (const program of ["esm.mjs", "cjs.cjs"]) {
      const { stdout } = await run(process.execPath, [program, bus.address], { cwd: project, timeout: 30_000 });
      const result = JSON.parse(stdout.trim());
      assert.deepEqual(result.data, { hello: "world" }, program);
      assert.match(result.sequence, /^[1-9]\d*$/, program);
      assert.equal(result.noResponders, true, program);
    }

    // The declarations, as a TypeScript user of either module system resolves them.
    const typed = (load: string) => `${load}
const bus: Bus = new Bus("127.0.0.1:1");
export const sequence: Promise<bigint> = bus.publish("a.b", { x: 1 });
export const isError = (error: unknown): boolean => error instanceof BusError;
`;
    writeFileSync(path.join(project, "typed-esm.mts"), typed('import { Bus, BusError } from "eventbus-client";'));
    writeFileSync(path.join(project, "typed-cjs.cts"), typed('import { Bus, BusError } from "eventbus-client";'));
    await run(process.execPath, [TSC, "--noEmit", "--strict", "--module", "nodenext", "--moduleResolution", "nodenext",
      "--target", "es2022", "--types", "node", "--typeRoots", path.join(PACKAGE_DIR, "node_modules", "@types"),
      "typed-esm.mts", "typed-cjs.cts"], { cwd: project, timeout: 60_000 }).catch((error) => {
      assert.fail(`type check failed:\n${error.stdout}${error.stderr}`);
    });
  });
});
