/** MANUAL-ack groups against a real bus: ack, nack and redelivery, the ack deadline, flow
 * control, and the dead-letter topic. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Bus, Delivery, type Subscription } from "../src";
import { BusProcess } from "../src/testing";

async function take(subscription: Subscription<Delivery>, count: number, timeoutMs = 10_000): Promise<Delivery[]> {
  const deadline = Date.now() + timeoutMs;
  const items: Delivery[] = [];
  while (items.length < count) {
    const item = await subscription.next(Math.max(0, deadline - Date.now()));
    assert.ok(item, "subscription ended early");
    items.push(item);
  }
  return items;
}

describe("MANUAL-ack groups", () => {
  let process_: BusProcess;
  let bus: Bus;

  before(async () => {
    process_ = await BusProcess.start();
    bus = new Bus(process_.address, { source: "node-manual" });
  });
  after(async () => {
    bus.close();
    await process_.stop();
  });

  test("acked deliveries are not delivered again and move the cursor", async () => {
    const sequences = await bus.publishBatch([0, 1, 2].map((n) => ({ topic: "manual.ack", data: { n } })));
    const first = await bus.subscribe("manual.ack", { group: "acker", start: "earliest", manualAck: {} });
    const deliveries = await take(first, 3);
    assert.ok(deliveries.every((d) => d instanceof Delivery && d.attempt === 1 && d.group === "acker"));
    assert.deepEqual(deliveries.map((d) => d.sequence), sequences);
    let cursor = 0n;
    for (const delivery of deliveries) {
      const result = await delivery.ack();
      assert.equal(result.acknowledged, 1);
      assert.ok(result.groupCursor > cursor);
      cursor = result.groupCursor;
    }
    assert.equal(cursor, sequences[2]);
    first.close();

    // A new member of the existing group starts at the cursor, whatever it asks for.
    const later = await bus.publish("manual.ack", { n: 3 });
    const second = await bus.subscribe("manual.ack", { group: "acker", start: "earliest", manualAck: {} });
    assert.equal(second.confirmation?.groupCursor, cursor);
    const [next] = await take(second, 1);
    // Not the acked ones again. (Its attempt may be 2: the closed member can still have been
    // registered when it was published, and a leaving member's deliveries count.)
    assert.equal(next.sequence, later);
    await next.ack();
    second.close();
  });

  test("a nacked delivery comes back as attempt 2", async () => {
    const member = await bus.subscribe("manual.nack", { group: "nacker", manualAck: {} });
    const sequence = await bus.publish("manual.nack", "again");
    const [first] = await take(member, 1);
    assert.equal(first.sequence, sequence);
    assert.equal(first.attempt, 1);
    assert.equal((await first.nack(50)).requeued, 1);
    const [second] = await take(member, 1);
    assert.equal(second.sequence, sequence);
    assert.equal(second.attempt, 2);
    assert.equal(second.event.text(), "again");
    await second.ack();
    await assert.rejects(member.next(300), { name: "TimeoutError" });
    member.close();
  });

  test("an unacked delivery comes back after the ack deadline", async () => {
    const member = await bus.subscribe("manual.deadline", { group: "sleeper", manualAck: { ackDeadlineMs: 300 } });
    await bus.publish("manual.deadline", "x");
    const [first] = await take(member, 1);
    const started = Date.now();
    const [second] = await take(member, 1);
    assert.equal(second.sequence, first.sequence);
    assert.equal(second.attempt, 2);
    assert.ok(Date.now() - started >= 200, "redelivered before the deadline");
    await second.ack();
    member.close();
  });

  test("maxInFlight holds back deliveries until one is acked", async () => {
    const member = await bus.subscribe("manual.flow", { group: "flow", manualAck: { maxInFlight: 2 } });
    await bus.publishBatch([0, 1, 2, 3].map((n) => ({ topic: "manual.flow", data: { n } })));
    const held = await take(member, 2);
    await assert.rejects(member.next(300), { name: "TimeoutError" });
    await held[0].ack();
    const [third] = await take(member, 1);
    assert.equal(third.event.json<{ n: number }>().n, 2);
    member.close();
  });

  test("after maxDeliveries the event goes to the dead-letter topic", async () => {
    const dead = await bus.subscribe("manual.dead.letters");
    const member = await bus.subscribe("manual.work", {
      group: "doomed", manualAck: { maxDeliveries: 2, deadLetterTopic: "manual.dead.letters" },
    });
    const sequence = await bus.publish("manual.work", { poison: true });
    for (const attempt of [1, 2]) {
      const [delivery] = await take(member, 1);
      assert.equal(delivery.attempt, attempt);
      await delivery.nack();
    }
    const letter = await dead.next(10_000);
    assert.ok(letter);
    assert.deepEqual(letter.json(), { poison: true });
    assert.equal(letter.attributes.dlq_original_topic, "manual.work");
    assert.equal(letter.attributes.dlq_original_sequence, String(sequence));
    assert.equal(letter.attributes.dlq_attempts, "2");
    assert.equal(letter.attributes.dlq_group, "doomed");
    await assert.rejects(member.next(300), { name: "TimeoutError" });
    member.close();
    dead.close();
  });

  test("settings are checked before anything is sent", async () => {
    await assert.rejects(bus.subscribe("manual.x", { manualAck: {} } as never), TypeError);
    await assert.rejects(bus.subscribe("manual.x", { group: "g", manualAck: { maxDeliveries: 0 } }), RangeError);
    await assert.rejects(bus.subscribe("manual.x", { group: "g", manualAck: { ackDeadlineMs: 0 } }), RangeError);
    await assert.rejects(bus.ack("no-such-group", [1n]), (error: unknown) =>
      error instanceof Error && "codeName" in error && error.codeName === "NOT_FOUND");
  });
});
