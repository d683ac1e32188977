/** The shared scenarios (`scenarios/*.json`, format in scenarios/README.md) run with the
 * TypeScript client: one test per file, each against its own bus process, or for a scenario with
 * `cluster` its own bus nodes over one JetStream stream on a nats-server of its own. */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import * as path from "node:path";
import { test } from "node:test";

import {
  Bus,
  BusError,
  Delivery,
  NoRespondersError,
  NodeUnavailableError,
  QueryTimeoutError,
  uuidv7,
  type Event,
  type EventInit,
  type Json,
  type Publisher,
  type Responder,
  type Sequence,
  type Subscription,
} from "../src";
import {
  BusProcess,
  NatsServer,
  REPO_ROOT,
  busBinary,
  makeTestCertificates,
  waitFor,
  type TestCertificates,
} from "../src/testing";

const SCENARIOS = path.join(REPO_ROOT, "scenarios");
const FILES = readdirSync(SCENARIOS).filter((name) => name.endsWith(".json")).sort();

/** The TypeScript idiom of each error reason a scenario may expect. */
const ERRORS: Record<string, new (...args: never[]) => BusError> = {
  "no-responders": NoRespondersError,
  "query-timeout": QueryTimeoutError,
};
const QUERY_EXPECT = new Set(["reply", "reply_type", "error", "status", "within_ms", "after_ms"]);
const RECEIVE_EXPECT = new Set(["n_range", "n_set", "attempts", "redelivered_after_ms", "attributes", "in_order",
  "each_at_least", "resumed"]);
const PUBLISH_EXPECT = new Set(["same_sequences"]);
const SCENARIO_KEYS = new Set(["name", "description", "bus", "cluster", "steps"]);
/** Every op and the fields its steps may have. */
const STEP_KEYS: Record<string, Set<string>> = {
  subscribe: new Set(["op", "id", "pattern", "group", "ack", "ack_deadline_ms", "max_deliveries", "dead_letter_topic",
    "settle", "nack_delay_ms"]),
  publish: new Set(["op", "topic", "count", "first", "batch", "repeat", "via", "rate", "background", "expect"]),
  publish_wait: new Set(["op", "id", "within_ms"]),
  kill_node: new Set(["op", "node"]),
  restart_node: new Set(["op", "node"]),
  quiet: new Set(["op", "from", "for_ms"]),
  serve: new Set(["op", "topic", "group"]),
  query: new Set(["op", "topic", "data", "timeout_ms", "retry_within_ms", "expect"]),
  receive: new Set(["op", "from", "count", "within_ms", "expect"]),
};
/** The `subscribe` fields that only a MANUAL-ack member (`ack: "manual"`) may have. */
const MANUAL_KEYS = ["ack_deadline_ms", "max_deliveries", "dead_letter_topic", "settle", "nack_delay_ms"];
/** How long a step asks again after errors the client calls retryable (its node went away). */
const RETRY_WITHIN_MS = 30_000;
/** How long a restarted node may take to answer health SERVING. */
const RESTART_WITHIN_MS = 30_000;

const delay = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** `call()`, asked again while it rejects with NodeUnavailableError (or `also`), for up to
 * `withinMs`. */
async function retrying<T>(call: () => Promise<T>, withinMs: number, also: (new (...args: never[]) => Error)[] = []): Promise<T> {
  const deadline = performance.now() + withinMs;
  for (;;) {
    try {
      return await call();
    } catch (error) {
      const retryable = error instanceof NodeUnavailableError || also.some((kind) => error instanceof kind);
      if (!retryable || performance.now() >= deadline) throw error;
      await delay(50);
    }
  }
}

type Step = Record<string, any>;

/** One event a subscription collected: for a MANUAL-ack member with its delivery `attempt`, and
 * when it arrived (`performance.now()`, milliseconds). */
interface Received {
  event: Event;
  attempt?: number;
  at: number;
}

/** What a MANUAL-ack member does with a delivery (a step's `settle`); the promise of the ack or
 * nack, or nothing when it leaves the delivery alone. */
type Settle = (delivery: Delivery) => Promise<unknown> | undefined;

function settler(step: Step): Settle {
  const delayMs: number = step.nack_delay_ms ?? 0;
  switch (step.settle ?? "ack") {
    case "ack":
      return (delivery) => delivery.ack();
    case "nack":
      return (delivery) => delivery.nack(delayMs);
    case "nack_first":
      return (delivery) => (delivery.attempt === 1 ? delivery.nack(delayMs) : delivery.ack());
    case "ignore_first":
      return (delivery) => (delivery.attempt === 1 ? undefined : delivery.ack());
    default:
      throw new Error(`unknown settle ${step.settle}`);
  }
}

/** A subscription and the events its background reader collected. A MANUAL-ack member's
 * deliveries are settled as they come, each ack or nack answered before the next delivery is
 * read: calls made together may reach the bus in any order, and the order of the nacks is the
 * order of the redeliveries and dead letters. A failed ack or nack fails the subscription. */
class Collector {
  readonly received: Received[] = [];
  error: unknown;
  constructor(readonly subscription: Subscription<Event> | Subscription<Delivery>, settle?: Settle) {
    void (async () => {
      try {
        for await (const item of subscription as AsyncIterable<Event | Delivery>) {
          const at = performance.now();
          if (item instanceof Delivery) {
            this.received.push({ event: item.event, attempt: item.attempt, at });
            try {
              await settle?.(item);
            } catch (error) {
              this.error ??= error;
            }
          } else {
            this.received.push({ event: item, at });
          }
        }
      } catch (error) {
        this.error = error;
      }
    })();
  }
}

/** A publish running in the background (`background`), until `publish_wait` takes it. */
interface Background {
  settled: boolean;
  error?: unknown;
}

const n = (received: Received) => received.event.json<{ n: number }>().n;

class Runner {
  readonly collectors = new Map<string, Collector>();
  readonly responders: Responder[] = [];
  readonly publishers: Publisher[] = [];
  readonly backgrounds = new Map<string, Background>();

  constructor(readonly bus: Bus, readonly nodes: BusProcess[]) {}

  async close(): Promise<void> {
    for (const collector of this.collectors.values()) collector.subscription.close();
    for (const responder of this.responders) await responder.stop();
    // A publisher left by a failed step ends with the client; its answers are not awaited.
    for (const publisher of this.publishers) void publisher.close();
  }

  async run(step: Step): Promise<void> {
    const keys = STEP_KEYS[step.op];
    if (!keys) throw new Error(`unknown op ${step.op}`);
    for (const key of Object.keys(step)) assert.ok(keys.has(key), `unknown ${step.op} key ${key}`);
    switch (step.op) {
      case "subscribe":
        return this.subscribe(step);
      case "publish": {
        const done = this.publish(step);
        if (step.background === undefined) return done;
        assert.ok(!this.backgrounds.has(step.background), `background publish ${step.background} twice`);
        const background: Background = { settled: false };
        this.backgrounds.set(step.background, background);
        done.then(() => (background.settled = true), (error: unknown) => {
          background.settled = true;
          background.error = error;
        });
        return;
      }
      case "publish_wait": {
        const background = this.backgrounds.get(step.id);
        assert.ok(background, `no background publish ${step.id}`);
        await waitFor(() => {
          if (background.error) throw background.error;
          return background.settled;
        }, step.within_ms, `background publish ${step.id}`);
        this.backgrounds.delete(step.id);
        return;
      }
      case "kill_node":
        await this.nodes[step.node].stop(15_000, "SIGKILL");
        return;
      case "restart_node": {
        // Same port, flags and data directory: BusProcess keeps them across a stop.
        const node = this.nodes[step.node];
        await node.stop(15_000, "SIGKILL");
        await node.start(RESTART_WITHIN_MS);
        return;
      }
      case "quiet":
        return this.quiet(step);
      case "serve":
        this.responders.push(await this.bus.serve(step.topic, step.group, (query) => ({ echo: query.json() })));
        return;
      case "query":
        return this.query(step);
      case "receive":
        return this.receive(step);
    }
  }

  /** Fails when a background publish was never waited for: its outcome would go unchecked. */
  finish(): void {
    assert.deepEqual([...this.backgrounds.keys()], [], "background publishes without publish_wait");
  }

  private async subscribe(step: Step): Promise<void> {
    if (step.ack === undefined) {
      for (const key of MANUAL_KEYS) assert.ok(!(key in step), `subscribe key ${key} needs ack: "manual"`);
      this.collectors.set(step.id, new Collector(await this.bus.subscribe(step.pattern, { group: step.group })));
      return;
    }
    assert.equal(step.ack, "manual", `unknown ack ${step.ack}`);
    const settle = settler(step);
    const subscription = await this.bus.subscribe(step.pattern, {
      group: step.group,
      manualAck: { ackDeadlineMs: step.ack_deadline_ms, maxDeliveries: step.max_deliveries, deadLetterTopic: step.dead_letter_topic },
    });
    this.collectors.set(step.id, new Collector(subscription, settle));
  }

  /** Events `{"n": first + i}`: by calls (with ids of the runner's, so a repeat or a retry is
   * the same event), or through the batching publisher (ids of its own). */
  private async publish(step: Step): Promise<void> {
    const expect = step.expect ?? {};
    for (const key of Object.keys(expect)) assert.ok(PUBLISH_EXPECT.has(key), `unknown expect key ${key}`);
    const data = (i: number) => ({ n: step.first + i });
    const via = step.via ?? "call";
    if (via === "publisher") {
      for (const key of ["batch", "repeat", "expect"]) assert.ok(!(key in step), `publish key ${key} is for via: "call"`);
      const events: EventInit[] = Array.from({ length: step.count }, (_, i) => ({ topic: step.topic, data: data(i) }));
      return this.publishThrough(events, step.rate);
    }
    assert.equal(via, "call", `unknown via ${via}`);
    assert.ok(!("rate" in step), "publish key rate is for via: \"publisher\"");
    const events: EventInit[] = Array.from({ length: step.count }, (_, i) => ({ id: uuidv7(), topic: step.topic, data: data(i) }));
    const repeat: number = step.repeat ?? 1;
    for (const batch of step.batch ? [events] : events.map((event) => [event])) {
      let first: Sequence[] | undefined;
      for (let i = 0; i < repeat; i++) {
        // Asked again while the client moves to another node: the same ids, so stored once.
        const sequences = await retrying(() => this.bus.publishBatch(batch), RETRY_WITHIN_MS);
        first ??= sequences;
        if (expect.same_sequences) assert.deepEqual(sequences, first, `repeat ${i + 1} answered with other sequences`);
      }
    }
  }

  /** Through one batching publisher, at most `rate` events a second when set; resolves once
   * every event is acknowledged, rejects with the first failed acknowledgement. */
  private async publishThrough(events: EventInit[], rate?: number): Promise<void> {
    const publisher = this.bus.publisher();
    this.publishers.push(publisher);
    const started = performance.now();
    const sequences: Promise<Sequence>[] = [];
    for (const [i, event] of events.entries()) {
      if (rate) {
        const due = started + (i * 1000) / rate;
        const wait = due - performance.now();
        if (wait > 0) await delay(wait);
      }
      const { sequence } = await publisher.submit(event);
      // Checked together below; until then a failure must not count as unhandled.
      sequence.catch(() => undefined);
      sequences.push(sequence);
    }
    await Promise.all(sequences);
    await publisher.close();
    this.publishers.splice(this.publishers.indexOf(publisher), 1);
  }

  private async query(step: Step): Promise<void> {
    const expect = step.expect;
    for (const key of Object.keys(expect)) assert.ok(QUERY_EXPECT.has(key), `unknown expect key ${key}`);
    const started = performance.now();
    let reply: Event | undefined;
    let error: unknown;
    const ask = () => this.bus.query(step.topic, step.data as Json, { timeoutMs: step.timeout_ms });
    try {
      reply = "retry_within_ms" in step ? await retrying(ask, step.retry_within_ms, [NoRespondersError]) : await ask();
    } catch (caught) {
      error = caught;
    }
    const elapsed = performance.now() - started;
    if ("error" in expect) {
      assert.ok(error, `expected ${expect.error}, got a reply`);
      assert.ok(error instanceof ERRORS[expect.error], String(error));
      assert.ok(error instanceof BusError);
      assert.equal(error.reason, expect.error);
      assert.equal(error.codeName, expect.status);
    } else {
      assert.equal(error, undefined, `query failed: ${String(error)}`);
      assert.ok(reply);
      if ("reply" in expect) assert.deepEqual(reply.json(), expect.reply);
      if ("reply_type" in expect) assert.equal(reply.type, expect.reply_type);
    }
    if ("within_ms" in expect) assert.ok(elapsed < expect.within_ms, `took ${elapsed} ms`);
    if ("after_ms" in expect) assert.ok(elapsed >= expect.after_ms, `took only ${elapsed} ms`);
  }

  private collectorsOf(ids: string[]): Collector[] {
    return ids.map((id) => {
      const collector = this.collectors.get(id);
      assert.ok(collector, `no subscription ${id}`);
      return collector;
    });
  }

  private async receive(step: Step): Promise<void> {
    const expect = step.expect;
    for (const key of Object.keys(expect)) assert.ok(RECEIVE_EXPECT.has(key), `unknown expect key ${key}`);
    const collectors = this.collectorsOf(step.from);
    await waitFor(() => {
      for (const collector of collectors) if (collector.error) throw collector.error;
      return collectors.reduce((sum, c) => sum + c.received.length, 0) >= step.count;
    }, step.within_ms, `${step.count} events on ${step.from}`);
    const batches = collectors.map((c) => c.received.slice(0, step.count));
    const all = batches.flat();
    const range = ([low, high]: [number, number]) => Array.from({ length: high - low }, (_, i) => low + i);
    if ("n_range" in expect) {
      assert.deepEqual(all.map(n).sort((a, b) => a - b), range(expect.n_range));
    }
    if ("n_set" in expect) {
      assert.deepEqual([...new Set(all.map(n))].sort((a, b) => a - b), range(expect.n_set));
    }
    // Each n's deliveries, in the order they arrived.
    const byN = new Map<number, Received[]>();
    for (const received of [...all].sort((a, b) => a.at - b.at)) {
      byN.set(n(received), [...(byN.get(n(received)) ?? []), received]);
    }
    if ("attempts" in expect) {
      for (const [value, deliveries] of byN) {
        assert.ok(deliveries.every((d) => d.attempt !== undefined), "attempts need MANUAL-ack subscriptions");
        const attempts = deliveries.map((d) => d.attempt as number).sort((a, b) => a - b);
        assert.deepEqual(attempts, expect.attempts, `attempts of n = ${value}`);
      }
    }
    if ("redelivered_after_ms" in expect) {
      for (const [value, deliveries] of byN) {
        for (let i = 1; i < deliveries.length; i++) {
          const gap = deliveries[i].at - deliveries[i - 1].at;
          assert.ok(gap >= expect.redelivered_after_ms, `n = ${value}: delivery ${i + 1} came ${gap.toFixed(1)} ms ` +
            `after the one before, under ${expect.redelivered_after_ms} ms (attempt@ms: ${deliveries.map((d) =>
              `${d.attempt}@${d.at.toFixed(1)}`).join(" ")})`);
        }
      }
    }
    if ("attributes" in expect) {
      for (const received of all) {
        for (const [key, value] of Object.entries(expect.attributes as Record<string, string>)) {
          assert.equal(received.event.attributes[key], value, `attribute ${key} of n = ${n(received)}`);
        }
      }
    }
    if (expect.in_order) {
      batches.forEach((batch, b) => {
        const order = () => batch.map((r) => `${n(r)}@${r.event.sequence}`).join(" ");
        for (let i = 1; i < batch.length; i++) {
          assert.ok(n(batch[i]) > n(batch[i - 1]), `n out of order in ${step.from[b]} (n@sequence): ${order()}`);
          assert.ok(batch[i].event.sequence > batch[i - 1].event.sequence,
            `sequence out of order in ${step.from[b]} (n@sequence): ${order()}`);
        }
      });
    }
    if ("each_at_least" in expect) {
      assert.ok(batches.every((b) => b.length >= expect.each_at_least), `${batches.map((b) => b.length)}`);
    }
    if (expect.resumed) {
      assert.ok(collectors.every((c) => c.subscription.resumes >= 1), "no stream dropped");
    }
  }

  /** Watches the subscriptions in `from` for `for_ms` (the one fixed wait: it proves an
   * absence), failing at the first event that arrives. */
  private async quiet(step: Step): Promise<void> {
    const collectors = this.collectorsOf(step.from);
    const before = collectors.map((c) => c.received.length);
    const started = performance.now();
    for (;;) {
      collectors.forEach((collector, i) => {
        if (collector.error) throw collector.error;
        const late = collector.received.slice(before[i]);
        assert.equal(late.length, 0, `${step.from[i]} collected ${late.map((r) =>
          `n = ${n(r)}${r.attempt === undefined ? "" : ` (attempt ${r.attempt})`} ${(r.at - started).toFixed(0)} ms in`).join(", ")}`);
      });
      const left = started + step.for_ms - performance.now();
      if (left <= 0) return;
      await delay(Math.min(20, left));
    }
  }
}

/** The bearer token of a secure run's one principal. */
const TOKEN = "scenario-runner-token";

/** A secure run: TLS with a CA made for the test, and a config file with one principal (by
 * {@link TOKEN}, hashed by `eventbus hash-token`) that may do what scenarios do. */
interface Secure {
  certificates: TestCertificates;
  config: string;
}

function makeSecure(): Secure {
  const tokenHash = execFileSync(busBinary(), ["hash-token", TOKEN], { encoding: "utf8" }).trim();
  const config = path.join(mkdtempSync(path.join(tmpdir(), "eventbus-scenario-")), "eventbus.toml");
  writeFileSync(config,
    `[[principals]]\nname = "scenario-runner"\ntoken_hash = "${tokenHash}"\n` +
    `publish = [">"]\nsubscribe = [">"]\nsources = ["*"]\n`);
  return { certificates: makeTestCertificates(), config };
}

/** The scenario's bus, or its `cluster.nodes` bus nodes on one JetStream stream (and their
 * nats-server, to stop after them); with `secure`, over TLS with the principal's config. A node
 * on the file store gets a fresh data directory of its own (in `dataDirs`, to remove after the
 * run), which it keeps across `restart_node`. */
async function startBuses(scenario: Step, dataDirs: string[], secure?: Secure): Promise<{ nodes: BusProcess[]; nats?: NatsServer }> {
  const settings = { ...(scenario.bus ?? {}), ...(secure ? { config: secure.config } : {}) };
  const tls = secure?.certificates;
  const withDataDir = (node: Record<string, string | number>) => {
    if (node.storage !== "file") return node;
    const dir = mkdtempSync(path.join(tmpdir(), "eventbus-scenario-data-"));
    dataDirs.push(dir);
    return { ...node, data_dir: dir };
  };
  if (!scenario.cluster) return { nodes: [await BusProcess.start(withDataDir(settings), tls)] };
  for (const key of Object.keys(scenario.cluster)) assert.equal(key, "nodes", `unknown cluster key ${key}`);
  const nats = await NatsServer.start();
  const nodes: BusProcess[] = [];
  for (let i = 0; i < scenario.cluster.nodes; i++) {
    nodes.push(await BusProcess.start(withDataDir({ ...settings, storage: "jetstream", nats_url: nats.url }), tls));
  }
  return { nodes, nats };
}

// Every scenario, against a plain bus and against one with TLS and a bearer token.
for (const file of FILES) {
  for (const secureRun of [false, true]) {
    const scenario = JSON.parse(readFileSync(path.join(SCENARIOS, file), "utf8"));
    test(`scenario ${scenario.name}${secureRun ? " (TLS + token)" : ""}`, async () => {
      for (const key of Object.keys(scenario)) assert.ok(SCENARIO_KEYS.has(key), `unknown scenario key ${key}`);
      const secure = secureRun ? makeSecure() : undefined;
      const dataDirs: string[] = [];
      const { nodes, nats } = await startBuses(scenario, dataDirs, secure);
      const credentials = secure ? { tlsCa: secure.certificates.ca, token: TOKEN } : {};
      const client = new Bus(nodes.map((node) => node.url), { source: `scenario-${scenario.name}`, ...credentials });
      const runner = new Runner(client, nodes);
      try {
        for (const step of scenario.steps as Step[]) await runner.run(step);
        runner.finish();
      } finally {
        await runner.close();
        client.close();
        for (const node of nodes) await node.stop();
        await nats?.stop();
        for (const dir of dataDirs) rmSync(dir, { recursive: true, force: true });
      }
    });
  }
}
