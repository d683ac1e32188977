/**
 * The client: {@link Bus} (publish, subscribe, query, serve), {@link Subscription} (an async
 * iterator that resumes a broken stream by itself) and {@link Responder}.
 *
 * A subscription reads its stream into a small buffer and pauses the stream while the buffer is
 * full, so a slow consumer still slows the stream down and the bus, not this process, decides
 * what a subscriber that falls behind does (it catches up from the bus's log, or past
 * `max_subscriber_lag` is ended). When the bus ends a stream (slow consumer, shutting down) or the
 * connection breaks, the subscription reopens it after the last sequence it saw: no duplicates,
 * and no gaps while the bus still holds the events.
 */
import * as grpc from "@grpc/grpc-js";

import {
  BusError,
  DeadlineExceededError,
  UnavailableError,
  fromServiceError,
  isResumable,
} from "./errors";
import {
  Event,
  Reply,
  ReplyError,
  errorReply,
  fromPb,
  replyEvent,
  subscribeRequest,
  toPb,
  type Data,
  type EventInit,
  type Start,
} from "./events";
import type { EventBusServiceClient } from "./generated/eventbus/v1/EventBusService";
import type { PublishRequest } from "./generated/eventbus/v1/PublishRequest";
import type { PublishResponse__Output } from "./generated/eventbus/v1/PublishResponse";
import type { QueryRequest } from "./generated/eventbus/v1/QueryRequest";
import type { QueryResponse__Output } from "./generated/eventbus/v1/QueryResponse";
import type { SubscribeResponse__Output } from "./generated/eventbus/v1/SubscribeResponse";
import type { Subscribed__Output } from "./generated/eventbus/v1/Subscribed";
import type { HealthClient } from "./generated/grpc/health/v1/Health";
import type { HealthCheckRequest } from "./generated/grpc/health/v1/HealthCheckRequest";
import type { HealthCheckResponse__Output } from "./generated/grpc/health/v1/HealthCheckResponse";
import { protos } from "./proto";

/** The environment variable naming the bus, shared with the Rust CLI. */
export const SERVER_ENV = "EVENTBUS_SERVER";
export const DEFAULT_TARGET = "127.0.0.1:50051";
const HEALTH_SERVICE = "eventbus.v1.EventBusService";
const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
};

/** A query handler: gets the query event, returns the reply data (or a {@link Reply}), or
 * throws {@link ReplyError} to answer with an error. */
export type Handler = (request: Event) => Reply | Data | Promise<Reply | Data>;

export interface BusOptions {
  /** This service's name: the source of its events and its name in the topology. */
  source?: string;
}

export interface SubscribeOptions {
  /** A consumer group: members share the events. */
  group?: string;
  /** Where to start; `latest` by default. Groups always start at `latest`. */
  start?: Start;
  /** The subscribing service's name; the bus client's source by default. */
  subscriber?: string;
  /** Reopen a broken stream after the last event seen (default true). */
  resume?: boolean;
  /** How long to keep trying to reopen a broken stream (default 30 s). */
  reconnectTimeoutMs?: number;
  /** How long to wait for the bus's confirmation (default 10 s). */
  confirmTimeoutMs?: number;
  /** Events read ahead of the caller before the stream is paused (default 1024). */
  buffer?: number;
}

export interface QueryOptions extends Omit<EventInit, "topic" | "data"> {
  /** How long to wait for the reply; the bus's default (5 s) when unset. */
  timeoutMs?: number;
}

/** Accepts `host:port`, `http://host:port` (plaintext) or `https://host:port` (TLS). */
export function parseTarget(target?: string): { address: string; tls: boolean } {
  const value = target || process.env[SERVER_ENV] || DEFAULT_TARGET;
  const tls = value.startsWith("https://");
  const address = value.replace(/^https?:\/\//, "").replace(/\/+$/, "");
  return { address, tls };
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

/** A connection to the bus. */
export class Bus {
  readonly address: string;
  readonly source: string;
  private readonly client: EventBusServiceClient;
  private readonly health: HealthClient;

  /** `target` defaults to `$EVENTBUS_SERVER`, else `127.0.0.1:50051`. */
  constructor(target?: string, options: BusOptions = {}) {
    const parsed = parseTarget(target);
    this.address = parsed.address;
    this.source = options.source ?? "node-client";
    const credentials = parsed.tls
      ? grpc.credentials.createSsl()
      : grpc.credentials.createInsecure();
    const loaded = protos();
    this.client = new loaded.eventbus.v1.EventBusService(this.address, credentials, CHANNEL_OPTIONS);
    this.health = new loaded.grpc.health.v1.Health(this.address, credentials, CHANNEL_OPTIONS);
  }

  /** Closes the connection; open subscriptions end. */
  close(): void {
    this.client.close();
    this.health.close();
  }

  /** Polls health until the event API is SERVING; {@link UnavailableError} if not in time. */
  async waitReady(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    let last = "no answer";
    for (;;) {
      try {
        const response = await unary<HealthCheckRequest, HealthCheckResponse__Output>(this.health.Check.bind(this.health), { service: HEALTH_SERVICE },
          { deadline: Date.now() + 1000 });
        if (response.status === "SERVING") return;
        last = String(response.status);
      } catch (error) {
        last = String(error);
      }
      if (Date.now() >= deadline) {
        throw new UnavailableError(grpc.status.UNAVAILABLE,
          `bus at ${this.address} not serving after ${timeoutMs} ms (${last})`);
      }
      await delay(50);
    }
  }

  /** Publishes one event; resolves to its sequence. */
  async publish(topic: string, data?: Data, fields: Omit<EventInit, "topic" | "data"> = {}): Promise<number> {
    const [sequence] = await this.publishBatch([{ ...fields, topic, data }]);
    return sequence;
  }

  /** Publishes events in order, all or none; resolves to their sequences. */
  async publishBatch(events: EventInit[]): Promise<number[]> {
    const response = await unary<PublishRequest, PublishResponse__Output>(this.client.Publish.bind(this.client), {
      events: events.map((e) => toPb(e, this.source)),
    });
    return response.sequences.map(Number);
  }

  /** Asks a question over events; resolves to the reply event. Rejects with
   * {@link NoRespondersError} at once when nobody serves the topic, and with
   * {@link QueryTimeoutError} when no reply comes in time. */
  async query(topic: string, data?: Data, options: QueryOptions = {}): Promise<Event> {
    const { timeoutMs, ...fields } = options;
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
    const callOptions = timeoutMs === undefined ? {} : { deadline: Date.now() + timeoutMs + 2000 };
    const response = await unary<QueryRequest, QueryResponse__Output>(this.client.Query.bind(this.client), request, callOptions);
    if (!response.reply) {
      throw new BusError(grpc.status.INTERNAL, "the bus answered a query without a reply");
    }
    return fromPb(response.reply);
  }

  /** Subscribes to a topic pattern (`*` one token, `>` the rest); resolves once the bus has
   * confirmed, so every matching event published after that is delivered. */
  subscribe(pattern: string, options: SubscribeOptions = {}): Promise<Subscription> {
    return Subscription.open(this.client, pattern, { subscriber: this.source, ...options });
  }

  /** Answers the queries on `topic` with `handler`, one at a time; `group` lets replicas share
   * them (use the service's name). Resolves once subscribed. */
  async serve(topic: string, group: string | undefined, handler: Handler): Promise<Responder> {
    const subscription = await this.subscribe(topic, { group });
    return new Responder(this, subscription, handler);
  }
}

/** Tracks how far a subscription got, so a reopened stream goes on after the last event seen. */
class ResumePoint {
  lastSequence = 0;
  headAtConfirmation: number | undefined;

  constructor(readonly start: Start, readonly group: string | undefined) {}

  confirmed(subscribed: Subscribed__Output): void {
    this.headAtConfirmation ??= Number(subscribed.head_sequence);
  }

  /** Records a received sequence; false for one already delivered. */
  isNew(sequence: number): boolean {
    if (sequence <= this.lastSequence) return false;
    this.lastSequence = sequence;
    return true;
  }

  /** Groups restart at latest: the bus refuses replay for groups. */
  nextStart(): Start {
    if (this.group) return "latest";
    if (this.lastSequence) return this.lastSequence;
    if (this.start === "latest" && this.headAtConfirmation !== undefined) return this.headAtConfirmation;
    return this.start;
  }
}

type Stream = grpc.ClientReadableStream<SubscribeResponse__Output>;

/** A live subscription: `for await (const event of subscription)`, or {@link next}. */
export class Subscription implements AsyncIterable<Event> {
  /** How many times a broken stream was reopened. */
  resumes = 0;
  /** The error that broke the stream most recently, resumed or not. */
  lastError: BusError | undefined;
  /** The bus's first confirmation. */
  confirmation: Subscribed__Output | undefined;
  /** The sequence of the `caught_up` marker, once a replay reached the live head. */
  caughtUp: number | undefined;

  private readonly point: ResumePoint;
  private readonly buffer: Event[] = [];
  private readonly waiters: Array<() => void> = [];
  private call: Stream | undefined;
  private paused = false;
  private closed = false;
  private failure: BusError | undefined;

  private constructor(
    private readonly client: EventBusServiceClient,
    readonly pattern: string,
    private readonly options: SubscribeOptions & { subscriber: string },
  ) {
    this.point = new ResumePoint(options.start ?? "latest", options.group);
  }

  static async open(client: EventBusServiceClient, pattern: string,
    options: SubscribeOptions & { subscriber: string }): Promise<Subscription> {
    const subscription = new Subscription(client, pattern, options);
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
  async next(timeoutMs?: number): Promise<Event | null> {
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

  async *[Symbol.asyncIterator](): AsyncIterator<Event> {
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

  private highWater(): number {
    return this.options.buffer ?? 1024;
  }

  /** Opens a stream; resolves once the bus confirms it, rejects if the bus refuses it. Events
   * after the confirmation go to the buffer; a later break reopens it. */
  private openStream(start: Start): Promise<Stream> {
    return new Promise((resolve, reject) => {
      const call = this.client.Subscribe(
        subscribeRequest(this.pattern, this.options.group, this.options.subscriber, start));
      this.call = call;
      let confirmed = false;
      call.on("data", (message: SubscribeResponse__Output) => {
        if (message.message === "subscribed" && message.subscribed) {
          if (!confirmed) {
            confirmed = true;
            this.point.confirmed(message.subscribed);
            this.confirmation ??= message.subscribed;
            resolve(call);
          }
        } else if (message.message === "event" && message.event) {
          if (this.point.isNew(Number(message.event.sequence))) {
            this.buffer.push(fromPb(message.event));
            if (!this.paused && this.buffer.length >= this.highWater()) {
              this.paused = true;
              call.pause();
            }
            this.wake();
          }
        } else if (message.message === "caught_up" && message.caught_up) {
          this.caughtUp = Number(message.caught_up.sequence);
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
    if (this.options.resume === false || !isResumable(failure)) {
      this.fail(failure);
      return;
    }
    void this.reopen();
  }

  private async reopen(): Promise<void> {
    const deadline = Date.now() + (this.options.reconnectTimeoutMs ?? 30_000);
    let backoff = 50;
    this.paused = false;
    while (!this.closed) {
      try {
        await this.openStream(this.point.nextStart());
        this.resumes += 1;
        return;
      } catch (error) {
        const failure = error as BusError;
        if (this.closed) break;
        this.lastError = failure;
        if (!isResumable(failure) || Date.now() >= deadline) {
          this.fail(failure);
          return;
        }
      }
      await delay(backoff);
      backoff = Math.min(backoff * 2, 1000);
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

  constructor(private readonly bus: Bus, private readonly subscription: Subscription,
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
