/** The bookkeeping of the moves between nodes, without a bus: how they are logged. The Python
 * client's test_moves_in_an_outage_warn_once_then_debug_until_warn_every_passed is the same
 * test. */
import assert from "node:assert/strict";
import { test } from "node:test";

import { status } from "@grpc/grpc-js";

import { NodeUnavailableError, type Failover } from "../src";
import { Nodes, WARN_EVERY_MS } from "../src/nodes";

test("moves in an outage warn once, then log at debug level until WARN_EVERY_MS passed", () => {
  let now = 100_000;
  const hooked: Failover[] = [];
  const logged: { level: "warn" | "debug"; message: string }[] = [];
  const nodes = new Nodes(
    [{ address: "a:1", tls: false }, { address: "b:2", tls: false }],
    (failover) => hooked.push(failover),
    () => now,
    {
      warn: (message) => logged.push({ level: "warn", message }),
      debug: (message) => logged.push({ level: "debug", message }),
    },
  );
  const move = (times: number) => {
    for (let i = 0; i < times; i++) {
      const index = nodes.index;
      const to = nodes.choose(index, nodes.candidates(index)[0]);
      nodes.report({
        what: "subscription",
        pattern: "orders.>",
        fromEndpoint: nodes.address(index),
        toEndpoint: nodes.address(to),
        error: new NodeUnavailableError(status.UNAVAILABLE, "connection refused"),
      });
      now += 250;
    }
  };

  // Every node down: a move every 250 ms for 5 s.
  move(20);
  assert.deepEqual(logged.map((entry) => entry.level), ["warn", ...Array<string>(19).fill("debug")]);
  assert.equal(logged[0].message, "eventbus: subscription orders.> moved from a:1 to b:2 (UNAVAILABLE: connection refused)");
  assert.equal(hooked.length, 20, "the hook hears of every move all the same");

  // Still down once the period has passed since the first warning: one more warning, with a
  // count of the quiet moves.
  logged.length = 0;
  now = 100_000 + WARN_EVERY_MS;
  move(3);
  assert.deepEqual(logged.map((entry) => entry.level), ["warn", "debug", "debug"]);
  assert.equal(logged[0].message,
    "eventbus: subscription orders.> moved from a:1 to b:2 (UNAVAILABLE: connection refused); moves_since_last_warning=19");
  assert.equal(hooked.length, 23);
});
