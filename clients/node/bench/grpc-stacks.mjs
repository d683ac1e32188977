// One-run comparison of two gRPC stacks on the same bus, same machine: @grpc/grpc-js with
// @grpc/proto-loader (what this client uses) against @connectrpc/connect-node with
// @bufbuild/protobuf (its gRPC transport; descriptors built at run time from what proto-loader
// read of the same .proto, so no code generator is needed for the measurement).
//
// Measures sequential unary Publish round trips (one 64-byte event each) and subscribe
// throughput (a replay from `earliest` of pre-published 128-byte events), each stack twice,
// interleaved; then the same replay through this client's Subscription (conversion to Event
// included). Run it outside the package, which does not depend on Connect:
//
//   tmp=$(mktemp -d) && cp bench/grpc-stacks.mjs "$tmp" && cd "$tmp"
//   echo '{"type":"module","private":true}' > package.json
//   npm install @connectrpc/connect@2 @connectrpc/connect-node@2 @bufbuild/protobuf@2
//   eventbus serve --listen 127.0.0.1:50671 --storage memory &
//   CLIENT_DIR=/path/to/clients/node node grpc-stacks.mjs 127.0.0.1:50671 3000 100000
//
// (after `npm run build` in clients/node.)
import { createRequire } from "node:module";
import * as path from "node:path";

const NODE = process.env.CLIENT_DIR;
if (!NODE) throw new Error("set CLIENT_DIR to the built clients/node directory");
const require = createRequire(path.join(NODE, "package.json"));
const grpc = require("@grpc/grpc-js");
const { packageDefinition } = require(path.join(NODE, "dist/src/proto.js"));
const { Bus } = require(path.join(NODE, "dist/src/index.js"));

import { create, fromBinary, createFileRegistry } from "@bufbuild/protobuf";
import { FileDescriptorSetSchema, FileDescriptorProtoSchema } from "@bufbuild/protobuf/wkt";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

const address = process.argv[2];
const ROUND_TRIPS = Number(process.argv[3] ?? 3000);
const EVENTS = Number(process.argv[4] ?? 100000);

// grpc-js raw client (proto-loader objects, longs as strings: as the client loads them).
const definition = packageDefinition();
const GrpcService = grpc.makeClientConstructor(definition["eventbus.v1.EventBusService"], "EventBusService");
const grpcClient = new GrpcService(address, grpc.credentials.createInsecure());

// Connect: the same files' descriptors, as proto-loader read them.
const seen = new Set();
const files = [];
for (const value of Object.values(definition)) {
  for (const bytes of value.fileDescriptorProtos ?? []) {
    const file = fromBinary(FileDescriptorProtoSchema, bytes);
    if (!seen.has(file.name) && !file.name.startsWith("grpc_health")) { seen.add(file.name); files.push(file); }
  }
}
files.sort((a, b) => Number(!a.name.startsWith("google")) - Number(!b.name.startsWith("google")));
// protobufjs writes synthetic files without their imports: name them, so types resolve.
// It also writes type names relative to the package: make them absolute.
for (const file of files) {
  if (!file.name.startsWith("google")) file.dependency = ["google_protobuf.proto"];
  const qualify = (message, prefix) => {
    for (const field of message.field) {
      if (!field.typeName || field.typeName.startsWith(".")) continue;
      if (field.typeName.includes(".")) field.typeName = `.${field.typeName}`;
      else if (message.nestedType.some((n) => n.name === field.typeName)) field.typeName = `.${prefix}.${message.name}.${field.typeName}`;
      else field.typeName = `.${file.package}.${field.typeName}`;
    }
    for (const nested of message.nestedType) qualify(nested, `${prefix}.${message.name}`);
  };
  for (const message of file.messageType) qualify(message, file.package);
  for (const s of file.service) for (const m of s.method) {
    if (!m.inputType.startsWith(".")) m.inputType = m.inputType.includes(".") ? `.${m.inputType}` : `.${file.package}.${m.inputType}`;
    if (!m.outputType.startsWith(".")) m.outputType = m.outputType.includes(".") ? `.${m.outputType}` : `.${file.package}.${m.outputType}`;
  }
}
const registry = createFileRegistry(create(FileDescriptorSetSchema, { file: files }));
const service = registry.getService("eventbus.v1.EventBusService");
const transport = createGrpcTransport({ baseUrl: `http://${address}` });
const connectClient = createClient(service, transport);

const data = Buffer.alloc(64, 120);
const event = (topic) => ({ topic, source: "bench", data });

async function grpcPublish(topic) {
  return new Promise((resolve, reject) => grpcClient.Publish({ events: [event(topic)] }, (e, r) => (e ? reject(e) : resolve(r))));
}
const connectPublish = (topic) => connectClient.publish({ events: [event(topic)] });

async function roundTrips(name, publish) {
  for (let i = 0; i < 200; i++) await publish("bench.warm");
  const started = performance.now();
  for (let i = 0; i < ROUND_TRIPS; i++) await publish("bench.rt");
  const seconds = (performance.now() - started) / 1000;
  return { name, roundTripsPerSecond: Math.round(ROUND_TRIPS / seconds) };
}

async function grpcReplay() {
  const started = performance.now();
  let count = 0;
  await new Promise((resolve, reject) => {
    const call = grpcClient.Subscribe({ topic: "bench.stream", subscriber: "bench", earliest: {} });
    call.on("data", (m) => {
      if (m.message === "event" && ++count === EVENTS) { call.cancel(); resolve(); }
    });
    call.on("error", (e) => (e.code === grpc.status.CANCELLED ? resolve() : reject(e)));
  });
  return { name: "grpc-js", eventsPerSecond: Math.round(EVENTS / ((performance.now() - started) / 1000)) };
}

async function connectReplay() {
  const started = performance.now();
  let count = 0;
  const controller = new AbortController();
  try {
    for await (const m of connectClient.subscribe({ topic: "bench.stream", subscriber: "bench", start: { case: "earliest", value: {} } }, { signal: controller.signal })) {
      if (m.message.case === "event" && ++count === EVENTS) { controller.abort(); break; }
    }
  } catch (e) { if (!controller.signal.aborted) throw e; }
  return { name: "connect-node", eventsPerSecond: Math.round(EVENTS / ((performance.now() - started) / 1000)) };
}

async function wrapperReplay() {
  const bus = new Bus(address);
  const started = performance.now();
  const subscription = await bus.subscribe("bench.stream", { start: "earliest", buffer: 4096 });
  let count = 0;
  for await (const _ of subscription) if (++count === EVENTS) break;
  subscription.close();
  bus.close();
  return { name: "eventbus-client (grpc-js + conversion to Event)", eventsPerSecond: Math.round(EVENTS / ((performance.now() - started) / 1000)) };
}

// The replayed events, published once in batches of 1000.
for (let i = 0; i < EVENTS / 1000; i++) {
  await new Promise((resolve, reject) => grpcClient.Publish({ events: Array.from({ length: 1000 }, () => ({ ...event("bench.stream"), data: Buffer.alloc(128, 121) })) }, (e, r) => (e ? reject(e) : resolve(r))));
}
const results = [];
results.push(await roundTrips("grpc-js", grpcPublish));
results.push(await roundTrips("connect-node", connectPublish));
results.push(await roundTrips("grpc-js (again)", grpcPublish));
results.push(await roundTrips("connect-node (again)", connectPublish));
results.push(await grpcReplay());
results.push(await connectReplay());
results.push(await grpcReplay());
results.push(await connectReplay());
results.push(await wrapperReplay());
console.log(JSON.stringify(results, null, 1));
grpcClient.close();
process.exit(0);
