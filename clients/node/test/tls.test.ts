/** TLS: publish and subscribe over TLS with a CA made at test time, and no plaintext to an
 * `https://` target (nor TLS to a plaintext one). */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { after, before, describe, test } from "node:test";

import { Bus, BusError } from "../src";
import { BusProcess, makeTestCertificates, type TestCertificates } from "../src/testing";

describe("TLS", () => {
  let certificates: TestCertificates;
  let tlsBus: BusProcess;
  let plainBus: BusProcess;

  before(async () => {
    certificates = makeTestCertificates();
    tlsBus = await BusProcess.start({}, certificates);
    plainBus = await BusProcess.start();
  });

  after(async () => {
    await tlsBus.stop();
    await plainBus.stop();
  });

  test("publish and subscribe over TLS with a custom CA and a token", async () => {
    const bus = new Bus(tlsBus.url, { source: "node-test", tlsCa: certificates.ca, token: "t0k" });
    try {
      const subscription = await bus.subscribe("tls.*");
      const sequence = await bus.publish("tls.checked", Buffer.from("secret"));
      for await (const event of subscription) {
        assert.equal(event.sequence, sequence);
        assert.equal(Buffer.from(event.data).toString(), "secret");
        break;
      }
      subscription.close();
      // The CA as PEM bytes works the same.
      const withBytes = new Bus(tlsBus.url, { tlsCa: readFileSync(certificates.ca) });
      assert.ok((await withBytes.publish("tls.bytes", Buffer.from("x"))) >= 1n);
      withBytes.close();
    } finally {
      bus.close();
    }
  });

  test("no plaintext to an https:// target, no plaintext on a TLS port", async () => {
    const plaintextToTls = new Bus(`http://${tlsBus.address}`);
    await assert.rejects(plaintextToTls.publish("tls.plain", Buffer.from("x")), BusError);
    plaintextToTls.close();
    const httpsToPlain = new Bus(`https://${plainBus.address}`, { tlsCa: certificates.ca });
    await assert.rejects(httpsToPlain.publish("tls.plain", Buffer.from("x")), BusError);
    httpsToPlain.close();
    const untrusted = new Bus(tlsBus.url);
    await assert.rejects(untrusted.publish("tls.untrusted", Buffer.from("x")), BusError);
    untrusted.close();
    assert.throws(() => new Bus(tlsBus.url, { tlsCa: "/nonexistent/ca.pem" }), /tlsCa/);
  });
});
