/**
 * Errors that keep the gRPC status.
 *
 * Every failed call becomes a {@link BusError} with the status `code`, its `details` and the
 * bus's stable `reason`: the `eventbus-error` metadata the bus puts on every error status
 * (src/service/status.rs), because several errors share a code ("no responders" and "shutting
 * down" are both UNAVAILABLE). The reason picks the class; transport failures without one are
 * classified by code alone.
 *
 * ```text
 * BusError
 * ├── InvalidArgumentError        INVALID_ARGUMENT
 * │   └── EventTooLargeError      (event-too-large)
 * ├── UnavailableError            UNAVAILABLE
 * │   ├── NoRespondersError       (no-responders)
 * │   └── NodeUnavailableError    the node is gone or going: no reason, or store-failed;
 * │       │                       the call may be retried (on another node)
 * │       └── ShuttingDownError   (shutting-down)
 * ├── DeadlineExceededError       DEADLINE_EXCEEDED
 * │   └── QueryTimeoutError       (query-timeout)
 * ├── ResourceExhaustedError      RESOURCE_EXHAUSTED
 * │   ├── SlowConsumerError       (slow-consumer)
 * │   └── ReplayOverrunError      (replay-overrun)
 * ├── CancelledError              CANCELLED
 * │   └── PublisherClosedError    (the publisher was closed)
 * ├── StreamBrokenError           the publish stream's code, after the last resend
 * └── RemoteError                 UNKNOWN: a query's reply was an error reply
 * ```
 */
import { status, type ServiceError } from "@grpc/grpc-js";

import type { Event } from "./events";

/** The metadata key of the bus's stable error reason. */
export const ERROR_REASON_KEY = "eventbus-error";

/** A failed call to the bus. */
export class BusError extends Error {
  constructor(
    /** The gRPC status code. */
    readonly code: status,
    /** The status message. */
    readonly details: string,
    /** The bus's stable reason, e.g. `no-responders`; undefined when not from the bus. */
    readonly reason?: string,
  ) {
    super(`${status[code]}: ${details}`);
    this.name = new.target.name;
  }

  /** The code's name, e.g. `UNAVAILABLE`. */
  get codeName(): string {
    return status[this.code];
  }

  /** Whether the same call may succeed if made again (see {@link NodeUnavailableError}). */
  get retryable(): boolean {
    return false;
  }
}

/** The request broke a rule; `details` names the field and the rule. */
export class InvalidArgumentError extends BusError {}
/** An event's data is over the bus's size limit. */
export class EventTooLargeError extends InvalidArgumentError {}
/** The bus cannot take the call now. */
export class UnavailableError extends BusError {}
/** A query's topic had no subscriber, so no reply could come. Raised at once. */
export class NoRespondersError extends UnavailableError {}
/** The bus node the call went to is gone or going: unreachable, the connection broke under the
 * call, stopping, or it lost its store (`store-failed`). The call may be retried; a client
 * given several nodes has moved to another by the time this is thrown. */
export class NodeUnavailableError extends UnavailableError {
  override get retryable(): boolean {
    return true;
  }
}
/** The bus is stopping. */
export class ShuttingDownError extends NodeUnavailableError {}
/** A deadline passed. */
export class DeadlineExceededError extends BusError {}
/** No reply to a query came in time. */
export class QueryTimeoutError extends DeadlineExceededError {}
/** A limit of the bus was reached. */
export class ResourceExhaustedError extends BusError {
  /** The sequence to resume after, when the bus named one. */
  get lastDelivered(): bigint | undefined {
    const match = /after_sequence=(\d+)/.exec(this.details);
    return match ? BigInt(match[1]) : undefined;
  }
}
/** A subscription fell further behind than the bus's `max_subscriber_lag` and the bus ended it. */
export class SlowConsumerError extends ResourceExhaustedError {}
/** A replay fell behind the bus's retention. */
export class ReplayOverrunError extends ResourceExhaustedError {}
/** The call was cancelled (usually by `close()`). */
export class CancelledError extends BusError {}

type ErrorClass = new (code: status, details: string, reason?: string) => BusError;

const BY_REASON: Record<string, ErrorClass> = {
  "invalid-argument": InvalidArgumentError,
  "event-too-large": EventTooLargeError,
  "no-responders": NoRespondersError,
  "shutting-down": ShuttingDownError,
  "store-failed": NodeUnavailableError,
  "query-timeout": QueryTimeoutError,
  "slow-consumer": SlowConsumerError,
  "replay-overrun": ReplayOverrunError,
};

const BY_CODE: Partial<Record<status, ErrorClass>> = {
  [status.INVALID_ARGUMENT]: InvalidArgumentError,
  [status.UNAVAILABLE]: NodeUnavailableError,
  [status.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [status.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [status.CANCELLED]: CancelledError,
};

/** The error class for a status: by reason when the bus gave one, else by code. */
export function errorClass(code: status, reason?: string): ErrorClass {
  return (reason !== undefined && BY_REASON[reason]) || BY_CODE[code] || BusError;
}

/** Converts a failed grpc-js call into the matching {@link BusError}. */
export function fromServiceError(error: ServiceError): BusError {
  const values = error.metadata?.get(ERROR_REASON_KEY) ?? [];
  const reason = values.length > 0 ? values[0].toString() : undefined;
  const Class = errorClass(error.code, reason);
  return new Class(error.code, error.details ?? error.message, reason);
}

/**
 * The responder answering a query sent an error reply: one with the attribute `error`. Two
 * shapes are understood: the Rust SDK's (type `eventbus.error`, the attribute and the text
 * data hold the message) and the scenario protocol's, which this client's responders send for
 * a {@link ReplyError} (attribute `error` = a code such as `not_found`, data
 * `{"error": {"code", "message"}}`). The gRPC code is UNKNOWN, as the Rust SDK's
 * `Error::Remote`: the failure was the responder's, not the bus's.
 */
export class RemoteError extends BusError {
  constructor(
    /** The query's topic. */
    readonly topic: string,
    /** The responder's error message. */
    readonly remoteMessage: string,
    /** The whole error reply. */
    readonly reply: Event,
    /** The error code of a scenario-protocol reply (`not_found`, `invalid`, ...); undefined
     * for the Rust SDK's replies, which carry a message only. */
    readonly errorCode?: string,
  ) {
    super(status.UNKNOWN, `the responder on ${topic} failed: ${remoteMessage}`);
  }

  /** The error of an error reply to a query on `topic`. */
  static fromReply(topic: string, reply: Event): RemoteError {
    const attribute = reply.attributes.error ?? "";
    try {
      const body = reply.dataContentType.startsWith("application/json")
        ? reply.json<{ error?: { code?: unknown; message?: unknown } }>() : undefined;
      if (body && typeof body === "object" && body.error && typeof body.error.message === "string") {
        const code = typeof body.error.code === "string" ? body.error.code : attribute;
        return new RemoteError(topic, body.error.message, reply, code);
      }
    } catch {
      // Not JSON: the Rust SDK's shape, the message is the attribute.
    }
    return new RemoteError(topic, attribute || reply.text(), reply);
  }
}

/** Whether a call that failed with `code` may succeed if made again (the bus or the connection
 * went away, a limit was reached for a while); refusals of the request itself are final.
 * The same split as the Rust SDK's `is_retryable`. */
export function isRetryableCode(code: status): boolean {
  switch (code) {
    case status.OK:
    case status.CANCELLED:
    case status.UNKNOWN:
    case status.DEADLINE_EXCEEDED:
    case status.RESOURCE_EXHAUSTED:
    case status.ABORTED:
    case status.INTERNAL:
    case status.UNAVAILABLE:
    case status.DATA_LOSS:
      return true;
    default:
      return false;
  }
}

/** The publish stream broke while this event's batch was in flight, and it was sent again up
 * to the publisher's `retries` without an answer. The bus may or may not have stored it (with
 * the same id, a later publish of it is deduplicated within the bus's dedupe window). */
export class StreamBrokenError extends BusError {}

/** The {@link Publisher} was closed before the event was handed to it. */
export class PublisherClosedError extends CancelledError {
  constructor(details = "the publisher is closed") {
    super(status.CANCELLED, details);
  }
}

/** Whether a broken subscription is worth reopening: see {@link isRetryableCode}. */
export function isResumable(error: BusError): boolean {
  return isRetryableCode(error.code);
}

/** Whether a failure says the node is gone or going, so another node may serve: UNAVAILABLE
 * (a refused or broken connection, `shutting-down`, `store-failed`) but not `no-responders`,
 * which every node would answer alike. The Rust SDK's rule. */
export function movesOn(error: BusError): boolean {
  return error.code === status.UNAVAILABLE && error.reason !== "no-responders";
}

/** FAILED_PRECONDITION `group-on-another-node`: on a cluster, the group moved to another node
 * while this member joined it through a third; worth retrying. */
export function isGroupElsewhere(error: BusError): boolean {
  return error.code === status.FAILED_PRECONDITION && error.reason === "group-on-another-node";
}
