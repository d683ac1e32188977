/**
 * eventbus-client: TypeScript services on the eventbus, on @grpc/grpc-js with the contract
 * (`proto/eventbus/v1/eventbus.proto`) loaded at run time by @grpc/proto-loader.
 *
 * Layout: `bus` (Bus, Subscription with its resume rules, Delivery for MANUAL-ack groups,
 * Responder), `nodes` (the nodes of a clustered bus and the move between them), `publisher`
 * (the batching idempotent Publisher over PublishStream), `backoff`
 * (reconnect delays), `events` (Event and the one boundary to and from wire messages),
 * `sequence` (uint64 sequences as bigint, the one place they cross the wire), `errors`
 * (errors that keep the gRPC status and the bus's reason), `proto` (loading the contract),
 * `testing` (real bus processes for tests; not part of the package).
 *
 * ```ts
 * const bus = new Bus("127.0.0.1:50051", { source: "greeter" });
 * await bus.publish("greetings.sent", { to: "Ada" });
 * const reply = await bus.query("user.query", { user_id: 7 }, { timeoutMs: 2000 });
 * ```
 */
export * from "./bus";
export * from "./errors";
export { Backoff, type BackoffOptions } from "./backoff";
export { Publisher, uuidv7, type PendingPublish, type PublisherOptions } from "./publisher";
export { MAX_SEQUENCE, sequenceFromWire, sequenceToWire, type Sequence } from "./sequence";
export { ERROR_ATTRIBUTE, ERROR_EVENT_TYPE, TRACEPARENT, TRACESTATE, Event, Reply, ReplyError, encodeData, type Data, type EventInit, type Json, type ManualAck, type Start, type Subscribed } from "./events";
