/**
 * A small responder: answers every query on a topic with its own data.
 *
 *     node dist/examples/echo-responder.js greet.hello [--bus 127.0.0.1:50051] [--group echo]
 *
 * With it running, `bus.query("greet.hello", { name: "Ada" })` gets `{"name":"Ada"}` back.
 */
import { parseArgs } from "node:util";

import { Bus, Reply } from "../src";

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: { bus: { type: "string" }, group: { type: "string", default: "echo" } },
  });
  const topic = positionals[0];
  if (!topic) throw new Error("usage: echo-responder TOPIC [--bus URL] [--group NAME]");
  const bus = new Bus(values.bus, { source: "echo" });
  await bus.waitReady(30_000);
  const responder = await bus.serve(topic, values.group, (request) =>
    new Reply({ data: request.data, dataContentType: request.dataContentType }));
  const stop = () => void responder.stop();
  process.once("SIGTERM", stop);
  process.once("SIGINT", stop);
  console.log(`echo: answering queries on ${topic}`);
  await responder.wait();
  bus.close();
}

main().catch((error) => {
  console.error(`echo: ${String(error)}`);
  process.exit(1);
});
