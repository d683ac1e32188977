/** Batched delivery (`max_batch_events`, `event_batch`): a stand-in bus that sends batches the
 * way the contract allows, through the client's real serialisers; then a real bus, with a burst
 * of events, a MANUAL-ack group, and settings out of range. */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import * as grpc from "@grpc/grpc-js";

import { Bus, Delivery, type Event, type Subscription } from "../src";
import type { SubscribeRequest__Output } from "../src/generated/eventbus/v1/SubscribeRequest";
import type { SubscribeResponse, SubscribeResponse__Output } from "../src/generated/eventbus/v1/SubscribeResponse";
import { packageDefinition } from "../src/proto";
import { BusProcess } from "../src/testing";

async function take<T extends Event | Delivery>(subscription: Subscription<T>, count: number,
  timeoutMs = 15_000): Promise<T[]> {
  const deadline = Date.now() + timeoutMs;
  const items: T[] = [];
  while (items.length < count) {
    const item = await subscription.next(Math.max(0, deadline - Date.now()));
    assert.ok(item, "subscription ended early");
    items.push(item);
  }
  return items;
}

const wireEvent = (sequence: number) => ({ topic: "b.x", id: `e${sequence}`, sequence: String(sequence), data: Buffer.from(`${sequence}`) });

/** A Subscribe-only bus in this process: each call runs the next of `streams`, which writes
 * responses and may end the stream; the requests it got are kept. */
class StandIn {
  readonly requests: SubscribeRequest__Output[] = [];
  private readonly server = new grpc.Server();
  port = 0;

  constructor(private readonly streams: Array<(call: grpc.ServerWritableStream<SubscribeRequest__Output, SubscribeResponse>) => void>) {}

  async start(): Promise<string> {
    const service = packageDefinition()["eventbus.v1.EventBusService"] as grpc.ServiceDefinition;
    this.server.addService(service, {
      Subscribe: (call: grpc.ServerWritableStream<SubscribeRequest__Output, SubscribeResponse>) => {
        this.requests.push(call.request);
        const stream = this.streams[this.requests.length - 1];
        if (stream) stream(call);
        else call.emit("error", { code: grpc.status.UNIMPLEMENTED, details: "no more streams scripted" });
      },
    });
    this.port = await new Promise<number>((resolve, reject) =>
      this.server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(),
        (error, port) => (error ? reject(error) : resolve(port))));
    return `127.0.0.1:${this.port}`;
  }

  stop(): void {
    this.server.forceShutdown();
  }
}

describe("batched delivery against a stand-in bus", () => {
  test("a batch is yielded event by event, a resume asks for batches again and drops what was delivered", async () => {
    const standIn = new StandIn([
      (call) => {
        call.write({ subscribed: { log_id: "log-1", head_sequence: "0" } });
        call.write({ event: wireEvent(1) });
        call.write({ event_batch: { events: [2, 3, 4].map(wireEvent) } });
        call.emit("error", { code: grpc.status.UNAVAILABLE, details: "the node went away" });
      },
      (call) => {
        call.write({ subscribed: { log_id: "log-1", head_sequence: "4" } });
        // Overlapping what was delivered before the break: those are dropped.
        call.write({ event_batch: { events: [3, 4, 5, 6].map(wireEvent) } });
        call.write({ event: wireEvent(7) }); // a single event still works (one event ready, an older bus)
      },
    ]);
    const bus = new Bus(await standIn.start(), { source: "node-batch" });
    try {
      const subscription = await bus.subscribe("b.>", { start: "earliest", backoff: { initialMs: 1, maxMs: 10 } });
      const events = await take(subscription, 7, 5000);
      assert.deepEqual(events.map((e) => e.sequence), [1n, 2n, 3n, 4n, 5n, 6n, 7n]);
      assert.deepEqual(events.map((e) => e.text()), ["1", "2", "3", "4", "5", "6", "7"]);
      await assert.rejects(subscription.next(200), { name: "TimeoutError" });
      assert.equal(subscription.resumes, 1);
      assert.equal(standIn.requests.length, 2);
      assert.deepEqual(standIn.requests.map((r) => r.max_batch_events), [256, 256], "the default, on the resume too");
      assert.equal(standIn.requests[1].after_sequence, "4");
      assert.equal(standIn.requests[1].log_id, "log-1");
      subscription.close();
    } finally {
      bus.close();
      standIn.stop();
    }
  });

  test("MANUAL-ack deliveries of a batch carry their own attempts", async () => {
    const standIn = new StandIn([
      (call) => {
        call.write({ subscribed: { log_id: "log-1", group: "g" } });
        call.write({ event_batch: { events: [1, 2, 3].map(wireEvent), delivery_attempts: [1, 3, 2] } });
        call.write({ event: wireEvent(2), delivery_attempt: 4 });
      },
    ]);
    const bus = new Bus(await standIn.start(), { source: "node-batch" });
    try {
      const member = await bus.subscribe("b.>", { group: "g", manualAck: {}, maxBatchEvents: 10 });
      const deliveries = await take(member, 4, 5000);
      assert.ok(deliveries.every((d) => d instanceof Delivery && d.group === "g"));
      assert.deepEqual(deliveries.map((d) => [d.sequence, d.attempt]), [[1n, 1], [2n, 3], [3n, 2], [2n, 4]]);
      assert.equal(standIn.requests[0].max_batch_events, 10);
      assert.equal(standIn.requests[0].ack_mode, "ACK_MODE_MANUAL");
      member.close();
    } finally {
      bus.close();
      standIn.stop();
    }
  });
});

/** Records what the subscriptions of `bus` send and receive on its node in use. */
function watchSubscribe(bus: Bus): { requests: SubscribeRequest__Output[]; batches: number[]; singles: number } {
  const seen = { requests: [] as SubscribeRequest__Output[], batches: [] as number[], singles: 0 };
  const client = bus.rpc as unknown as { Subscribe: (request: SubscribeRequest__Output) => grpc.ClientReadableStream<SubscribeResponse__Output> };
  const subscribe = client.Subscribe.bind(client);
  client.Subscribe = (request) => {
    seen.requests.push(request);
    const call = subscribe(request);
    call.on("data", (message: SubscribeResponse__Output) => {
      if (message.message === "event_batch") seen.batches.push(message.event_batch?.events.length ?? 0);
      if (message.message === "event") seen.singles += 1;
    });
    return call;
  };
  return seen;
}

describe("batched delivery against a real bus", () => {
  let process_: BusProcess;
  let bus: Bus;

  before(async () => {
    process_ = await BusProcess.start();
    bus = new Bus(process_.address, { source: "node-batch" });
  });
  after(async () => {
    bus.close();
    await process_.stop();
  });

  test("a burst of 5,000 events: each arrives once, in sequence order, live and replayed", async () => {
    const count = 5000;
    const seen = watchSubscribe(bus);
    const live = await bus.subscribe("burst.>");
    const reading = take(live, count, 60_000);
    const publisher = bus.publisher({ maxBatch: 500 });
    const published = await Promise.all(Array.from({ length: count }, (_, i) => publisher.publish(`burst.${i % 4}`, { i })));
    await publisher.close();
    const expected = [...published].sort((a, b) => (a < b ? -1 : 1));

    const events = await reading;
    assert.deepEqual(events.map((e) => e.sequence), expected);
    await assert.rejects(live.next(300), { name: "TimeoutError" });
    live.close();

    const replay = await bus.subscribe("burst.>", { start: "earliest", maxBatchEvents: 1024 });
    const replayed = await take(replay, count, 60_000);
    assert.deepEqual(replayed.map((e) => e.sequence), expected);
    assert.deepEqual(replayed.map((e) => e.json<{ i: number }>().i).sort((a, b) => a - b), Array.from({ length: count }, (_, i) => i));
    await assert.rejects(replay.next(300), { name: "TimeoutError" });
    replay.close();

    assert.deepEqual(seen.requests.map((r) => r.max_batch_events), [256, 1024]);
    assert.ok(seen.batches.length > 0, "the bus sent event_batch responses");
    assert.ok(seen.batches.every((size) => size >= 2 && size <= 1024));
    assert.equal(seen.batches.reduce((a, b) => a + b, 0) + seen.singles, 2 * count);
  });

  test("a MANUAL-ack member with batching: attempts per event, a nacked one comes back as attempt 2", async () => {
    const seen = watchSubscribe(bus);
    const sequences = await bus.publishBatch(Array.from({ length: 50 }, (_, n) => ({ topic: "batch.work", data: { n } })));
    const member = await bus.subscribe("batch.work", { group: "batcher", start: "earliest", manualAck: {}, maxBatchEvents: 16 });
    const first = await take(member, 50);
    assert.deepEqual(first.map((d) => d.sequence), sequences);
    assert.ok(first.every((d) => d.attempt === 1 && d.group === "batcher"));
    const nacked = first[7];
    for (const delivery of first) {
      if (delivery === nacked) assert.equal((await delivery.nack(50)).requeued, 1);
      else await delivery.ack();
    }
    const [again] = await take(member, 1);
    assert.equal(again.sequence, nacked.sequence);
    assert.equal(again.attempt, 2);
    assert.deepEqual(again.event.json(), { n: 7 });
    assert.equal((await again.ack()).groupCursor, sequences[49]);
    await assert.rejects(member.next(300), { name: "TimeoutError" });
    member.close();
    assert.equal(seen.requests[0].max_batch_events, 16);
    assert.ok(seen.batches.length > 0, "the bus sent event_batch responses");
    assert.ok(seen.batches.every((size) => size <= 16));
  });

  test("maxBatchEvents out of range is refused before anything is sent; the bus has the same bound", async () => {
    for (const bad of [-1, 1.5, 1025, Number.NaN]) {
      await assert.rejects(bus.subscribe("batch.bad", { maxBatchEvents: bad }),
        (error: unknown) => error instanceof RangeError && /^maxBatchEvents: .* from 0 to 1024$/.test(error.message));
    }
    for (const good of [0, 1, 1024]) (await bus.subscribe("batch.good", { maxBatchEvents: good })).close();

    // The bus's own check, for a client that sends more anyway.
    const refusal = await new Promise<grpc.ServiceError>((resolve) => {
      const call = bus.rpc.Subscribe({ topic: "batch.bad", subscriber: "raw", latest: {}, max_batch_events: 1025 });
      call.on("data", () => undefined);
      call.on("error", resolve);
    });
    assert.equal(refusal.code, grpc.status.INVALID_ARGUMENT);
    assert.match(refusal.details, /max_batch_events/);
  });
});
