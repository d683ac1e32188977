/**
 * The client: {@link Bus} (publish, subscribe, ack/nack, query, serve), {@link Subscription}
 * (an async iterator that resumes a broken stream by itself), {@link Delivery} (an event of a
 * MANUAL-ack group) and {@link Responder}.
 *
 * A subscription reads its stream into a small buffer and pauses the stream while the buffer is
 * full, so a slow consumer still slows the stream down and the bus, not this process, decides
 * what a subscriber that falls behind does (it catches up from the bus's log, or past
 * `max_subscriber_lag` is ended). When the stream breaks for a reason that may pass (the bus
 * restarts or stops, ends a slow consumer, the connection drops), the subscription reopens it
 * with {@link Backoff} after the last sequence it delivered, naming the log that sequence belongs
 * to: no duplicates, no gaps while the bus still holds the events, and a fresh start (reported)
 * when the bus's log is another one.
 */
import { readFileSync } from "node:fs";

import * as grpc from "@grpc/grpc-js";

import {
  BusError,
  DeadlineExceededError,
  NodeUnavailableError,
  UnavailableError,
  RemoteError,
  fromServiceError,
  isGroupElsewhere,
  isRetryableCode,
  movesOn,
} from "./errors";
import { Backoff, type BackoffOptions } from "./backoff";
import { Nodes, type Failover, type Security, type Target } from "./nodes";
import {
  Event,
  Reply,
  ReplyError,
  ERROR_ATTRIBUTE,
  errorReply,
  fromPb,
  durationFromMs,
  receivedEvents,
  replyEvent,
  subscribeRequest,
  subscribedFromPb,
  type Subscribed,
  toPb,
  type Data,
  type EventInit,
  type ManualAck,
  type Start,
} from "./events";
import type { AckRequest } from "./generated/eventbus/v1/AckRequest";
import type { AckResponse__Output } from "./generated/eventbus/v1/AckResponse";
import type { EventBusServiceClient } from "./generated/eventbus/v1/EventBusService";
import type { NackRequest } from "./generated/eventbus/v1/NackRequest";
import type { NackResponse__Output } from "./generated/eventbus/v1/NackResponse";
import type { PublishRequest } from "./generated/eventbus/v1/PublishRequest";
import type { PublishResponse__Output } from "./generated/eventbus/v1/PublishResponse";
import type { QueryRequest } from "./generated/eventbus/v1/QueryRequest";
import type { QueryResponse__Output } from "./generated/eventbus/v1/QueryResponse";
import type { SubscribeResponse__Output } from "./generated/eventbus/v1/SubscribeResponse";
import { Publisher, type PublisherOptions } from "./publisher";
import { sequenceFromWire, sequenceToWire, type Sequence } from "./sequence";

/** The environment variable naming the bus, shared with the Rust CLI. */
export const SERVER_ENV = "EVENTBUS_SERVER";
/** The environment variable naming the bus's nodes, comma-separated, shared with the Rust SDK,
 * the CLI and the scenario services; it wins over `EVENTBUS_SERVER`. */
export const URL_ENV = "EVENTBUS_URL";
export const DEFAULT_TARGET = "127.0.0.1:50051";
const HEALTH_SERVICE = "eventbus.v1.EventBusService";
/** The bus's own query timeout when a query names none. */
const DEFAULT_QUERY_TIMEOUT_MS = 5000;
export type { Failover } from "./nodes";

/** A query handler: gets the query event, returns the reply data (or a {@link Reply}), or
 * throws {@link ReplyError} to answer with an error. */
export type Handler = (request: Event) => Reply | Data | Promise<Reply | Data>;

export interface BusOptions {
  /** This service's name: the source of its events and its name in the topology. */
  source?: string;
  /** Called for every move to another node (see {@link Bus}); also logged with `console.warn`
   * (with every node down, one warning per 10 s and the moves between at debug level:
   * `NODE_DEBUG=eventbus`). */
  onFailover?: (failover: Failover) => void;
  /** For `https://` targets: a CA to trust instead of the system's roots, as a PEM file path
   * or the PEM itself (a Buffer). */
  tlsCa?: string | Buffer;
  /** For `https://` targets of a bus with mutual TLS: the client certificate (PEM, leaf
   * first) and its key, each a file path or a Buffer; both or neither. */
  tlsCert?: string | Buffer;
  tlsKey?: string | Buffer;
  /** Sent with every call as `authorization: Bearer <token>`. */
  token?: string;
}

/** A PEM option as bytes: a Buffer as it is, a string as a file path to read. Throws naming the
 * option when the file cannot be read. */
function readPem(value: string | Buffer | undefined, option: string): Buffer | undefined {
  if (value === undefined || Buffer.isBuffer(value)) return value;
  try {
    return readFileSync(value);
  } catch (error) {
    throw new Error(`${option}: cannot read ${value}: ${(error as Error).message}`);
  }
}

/** The credentials of {@link BusOptions}, read once for every node of a client. */
function securityOf(options: BusOptions): Security {
  if ((options.tlsCert === undefined) !== (options.tlsKey === undefined)) {
    throw new Error("tlsCert and tlsKey go together (a client certificate and its key)");
  }
  return {
    tlsCa: readPem(options.tlsCa, "tlsCa"),
    tlsCert: readPem(options.tlsCert, "tlsCert"),
    tlsKey: readPem(options.tlsKey, "tlsKey"),
    token: options.token || undefined,
  };
}

export interface SubscribeOptions {
  /** A consumer group: members share the events. */
  group?: string;
  /** Where to start; `latest` by default. AUTO groups always start at `latest`; a new MANUAL
   * group starts here, an existing one at its cursor. */
  start?: Start;
  /** At-least-once delivery for a `group`: the subscription yields {@link Delivery} objects to
   * ack or nack (see {@link ManualAck}; `{}` takes the bus's defaults). */
  manualAck?: ManualAck;
  /** The subscribing service's name; the bus client's source by default. */
  subscriber?: string;
  /** Reopen a broken stream after the last event seen (default true). */
  resume?: boolean;
  /** Delays between attempts to reopen a broken stream: by default the Rust SDK's (50 ms,
   * doubling, at most 5 s) with full jitter, and never giving up; `maxAttempts` sets a limit
   * on failures in a row. */
  backoff?: BackoffOptions;
  /** Give up reopening a broken stream after this many milliseconds (default: never). */
  reconnectTimeoutMs?: number;
  /** A MANUAL-ack member that moved to another node of a cluster rejoins its group there (the
   * bus relays it to the group's home node); a FAILED_PRECONDITION `group-on-another-node` (the
   * group moved while it joined) is retried with `backoff` for up to this many milliseconds
   * (default 30 000). */
  rejoinTimeoutMs?: number;
  /** The log a `start` sequence was taken from (a `Subscribed.logId` seen before), for a
   * caller that stored its position: if the bus's log is another one now, the bus starts at
   * its oldest event instead and {@link onLogChanged} is called. Resumes always send it. */
  logId?: string;
  /** Called when the bus's log turned out to be another one than the position came from (a
   * memory-store bus that restarted, a repaired log): the subscription has started over at
   * the beginning of the new log (AUTO groups: live), and events of the old log after
   * `lastSeen` that were not delivered are lost to it. Called before the new log's events. */
  onLogChanged?: (change: LogChange) => void;
  /** How long to wait for the bus's confirmation (default 10 s). */
  confirmTimeoutMs?: number;
  /** Events read ahead of the caller before the stream is paused (default 1024; a batch that
   * arrives when the buffer is nearly full is taken whole). */
  buffer?: number;
  /** Batched delivery: the bus may send up to this many ready events in one response (fewer,
   * larger messages), which the subscription still yields one by one. 0 or 1: one event per
   * response. A whole number up to 1024; default 256. A bus older than batching ignores it. */
  maxBatchEvents?: number;
}

/** What {@link SubscribeOptions.onLogChanged} is told. */
export interface LogChange {
  /** The log the position came from (`""` if unknown). */
  previousLogId: string;
  /** The bus's log now. */
  logId: string;
  /** The last sequence delivered from the old log (or the start asked for; 0 for none). */
  lastSeen: Sequence;
  /** The new log's head when it was noticed. */
  headSequence: Sequence;
}

/** {@link SubscribeOptions} of a MANUAL-ack group: a group and the ack settings are required. */
export interface ManualSubscribeOptions extends SubscribeOptions {
  group: string;
  manualAck: ManualAck;
}

/** The answer to an ack. */
export interface AckResult {
  /** How many of the sequences were waiting for an ack (the others were already acked,
   * redelivered elsewhere, or never delivered to the group). */
  acknowledged: number;
  /** The group's cursor after the ack: every event up to it is acked or dead-lettered. */
  groupCursor: Sequence;
}

/** The answer to a nack. */
export interface NackResult {
  /** How many of the sequences were in flight and will be delivered again. */
  requeued: number;
}

export interface QueryOptions extends Omit<EventInit, "topic" | "data"> {
  /** How long to wait for the reply; the bus's default (5 s) when unset. */
  timeoutMs?: number;
  /** When the node in use fails under the query, send it again (to the node the client moved
   * to, after `backoff`, with the same event id) until `timeoutMs` (5 s when unset) has passed
   * since the first send, instead of rejecting with {@link NodeUnavailableError}. A responder
   * may then see the query twice. Default false. */
  retry?: boolean;
  /** Delays between those retries (default: 50 ms doubling, full jitter). */
  backoff?: BackoffOptions;
}

/** Accepts `host:port`, `http://host:port` (plaintext) or `https://host:port` (TLS); nothing
 * means the first of {@link parseTargets}. */
export function parseTarget(target?: string, security?: Security): Target {
  if (!target) return parseTargets(undefined, security)[0];
  const value = target.trim();
  const tls = value.startsWith("https://");
  const address = value.replace(/^https?:\/\//, "").replace(/\/+$/, "");
  return security === undefined ? { address, tls } : { address, tls, security };
}

/** The bus's nodes: `"http://a:50051"`, `"http://a:50051,http://b:50051"` or a list (each entry
 * as {@link parseTarget} takes it; it may hold commas too). Nothing (or empty) means
 * `$EVENTBUS_URL`, else `$EVENTBUS_SERVER`, else `127.0.0.1:50051`. */
export function parseTargets(targets?: string | string[], security?: Security): Target[] {
  const split = (text: string) => text.split(",").map((part) => part.trim()).filter((part) => part !== "");
  let parts = (typeof targets === "string" ? [targets] : targets ?? []).flatMap(split);
  if (parts.length === 0) {
    parts = split(process.env[URL_ENV] || process.env[SERVER_ENV] || DEFAULT_TARGET);
  }
  if (parts.length === 0) parts = [DEFAULT_TARGET];
  return parts.map((part) => parseTarget(part, security));
}

function unary<Req, Res>(
  call: (request: Req, options: grpc.CallOptions, callback: grpc.requestCallback<Res>) => unknown,
  request: Req,
  options: grpc.CallOptions = {},
): Promise<Res> {
  return new Promise((resolve, reject) => {
    call(request, options, (error, response) => {
      if (error) reject(fromServiceError(error));
      else resolve(response as Res);
    });
  });
}

const delay = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/**
 * A connection to the bus: to one node, or to several nodes of a clustered bus.
 *
 * The client uses one node at a time. When a call fails the way a node that is gone fails
 * (UNAVAILABLE: a refused or broken connection, `shutting-down`, `store-failed`), it moves to
 * the next node that answers SERVING to a health check (or the next in order when none does):
 * subscriptions resume there after the last sequence they delivered, MANUAL-ack members rejoin
 * their group, the batching publisher resends what was unanswered with the same ids, and a
 * failed query or unary call rejects with {@link NodeUnavailableError} (retry it: the next call
 * goes to the new node). {@link BusOptions.onFailover} is told of every move.
 */
export class Bus {
  readonly source: string;
  /** @internal The nodes and the one in use. */
  readonly nodes: Nodes;

  /** `target`: `host:port`, `http://host:port` or `https://host:port`; several nodes as a list
   * or one comma-separated string. Defaults to `$EVENTBUS_URL`, else `$EVENTBUS_SERVER`, else
   * `127.0.0.1:50051`. An `https://` target is always TLS, never plaintext (see
   * {@link BusOptions.tlsCa}); a TLS file that cannot be read throws here. */
  constructor(target?: string | string[], options: BusOptions = {}) {
    this.nodes = new Nodes(parseTargets(target, securityOf(options)), options.onFailover);
    this.source = options.source ?? "node-client";
  }

  /** The node in use now, `host:port`. */
  get address(): string {
    return this.nodes.address(this.nodes.index);
  }

  /** Every node this client may use, `host:port`, in the order given. */
  get endpoints(): string[] {
    return this.nodes.targets.map((target) => target.address);
  }

  /** Closes the connection; open subscriptions end. */
  close(): void {
    this.nodes.close();
  }

  /** One unary call on the node in use; a failure that says the node is gone moves the client
   * to another node for the next call, and is thrown. */
  private async call<Req, Res>(what: Failover["what"], method: keyof EventBusServiceClient & string,
    request: Req, options: grpc.CallOptions = {}, node?: number): Promise<Res> {
    const index = node ?? this.nodes.index;
    const client = this.nodes.client(index);
    const fn = (client[method] as (...args: unknown[]) => unknown).bind(client) as
      (request: Req, options: grpc.CallOptions, callback: grpc.requestCallback<Res>) => unknown;
    try {
      return await unary<Req, Res>(fn, request, options);
    } catch (error) {
      // Only the call that moves the client reports the move.
      if (error instanceof BusError && movesOn(error) && this.nodes.index === index) {
        const to = await this.nodes.failOver(index);
        this.nodes.report({ what, fromEndpoint: this.nodes.address(index), toEndpoint: this.nodes.address(to), error });
      }
      throw error;
    }
  }

  /** Polls health until the event API is SERVING on a node (the node in use first, then the
   * others in turn, moving to the first that serves); {@link UnavailableError} if none does in
   * time. */
  async waitReady(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let last = "no answer";
    for (;;) {
      const start = this.nodes.index;
      for (const index of [start, ...this.nodes.candidates(start).slice(0, -1)]) {
        const health = await this.nodes.health(index, HEALTH_SERVICE, 1000);
        if (health === "SERVING") {
          this.nodes.choose(start, index);
          return;
        }
        last = `${this.nodes.address(index)}: ${health}`;
      }
      if (Date.now() >= deadline) {
        throw new UnavailableError(grpc.status.UNAVAILABLE,
          `bus at ${this.endpoints.join(", ")} not serving after ${timeoutMs} ms (${last})`);
      }
      await delay(50);
    }
  }

  /** Publishes one event with a unary call; resolves to its sequence (for a duplicate
   * (source, id) within the bus's dedupe window, the original's). Rejects with
   * {@link InvalidArgumentError} (naming the field) or {@link EventTooLargeError} for an event
   * the bus refuses, {@link UnavailableError} when it cannot be reached. For many events, a
   * {@link Publisher} is faster. */
  async publish(topic: string, data?: Data, fields: Omit<EventInit, "topic" | "data"> = {}): Promise<Sequence> {
    const [sequence] = await this.publishBatch([{ ...fields, topic, data }]);
    return sequence;
  }

  /** Publishes events in order, all or none; resolves to their sequences, in order. Errors as
   * {@link publish}; the message names the failing event's index. */
  async publishBatch(events: EventInit[]): Promise<Sequence[]> {
    const response = await this.call<PublishRequest, PublishResponse__Output>("call", "Publish", {
      events: events.map((e) => toPb(e, this.source)),
    });
    return response.sequences.map(sequenceFromWire);
  }

  /** Asks a question over events; resolves to the reply event. Rejects with
   * {@link NoRespondersError} at once when nobody serves the topic, with
   * {@link QueryTimeoutError} when no reply comes in time, and with {@link RemoteError} when
   * the reply is an error reply (it has the attribute `error`: a responder's handler failed,
   * in any language). */
  async query(topic: string, data?: Data, options: QueryOptions = {}): Promise<Event> {
    const { timeoutMs, retry, backoff: backoffOptions, ...fields } = options;
    if (timeoutMs !== undefined && !(timeoutMs > 0)) {
      throw new RangeError(`timeoutMs: ${timeoutMs} is not positive`);
    }
    const request: QueryRequest = {
      event: toPb({ ...fields, topic, data }, this.source),
      timeout: timeoutMs === undefined ? null
        : { seconds: Math.floor(timeoutMs / 1000), nanos: (timeoutMs % 1000) * 1_000_000 },
    };
    // A little past the query's own timeout, so the bus's DEADLINE_EXCEEDED (with the reason
    // query-timeout and the topic) arrives before the transport gives up on its own.
    const backoff = new Backoff(backoffOptions);
    const giveUpAt = Date.now() + (timeoutMs ?? DEFAULT_QUERY_TIMEOUT_MS);
    let response: QueryResponse__Output;
    for (let attempt = 0; ; attempt++) {
      const callOptions = timeoutMs === undefined ? {} : { deadline: Date.now() + timeoutMs + 2000 };
      try {
        response = await this.call<QueryRequest, QueryResponse__Output>("query", "Query", request, callOptions);
        break;
      } catch (error) {
        const wait = backoff.delayMs(attempt);
        if (!retry || !(error instanceof NodeUnavailableError) || Date.now() + wait >= giveUpAt) throw error;
        await delay(wait);
      }
    }
    if (!response.reply) {
      throw new BusError(grpc.status.INTERNAL, "the bus answered a query without a reply");
    }
    const reply = fromPb(response.reply);
    if (reply.attributes[ERROR_ATTRIBUTE] !== undefined) throw RemoteError.fromReply(topic, reply);
    return reply;
  }

  /**
   * Subscribes to a topic pattern (`*` one token, `>` the rest); resolves once the bus has
   * confirmed, so every matching event published after that is delivered.
   *
   * With `manualAck` (and a `group`) the subscription is a MANUAL-ack group member and yields
   * {@link Delivery} objects: ack each once processed, or nack it to have it delivered again.
   * Rejects with {@link InvalidArgumentError} when the bus refuses the request (a bad pattern,
   * a replay for an AUTO group, a bad dead-letter topic), with `RangeError` for settings out
   * of range, and with {@link UnavailableError} when the bus cannot be reached.
   */
  subscribe(pattern: string, options: ManualSubscribeOptions): Promise<Subscription<Delivery>>;
  subscribe(pattern: string, options?: SubscribeOptions): Promise<Subscription<Event>>;
  subscribe(pattern: string, options: SubscribeOptions = {}): Promise<Subscription<Event | Delivery>> {
    if (options.manualAck && !options.group) {
      return Promise.reject(new TypeError("manualAck needs a group: MANUAL acks are kept per consumer group"));
    }
    return Subscription.open(this, pattern, { subscriber: this.source, ...options });
  }

  /** Confirms that a MANUAL-ack `group` has processed the events with these sequences: they
   * are not delivered again and the group's cursor moves past them. Rejects with a
   * {@link BusError} with code NOT_FOUND (`unknown-group`) when the bus has no such group. */
  async ack(group: string, sequences: Array<Sequence | number>, /** @internal */ node?: number): Promise<AckResult> {
    const response = await this.call<AckRequest, AckResponse__Output>("call", "Ack", {
      group,
      sequences: sequences.map((sequence) => sequenceToWire(sequence)),
    }, {}, node);
    return { acknowledged: response.acknowledged, groupCursor: sequenceFromWire(response.group_cursor) };
  }

  /** Hands events of a MANUAL-ack `group` back for redelivery, after at least
   * `redeliverAfterMs` milliseconds when given (the bus's redelivery backoff applies too).
   * Each nack counts as a delivery against the group's `maxDeliveries`. */
  async nack(group: string, sequences: Array<Sequence | number>, redeliverAfterMs?: number,
    /** @internal */ node?: number): Promise<NackResult> {
    const request: NackRequest = {
      group,
      sequences: sequences.map((sequence) => sequenceToWire(sequence)),
      redeliver_after: redeliverAfterMs === undefined ? null : durationFromMs(redeliverAfterMs, "redeliverAfterMs"),
    };
    const response = await this.call<NackRequest, NackResponse__Output>("call", "Nack", request, {}, node);
    return { requeued: response.requeued };
  }

  /** A batching, idempotent publisher over one `PublishStream` (see {@link Publisher}): the
   * fast way to publish many events. Close it when done. */
  publisher(options: PublisherOptions = {}): Publisher {
    return new Publisher(this, options);
  }

  /** @internal The generated gRPC client of the node in use. */
  get rpc(): EventBusServiceClient {
    return this.nodes.client(this.nodes.index);
  }

  /** Answers the queries on `topic` with `handler`, one at a time; `group` lets replicas share
   * them (use the service's name). Resolves once subscribed. */
  async serve(topic: string, group: string | undefined, handler: Handler): Promise<Responder> {
    const subscription = await this.subscribe(topic, { group });
    return new Responder(this, subscription, handler);
  }
}

/** An event of a MANUAL-ack group, to acknowledge once processed. Unacked within the
 * subscription's ack deadline, it is delivered again (to this or another member). */
export class Delivery {
  constructor(
    /** The event. */
    readonly event: Event,
    /** Which delivery of this event this is, from 1. */
    readonly attempt: number,
    /** The consumer group it was delivered to. */
    readonly group: string,
    private readonly bus: Bus,
    /** The node that delivered it: acks go there, where the group is. */
    private readonly node?: number,
  ) {}

  /** The event's sequence. */
  get sequence(): Sequence {
    return this.event.sequence;
  }

  /** Confirms the event is processed: it is not delivered again. See {@link Bus.ack}. Sent to
   * the node that delivered it; if that node is gone, this rejects and the group delivers the
   * event again (from the node its members moved to). */
  ack(): Promise<AckResult> {
    return this.bus.ack(this.group, [this.event.sequence], this.node);
  }

  /** Hands the event back, to be delivered again after at least `delayMs` milliseconds (the
   * bus's redelivery backoff alone when unset). See {@link Bus.nack}. */
  nack(delayMs?: number): Promise<NackResult> {
    return this.bus.nack(this.group, [this.event.sequence], delayMs, this.node);
  }
}

/** Tracks how far a subscription got, so a reopened stream goes on after the last event seen. */
class ResumePoint {
  lastSequence = 0n;
  headAtConfirmation: Sequence | undefined;

  constructor(
    public start: Start,
    readonly group: string | undefined,
    readonly manual: boolean,
    /** The log the position belongs to: the last `Subscribed.logId` seen (or the caller's). */
    public logId: string | undefined,
  ) {}

  /** Takes in a confirmation. When the bus says the position was from another log (or names
   * another log than the one seen), the position means nothing any more: start over at the
   * beginning of the new log (latest for an AUTO group), and return what changed. */
  confirmed(subscribed: Subscribed): LogChange | undefined {
    const previous = this.logId;
    if (subscribed.logId) this.logId = subscribed.logId;
    this.headAtConfirmation ??= subscribed.headSequence;
    const changed = subscribed.logChanged
      || (previous !== undefined && subscribed.logId !== "" && previous !== subscribed.logId);
    if (!changed) return undefined;
    const lastSeen = this.lastSequence > 0n ? this.lastSequence
      : typeof this.start === "bigint" ? this.start
        : typeof this.start === "number" ? BigInt(this.start) : 0n;
    this.lastSequence = 0n;
    this.headAtConfirmation = subscribed.headSequence;
    if (!this.manual) this.start = this.group ? "latest" : "earliest";
    return { previousLogId: previous ?? "", logId: subscribed.logId, lastSeen, headSequence: subscribed.headSequence };
  }

  /** Records a received sequence; false for one already delivered. A MANUAL-ack group's
   * redeliveries are on purpose, so they all pass. */
  isNew(sequence: Sequence): boolean {
    if (this.manual) return true;
    if (sequence <= this.lastSequence) return false;
    this.lastSequence = sequence;
    return true;
  }

  /** AUTO groups restart at latest: the bus refuses replay for them. A MANUAL group resumes
   * from its cursor on the bus whatever is asked, so it asks what it asked first. */
  nextStart(): Start {
    if (this.manual) return this.start;
    if (this.group) return "latest";
    if (this.lastSequence > 0n) return this.lastSequence;
    if (this.start === "latest" && this.headAtConfirmation !== undefined) return this.headAtConfirmation;
    return this.start;
  }
}

type Stream = grpc.ClientReadableStream<SubscribeResponse__Output>;

/** A live subscription: `for await (const event of subscription)`, or {@link next}. Yields
 * {@link Event}s, or {@link Delivery} objects for a MANUAL-ack group. */
export class Subscription<T extends Event | Delivery = Event> implements AsyncIterable<T> {
  /** How many times a broken stream was reopened. */
  resumes = 0;
  /** How many times the bus's log turned out to be another one (see
   * {@link SubscribeOptions.onLogChanged}). */
  logChanges = 0;
  /** The error that broke the stream most recently, resumed or not. */
  lastError: BusError | undefined;
  /** The bus's first confirmation. */
  confirmation: Subscribed | undefined;
  /** The sequence of the `caught_up` marker, once a replay reached the live head. */
  caughtUp: Sequence | undefined;
  /** How many times the subscription moved to another node. */
  failovers = 0;

  private readonly point: ResumePoint;
  /** The node the stream is open on. */
  private node: number;
  private readonly buffer: T[] = [];
  private readonly waiters: Array<() => void> = [];
  private call: Stream | undefined;
  private paused = false;
  private closed = false;
  private failure: BusError | undefined;

  private readonly backoff: Backoff;

  private constructor(
    private readonly bus: Bus,
    readonly pattern: string,
    private readonly options: SubscribeOptions & { subscriber: string },
  ) {
    this.node = bus.nodes.index;
    this.backoff = new Backoff(options.backoff);
    this.point = new ResumePoint(options.start ?? "latest", options.group, options.manualAck !== undefined,
      options.logId || undefined);
  }

  static async open<T extends Event | Delivery>(bus: Bus, pattern: string,
    options: SubscribeOptions & { subscriber: string }): Promise<Subscription<T>> {
    const subscription = new Subscription<T>(bus, pattern, options);
    const confirmTimeoutMs = options.confirmTimeoutMs ?? 10_000;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new DeadlineExceededError(grpc.status.DEADLINE_EXCEEDED,
        `no subscribed confirmation for ${pattern} within ${confirmTimeoutMs} ms`)), confirmTimeoutMs);
    });
    try {
      await Promise.race([subscription.openStream(subscription.point.start), timeout]);
    } catch (error) {
      subscription.close();
      throw error;
    } finally {
      clearTimeout(timer);
    }
    return subscription;
  }

  /** The next event; `null` once closed. Rejects with the ending error when the stream broke for
   * good, and with a `TimeoutError` when none comes within `timeoutMs`. */
  async next(timeoutMs?: number): Promise<T | null> {
    const deadline = timeoutMs === undefined ? undefined : Date.now() + timeoutMs;
    for (;;) {
      const event = this.buffer.shift();
      if (event) {
        if (this.paused && this.buffer.length <= this.highWater() / 2) {
          this.paused = false;
          this.call?.resume();
        }
        return event;
      }
      if (this.failure) throw this.failure;
      if (this.closed) return null;
      const left = deadline === undefined ? undefined : deadline - Date.now();
      if (left !== undefined && left <= 0) {
        const error = new Error(`no event on ${this.pattern} within ${timeoutMs} ms`);
        error.name = "TimeoutError";
        throw error;
      }
      await this.changed(left);
    }
  }

  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    for (;;) {
      const event = await this.next();
      if (event === null) return;
      yield event;
    }
  }

  /** Ends the subscription; iteration stops after the events already received. */
  close(): void {
    this.closed = true;
    this.call?.cancel();
    this.wake();
  }

  /** The node the subscription's stream is on, `host:port`. */
  get endpoint(): string {
    return this.bus.nodes.address(this.node);
  }

  private highWater(): number {
    return this.options.buffer ?? 1024;
  }

  /** Opens a stream; resolves once the bus confirms it, rejects if the bus refuses it. Events
   * after the confirmation go to the buffer; a later break reopens it. */
  private openStream(start: Start): Promise<Stream> {
    return new Promise((resolve, reject) => {
      const node = this.node;
      const call = this.bus.nodes.client(node).Subscribe(subscribeRequest(this.pattern, this.options.group,
        this.options.subscriber, start, { manualAck: this.options.manualAck, logId: this.point.logId,
          maxBatchEvents: this.options.maxBatchEvents }));
      this.call = call;
      let confirmed = false;
      call.on("data", (message: SubscribeResponse__Output) => {
        if (message.message === "subscribed" && message.subscribed) {
          if (!confirmed) {
            confirmed = true;
            const subscribed = subscribedFromPb(message.subscribed);
            // Here, before this stream's events: they belong to the new log.
            const change = this.point.confirmed(subscribed);
            this.confirmation ??= subscribed;
            if (change) {
              this.logChanges += 1;
              try {
                this.options.onLogChanged?.(change);
              } catch (error) {
                console.error(`onLogChanged of the subscription to ${this.pattern} threw:`, error);
              }
            }
            resolve(call);
          }
        } else if (message.message === "event" || message.message === "event_batch") {
          // A batch is taken apart here: each of its events goes through the same checks, in
          // order, as if it had come alone.
          const before = this.buffer.length;
          for (const [received, attempt] of receivedEvents(message)) {
            if (!this.point.isNew(sequenceFromWire(received.sequence))) continue;
            const event = fromPb(received);
            this.buffer.push((this.options.manualAck
              ? new Delivery(event, attempt, this.options.group ?? "", this.bus, node)
              : event) as T);
          }
          if (this.buffer.length > before) {
            if (!this.paused && this.buffer.length >= this.highWater()) {
              this.paused = true;
              call.pause();
            }
            this.wake();
          }
        } else if (message.message === "caught_up" && message.caught_up) {
          this.caughtUp = sequenceFromWire(message.caught_up.sequence);
        }
      });
      call.on("error", (error: grpc.ServiceError) => {
        const failure = fromServiceError(error);
        if (!confirmed) {
          reject(failure);
        } else if (call === this.call) {
          this.broken(failure);
        }
      });
      call.on("status", (status: grpc.StatusObject) => {
        if (status.code === grpc.status.OK && call === this.call) {
          const failure = new UnavailableError(grpc.status.UNAVAILABLE,
            "the bus ended the subscription stream");
          if (!confirmed) reject(failure);
          else this.broken(failure);
        }
      });
    });
  }

  private broken(failure: BusError): void {
    if (this.closed) {
      this.wake();
      return;
    }
    this.lastError = failure;
    if (this.options.resume === false || !isRetryableCode(failure.code)) {
      this.fail(failure);
      return;
    }
    void this.reopen();
  }

  /** Subscribes again until it works, with backoff before every attempt (the Rust SDK's
   * schedule), from right after the last event seen and naming the log it was seen in. Gives
   * up (the next `next()` rejects with the last error) on a refusal, after
   * `backoff.maxAttempts` failures in a row, or after `reconnectTimeoutMs`. */
  private async reopen(): Promise<void> {
    const giveUpAt = this.options.reconnectTimeoutMs === undefined ? Infinity
      : Date.now() + this.options.reconnectTimeoutMs;
    let failures = 0;
    this.paused = false;
    const brokeOn = this.node;
    const broke = this.lastError as BusError;
    let rejoinUntil: number | undefined;
    if (movesOn(broke)) this.node = await this.bus.nodes.failOver(this.node);
    while (!this.closed) {
      if (!this.backoff.allows(failures) || Date.now() >= giveUpAt) {
        this.fail(this.lastError as BusError);
        return;
      }
      await this.changed(Math.min(this.backoff.delayMs(failures), Math.max(0, giveUpAt - Date.now())));
      if (this.closed) break;
      try {
        await this.openStream(this.point.nextStart());
        this.resumes += 1;
        if (this.node !== brokeOn) {
          this.failovers += 1;
          const nodes = this.bus.nodes;
          nodes.report({ what: "subscription", fromEndpoint: nodes.address(brokeOn), toEndpoint: nodes.address(this.node),
            error: broke, pattern: this.pattern, afterSequence: this.options.manualAck ? undefined : this.point.lastSequence });
        }
        return;
      } catch (error) {
        const failure = error as BusError;
        if (this.closed) break;
        failures += 1;
        this.lastError = failure;
        if (isGroupElsewhere(failure)) {
          // The group's members are still on the old node: they leave when it dies or notices
          // this member is gone. Wait for that, for a bounded time.
          rejoinUntil ??= Date.now() + (this.options.rejoinTimeoutMs ?? 30_000);
          if (Date.now() >= rejoinUntil) {
            this.fail(failure);
            return;
          }
        } else if (!isRetryableCode(failure.code)) {
          this.fail(failure);
          return;
        } else if (movesOn(failure)) {
          this.node = await this.bus.nodes.failOver(this.node);
        }
      }
    }
    this.wake();
  }

  private fail(failure: BusError): void {
    this.failure = failure;
    this.wake();
  }

  private wake(): void {
    for (const waiter of this.waiters.splice(0)) waiter();
  }

  private changed(timeoutMs: number | undefined): Promise<void> {
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      const done = () => {
        clearTimeout(timer);
        resolve();
      };
      this.waiters.push(done);
      if (timeoutMs !== undefined) timer = setTimeout(done, timeoutMs);
    });
  }
}

/** Answers queries until {@link stop}. `handled` counts the queries answered. */
export class Responder {
  handled = 0;
  readonly topic: string;
  private readonly done: Promise<void>;

  constructor(private readonly bus: Bus, private readonly subscription: Subscription<Event>,
    private readonly handler: Handler) {
    this.topic = subscription.pattern;
    this.done = this.run();
  }

  /** Stops answering and waits for the query in hand. */
  async stop(): Promise<void> {
    this.subscription.close();
    await this.done;
  }

  /** Resolves when the responder stops. */
  wait(): Promise<void> {
    return this.done;
  }

  private async run(): Promise<void> {
    try {
      for await (const request of this.subscription) await this.answer(request);
    } catch (error) {
      console.error(`responder on ${this.topic} stopped: ${String(error)}`);
    }
  }

  private async answer(request: Event): Promise<void> {
    if (!request.replyTo) {
      console.warn(`event ${request.id} on ${this.topic} has no reply_to; not a query, ignored`);
      return;
    }
    let outcome: Reply | Data;
    try {
      outcome = await this.handler(request);
    } catch (error) {
      if (error instanceof ReplyError) {
        outcome = errorReply(error);
      } else {
        // A handler bug must not stop the responder.
        console.error(`handler for ${this.topic} failed on event ${request.id}:`, error);
        const name = error instanceof Error ? `${error.name}: ${error.message}` : String(error);
        outcome = errorReply(new ReplyError("internal", name));
      }
    }
    try {
      await this.bus.publishBatch([replyEvent(request, outcome, this.bus.source)]);
      this.handled += 1;
    } catch (error) {
      console.error(`reply to ${request.id} on ${this.topic} not published: ${String(error)}`);
    }
  }
}
