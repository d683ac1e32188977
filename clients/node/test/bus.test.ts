/** The client against a real bus process: every call, and every way it fails. */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import * as path from "node:path";
import { after, before, describe, test } from "node:test";

import {
  Bus,
  BusError,
  ERROR_ATTRIBUTE,
  ERROR_EVENT_TYPE,
  EventTooLargeError,
  InvalidArgumentError,
  NoRespondersError,
  QueryTimeoutError,
  RemoteError,
  Reply,
  ReplyError,
  SlowConsumerError,
  NodeUnavailableError,
  UnavailableError,
  errorClass,
  parseTarget,
  parseTargets,
  type Subscription,
} from "../src";
import { Event, encodeData, subscribeRequest } from "../src/events";
import { BusProcess, freePort, waitFor } from "../src/testing";
import { status } from "@grpc/grpc-js";

async function take(subscription: Subscription, count: number, timeoutMs = 10_000): Promise<Event[]> {
  const deadline = Date.now() + timeoutMs;
  const events: Event[] = [];
  while (events.length < count) {
    const event = await subscription.next(Math.max(0, deadline - Date.now()));
    assert.ok(event, "subscription ended early");
    events.push(event);
  }
  return events;
}

describe("pure logic", () => {
  test("errors are classified by reason, then code", () => {
    assert.equal(errorClass(status.UNAVAILABLE, "no-responders"), NoRespondersError);
    assert.equal(errorClass(status.UNAVAILABLE), NodeUnavailableError);
    assert.equal(errorClass(status.UNAVAILABLE, "store-failed"), NodeUnavailableError);
    assert.ok(new NodeUnavailableError(status.UNAVAILABLE, "gone").retryable);
    assert.ok(!new UnavailableError(status.UNAVAILABLE, "x").retryable);
    assert.equal(errorClass(status.DEADLINE_EXCEEDED, "query-timeout"), QueryTimeoutError);
    assert.equal(errorClass(status.INVALID_ARGUMENT, "event-too-large"), EventTooLargeError);
    assert.equal(errorClass(status.RESOURCE_EXHAUSTED, "slow-consumer"), SlowConsumerError);
    assert.equal(errorClass(status.INTERNAL, "storage"), BusError);
    const error = new NoRespondersError(status.UNAVAILABLE, "no responders for topic x", "no-responders");
    assert.ok(error instanceof UnavailableError);
    assert.equal(error.codeName, "UNAVAILABLE");
    assert.equal(error.name, "NoRespondersError");
    const slow = new SlowConsumerError(status.RESOURCE_EXHAUSTED, "... after_sequence=41 to go on");
    assert.equal(slow.lastDelivered, 41n);
  });

  test("targets and data", () => {
    assert.deepEqual(parseTarget("http://127.0.0.1:1/"), { address: "127.0.0.1:1", tls: false });
    assert.equal(parseTarget("https://bus:443").tls, true);
    assert.deepEqual(encodeData({ a: [1] }), [Buffer.from('{"a":[1]}'), "application/json"]);
    assert.deepEqual(encodeData("hi"), [Buffer.from("hi"), "text/plain; charset=utf-8"]);
    assert.deepEqual(encodeData(Buffer.from([0])), [Buffer.from([0]), ""]);
  });

  test("several targets: a list, a comma-separated string, EVENTBUS_URL over EVENTBUS_SERVER", () => {
    const addresses = (value?: string | string[]) => parseTargets(value).map((target) => target.address);
    assert.deepEqual(addresses(["http://a:1", "b:2"]), ["a:1", "b:2"]);
    assert.deepEqual(addresses("http://a:1, http://b:2,"), ["a:1", "b:2"]);
    assert.deepEqual(addresses(["a:1,b:2", "c:3"]), ["a:1", "b:2", "c:3"]);
    const saved = { url: process.env.EVENTBUS_URL, server: process.env.EVENTBUS_SERVER };
    try {
      delete process.env.EVENTBUS_URL;
      process.env.EVENTBUS_SERVER = "http://s:9";
      assert.deepEqual(addresses(), ["s:9"]);
      process.env.EVENTBUS_URL = "http://a:1,http://b:2";
      assert.deepEqual(addresses([]), ["a:1", "b:2"]);
      assert.equal(parseTarget().address, "a:1");
    } finally {
      for (const [key, value] of [["EVENTBUS_URL", saved.url], ["EVENTBUS_SERVER", saved.server]] as const) {
        if (value === undefined) delete process.env[key];
        else process.env[key] = value;
      }
    }
  });

  test("start positions", () => {
    assert.deepEqual(subscribeRequest("a", undefined, "s", "earliest").earliest, {});
    assert.equal(subscribeRequest("a", "g", "s", 7).after_sequence, "7");
    assert.equal(subscribeRequest("a", undefined, "s", new Date(1500)).from_time?.nanos, 500_000_000);
    assert.throws(() => subscribeRequest("a", undefined, "s", -1), RangeError);
    assert.throws(() => subscribeRequest("a", undefined, "s", 1.5), RangeError);
  });
});

describe("against a bus", () => {
  let process_: BusProcess;
  let bus: Bus;

  before(async () => {
    process_ = await BusProcess.start();
    bus = new Bus(process_.address, { source: "node-test" });
  });
  after(async () => {
    bus.close();
    await process_.stop();
  });

  test("publish returns increasing sequences", async () => {
    const first = await bus.publish("node.seq", "a");
    const batch = await bus.publishBatch([0, 1, 2].map((n) => ({ topic: "node.seq", data: { n } })));
    assert.deepEqual(batch, [first + 1n, first + 2n, first + 3n]);
    assert.equal(typeof first, "bigint");
  });

  test("subscribe delivers in order with every field", async () => {
    const subscription = await bus.subscribe("node.order.*");
    assert.ok(subscription.confirmation);
    await bus.publish("node.order.created", { n: 0 }, {
      type: "order.created", id: "order-0", attributes: { traceparent: "00-abc-01" },
    });
    await bus.publishBatch([1, 2, 3].map((n) => ({ topic: "node.order.paid", data: { n } })));
    const events = await take(subscription, 4);
    subscription.close();
    assert.deepEqual(events.map((e) => e.json<{ n: number }>().n), [0, 1, 2, 3]);
    const [first] = events;
    assert.equal(first.id, "order-0");
    assert.equal(first.type, "order.created");
    assert.equal(first.source, "node-test");
    assert.deepEqual(first.attributes, { traceparent: "00-abc-01" });
    assert.equal(first.dataContentType, "application/json");
    assert.ok(first.publishTime instanceof Date);
    assert.equal(await subscription.next(), null);
  });

  test("replay from earliest, a sequence and a time", async () => {
    const before = new Date(Date.now() - 1000);
    const sequences = await bus.publishBatch([0, 1, 2].map((n) => ({ topic: "node.replay", data: { n } })));
    const earliest = await bus.subscribe("node.replay", { start: "earliest" });
    assert.deepEqual((await take(earliest, 3)).map((e) => e.sequence), sequences);
    await waitFor(() => earliest.caughtUp !== undefined, 5000, "caught_up");
    earliest.close();
    const after = await bus.subscribe("node.replay", { start: sequences[0] });
    assert.deepEqual((await take(after, 2)).map((e) => e.sequence), sequences.slice(1));
    after.close();
    const fromTime = await bus.subscribe("node.replay", { start: before });
    assert.deepEqual((await take(fromTime, 3)).map((e) => e.sequence), sequences);
    fromTime.close();
  });

  test("next times out", async () => {
    const subscription = await bus.subscribe("node.quiet");
    await assert.rejects(subscription.next(100), { name: "TimeoutError" });
    subscription.close();
  });

  test("an invalid batch names the event and stores nothing", async () => {
    const subscription = await bus.subscribe("node.atomic");
    await assert.rejects(
      bus.publishBatch([{ topic: "node.atomic", data: "ok" }, { topic: "bad topic!", data: "x" }]),
      (error: unknown) => error instanceof InvalidArgumentError
        && error.reason === "invalid-argument" && error.details.includes("events[1].topic"));
    await bus.publish("node.atomic", "after");
    assert.equal((await subscription.next(5000))?.text(), "after");
    subscription.close();
  });

  test("an invalid pattern and a group replay fail at subscribe", async () => {
    await assert.rejects(bus.subscribe("a.>.b"), InvalidArgumentError);
    await assert.rejects(bus.subscribe("node.g", { group: "g", start: "earliest" }), InvalidArgumentError);
  });

  test("query reply follows the protocol", async () => {
    const responder = await bus.serve("node.echo", "echo", (request) => ({ echo: request.json() }));
    const reply = await bus.query("node.echo", { hi: 1 }, { timeoutMs: 5000 });
    assert.deepEqual(reply.json(), { echo: { hi: 1 } });
    assert.equal(reply.type, "node.echo.result");
    assert.equal(reply.source, "node-test");
    assert.ok(reply.correlationId && reply.causationId);
    const mine = await bus.query("node.echo", {}, { timeoutMs: 5000, correlationId: "mine-1" });
    assert.equal(mine.correlationId, "mine-1");
    await waitFor(() => responder.handled === 2, 5000, "handled count");
    await responder.stop();
  });

  test("a traceparent reaches subscribers, the responder and the reply", async () => {
    const parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const subscription = await bus.subscribe("node.traced");
    await bus.publish("node.traced", "x", { traceparent: parent, tracestate: "vendor=1" });
    const [received] = await take(subscription, 1);
    assert.equal(received.traceparent, parent);
    assert.equal(received.tracestate, "vendor=1");
    subscription.close();
    const seen: (string | undefined)[] = [];
    const responder = await bus.serve("node.traced.query", undefined, (request) => {
      seen.push(request.traceparent);
      return "42";
    });
    const reply = await bus.query("node.traced.query", "?", { timeoutMs: 5000, traceparent: parent });
    assert.deepEqual(seen, [parent]);
    assert.equal(reply.traceparent, parent);
    await responder.stop();
  });

  test("handler errors become error replies, which reject the query with RemoteError", async () => {
    const responder = await bus.serve("node.fail", "fail", async (request) => {
      if (request.json<{ boom: boolean }>().boom) throw new Error("kaput");
      throw new ReplyError("not_found", "unknown thing");
    });
    await assert.rejects(bus.query("node.fail", { boom: false }, { timeoutMs: 5000 }), (error: unknown) => {
      assert.ok(error instanceof RemoteError && error instanceof BusError);
      assert.equal(error.errorCode, "not_found");
      assert.equal(error.remoteMessage, "unknown thing");
      assert.equal(error.topic, "node.fail");
      assert.equal(error.codeName, "UNKNOWN");
      assert.deepEqual(error.reply.json(), { error: { code: "not_found", message: "unknown thing" } });
      assert.deepEqual(error.reply.attributes, { error: "not_found" });
      return true;
    });
    await assert.rejects(bus.query("node.fail", { boom: true }, { timeoutMs: 5000 }), (error: unknown) =>
      error instanceof RemoteError && error.errorCode === "internal" && /kaput/.test(error.remoteMessage));
    await responder.stop();
  });

  test("a Rust-style error reply (type eventbus.error) rejects the query with RemoteError", async () => {
    // What the Rust SDK's responders send for a handler error (src/sdk/responder.rs).
    const queries = await bus.subscribe("node.rusty", { group: "rusty" });
    const answering = (async () => {
      const query = await queries.next(5000);
      assert.ok(query);
      await bus.publish(query.replyTo, Buffer.from("no such user"), {
        type: ERROR_EVENT_TYPE, dataContentType: "text/plain", attributes: { [ERROR_ATTRIBUTE]: "no such user" },
        correlationId: query.correlationId, causationId: query.id,
      });
    })();
    await assert.rejects(bus.query("node.rusty", { user_id: 7 }, { timeoutMs: 5000 }), (error: unknown) =>
      error instanceof RemoteError && error.remoteMessage === "no such user" && error.errorCode === undefined
        && error.reply.type === ERROR_EVENT_TYPE && /the responder on node.rusty failed: no such user/.test(error.message));
    await answering;
    queries.close();
  });

  test("a responder ignores events without reply_to and can reply with a Reply", async () => {
    let calls = 0;
    const responder = await bus.serve("node.plain", undefined, () => {
      calls += 1;
      return new Reply({ data: "x", type: "custom", attributes: { a: "b" } });
    });
    await bus.publish("node.plain", "not a query");
    const reply = await bus.query("node.plain", "q", { timeoutMs: 5000 });
    assert.equal(reply.text(), "x");
    assert.equal(reply.type, "custom");
    assert.deepEqual(reply.attributes, { a: "b" });
    assert.equal(calls, 1);
    await responder.stop();
  });

  test("query without responders is UNAVAILABLE at once", async () => {
    const started = Date.now();
    await assert.rejects(bus.query("node.nobody", "?", { timeoutMs: 10_000 }),
      (error: unknown) => error instanceof NoRespondersError && error.code === status.UNAVAILABLE
        && error.details.includes("node.nobody"));
    assert.ok(Date.now() - started < 2000);
  });

  test("query timeout", async () => {
    const silent = await bus.subscribe("node.silent");
    const started = Date.now();
    await assert.rejects(bus.query("node.silent", "?", { timeoutMs: 300 }),
      (error: unknown) => error instanceof QueryTimeoutError
        && error.code === status.DEADLINE_EXCEEDED && error.reason === "query-timeout");
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= 250 && elapsed < 3000, `${elapsed} ms`);
    silent.close();
    await assert.rejects(bus.query("node.silent", "?", { timeoutMs: 0 }), RangeError);
  });
});

describe("with their own bus", () => {
  test("event too large", async () => {
    const small = await BusProcess.start({
      max_event_data_bytes: 1024, max_message_bytes: 1024 * 1024, retention_max_bytes: 1024 * 1024,
    });
    const bus = new Bus(small.address);
    try {
      await assert.rejects(bus.publish("node.big", Buffer.alloc(2048)),
        (error: unknown) => error instanceof EventTooLargeError && error instanceof InvalidArgumentError);
    } finally {
      bus.close();
      await small.stop();
    }
  });

  test("a subscription resumes after the bus drops it as a slow consumer", async () => {
    const tiny = await BusProcess.start({ subscriber_queue_size: 1, max_subscriber_lag: 1 });
    const bus = new Bus(tiny.address);
    try {
      const subscription = await bus.subscribe("node.flood");
      await bus.publishBatch(Array.from({ length: 200 }, (_, n) => ({ topic: "node.flood", data: { n } })));
      const events = await take(subscription, 200);
      assert.deepEqual(events.map((e) => e.json<{ n: number }>().n), Array.from({ length: 200 }, (_, n) => n));
      assert.ok(subscription.resumes >= 1);
      assert.ok(subscription.lastError instanceof SlowConsumerError);
      subscription.close();
    } finally {
      bus.close();
      await tiny.stop();
    }
  });

  test("without resume the slow-consumer error is thrown", async () => {
    const tiny = await BusProcess.start({ subscriber_queue_size: 1, max_subscriber_lag: 1 });
    const bus = new Bus(tiny.address);
    try {
      const subscription = await bus.subscribe("node.flood", { resume: false });
      await bus.publishBatch(Array.from({ length: 200 }, (_, n) => ({ topic: "node.flood", data: { n } })));
      await assert.rejects(take(subscription, 200), SlowConsumerError);
      assert.equal(subscription.resumes, 0);
    } finally {
      bus.close();
      await tiny.stop();
    }
  });

  test("a subscription gives up when the bus stays away", async () => {
    const doomed = await BusProcess.start();
    const bus = new Bus(doomed.address);
    try {
      const subscription = await bus.subscribe("node.gone", { reconnectTimeoutMs: 500 });
      await doomed.stop();
      await assert.rejects(subscription.next(15_000), UnavailableError);
    } finally {
      bus.close();
    }
  });

  test("an unreachable bus", async () => {
    const bus = new Bus(`127.0.0.1:${await freePort()}`);
    try {
      await assert.rejects(bus.publish("a", ""), UnavailableError);
      await assert.rejects(bus.waitReady(300), /not serving/);
      await assert.rejects(bus.subscribe("a"), UnavailableError);
    } finally {
      bus.close();
    }
  });

  test("the example responder answers", async () => {
    const running = await BusProcess.start();
    const bus = new Bus(running.address);
    const example = spawn(process.execPath,
      [path.join(__dirname, "..", "examples", "echo-responder.js"), "node.example", "--bus", running.url],
      { stdio: ["ignore", "pipe", "inherit"] });
    try {
      let output = "";
      example.stdout.on("data", (chunk: Buffer) => (output += chunk.toString()));
      await waitFor(() => output.includes("answering queries on node.example"), 15_000, "example to start");
      const reply = await bus.query("node.example", { name: "Ada" }, { timeoutMs: 5000 });
      assert.deepEqual(reply.json(), { name: "Ada" });
      assert.equal(reply.source, "echo");
    } finally {
      example.kill("SIGTERM");
      bus.close();
      await running.stop();
    }
  });
});
