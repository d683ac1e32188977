/**
 * {@link Publisher}: many events over one `PublishStream`, batched, with many batches in flight.
 *
 * One unary `Publish` per event pays a round trip each; the stream amortises that. The
 * publisher collects events into batches (up to `maxBatch` events or `maxBatchBytes`, or
 * whatever arrived within `lingerMs`), tags each with a `request_id`, and keeps up to
 * `maxInFlight` batches unanswered. Each event's promise settles when its batch's answer comes.
 * The queue in front of the batcher is bounded (`queue`): {@link Publisher.submit} waits for
 * room, so a fast producer that awaits it cannot fill memory.
 *
 * Failures: a batch the bus refuses (`PublishError`) fails exactly its own events with the
 * bus's code and reason; nothing of it was stored. Except an UNAVAILABLE answer other than
 * `no-responders` (`store-failed`: the node could not get the batch into its log in time): that
 * batch's fate is unknown, as below. When the stream itself breaks, the bus may or may not have
 * stored the batches in flight. Every event gets its id before its first send (a UUIDv7 when it
 * has none) and the bus deduplicates by (source, id) within its dedupe window (2 minutes by
 * default), so resending is safe: those batches, and the ones a node answered UNAVAILABLE, go
 * again with the same ids after a {@link Backoff} delay, up to `retries` times, in the order
 * they were published (however each one failed) and before anything newer; an event the bus
 * had stored is answered with its original sequence. After the last retry they fail with
 * {@link StreamBrokenError}. The same design as the Rust SDK's `Publisher`.
 *
 * On a clustered bus, a stream broken because its node is gone, or a batch answered
 * UNAVAILABLE by a node that is going (both `movesOn`), moves the publisher to another node
 * (see `nodes.ts`) for its next stream, and the resends go there: the nodes share JetStream's
 * dedupe window, so the cluster still stores each event once.
 */
import { randomFillSync } from "node:crypto";

import type * as grpc from "@grpc/grpc-js";
import { status } from "@grpc/grpc-js";

import { Backoff, type BackoffOptions } from "./backoff";
import type { Bus } from "./bus";
import {
  BusError,
  PublisherClosedError,
  StreamBrokenError,
  UnavailableError,
  errorClass,
  fromServiceError,
  isRetryableCode,
  movesOn,
} from "./errors";
import { toPb, type Data, type EventInit } from "./events";
import type { Event as PbEvent } from "./generated/eventbus/v1/Event";
import type { PublishStreamRequest } from "./generated/eventbus/v1/PublishStreamRequest";
import type { PublishStreamResponse__Output } from "./generated/eventbus/v1/PublishStreamResponse";
import { sequenceFromWire, type Sequence } from "./sequence";

/** Tuning of a {@link Publisher}; every field is optional. */
export interface PublisherOptions {
  /** Most events in one batch (default 512). */
  maxBatch?: number;
  /** A batch is sent once its events' size reaches this many bytes (default 1 MiB; keep it
   * under the bus's `--max-message-bytes`). */
  maxBatchBytes?: number;
  /** How long the first event of a batch may wait for company, in milliseconds (default 2). */
  lingerMs?: number;
  /** Most batches sent and not yet answered (default 16). */
  maxInFlight?: number;
  /** Events queued in front of the batcher before {@link Publisher.submit} waits (default
   * 4096). */
  queue?: number;
  /** Times a batch whose fate is unknown (its stream broke, or its node answered UNAVAILABLE)
   * is sent again, with the same event ids, before its events fail with
   * {@link StreamBrokenError} (default 5, as the Rust SDK). `Infinity` never gives up. */
  retries?: number;
  /** Delays before those resends (default: 50 ms doubling to 5 s, full jitter). */
  retryBackoff?: BackoffOptions;
}

/** One queued event: its id (fixed before the first send) and its outcome. */
export interface PendingPublish {
  /** The event's id: the one given, or the UUIDv7 the publisher gave it. */
  readonly id: string;
  /** Resolves to the event's sequence once its batch is answered (for a duplicate, the
   * original's); rejects with the bus's error for a refused batch, {@link StreamBrokenError}
   * after the last resend, or {@link PublisherClosedError}. */
  readonly sequence: Promise<Sequence>;
}

interface Item {
  event: PbEvent;
  bytes: number;
  resolve: (sequence: Sequence) => void;
  reject: (error: BusError) => void;
}

interface SentBatch {
  items: Item[];
  /** Sends so far. */
  attempts: number;
  /** The batch's place in the publisher's order, fixed when it is made: batches waiting to be
   * sent again are kept in this order, whichever way their sends failed (a refused batch goes
   * out again with a newer request id than the batches behind it that were in flight), so the
   * bus stores a publisher's events in the order they were published. */
  order: number;
  /** When it may be sent again (`Date.now()` ms), once queued to be. */
  due: number;
}

type Stream = grpc.ClientDuplexStream<PublishStreamRequest, PublishStreamResponse__Output>;

/** A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then random bits; sorts by time. */
export function uuidv7(now = Date.now()): string {
  const bytes = randomFillSync(new Uint8Array(16));
  let ms = now;
  for (let i = 5; i >= 0; i--) {
    bytes[i] = ms % 256;
    ms = Math.floor(ms / 256);
  }
  bytes[6] = (bytes[6] & 0x0f) | 0x70;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Buffer.from(bytes).toString("hex");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/** About the encoded size of an event, for `maxBatchBytes`. */
function sizeOf(event: PbEvent): number {
  let bytes = 32 + (event.data as Buffer).length;
  for (const text of [event.id, event.source, event.type, event.topic, event.data_content_type,
    event.correlation_id, event.causation_id, event.reply_to]) bytes += Buffer.byteLength(text ?? "");
  for (const [key, value] of Object.entries(event.attributes ?? {})) bytes += 4 + Buffer.byteLength(key) + Buffer.byteLength(value);
  return bytes;
}

/**
 * A batching, idempotent publisher over one `PublishStream`; made by {@link Bus.publisher}.
 * See the module docs for batching and what happens when the stream breaks.
 *
 * ```ts
 * const publisher = bus.publisher({ lingerMs: 5 });
 * const sequences = await Promise.all(orders.map((order) => publisher.publish("orders.created", order)));
 * await publisher.close();
 * ```
 */
export class Publisher {
  /** How many times the stream broke and was opened again. */
  reconnects = 0;
  /** Batches sent again: after a broken stream, or answered UNAVAILABLE by their node. */
  resentBatches = 0;
  /** Times the publisher moved to another node. */
  failovers = 0;
  /** Events the bus answered as duplicates (already stored with the same source and id): after
   * a broken stream, the resent events that the bus had stored the first time. */
  duplicates = 0;

  private readonly maxBatch: number;
  private readonly maxBatchBytes: number;
  private readonly lingerMs: number;
  private readonly maxInFlight: number;
  private readonly queueLimit: number;
  private readonly retries: number;
  private readonly backoff: Backoff;

  private pending: Item[] = [];
  private pendingBytes = 0;
  private lingerDeadline: number | undefined;
  private force = false;
  private readonly inFlight = new Map<string, SentBatch>();
  /** Batches whose fate is unknown, to send again in their order (`SentBatch.order`): the
   * front one once it is due, and no new batch before them. */
  private resend: SentBatch[] = [];
  private nextOrder = 0;
  private timer: NodeJS.Timeout | undefined;
  private nextId = 1;
  private stream: Stream | undefined;
  /** The node the open stream is on. */
  private streamNode = 0;
  /** The node new streams open on. */
  private node: number;
  /** A move to another node is being chosen: nothing is sent until it is. */
  private moving = false;
  private readonly outstanding = new Set<Promise<unknown>>();
  private readonly roomWaiters: Array<() => void> = [];
  private closing = false;
  private closed: Promise<void> | undefined;
  private closedResolve: (() => void) | undefined;

  /** Use {@link Bus.publisher}. */
  constructor(private readonly bus: Bus, options: PublisherOptions = {}) {
    this.maxBatch = Math.max(1, options.maxBatch ?? 512);
    this.maxBatchBytes = Math.max(1, options.maxBatchBytes ?? 1024 * 1024);
    this.lingerMs = Math.max(0, options.lingerMs ?? 2);
    this.maxInFlight = Math.max(1, options.maxInFlight ?? 16);
    this.queueLimit = Math.max(1, options.queue ?? 4096);
    this.retries = Math.max(0, options.retries ?? 5);
    this.backoff = new Backoff(options.retryBackoff);
    this.node = bus.nodes.index;
  }

  /** Publishes one event; resolves to its sequence once its batch is answered. Errors: see
   * {@link PendingPublish.sequence}. */
  async publish(topic: string, data?: Data, fields: Omit<EventInit, "topic" | "data"> = {}): Promise<Sequence> {
    return (await this.submit({ ...fields, topic, data })).sequence;
  }

  /** Queues an event, waiting only for room in the queue, and returns its id and the promise of
   * its sequence, so one caller can have many events in flight. The id is fixed here, before
   * the first send (the event's own, else a fresh UUIDv7). Rejects with
   * {@link PublisherClosedError} once {@link close} was called. */
  async submit(init: EventInit): Promise<PendingPublish> {
    while (!this.closing && this.pending.length >= this.queueLimit) {
      await new Promise<void>((resolve) => this.roomWaiters.push(resolve));
    }
    if (this.closing) throw new PublisherClosedError();
    const event = toPb(init, this.bus.source);
    // Fixed before the first send, so a resend after a broken stream is the same event to the bus.
    if (!event.id) event.id = uuidv7();
    let resolve!: (sequence: Sequence) => void;
    let reject!: (error: BusError) => void;
    const sequence = new Promise<Sequence>((yes, no) => {
      resolve = yes;
      reject = no;
    });
    const settled = sequence.then(() => undefined, () => undefined);
    this.outstanding.add(settled);
    void settled.then(() => this.outstanding.delete(settled));
    if (this.pending.length === 0) this.lingerDeadline = Date.now() + this.lingerMs;
    const bytes = sizeOf(event);
    this.pending.push({ event, bytes, resolve, reject });
    this.pendingBytes += bytes;
    this.pump();
    return { id: event.id as string, sequence };
  }

  /** Sends what is queued now and resolves once every event submitted before this call is
   * answered, successfully or not. */
  async flush(): Promise<void> {
    const waiting = [...this.outstanding];
    this.force = this.pending.length > 0;
    this.pump();
    await Promise.all(waiting);
  }

  /** Sends what is queued, waits for every answer, and ends the stream. Later
   * {@link submit}/{@link publish} calls reject with {@link PublisherClosedError}. */
  close(): Promise<void> {
    if (!this.closed) {
      this.closing = true;
      this.closed = new Promise((resolve) => (this.closedResolve = resolve));
      for (const wake of this.roomWaiters.splice(0)) wake();
      this.pump();
    }
    return this.closed;
  }

  private batchDue(now: number): boolean {
    return this.pending.length > 0 && (this.force || this.closing
      || this.pending.length >= this.maxBatch || this.pendingBytes >= this.maxBatchBytes
      || (this.lingerDeadline !== undefined && now >= this.lingerDeadline));
  }

  /** Moves the state on: resends first (so the stream keeps the publisher's order), then due
   * batches while there is room in flight; then arms the one timer for what comes next. */
  private pump(): void {
    if (this.moving) return; // pumped again once the next node is chosen
    const now = Date.now();
    // The front batch once it is due (each waits its own backoff); the others behind it.
    while (this.resend.length > 0 && now >= this.resend[0].due && this.inFlight.size < this.maxInFlight) {
      this.send(this.resend.shift() as SentBatch);
    }
    while (this.resend.length === 0 && this.batchDue(now) && this.inFlight.size < this.maxInFlight) {
      this.sendBatch();
    }
    while (this.roomWaiters.length > 0 && this.pending.length < this.queueLimit) this.roomWaiters.shift()?.();
    if (this.closing && this.pending.length === 0 && this.inFlight.size === 0 && this.resend.length === 0) {
      clearTimeout(this.timer);
      this.timer = undefined;
      this.stream?.end();
      this.stream = undefined;
      this.closedResolve?.();
      return;
    }
    this.arm(now);
  }

  private arm(now: number): void {
    clearTimeout(this.timer);
    this.timer = undefined;
    let at: number | undefined;
    if (this.resend.length > 0) at = this.resend[0].due;
    else if (this.pending.length > 0 && this.lingerDeadline !== undefined && this.inFlight.size < this.maxInFlight) {
      at = this.lingerDeadline;
    }
    if (at !== undefined) this.timer = setTimeout(() => this.pump(), Math.max(0, at - now));
  }

  /** Sends up to one batch's worth of the collected events. */
  private sendBatch(): void {
    let take = 0;
    let bytes = 0;
    for (const item of this.pending) {
      if (take > 0 && (take === this.maxBatch || bytes + item.bytes > this.maxBatchBytes)) break;
      bytes += item.bytes;
      take += 1;
    }
    const items = this.pending.splice(0, take);
    this.pendingBytes -= bytes;
    if (this.pending.length === 0) {
      this.lingerDeadline = undefined;
      this.force = false;
    } else {
      this.lingerDeadline = Date.now() + this.lingerMs;
    }
    this.send({ items, attempts: 0, order: this.nextOrder++, due: 0 });
  }

  /** Sends one batch on the open stream, or on a new one. */
  private send(batch: SentBatch): void {
    const requestId = String(this.nextId++);
    batch.attempts += 1;
    if (batch.attempts > 1) this.resentBatches += 1;
    const stream = this.stream ?? this.open();
    this.inFlight.set(requestId, batch);
    stream.write({ request_id: requestId, events: batch.items.map((item) => item.event) });
  }

  private open(): Stream {
    const stream = this.bus.nodes.client(this.node).PublishStream();
    this.stream = stream;
    this.streamNode = this.node;
    stream.on("data", (response: PublishStreamResponse__Output) => {
      if (stream === this.stream) this.answer(response);
    });
    stream.on("error", (error: grpc.ServiceError) => {
      if (stream === this.stream) this.broken(fromServiceError(error));
    });
    stream.on("status", (end: grpc.StatusObject) => {
      if (end.code === status.OK && stream === this.stream) {
        this.broken(new UnavailableError(status.UNAVAILABLE, "the bus ended the publish stream"));
      }
    });
    return stream;
  }

  private answer(response: PublishStreamResponse__Output): void {
    const batch = this.inFlight.get(response.request_id);
    if (!batch) return; // an answer to a batch of a stream given up on; cannot happen on one stream
    this.inFlight.delete(response.request_id);
    const { items } = batch;
    if (response.result === "published" && response.published) {
      const sequences = response.published.sequences;
      if (sequences.length === items.length) {
        for (const duplicate of response.published.duplicates) if (duplicate) this.duplicates += 1;
        items.forEach((item, i) => item.resolve(sequenceFromWire(sequences[i])));
      } else {
        const message = `${sequences.length} sequences for a batch of ${items.length} events`;
        for (const item of items) item.reject(new BusError(status.INTERNAL, message));
      }
    } else if (response.result === "error" && response.error) {
      const { code, message, reason } = response.error;
      const Class = errorClass(code, reason || undefined);
      const error = new Class(code, message, reason || undefined);
      if (movesOn(error)) {
        // The node could not store it now (its log is unreachable): its fate is unknown, so it
        // is sent again with the same ids, as after a broken stream. The node is going: the
        // next stream opens elsewhere; this one is kept for the answers still due on it, as
        // the Rust SDK does.
        this.retryOrFail(batch, error, "the node did not confirm the batch", Date.now());
        this.moveOff(this.streamNode, error);
        return;
      }
      for (const item of items) item.reject(error);
    } else {
      for (const item of items) item.reject(new BusError(status.INTERNAL, "a batch answer with neither sequences nor error"));
    }
    this.pump();
  }

  /** The stream is gone: what is in flight may or may not be stored, so it is sent again on
   * a new stream (the bus deduplicates by event id), up to the retry limit. */
  private broken(error: BusError): void {
    const stream = this.stream;
    this.stream = undefined;
    stream?.cancel();
    if (this.inFlight.size > 0) this.reconnects += 1;
    const batches = [...this.inFlight.values()];
    this.inFlight.clear();
    const retryable = isRetryableCode(error.code);
    const now = Date.now();
    for (const batch of batches) {
      if (retryable) this.retryOrFail(batch, error, "publish stream broke before the batch was acknowledged", now);
      else for (const item of batch.items) item.reject(error);
    }
    if (movesOn(error)) {
      this.moveOff(this.streamNode, error);
      return;
    }
    this.pump();
  }

  /** Queues a batch whose fate is unknown to be sent again after its backoff, or fails its
   * events with {@link StreamBrokenError} (saying `what` happened) once its resends are used
   * up. */
  private retryOrFail(batch: SentBatch, error: BusError, what: string, now: number): void {
    if (batch.attempts > this.retries) {
      const lost = new StreamBrokenError(error.code,
        `${what}, ${batch.attempts} sends (it may or may not be stored): ${error.details}`, error.reason);
      for (const item of batch.items) item.reject(lost);
      return;
    }
    batch.due = now + this.backoff.delayMs(batch.attempts - 1);
    // In its place by order, however it failed: batches in flight go back in front of those
    // waiting (which wait while resends go out first), and a refused batch sent again on the
    // same stream, so with a newer request id than the batches behind it, still goes before
    // them.
    const at = this.resend.findIndex((queued) => queued.order > batch.order);
    this.resend.splice(at === -1 ? this.resend.length : at, 0, batch);
  }

  /** The node `from` is gone or going (`error`): chooses the node for the next stream (probing
   * health takes a moment, and nothing is sent meanwhile), then pumps. */
  private moveOff(from: number, error: BusError): void {
    if (this.moving) return; // a move being chosen already; it pumps when it is
    this.moving = true;
    // A probe on a client closed meanwhile rejects: stay, and let the next send fail there.
    void this.bus.nodes.failOver(from).catch(() => this.node).then((to) => {
      this.moving = false;
      // When the client already left `from` (another call, or an earlier answer on this
      // stream, moved it), `to` is where it went.
      if (to !== this.node) {
        const was = this.node;
        this.node = to;
        this.failovers += 1;
        const nodes = this.bus.nodes;
        nodes.report({ what: "publisher", fromEndpoint: nodes.address(was), toEndpoint: nodes.address(to), error });
      }
      this.pump();
    });
  }
}
