/** Failover between the nodes of a clustered bus, with real processes: one nats-server with
 * JetStream and two bus nodes on it. A client given both nodes has a subscriber, a batching
 * publisher with known ids, a MANUAL-ack group member and a query in flight on the first node
 * when it is killed (SIGKILL) mid-stream; then, from the surviving node's log: the subscriber
 * delivered exactly the stream's events (no gap, no duplicate), every publish was acknowledged
 * and is stored exactly once at the sequence it was given, the MANUAL member got every event at
 * least once, the query in flight failed with a retryable error, and a query after the fault is
 * answered. The Python client's tests/test_failover.py is the same test. */
import assert from "node:assert/strict";
import { test } from "node:test";

import { Bus, NodeUnavailableError, type Event, type Failover } from "../src";
import { BusProcess, NatsServer, freePort, waitFor } from "../src/testing";

const TOTAL = 400;
const KILL_AFTER = 150;

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** The log's events on `pattern` up to sequence `through`, read from one node. */
async function replay(address: string, pattern: string, through: bigint): Promise<Event[]> {
  const bus = new Bus(address, { source: "replay" });
  const subscription = await bus.subscribe(pattern, { start: "earliest" });
  const events: Event[] = [];
  try {
    while (events.length === 0 || events[events.length - 1].sequence < through) {
      const event = await subscription.next(10_000);
      assert.ok(event, "replay ended early");
      events.push(event);
    }
  } finally {
    subscription.close();
    bus.close();
  }
  return events;
}

test("clients fail over to the surviving node of a cluster", { timeout: 60_000 }, async () => {
  const nats = await NatsServer.start();
  const nodes: BusProcess[] = [];
  const moves: Failover[] = [];
  let bus: Bus | undefined;
  let answering: Bus | undefined;
  let release = () => {};
  try {
    for (let i = 0; i < 2; i++) nodes.push(await BusProcess.start({ storage: "jetstream", nats_url: nats.url }));
    const [first, second] = nodes;
    bus = new Bus([first.url, second.url], { source: "failover", onFailover: (move) => moves.push(move) });
    const client = bus;
    await client.waitReady();
    assert.equal(client.address, first.address);
    assert.deepEqual(client.endpoints, [first.address, second.address]);

    // A responder on the second node only, holding one query until released.
    answering = new Bus(second.address, { source: "responder" });
    let held = false;
    const released = new Promise<void>((resolve) => (release = resolve));
    const responder = await answering.serve("failover.echo", undefined, async (query) => {
      const body = query.json<{ hold?: boolean }>();
      if (body.hold) {
        held = true;
        await released;
      }
      return { echo: body };
    });

    const subscription = await client.subscribe("load.>", { start: "earliest" });
    const member = await client.subscribe("load.>", { group: "failover-workers", start: "earliest", manualAck: { ackDeadlineMs: 2000 } });
    const delivered: bigint[] = [];
    const worked = new Set<bigint>();
    let stop = false;
    const reading = (async () => {
      while (!stop) {
        const event = await subscription.next(200).catch((error: Error) => {
          if (error.name === "TimeoutError") return undefined;
          throw error;
        });
        if (event === null) return;
        if (event) delivered.push(event.sequence);
      }
    })();
    const working = (async () => {
      while (!stop) {
        const delivery = await member.next(200).catch((error: Error) => {
          if (error.name === "TimeoutError") return undefined;
          throw error;
        });
        if (delivery === null) return;
        if (!delivery) continue;
        worked.add(delivery.sequence);
        // Acking a delivery of the dead node fails: the group delivers it again.
        await delivery.ack().catch((error) => assert.ok(error instanceof NodeUnavailableError, String(error)));
      }
    })();

    // A query in flight on the first node when it dies.
    const asked = client.query("failover.echo", { hold: true }, { timeoutMs: 20_000 }).then(
      (reply) => reply, (error: unknown) => error);
    await waitFor(() => held, 10_000, "the held query to reach the responder");

    const publisher = client.publisher({ lingerMs: 2, maxInFlight: 4, retries: Infinity });
    const sequences = new Map<string, Promise<bigint>>();
    for (let n = 0; n < TOTAL; n++) {
      const id = `load-${n}`;
      const pending = await publisher.submit({ topic: `load.${n % 4}`, data: { n }, id });
      sequences.set(id, pending.sequence);
      if (n === KILL_AFTER) {
        await sequences.get("load-100");
        await first.stop(5000, "SIGKILL"); // mid-stream
      }
      await sleep(2); // a steady load, not one burst
    }
    await publisher.flush();
    const acknowledged = new Map<string, bigint>();
    for (const [id, sequence] of sequences) acknowledged.set(id, await sequence);
    await publisher.close();

    const outcome = await asked;
    release();
    assert.ok(outcome instanceof NodeUnavailableError, String(outcome));
    assert.ok(outcome.retryable);

    // Every acknowledged publish is in the log exactly once, at the sequence it was given.
    const through = [...acknowledged.values()].reduce((a, b) => (a > b ? a : b));
    const log = await replay(second.address, "load.>", through);
    assert.deepEqual(log.map((event) => event.id).sort(), [...acknowledged.keys()].sort(), "each acknowledged event stored once");
    assert.deepEqual(new Map(log.map((event) => [event.id, event.sequence])), acknowledged);
    const logSequences = log.map((event) => event.sequence);

    // The subscriber: exactly the log, in order, no gap and no duplicate.
    await waitFor(() => delivered.length >= logSequences.length, 20_000, "the subscriber to catch up");
    assert.deepEqual(delivered.slice(0, logSequences.length), logSequences);
    assert.equal(subscription.failovers, 1);
    assert.equal(subscription.endpoint, second.address);

    // The MANUAL member: every event at least once.
    await waitFor(() => logSequences.every((sequence) => worked.has(sequence)), 40_000, "the group to get every event");
    assert.equal(member.failovers, 1);

    // A query after the fault is answered, on the node the client moved to.
    const reply = await client.query("failover.echo", { after: 1 }, { timeoutMs: 5000, retry: true });
    assert.deepEqual(reply.json(), { echo: { after: 1 } });
    assert.equal(client.address, second.address);

    stop = true;
    subscription.close();
    member.close();
    await Promise.all([reading, working]);
    await responder.stop();

    const kinds = new Set(moves.map((move) => move.what));
    assert.ok(kinds.has("subscription") && kinds.has("publisher"), JSON.stringify([...kinds]));
    assert.ok(moves.every((move) => move.toEndpoint === second.address));
    const resumed = moves.filter((move) => move.what === "subscription" && move.afterSequence !== undefined);
    assert.ok(resumed.length > 0 && resumed.every((move) => (move.afterSequence as bigint) <= through));
  } finally {
    release();
    bus?.close();
    answering?.close();
    for (const node of nodes) await node.stop(5000, "SIGKILL");
    await nats.stop();
  }
});

test("failover passes over a node that is not serving", { timeout: 60_000 }, async () => {
  const nats = await NatsServer.start();
  const doomed = await NatsServer.start();
  const nodes: BusProcess[] = [];
  try {
    const serving = await BusProcess.start({ storage: "jetstream", nats_url: nats.url });
    nodes.push(serving);
    const lost = await BusProcess.start({ storage: "jetstream", nats_url: doomed.url });
    nodes.push(lost);
    await doomed.stop(); // the second node loses NATS
    const probe = new Bus(lost.address);
    try {
      await waitFor(async () => (await probe.nodes.health(0)) === "NOT_SERVING", 20_000,
        "the node without NATS to say NOT_SERVING");
    } finally {
      probe.close();
    }
    const gone = `127.0.0.1:${await freePort()}`; // nobody listens: the node in use is gone
    const moves: Failover[] = [];
    const bus = new Bus([gone, lost.address, serving.address], { onFailover: (move) => moves.push(move) });
    try {
      await assert.rejects(bus.publish("skip.a", "x"), NodeUnavailableError);
      assert.equal(bus.address, serving.address);
      assert.ok((await bus.publish("skip.a", "x")) > 0n);
    } finally {
      bus.close();
    }
    assert.deepEqual(moves.map((move) => [move.fromEndpoint, move.toEndpoint]), [[gone, serving.address]]);
  } finally {
    for (const node of nodes) await node.stop(5000, "SIGKILL");
    await nats.stop();
    await doomed.stop();
  }
});
