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
 * │   └── ShuttingDownError       (shutting-down)
 * ├── DeadlineExceededError       DEADLINE_EXCEEDED
 * │   └── QueryTimeoutError       (query-timeout)
 * ├── ResourceExhaustedError      RESOURCE_EXHAUSTED
 * │   ├── SlowConsumerError       (slow-consumer)
 * │   └── ReplayOverrunError      (replay-overrun)
 * └── CancelledError              CANCELLED
 * ```
 */
import { status, type ServiceError } from "@grpc/grpc-js";

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
}

/** The request broke a rule; `details` names the field and the rule. */
export class InvalidArgumentError extends BusError {}
/** An event's data is over the bus's size limit. */
export class EventTooLargeError extends InvalidArgumentError {}
/** The bus cannot take the call now. */
export class UnavailableError extends BusError {}
/** A query's topic had no subscriber, so no reply could come. Raised at once. */
export class NoRespondersError extends UnavailableError {}
/** The bus is stopping. */
export class ShuttingDownError extends UnavailableError {}
/** A deadline passed. */
export class DeadlineExceededError extends BusError {}
/** No reply to a query came in time. */
export class QueryTimeoutError extends DeadlineExceededError {}
/** A limit of the bus was reached. */
export class ResourceExhaustedError extends BusError {
  /** The sequence to resume after, when the bus named one. */
  get lastDelivered(): number | undefined {
    const match = /after_sequence=(\d+)/.exec(this.details);
    return match ? Number(match[1]) : undefined;
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
  "query-timeout": QueryTimeoutError,
  "slow-consumer": SlowConsumerError,
  "replay-overrun": ReplayOverrunError,
};

const BY_CODE: Partial<Record<status, ErrorClass>> = {
  [status.INVALID_ARGUMENT]: InvalidArgumentError,
  [status.UNAVAILABLE]: UnavailableError,
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

/** Whether a broken subscription is worth reopening: the bus ended it with a place to resume
 * from, or the bus or the connection went away for a while. */
export function isResumable(error: BusError): boolean {
  return error instanceof ResourceExhaustedError || error instanceof UnavailableError;
}
