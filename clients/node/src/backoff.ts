/**
 * Reconnect delays: exponential, capped, with jitter, so that many clients cut off together (a
 * bus restart) do not all come back in the same instant. The schedule matches the Rust SDK's
 * `Backoff` (src/sdk/backoff.rs): 50 ms, doubling, at most 5 s, no limit on attempts; the
 * jitter defaults to *full* jitter (each delay a random point of `(0, capped]`), where the
 * Rust SDK takes off at most 30 %.
 */

/** How to wait between reconnect attempts. Every field is optional. */
export interface BackoffOptions {
  /** The delay before the first retry, in milliseconds (default 50). */
  initialMs?: number;
  /** The largest delay, in milliseconds (default 5000). */
  maxMs?: number;
  /** Growth per attempt (default 2). */
  multiplier?: number;
  /** The fraction of each delay (0 to 1) that is randomised away: 1 (the default) is full
   * jitter, a delay anywhere up to the capped one; 0 is none. */
  jitter?: number;
  /** Give up after this many failed attempts in a row (default `Infinity`: never). */
  maxAttempts?: number;
}

/** A reconnect schedule; see {@link BackoffOptions}. */
export class Backoff {
  readonly initialMs: number;
  readonly maxMs: number;
  readonly multiplier: number;
  readonly jitter: number;
  readonly maxAttempts: number;

  constructor(options: BackoffOptions = {}) {
    this.initialMs = options.initialMs ?? 50;
    this.maxMs = options.maxMs ?? 5000;
    this.multiplier = options.multiplier ?? 2;
    this.jitter = options.jitter ?? 1;
    this.maxAttempts = options.maxAttempts ?? Infinity;
    for (const [name, value] of Object.entries({ initialMs: this.initialMs, maxMs: this.maxMs, multiplier: this.multiplier })) {
      if (!(value >= 0) || !Number.isFinite(value)) throw new RangeError(`backoff ${name}: ${value} is not a finite number >= 0`);
    }
    if (!(this.maxAttempts >= 0)) throw new RangeError(`backoff maxAttempts: ${this.maxAttempts} is not >= 0`);
  }

  /** The delay in milliseconds before retry `attempt` (0-based) with `unit` a random number in
   * [0, 1): `min(maxMs, initialMs · multiplier^attempt) · (1 − jitter · unit)`. */
  delayMs(attempt: number, unit = Math.random()): number {
    const base = this.initialMs * Math.max(1, this.multiplier) ** attempt;
    const capped = Math.min(base, this.maxMs);
    const jitter = Math.min(1, Math.max(0, this.jitter)) * Math.min(1, Math.max(0, unit));
    return capped * (1 - jitter);
  }

  /** Whether another attempt is allowed after `failed` failures in a row. */
  allows(failed: number): boolean {
    return failed < this.maxAttempts;
  }
}
