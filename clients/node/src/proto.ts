/**
 * Loads the eventbus.v1 contract at run time with @grpc/proto-loader, from the copy of
 * `proto/` that `npm run build` puts in `dist/proto` (override with `EVENTBUS_PROTO_DIR`).
 *
 * Why proto-loader rather than generated message classes: the wrapper converts every wire
 * message to its own types at one boundary anyway, so generated classes would add nothing but a
 * second code generator to keep in step. Type safety comes from `proto-loader-gen-types`, which
 * writes TypeScript interfaces for the same options into `src/generated` at build time (not
 * committed, like the Python stubs). The loader options below must match its flags in
 * package.json: keepCase, longs=String, enums=String, defaults, oneofs.
 */
import * as path from "node:path";

import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";

import type { ProtoGrpcType as EventbusTypes } from "./generated/eventbus";
import type { ProtoGrpcType as HealthTypes } from "./generated/health";

/** Where the .proto files are read from. */
export const PROTO_DIR = process.env.EVENTBUS_PROTO_DIR ?? path.join(__dirname, "..", "proto");

const LOADER_OPTIONS: protoLoader.Options = {
  keepCase: true,
  // uint64 as exact decimal strings, turned into bigint at one boundary (src/sequence.ts):
  // a Number would round sequences above 2^53.
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTO_DIR],
};

let definition: protoLoader.PackageDefinition | undefined;
let loaded: (EventbusTypes & HealthTypes) | undefined;

/** The contract as proto-loader reads it (loaded once): serialisers per method. */
export function packageDefinition(): protoLoader.PackageDefinition {
  definition ??= protoLoader.loadSync(
    ["eventbus/v1/eventbus.proto", "grpc/health/v1/health.proto"],
    LOADER_OPTIONS,
  );
  return definition;
}

/** The loaded service constructors (loaded once). */
export function protos(): EventbusTypes & HealthTypes {
  loaded ??= grpc.loadPackageDefinition(packageDefinition()) as unknown as EventbusTypes & HealthTypes;
  return loaded;
}
