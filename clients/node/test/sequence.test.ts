/** Sequences above 2^53 through the conversion layer: a real bus cannot reach them in a test,
 * so they go through the same serialisers and converters the client uses on the wire. */
import assert from "node:assert/strict";
import { test } from "node:test";

import type * as grpc from "@grpc/grpc-js";
import { status } from "@grpc/grpc-js";

import { MAX_SEQUENCE, ResourceExhaustedError, sequenceFromWire, sequenceToWire } from "../src";
import { fromPb, subscribeRequest, subscribedFromPb } from "../src/events";
import { packageDefinition } from "../src/proto";

const ABOVE_2_53 = 9_007_199_254_740_993n; // 2^53 + 1: a Number rounds it to 2^53
const MAX = "18446744073709551615";

function method(name: string): grpc.MethodDefinition<any, any> {
  const service = packageDefinition()["eventbus.v1.EventBusService"] as grpc.ServiceDefinition;
  return service[name];
}

test("conversions are exact up to 2^64 - 1 and refuse what is not a sequence", () => {
  assert.equal(sequenceFromWire(String(ABOVE_2_53)), ABOVE_2_53);
  assert.equal(sequenceFromWire(MAX), MAX_SEQUENCE);
  assert.equal(MAX_SEQUENCE, 2n ** 64n - 1n);
  assert.equal(sequenceFromWire(""), 0n);
  assert.equal(sequenceToWire(ABOVE_2_53), "9007199254740993");
  assert.equal(sequenceToWire(MAX_SEQUENCE), MAX);
  assert.equal(sequenceToWire(7), "7");
  assert.throws(() => sequenceToWire(2n ** 64n), RangeError);
  assert.throws(() => sequenceToWire(-1n), RangeError);
  assert.throws(() => sequenceToWire(1.5), RangeError);
  assert.throws(() => sequenceToWire(2 ** 53 + 2), RangeError, "an unsafe Number is refused, not rounded");
  assert.throws(() => sequenceFromWire(2 ** 53 + 2), RangeError);
});

test("events, confirmations and caught_up decode above 2^53 without loss", () => {
  const subscribe = method("Subscribe");
  const wire = subscribe.responseSerialize({ event: { topic: "a.b", sequence: MAX }, delivery_attempt: 2 });
  const decoded = subscribe.responseDeserialize(wire);
  assert.equal(fromPb(decoded.event).sequence, MAX_SEQUENCE);

  const confirmation = subscribe.responseDeserialize(subscribe.responseSerialize({
    subscribed: { head_sequence: String(ABOVE_2_53), oldest_sequence: String(ABOVE_2_53 - 5n),
      group_cursor: String(ABOVE_2_53 + 2n), log_id: "log-1" },
  }));
  const subscribed = subscribedFromPb(confirmation.subscribed);
  assert.equal(subscribed.headSequence, ABOVE_2_53);
  assert.equal(subscribed.oldestSequence, ABOVE_2_53 - 5n);
  assert.equal(subscribed.groupCursor, ABOVE_2_53 + 2n);

  const caughtUp = subscribe.responseDeserialize(subscribe.responseSerialize({ caught_up: { sequence: MAX } }));
  assert.equal(sequenceFromWire(caughtUp.caught_up.sequence), MAX_SEQUENCE);
});

test("publish results and start positions cross the wire exactly", () => {
  const publish = method("Publish");
  const response = publish.responseDeserialize(publish.responseSerialize({ sequences: [String(ABOVE_2_53), MAX] }));
  assert.deepEqual(response.sequences.map(sequenceFromWire), [ABOVE_2_53, MAX_SEQUENCE]);

  const subscribe = method("Subscribe");
  const request = subscribeRequest("a.b", undefined, "s", ABOVE_2_53 + 2n);
  const sent = subscribe.requestDeserialize(subscribe.requestSerialize(request));
  assert.equal(sequenceFromWire(sent.after_sequence), ABOVE_2_53 + 2n);
  assert.throws(() => subscribeRequest("a.b", undefined, "s", 2n ** 64n), RangeError);
});

test("a slow-consumer error names its resume point exactly", () => {
  const error = new ResourceExhaustedError(status.RESOURCE_EXHAUSTED, `resubscribe with after_sequence=${MAX} to go on`);
  assert.equal(error.lastDelivered, MAX_SEQUENCE);
});

test("ack and nack sequences and the group cursor cross the wire exactly", () => {
  const ack = method("Ack");
  const sent = ack.requestDeserialize(ack.requestSerialize({ group: "g", sequences: [sequenceToWire(ABOVE_2_53), sequenceToWire(MAX_SEQUENCE)] }));
  assert.deepEqual(sent.sequences.map(sequenceFromWire), [ABOVE_2_53, MAX_SEQUENCE]);
  const answer = ack.responseDeserialize(ack.responseSerialize({ acknowledged: 1, group_cursor: String(ABOVE_2_53 + 1n) }));
  assert.equal(sequenceFromWire(answer.group_cursor), ABOVE_2_53 + 1n);
  const nack = method("Nack");
  const handedBack = nack.requestDeserialize(nack.requestSerialize({ group: "g", sequences: [sequenceToWire(ABOVE_2_53 + 4n)] }));
  assert.equal(sequenceFromWire(handedBack.sequences[0]), ABOVE_2_53 + 4n);
});
