/**
 * Events as TypeScript values, and the one boundary where they become wire messages and back.
 * Callers never see proto-loader's plain objects: they get {@link Event}, with `Buffer` data,
 * `Date` times and camelCase fields.
 */
import type { Event as PbEvent, Event__Output as PbEventOutput } from "./generated/eventbus/v1/Event";
import type { SubscribeRequest } from "./generated/eventbus/v1/SubscribeRequest";
import type { SubscribeResponse__Output } from "./generated/eventbus/v1/SubscribeResponse";
import type { Subscribed__Output } from "./generated/eventbus/v1/Subscribed";
import type { Timestamp__Output } from "./generated/google/protobuf/Timestamp";
import { sequenceFromWire, sequenceToWire, type Sequence } from "./sequence";

/** A JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A payload: bytes as they are, a string as UTF-8 text, anything else as JSON. */
export type Data = Buffer | Uint8Array | string | Json;

/** Where a subscription starts: only new events, everything held, after a sequence (resume:
 * every held event with a greater sequence; a `bigint`, or a `number` that is a safe
 * integer), or every held event published at or after a time. */
export type Start = "latest" | "earliest" | Sequence | number | Date;

export const JSON_TYPE = "application/json";

/** The attribute that marks an error reply (the Rust SDK's `ERROR_ATTRIBUTE`). */
export const ERROR_ATTRIBUTE = "error";
/** The `type` of the Rust SDK's error replies. */
export const ERROR_EVENT_TYPE = "eventbus.error";

/** The attributes (and gRPC metadata keys) of the W3C trace context. */
export const TRACEPARENT = "traceparent";
export const TRACESTATE = "tracestate";

/** The fields of an event to publish. */
export interface EventInit {
  topic: string;
  data?: Data;
  id?: string;
  /** Defaults to the client's source. */
  source?: string;
  type?: string;
  time?: Date;
  /** Defaults from the data: JSON, text, or none for bytes. */
  dataContentType?: string;
  attributes?: Record<string, string>;
  /** The W3C trace context to send, as the `traceparent` (and `tracestate`) attribute: the bus
   * carries it to every subscriber and a responder carries it into its reply. */
  traceparent?: string;
  tracestate?: string;
  correlationId?: string;
  causationId?: string;
  replyTo?: string;
}

/** One event as received from the bus (CloudEvents 1.0 fields plus the bus's own). Times have
 * millisecond precision (JavaScript's `Date`). */
export class Event {
  constructor(
    readonly topic: string,
    readonly data: Buffer,
    readonly id: string,
    readonly source: string,
    readonly type: string,
    readonly time: Date | undefined,
    readonly dataContentType: string,
    readonly attributes: Readonly<Record<string, string>>,
    readonly correlationId: string,
    readonly causationId: string,
    readonly replyTo: string,
    /** Set by the bus: the event's position in the bus log (exact, up to 2^64 − 1). */
    readonly sequence: Sequence,
    /** Set by the bus: when it stored the event. */
    readonly publishTime: Date | undefined,
  ) {}

  /** The W3C `traceparent` the event carries (set by its producer, or by the bus from the
   * producer's request metadata), if any. */
  get traceparent(): string | undefined {
    return this.attributes[TRACEPARENT];
  }

  /** The W3C `tracestate` beside `traceparent`, if any. */
  get tracestate(): string | undefined {
    return this.attributes[TRACESTATE];
  }

  /** The data parsed as JSON. */
  json<T = Json>(): T {
    return JSON.parse(this.data.toString("utf8")) as T;
  }

  /** The data as UTF-8 text. */
  text(): string {
    return this.data.toString("utf8");
  }
}

/** The bus's confirmation of a subscription (`Subscribed` on the wire), sequences exact. */
export interface Subscribed {
  /** The bus's id for this subscription, as in its logs. */
  readonly subscriptionId: string;
  /** The pattern subscribed to. */
  readonly topic: string;
  /** The consumer group, `""` for none. */
  readonly group: string;
  /** The bus's last assigned sequence when the subscription was registered (0 when none). */
  readonly headSequence: Sequence;
  /** The oldest sequence the bus still holds (0 when it holds none). */
  readonly oldestSequence: Sequence;
  /** The requested start was older than anything held: the replay starts at
   * `oldestSequence`, and events before it are gone. */
  readonly startTruncated: boolean;
  /** The identity of the bus's log; it changes when the log starts over. */
  readonly logId: string;
  /** MANUAL-ack groups: every event up to this sequence is acked or dead-lettered. */
  readonly groupCursor: Sequence;
  /** The request's `log_id` named another log: its start was dropped and the subscription
   * starts at the oldest held event of this log. */
  readonly logChanged: boolean;
  /** MANUAL-ack groups: unacknowledged events retention dropped before delivery. */
  readonly groupDroppedEvents: bigint;
}

/** The wire confirmation as a {@link Subscribed}. */
export function subscribedFromPb(message: Subscribed__Output): Subscribed {
  return {
    subscriptionId: message.subscription_id,
    topic: message.topic,
    group: message.group,
    headSequence: sequenceFromWire(message.head_sequence),
    oldestSequence: sequenceFromWire(message.oldest_sequence),
    startTruncated: message.start_truncated,
    logId: message.log_id,
    groupCursor: sequenceFromWire(message.group_cursor),
    logChanged: message.log_changed,
    groupDroppedEvents: sequenceFromWire(message.group_dropped_events),
  };
}

/** The bytes and media type of a payload; `contentType` wins when given. */
export function encodeData(data: Data | undefined, contentType?: string): [Buffer, string] {
  if (data === undefined) return [Buffer.alloc(0), contentType ?? ""];
  if (Buffer.isBuffer(data)) return [data, contentType ?? ""];
  if (data instanceof Uint8Array) return [Buffer.from(data), contentType ?? ""];
  if (typeof data === "string") {
    return [Buffer.from(data, "utf8"), contentType ?? "text/plain; charset=utf-8"];
  }
  return [Buffer.from(JSON.stringify(data), "utf8"), contentType ?? JSON_TYPE];
}

function timestamp(date: Date): { seconds: number; nanos: number } {
  const ms = date.getTime();
  const seconds = Math.floor(ms / 1000);
  return { seconds, nanos: (ms - seconds * 1000) * 1_000_000 };
}

function toDate(stamp: Timestamp__Output | null): Date | undefined {
  if (!stamp) return undefined;
  return new Date(Number(stamp.seconds) * 1000 + Math.floor(stamp.nanos / 1_000_000));
}

/** The wire form of an event; an empty source becomes the client's. */
export function toPb(init: EventInit, defaultSource: string): PbEvent {
  const [data, dataContentType] = encodeData(init.data, init.dataContentType);
  const attributes: Record<string, string> = { ...(init.attributes ?? {}) };
  if (init.traceparent !== undefined) {
    attributes[TRACEPARENT] = init.traceparent;
    if (init.tracestate !== undefined) attributes[TRACESTATE] = init.tracestate;
  }
  return {
    id: init.id ?? "",
    source: init.source || defaultSource,
    type: init.type ?? "",
    topic: init.topic,
    time: init.time ? timestamp(init.time) : null,
    data_content_type: dataContentType,
    data,
    attributes,
    correlation_id: init.correlationId ?? "",
    causation_id: init.causationId ?? "",
    reply_to: init.replyTo ?? "",
  };
}

/** An event as received. */
export function fromPb(message: PbEventOutput): Event {
  return new Event(
    message.topic,
    Buffer.from(message.data),
    message.id,
    message.source,
    message.type,
    toDate(message.time),
    message.data_content_type,
    { ...message.attributes },
    message.correlation_id,
    message.causation_id,
    message.reply_to,
    sequenceFromWire(message.sequence),
    toDate(message.publish_time),
  );
}

/** MANUAL-ack settings of a consumer group (at least once): the bus keeps the group's cursor,
 * hands each event to one member, waits for an ack, and delivers again what is nacked or not
 * acked in time; after `maxDeliveries` the event goes to the dead-letter topic. Unset fields
 * take the bus's defaults. `maxDeliveries` and `deadLetterTopic` are per group (the member that
 * creates the group sets them); `ackDeadlineMs` and `maxInFlight` are per member. */
export interface ManualAck {
  /** How long (milliseconds, > 0) a delivered event may stay unacknowledged before it is
   * delivered again. The bus's default: 30 000. */
  ackDeadlineMs?: number;
  /** Deliveries of one event before it moves to the dead-letter topic (≥ 1). Default 5. */
  maxDeliveries?: number;
  /** The most unacknowledged events this member holds at once (flow control, ≥ 1). Default
   * 256. */
  maxInFlight?: number;
  /** Where events go after `maxDeliveries`, with the attributes `dlq_original_topic`,
   * `dlq_original_sequence`, `dlq_attempts` and `dlq_group`. Default `_bus.dlq.<group>`. A
   * topic clients may publish to, and not one the group's own pattern matches. */
  deadLetterTopic?: string;
}

/** Milliseconds as a protobuf Duration; `RangeError` unless a finite number ≥ 0. */
export function durationFromMs(ms: number, what: string): { seconds: number; nanos: number } {
  if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0) {
    throw new RangeError(`${what}: ${ms} is not a duration in milliseconds (a finite number >= 0)`);
  }
  const seconds = Math.floor(ms / 1000);
  return { seconds, nanos: Math.round((ms - seconds * 1000) * 1_000_000) };
}

function count(value: number | undefined, what: string): number {
  if (value === undefined) return 0;
  if (!Number.isInteger(value) || value < 1 || value > 0xffff_ffff) {
    throw new RangeError(`${what}: ${value} is not a whole number from 1 to 2^32-1`);
  }
  return value;
}

/** The events per `event_batch` response a subscription asks for when it names none. */
export const DEFAULT_MAX_BATCH_EVENTS = 256;
/** The most events per `event_batch` response the bus takes (the proto's rule). */
export const MAX_BATCH_EVENTS = 1024;

/** What a subscription request may carry besides its pattern and start. */
export interface SubscribeExtras {
  /** MANUAL-ack mode and its settings. */
  manualAck?: ManualAck;
  /** The log the start position was taken from (`Subscribed.logId` seen before). */
  logId?: string;
  /** At most this many events per response (`max_batch_events`); 0 or 1 for one event per
   * response. {@link DEFAULT_MAX_BATCH_EVENTS} when unset. */
  maxBatchEvents?: number;
}

function batchSize(value: number | undefined): number {
  if (value === undefined) return DEFAULT_MAX_BATCH_EVENTS;
  if (!Number.isInteger(value) || value < 0 || value > MAX_BATCH_EVENTS) {
    throw new RangeError(`maxBatchEvents: ${value} is not a whole number from 0 to ${MAX_BATCH_EVENTS}`);
  }
  return value;
}

/** The wire form of a subscription request. */
export function subscribeRequest(
  pattern: string,
  group: string | undefined,
  subscriber: string,
  start: Start,
  extras: SubscribeExtras = {},
): SubscribeRequest {
  const request: SubscribeRequest = { topic: pattern, group: group ?? "", subscriber };
  if (start === "latest") request.latest = {};
  else if (start === "earliest") request.earliest = {};
  else if (typeof start === "bigint" || typeof start === "number") {
    request.after_sequence = sequenceToWire(start, "start");
  } else if (start instanceof Date) request.from_time = timestamp(start);
  else throw new TypeError("start must be 'latest', 'earliest', a sequence or a Date");
  const manual = extras.manualAck;
  if (manual) {
    request.ack_mode = "ACK_MODE_MANUAL";
    if (manual.ackDeadlineMs !== undefined) {
      if (!(manual.ackDeadlineMs > 0)) throw new RangeError(`ackDeadlineMs: ${manual.ackDeadlineMs} is not positive`);
      request.ack_deadline = durationFromMs(manual.ackDeadlineMs, "ackDeadlineMs");
    }
    request.max_deliveries = count(manual.maxDeliveries, "maxDeliveries");
    request.max_in_flight = count(manual.maxInFlight, "maxInFlight");
    request.dead_letter_topic = manual.deadLetterTopic ?? "";
  }
  if (extras.logId) request.log_id = extras.logId;
  request.max_batch_events = batchSize(extras.maxBatchEvents);
  return request;
}

/** The events a subscription response carries, in delivery order, each with which delivery of
 * it this is (MANUAL-ack groups, from 1; 0 otherwise): the one of an `event` (what a bus sends
 * when batching is off, or when only one event was ready), those of an `event_batch`, or none. */
export function receivedEvents(message: SubscribeResponse__Output): Array<[PbEventOutput, number]> {
  if (message.message === "event" && message.event) return [[message.event, message.delivery_attempt]];
  if (message.message === "event_batch" && message.event_batch) {
    const { events, delivery_attempts: attempts } = message.event_batch;
    return events.map((event, index) => [event, attempts[index] ?? 0]);
  }
  return [];
}

/** What a query handler returns when it wants more than the data: a type, attributes or a media
 * type of its own. Plain data returned by a handler is sent as the reply's data. */
export class Reply {
  readonly data?: Data;
  readonly type?: string;
  readonly attributes?: Record<string, string>;
  readonly dataContentType?: string;

  constructor(fields: { data?: Data; type?: string; attributes?: Record<string, string>; dataContentType?: string }) {
    Object.assign(this, fields);
  }
}

/** Thrown by a query handler to answer with an error reply as docs/scenario-protocol.md defines
 * it: data `{"error": {"code", "message"}}` and attribute `error` = code. */
export class ReplyError extends Error {
  constructor(
    /** `not_found`, `invalid`, `unavailable` or `internal`. */
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = "ReplyError";
  }
}

/** The scenario protocol's error reply. */
export function errorReply(error: ReplyError): Reply {
  return new Reply({
    data: { error: { code: error.code, message: error.message } },
    attributes: { error: error.code },
  });
}

/** The reply to a query: to its reply_to, same correlation id, causation id = the query's id,
 * type = the query topic plus `.result` unless the handler chose one. */
export function replyEvent(request: Event, outcome: Reply | Data, source: string): EventInit {
  const reply = outcome instanceof Reply ? outcome : new Reply({ data: outcome });
  const attributes: Record<string, string> = { ...(reply.attributes ?? {}) };
  // The reply continues the asker's trace unless the handler set a context of its own.
  if (attributes[TRACEPARENT] === undefined) {
    for (const key of [TRACEPARENT, TRACESTATE]) {
      const value = request.attributes[key];
      if (value !== undefined) attributes[key] = value;
    }
  }
  return {
    topic: request.replyTo,
    data: reply.data,
    dataContentType: reply.dataContentType,
    source,
    type: reply.type ?? `${request.topic}.result`,
    attributes,
    correlationId: request.correlationId,
    causationId: request.id,
  };
}
