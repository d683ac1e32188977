/** Reconnecting subscriptions against real bus processes that go away: backoff without a
 * limit by default, resuming after the last delivered sequence on the same log, starting over
 * (and saying so) on a new log, and giving up when told to. */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { test } from "node:test";

import { Bus, UnavailableError, type Event, type LogChange, type Subscription } from "../src";
import { BusProcess } from "../src/testing";

async function take(subscription: Subscription, count: number, timeoutMs = 15_000): Promise<Event[]> {
  const deadline = Date.now() + timeoutMs;
  const events: Event[] = [];
  while (events.length < count) {
    const event = await subscription.next(Math.max(0, deadline - Date.now()));
    assert.ok(event, "subscription ended early");
    events.push(event);
  }
  return events;
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

test("a file-store bus that restarts: resumes after the last delivered sequence, same log", async () => {
  const dataDir = mkdtempSync(path.join(tmpdir(), "eventbus-reconnect-"));
  const running = await BusProcess.start({ storage: "file", data_dir: dataDir });
  const bus = new Bus(running.address, { source: "node-reconnect" });
  try {
    const changes: LogChange[] = [];
    const subscription = await bus.subscribe("re.file", { start: "earliest", onLogChanged: (c) => changes.push(c) });
    const first = await bus.publishBatch([0, 1, 2].map((n) => ({ topic: "re.file", data: { n } })));
    assert.deepEqual((await take(subscription, 3)).map((e) => e.sequence), first);
    await running.stop();
    await sleep(1500); // several backoff steps with nobody listening
    await running.start();
    const second = await bus.publishBatch([3, 4].map((n) => ({ topic: "re.file", data: { n } })));
    const events = await take(subscription, 2);
    assert.deepEqual(events.map((e) => e.sequence), second, "neither duplicates nor gaps");
    assert.ok(subscription.resumes >= 1);
    assert.equal(subscription.logChanges, 0);
    assert.deepEqual(changes, []);
    await assert.rejects(subscription.next(300), { name: "TimeoutError" });
    subscription.close();
  } finally {
    bus.close();
    await running.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test("a memory bus that restarts has a new log: the subscription says so and starts over on it", async () => {
  const running = await BusProcess.start();
  const bus = new Bus(running.address, { source: "node-reconnect" });
  try {
    const changes: LogChange[] = [];
    const subscription = await bus.subscribe("re.mem", { start: "earliest", onLogChanged: (c) => changes.push(c) });
    const oldLog = subscription.confirmation?.logId;
    assert.ok(oldLog);
    const old = await bus.publishBatch([0, 1, 2].map((n) => ({ topic: "re.mem", data: { n } })));
    await take(subscription, 3);
    await running.restart();
    // The new log's sequences start again, below the last one seen: resuming after it alone
    // would skip these.
    const fresh = await bus.publishBatch([10, 11].map((n) => ({ topic: "re.mem", data: { n } })));
    assert.ok(fresh[1] <= old[2]);
    const events = await take(subscription, 2);
    assert.deepEqual(events.map((e) => e.json<{ n: number }>().n), [10, 11]);
    assert.deepEqual(events.map((e) => e.sequence), fresh);
    assert.equal(subscription.logChanges, 1);
    assert.equal(changes.length, 1);
    assert.equal(changes[0].previousLogId, oldLog);
    assert.notEqual(changes[0].logId, oldLog);
    assert.equal(changes[0].lastSeen, old[2]);
    subscription.close();
  } finally {
    bus.close();
    await running.stop();
  }
});

test("a position stored with its log id: a bus on another log starts over", async () => {
  const running = await BusProcess.start();
  const bus = new Bus(running.address, { source: "node-reconnect" });
  try {
    const [sequence] = await bus.publishBatch([{ topic: "re.stored", data: "a" }, { topic: "re.stored", data: "b" }]);
    const changes: LogChange[] = [];
    const subscription = await bus.subscribe("re.stored", {
      start: sequence + 100n, logId: "some-other-log", onLogChanged: (c) => changes.push(c),
    });
    assert.equal(subscription.confirmation?.logChanged, true);
    assert.deepEqual((await take(subscription, 2)).map((e) => e.text()), ["a", "b"]);
    assert.equal(changes[0]?.lastSeen, sequence + 100n);
    subscription.close();
  } finally {
    bus.close();
    await running.stop();
  }
});

test("backoff.maxAttempts gives up when the bus stays away", async () => {
  const doomed = await BusProcess.start();
  const bus = new Bus(doomed.address);
  try {
    const subscription = await bus.subscribe("re.gone", { backoff: { maxAttempts: 3, initialMs: 20, maxMs: 100 } });
    await doomed.stop();
    await assert.rejects(subscription.next(15_000), UnavailableError);
    assert.equal(subscription.resumes, 0);
  } finally {
    bus.close();
  }
});
