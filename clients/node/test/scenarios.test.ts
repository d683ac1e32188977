/** The shared scenarios (`scenarios/*.json`, format in scenarios/README.md) run with the
 * TypeScript client: one test per file, each against its own bus process. */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import * as path from "node:path";
import { test } from "node:test";

import {
  Bus,
  BusError,
  NoRespondersError,
  QueryTimeoutError,
  type Event,
  type Json,
  type Responder,
  type Subscription,
} from "../src";
import { BusProcess, REPO_ROOT, waitFor } from "../src/testing";

const SCENARIOS = path.join(REPO_ROOT, "scenarios");
const FILES = readdirSync(SCENARIOS).filter((name) => name.endsWith(".json")).sort();

/** The TypeScript idiom of each error reason a scenario may expect. */
const ERRORS: Record<string, new (...args: never[]) => BusError> = {
  "no-responders": NoRespondersError,
  "query-timeout": QueryTimeoutError,
};
const QUERY_EXPECT = new Set(["reply", "reply_type", "error", "status", "within_ms", "after_ms"]);
const RECEIVE_EXPECT = new Set(["n_range", "in_order", "each_at_least", "resumed"]);

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

  constructor(readonly bus: Bus) {}

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
        if (step.batch) await this.bus.publishBatch(events);
        else for (const event of events) await this.bus.publishBatch([event]);
        return;
      }
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
    try {
      reply = await this.bus.query(step.topic, step.data as Json, { timeoutMs: step.timeout_ms });
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

for (const file of FILES) {
  const scenario = JSON.parse(readFileSync(path.join(SCENARIOS, file), "utf8"));
  test(`scenario ${scenario.name}`, async () => {
    const bus = await BusProcess.start(scenario.bus ?? {});
    const client = new Bus(bus.address, { source: `scenario-${scenario.name}` });
    const runner = new Runner(client);
    try {
      for (const step of scenario.steps as Step[]) await runner.run(step);
    } finally {
      await runner.close();
      client.close();
      await bus.stop();
    }
  });
}
