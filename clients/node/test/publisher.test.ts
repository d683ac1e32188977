/** The batching publisher against real bus processes: batching and per-event answers, refused
 * batches, exactly-once storage across a bus crash in the middle of the stream, and resends of
 * a batch a clustered bus's node could not store. The Python client's tests/test_publisher.py
 * has the same tests. */
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { test } from "node:test";

import { Backoff, Bus, InvalidArgumentError, PublisherClosedError, uuidv7, type Event, type Sequence } from "../src";
import { BusProcess, NatsServer, waitFor } from "../src/testing";

/** Every event on `pattern` from the start of the log up to the `caught_up` marker. */
async function replay(bus: Bus, pattern: string): Promise<Event[]> {
  const subscription = await bus.subscribe(pattern, { start: "earliest" });
  const events: Event[] = [];
  const head = subscription.confirmation?.headSequence ?? 0n;
  while (events.length === 0 || events[events.length - 1].sequence < head) {
    const event = await subscription.next(10_000);
    if (!event) break;
    events.push(event);
    if (subscription.caughtUp !== undefined && event.sequence >= subscription.caughtUp) break;
  }
  // The head may hold other topics' events: wait for the marker, then take what is buffered.
  await waitFor(() => subscription.caughtUp !== undefined, 10_000, "caught_up");
  for (;;) {
    const event = await subscription.next(200).catch(() => null);
    if (!event) break;
    events.push(event);
  }
  subscription.close();
  return events;
}

test("backoff: exponential, capped, full jitter by default, no give-up by default", () => {
  const plain = new Backoff({ jitter: 0 });
  assert.deepEqual([0, 1, 2, 3, 6, 7, 1000].map((n) => plain.delayMs(n)), [50, 100, 200, 400, 3200, 5000, 5000]);
  const full = new Backoff();
  assert.equal(full.delayMs(3, 0), 400);
  assert.equal(full.delayMs(3, 0.75), 100);
  for (let i = 0; i < 100; i++) {
    const delay = full.delayMs(2);
    assert.ok(delay > 0 && delay <= 200, String(delay));
  }
  assert.ok(full.allows(1_000_000));
  const limited = new Backoff({ maxAttempts: 2 });
  assert.ok(limited.allows(1) && !limited.allows(2));
  assert.throws(() => new Backoff({ initialMs: -1 }), RangeError);
});

test("uuidv7 ids sort by time and carry the version", () => {
  const early = uuidv7(1_700_000_000_000);
  const late = uuidv7(1_700_000_000_001);
  assert.match(early, /^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.ok(early < late);
});

test("batches events, answers each one, and fails only a refused batch", async () => {
  const running = await BusProcess.start();
  const bus = new Bus(running.address, { source: "node-publisher" });
  try {
    const publisher = bus.publisher({ maxBatch: 10, lingerMs: 5 });
    const pending = await Promise.all(Array.from({ length: 25 }, (_, n) =>
      publisher.submit({ topic: "pub.batch", data: { n }, ...(n === 0 ? { id: "mine-0" } : {}) })));
    assert.equal(pending[0].id, "mine-0");
    assert.ok(pending.slice(1).every((p) => /^[0-9a-f-]{36}$/.test(p.id)));
    const sequences = await Promise.all(pending.map((p) => p.sequence));
    for (let i = 1; i < sequences.length; i++) assert.equal(sequences[i], sequences[i - 1] + 1n);

    const bad = publisher.publish("bad topic!", "x");
    await assert.rejects(bad, (error: unknown) => error instanceof InvalidArgumentError && error.reason === "invalid-argument");
    assert.equal(typeof (await publisher.publish("pub.batch", "after")), "bigint");
    // The same (source, id) again: deduplicated, answered with the original's sequence.
    assert.equal(await publisher.publish("pub.batch", "again", { id: "mine-0" }), sequences[0]);
    assert.equal(publisher.duplicates, 1);
    await publisher.flush();
    await publisher.close();
    await assert.rejects(publisher.publish("pub.batch", "late"), PublisherClosedError);
    const stored = await replay(bus, "pub.batch");
    assert.equal(stored.length, 26);
  } finally {
    bus.close();
    await running.stop();
  }
});

test("a bus crash mid-stream: unanswered batches are resent with the same ids and stored once", async () => {
  const dataDir = mkdtempSync(path.join(tmpdir(), "eventbus-publisher-"));
  const running = await BusProcess.start({ storage: "file", data_dir: dataDir });
  const bus = new Bus(running.address, { source: "node-crash" });
  try {
    const publisher = bus.publisher({
      maxBatch: 20, lingerMs: 1, maxInFlight: 8, retries: Infinity, retryBackoff: { maxMs: 200 },
    });
    const total = 3000;
    const ids: string[] = [];
    const sequences: Array<Promise<Sequence>> = [];
    let answered = 0;
    let crash: Promise<void> | undefined;
    for (let n = 0; n < total; n++) {
      const pending = await publisher.submit({ topic: "pub.crash", data: { n } });
      ids.push(pending.id);
      sequences.push(pending.sequence.then((sequence) => {
        answered += 1;
        return sequence;
      }));
      if (n % 20 === 19) await new Promise((resolve) => setImmediate(resolve));
      // Crash the bus (SIGKILL) once a third is answered, with the producer still going.
      if (!crash && answered >= total / 3) crash = running.restart({ kill: true });
      // A producer that outruns the answers (a loaded machine) waits here for that third, so
      // the crash still comes with a third of the events not yet submitted.
      if (!crash && n === Math.floor((2 * total) / 3)) {
        await waitFor(() => answered >= total / 3, 30_000, "a third of the events answered");
        crash = running.restart({ kill: true });
      }
    }
    assert.ok(crash, "the bus was never crashed");
    await crash;
    const stored = await Promise.all(sequences);
    await publisher.close();
    assert.ok(publisher.reconnects >= 1, "the stream never broke");
    assert.ok(publisher.resentBatches >= 1, "nothing was resent");
    // Whether a batch was stored but not answered when the bus died depends on timing; when
    // one was, its resend was answered as duplicates instead of being stored again.
    console.log(`crash: ${publisher.reconnects} reconnects, ${publisher.resentBatches} batches resent, ${publisher.duplicates} duplicates`);

    const events = await replay(bus, "pub.crash");
    const byId = new Map<string, Event[]>();
    for (const event of events) byId.set(event.id, [...(byId.get(event.id) ?? []), event]);
    const twice = [...byId.entries()].filter(([, copies]) => copies.length > 1).map(([id]) => id);
    assert.deepEqual(twice, [], "events stored more than once");
    assert.equal(events.length, total, "stored events are not exactly the published ones");
    ids.forEach((id, n) => {
      const [event] = byId.get(id) ?? [];
      assert.ok(event, `event ${n} (${id}) missing`);
      assert.equal(event.json<{ n: number }>().n, n);
      assert.equal(event.sequence, stored[n], `event ${n}: answered ${stored[n]}, stored at ${event.sequence}`);
    });
  } finally {
    bus.close();
    await running.stop();
    rmSync(dataDir, { recursive: true, force: true });
  }
});

test("a batch its node could not store is sent again with the same ids, in order, and stored once", { timeout: 240_000 }, async () => {
  // Two bus nodes on one nats-server. NATS freezes while one batch is begun on the publisher's
  // node, then dies; the batches published after that are refused unbegun. Once its append
  // deadline (30 s) has passed, the node answers the begun batch UNAVAILABLE store-failed and
  // ends the stream. The publisher sends that batch again with the same ids instead of failing
  // it, ahead of the later ones that the end of the stream sends again; once NATS is back, every
  // event is stored once, in publish order, at the sequence its promise gave.
  const nats = await NatsServer.start();
  const nodes: BusProcess[] = [];
  let bus: Bus | undefined;
  try {
    for (let i = 0; i < 2; i++) nodes.push(await BusProcess.start({ storage: "jetstream", nats_url: nats.url }));
    const client = new Bus(nodes.map((node) => node.address), { source: "node-unstored" });
    bus = client;
    const publisher = client.publisher({ maxBatch: 5, lingerMs: 50, retries: Infinity, retryBackoff: { maxMs: 500 } });
    const sequences: Array<Promise<Sequence>> = [];
    let failed: unknown;
    const publish = async (from: number, to: number) => {
      for (let n = from; n < to; n++) {
        const pending = await publisher.submit({ topic: "pub.unstored", data: { n }, id: `u-${n}` });
        pending.sequence.catch((error: unknown) => (failed ??= error));
        sequences.push(pending.sequence);
      }
    };

    await publish(0, 20);
    await publisher.flush();
    // The fault window: NATS frozen while one batch reaches the node, which begins it (its
    // append waits), then killed. One begun batch only: the node's NATS client sends its own
    // resends of a begun batch's first event when NATS is back, and those of several batches
    // would land out of order.
    nats.signal("SIGSTOP");
    await publish(20, 25);
    await new Promise((resolve) => setTimeout(resolve, 1000));
    await nats.kill();
    await waitFor(async () => (await client.nodes.health(0)) === "NOT_SERVING", 20_000, "the node to notice it lost NATS");
    await publish(25, 50);
    await waitFor(() => failed !== undefined || publisher.resentBatches > 0, 90_000, "the node to answer the batch it began");
    await nats.restart();
    await publisher.flush();
    assert.equal(failed, undefined, `an event failed: ${String(failed)}`);
    const stored = await Promise.all(sequences);
    await publisher.close();

    const reader = new Bus(nodes[1].address);
    try {
      const events = await replay(reader, "pub.unstored");
      assert.deepEqual(events.map((event) => event.id), Array.from({ length: 50 }, (_, n) => `u-${n}`));
      assert.deepEqual(events.map((event) => event.sequence), stored);
    } finally {
      reader.close();
    }
  } finally {
    bus?.close();
    for (const node of nodes) await node.stop(5000, "SIGKILL");
    await nats.stop();
  }
});
