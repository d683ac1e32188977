/** The shared scenarios (`scenarios/*.json`, format in scenarios/README.md) run with the
 * TypeScript client: one test per file, each against its own bus process, or for a scenario with
 * `cluster` its own bus nodes over one JetStream stream on a nats-server of its own. */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import * as path from "node:path";
import { test } from "node:test";

import {
  Bus,
  BusError,
  NoRespondersError,
  NodeUnavailableError,
  QueryTimeoutError,
  type Event,
  type Json,
  type Responder,
  type Subscription,
} from "../src";
import { BusProcess, NatsServer, REPO_ROOT, waitFor } from "../src/testing";

const SCENARIOS = path.join(REPO_ROOT, "scenarios");
const FILES = readdirSync(SCENARIOS).filter((name) => name.endsWith(".json")).sort();

/** The TypeScript idiom of each error reason a scenario may expect. */
const ERRORS: Record<string, new (...args: never[]) => BusError> = {
  "no-responders": NoRespondersError,
  "query-timeout": QueryTimeoutError,
};
const QUERY_EXPECT = new Set(["reply", "reply_type", "error", "status", "within_ms", "after_ms"]);
const RECEIVE_EXPECT = new Set(["n_range", "in_order", "each_at_least", "resumed"]);
const SCENARIO_KEYS = new Set(["name", "description", "bus", "cluster", "steps"]);
const QUERY_KEYS = new Set(["op", "topic", "data", "timeout_ms", "retry_within_ms", "expect"]);
/** How long a step asks again after errors the client calls retryable (its node went away). */
const RETRY_WITHIN_MS = 30_000;

/** `call()`, asked again while it rejects with NodeUnavailableError (or `also`), for up to
 * `withinMs`. */
async function retrying<T>(call: () => Promise<T>, withinMs: number, also: (new (...args: never[]) => Error)[] = []): Promise<T> {
  const deadline = Date.now() + withinMs;
  for (;;) {
    try {
      return await call();
    } catch (error) {
      const retryable = error instanceof NodeUnavailableError || also.some((kind) => error instanceof kind);
      if (!retryable || Date.now() >= deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  }
}

type Step = Record<string, any>;

/** A subscription and the events its background reader collected. */
class Collector {
  readonly events: Event[] = [];
  error: unknown;
  constructor(readonly subscription: Subscription) {
    void (async () => {
      try {
        for await (const event of subscription) this.events.push(event);
      } catch (error) {
        this.error = error;
      }
    })();
  }
}

class Runner {
  readonly collectors = new Map<string, Collector>();
  readonly responders: Responder[] = [];

  constructor(readonly bus: Bus, readonly nodes: BusProcess[]) {}

  async close(): Promise<void> {
    for (const collector of this.collectors.values()) collector.subscription.close();
    for (const responder of this.responders) await responder.stop();
  }

  async run(step: Step): Promise<void> {
    switch (step.op) {
      case "subscribe":
        this.collectors.set(step.id, new Collector(await this.bus.subscribe(step.pattern, { group: step.group })));
        return;
      case "publish": {
        const events = Array.from({ length: step.count }, (_, i) => ({ topic: step.topic, data: { n: step.first + i } }));
        const batches = step.batch ? [events] : events.map((event) => [event]);
        // Asked again while the client moves to another node: each event is stored once.
        for (const batch of batches) await retrying(() => this.bus.publishBatch(batch), RETRY_WITHIN_MS);
        return;
      }
      case "kill_node":
        await this.nodes[step.node].stop(15_000, "SIGKILL");
        return;
      case "serve":
        this.responders.push(await this.bus.serve(step.topic, step.group, (query) => ({ echo: query.json() })));
        return;
      case "query":
        return this.query(step);
      case "receive":
        return this.receive(step);
      default:
        throw new Error(`unknown op ${step.op}`);
    }
  }

  private async query(step: Step): Promise<void> {
    const expect = step.expect;
    for (const key of Object.keys(expect)) assert.ok(QUERY_EXPECT.has(key), `unknown expect key ${key}`);
    const started = performance.now();
    let reply: Event | undefined;
    let error: unknown;
    for (const key of Object.keys(step)) assert.ok(QUERY_KEYS.has(key), `unknown query key ${key}`);
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

  private async receive(step: Step): Promise<void> {
    const expect = step.expect;
    for (const key of Object.keys(expect)) assert.ok(RECEIVE_EXPECT.has(key), `unknown expect key ${key}`);
    const collectors: Collector[] = step.from.map((id: string) => this.collectors.get(id));
    await waitFor(() => {
      for (const collector of collectors) if (collector.error) throw collector.error;
      return collectors.reduce((sum, c) => sum + c.events.length, 0) >= step.count;
    }, step.within_ms, `${step.count} events on ${step.from}`);
    const batches = collectors.map((c) => c.events.slice(0, step.count));
    const n = (event: Event) => event.json<{ n: number }>().n;
    if ("n_range" in expect) {
      const [low, high] = expect.n_range as [number, number];
      const all = batches.flat().map(n).sort((a, b) => a - b);
      assert.deepEqual(all, Array.from({ length: high - low }, (_, i) => low + i));
    }
    if (expect.in_order) {
      for (const batch of batches) {
        for (let i = 1; i < batch.length; i++) {
          assert.ok(n(batch[i]) > n(batch[i - 1]), "n out of order");
          assert.ok(batch[i].sequence > batch[i - 1].sequence, "sequence out of order");
        }
      }
    }
    if ("each_at_least" in expect) {
      assert.ok(batches.every((b) => b.length >= expect.each_at_least), `${batches.map((b) => b.length)}`);
    }
    if (expect.resumed) {
      assert.ok(collectors.every((c) => c.subscription.resumes >= 1), "no stream dropped");
    }
  }
}

/** The scenario's bus, or its `cluster.nodes` bus nodes on one JetStream stream (and their
 * nats-server, to stop after them). */
async function startBuses(scenario: Step): Promise<{ nodes: BusProcess[]; nats?: NatsServer }> {
  const settings = scenario.bus ?? {};
  if (!scenario.cluster) return { nodes: [await BusProcess.start(settings)] };
  for (const key of Object.keys(scenario.cluster)) assert.equal(key, "nodes", `unknown cluster key ${key}`);
  const nats = await NatsServer.start();
  const nodes: BusProcess[] = [];
  for (let i = 0; i < scenario.cluster.nodes; i++) {
    nodes.push(await BusProcess.start({ ...settings, storage: "jetstream", nats_url: nats.url }));
  }
  return { nodes, nats };
}

for (const file of FILES) {
  const scenario = JSON.parse(readFileSync(path.join(SCENARIOS, file), "utf8"));
  test(`scenario ${scenario.name}`, async () => {
    for (const key of Object.keys(scenario)) assert.ok(SCENARIO_KEYS.has(key), `unknown scenario key ${key}`);
    const { nodes, nats } = await startBuses(scenario);
    const client = new Bus(nodes.map((node) => node.url), { source: `scenario-${scenario.name}` });
    const runner = new Runner(client, nodes);
    try {
      for (const step of scenario.steps as Step[]) await runner.run(step);
    } finally {
      await runner.close();
      client.close();
      for (const node of nodes) await node.stop();
      await nats?.stop();
    }
  });
}
