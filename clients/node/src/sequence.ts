/**
 * Sequences as `bigint`, and the one place where they cross to and from the wire.
 *
 * The bus numbers events with a `uint64`. A JavaScript `number` is exact only to 2^53, so the
 * contract is loaded with `longs: String` (the wire's exact decimal digits) and every uint64
 * is turned into a `bigint` here, never into a `number`. Why `bigint` rather than decimal
 * strings: sequences are compared (`<=` drops duplicates on a resume), and strings compare by
 * characters (`"10" < "9"`); a `bigint` compares, sorts and does arithmetic exactly, and the
 * type checker keeps it apart from an ordinary number. The cost: `JSON.stringify` refuses a
 * `bigint`; convert with `String(sequence)` to log or serialise one.
 */

/** An event's position in the bus log: 1, 2, 3, ... up to 2^64 − 1. */
export type Sequence = bigint;

/** The largest sequence the wire can carry (2^64 − 1). */
export const MAX_SEQUENCE: Sequence = (1n << 64n) - 1n;

/** A uint64 as proto-loader hands it over (`longs: String`: decimal digits; a `number` or a
 * `Long` from other loader options) → `bigint`, exactly. */
export function sequenceFromWire(value: string | number | { toString(): string } | null | undefined): Sequence {
  if (value === null || value === undefined || value === "") return 0n;
  if (typeof value === "number") {
    if (!Number.isSafeInteger(value)) {
      throw new RangeError(`sequence ${value} arrived as an inexact number`);
    }
    return BigInt(value);
  }
  return BigInt(value.toString());
}

/** A sequence given by a caller (`bigint`, or a `number` that is a safe integer) → the
 * decimal string the wire takes. Throws `RangeError` for anything outside 0..2^64−1 or a
 * `number` that is not an exact integer. */
export function sequenceToWire(value: Sequence | number, what = "sequence"): string {
  return String(toSequence(value, what));
}

/** Checks and converts a caller's sequence; see {@link sequenceToWire}. */
export function toSequence(value: Sequence | number, what = "sequence"): Sequence {
  let sequence: bigint;
  if (typeof value === "bigint") sequence = value;
  else if (typeof value === "number" && Number.isSafeInteger(value)) sequence = BigInt(value);
  else throw new RangeError(`${what}: ${String(value)} is not an exact integer (use a bigint)`);
  if (sequence < 0n || sequence > MAX_SEQUENCE) {
    throw new RangeError(`${what}: ${sequence} is outside 0..2^64-1`);
  }
  return sequence;
}
