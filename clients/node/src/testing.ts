/**
 * A real bus process for tests: {@link BusProcess} starts `eventbus serve` on a free port, waits
 * until its health check says SERVING, and stops it at the end. The binary is `$EVENTBUS_BIN`,
 * else `target/debug/eventbus` of this repository (the test script builds it first).
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import * as path from "node:path";

import { Bus } from "./bus";

export const REPO_ROOT = path.resolve(__dirname, "..", "..", "..", "..");

export function busBinary(): string {
  const binary = process.env.EVENTBUS_BIN ?? path.join(REPO_ROOT, "target", "debug", "eventbus");
  if (!existsSync(binary)) {
    throw new Error(`bus binary ${binary} not found: run \`cargo build\` or set EVENTBUS_BIN`);
  }
  return binary;
}

/** A port nobody listens on now (bound to port 0, then released). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(port));
    });
  });
}

/** Polls until `condition()` is truthy; rejects naming `what` after `timeoutMs` (on the
 * monotonic clock). Tests poll with a deadline instead of sleeping. */
export async function waitFor<T>(condition: () => T | Promise<T>, timeoutMs = 10_000,
  what = "condition"): Promise<T> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const value = await condition();
    if (value) return value;
    if (performance.now() >= deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** PEM files made by {@link makeTestCertificates}: a CA, and a server certificate it signed for
 * `127.0.0.1` and `localhost` with its key. */
export interface TestCertificates {
  ca: string;
  cert: string;
  key: string;
}

/** Makes a throwaway CA and server certificate (ECDSA P-256, valid one day) in a new temporary
 * directory with the `openssl` command, at test time, so no private key is ever committed. */
export function makeTestCertificates(): TestCertificates {
  const dir = mkdtempSync(path.join(tmpdir(), "eventbus-tls-"));
  const run = (...args: string[]) => execFileSync("openssl", args, { cwd: dir, stdio: "pipe" });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
  run("req", "-x509", ...ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=test CA", "-days", "1");
  run("req", ...ec, "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=eventbus");
  writeFileSync(path.join(dir, "server.ext"),
    "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n");
  run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
    "-out", "cert.pem", "-days", "1", "-extfile", "server.ext");
  return { ca: path.join(dir, "ca.pem"), cert: path.join(dir, "cert.pem"), key: path.join(dir, "key.pem") };
}

/** `eventbus serve` on 127.0.0.1 and a free port; settings are serve flags in snake_case, e.g.
 * `{ subscriber_queue_size: 1 }` becomes `--subscriber-queue-size 1`. With `tls` it serves TLS
 * with those certificates and {@link url} is `https://`. */
export class BusProcess {
  port = 0;
  private child: ChildProcess | undefined;
  private output = "";

  constructor(readonly settings: Record<string, string | number> = {}, readonly tls?: TestCertificates) {
    if (tls) this.settings = { tls_cert: tls.cert, tls_key: tls.key, ...settings };
  }

  get address(): string {
    return `127.0.0.1:${this.port}`;
  }

  get url(): string {
    return `${this.tls ? "https" : "http"}://${this.address}`;
  }

  static async start(settings: Record<string, string | number> = {},
    tls?: TestCertificates): Promise<BusProcess> {
    const bus = new BusProcess(settings, tls);
    await bus.start();
    return bus;
  }

  /** Starts the process: on a free port the first time, on the same port again after
   * {@link stop} (so clients reconnect to the same address). */
  async start(timeoutMs = 15_000): Promise<void> {
    if (this.port === 0) this.port = await freePort();
    const args = ["serve", "--listen", this.address, "--log-level", "warn"];
    // The bus's own default is its durable file store in ./eventbus-data; a test bus keeps its
    // log in memory unless the test asks for storage settings.
    if (!("storage" in this.settings)) {
      args.push("--storage", "memory");
    }
    for (const [key, value] of Object.entries(this.settings)) {
      args.push(`--${key.replace(/_/g, "-")}`, String(value));
    }
    const child = spawn(busBinary(), args, { stdio: ["ignore", "pipe", "pipe"] });
    this.child = child;
    child.stdout?.on("data", (chunk: Buffer) => (this.output += chunk.toString()));
    child.stderr?.on("data", (chunk: Buffer) => (this.output += chunk.toString()));
    const client = this.tls ? new Bus(this.url, { tlsCa: this.tls.ca }) : new Bus(this.address);
    try {
      await client.waitReady(timeoutMs);
    } catch (error) {
      await this.stop();
      throw new Error(`bus not serving: ${String(error)}\n${this.output}`);
    } finally {
      client.close();
    }
  }

  /** Stops the process (SIGKILL: a crash, nothing flushed or said goodbye) and starts it again
   * on the same port with the same settings, so a file store comes back with its log. */
  async restart(options: { kill?: boolean } = {}): Promise<void> {
    await this.stop(15_000, options.kill ? "SIGKILL" : "SIGTERM");
    await this.start();
  }

  /** SIGTERM (graceful shutdown), then SIGKILL if it does not exit in time. */
  async stop(timeoutMs = 15_000, signal: NodeJS.Signals = "SIGTERM"): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.kill(signal);
    const timer = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    await exited;
    clearTimeout(timer);
  }
}

/** The nats-server for JetStream tests: `$EVENTBUS_TEST_NATS_SERVER`, else `nats-server` on the
 * `PATH` (`scripts/nats-server.sh system` prints the machine's). */
export function natsBinary(): string {
  return process.env.EVENTBUS_TEST_NATS_SERVER || "nats-server";
}

/** A nats-server with JetStream on 127.0.0.1 and a port of its choosing, with a temporary store,
 * for clustered buses in tests (`BusProcess.start({ storage: "jetstream", nats_url: nats.url })`).
 * Its config raises `max_payload` to 8 MB: a bus refuses NATS's default 1 MB, which is under its
 * own event limit. {@link kill} and {@link restart} crash it and bring it back on its port with
 * its store; {@link signal} freezes it. As `tests/common/nats.rs`. */
export class NatsServer {
  port = 0;
  private child: ChildProcess | undefined;
  private dir: string | undefined;
  private output = "";

  get url(): string {
    return `nats://127.0.0.1:${this.port}`;
  }

  static async start(timeoutMs = 15_000): Promise<NatsServer> {
    const nats = new NatsServer();
    await nats.launch(timeoutMs).catch(async (error) => {
      await nats.stop();
      throw error;
    });
    return nats;
  }

  /** Starts the process: on a port of its choosing with a new store the first time, on the same
   * port with the same store after {@link kill}. */
  private async launch(timeoutMs: number): Promise<void> {
    const dir = this.dir ?? mkdtempSync(path.join(tmpdir(), "eventbus-nats-"));
    this.dir = dir;
    const config = path.join(dir, "nats.conf");
    writeFileSync(config, "max_payload: 8MB\n");
    const child = spawn(natsBinary(), ["-a", "127.0.0.1", "-p", String(this.port || -1), "-js", "-sd", path.join(dir, "jetstream"), "-c", config],
      { stdio: ["ignore", "ignore", "pipe"] });
    this.child = child;
    let output = "";
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`nats-server not listening within ${timeoutMs} ms:\n${this.output}`)), timeoutMs);
      child.once("error", (error) => {
        clearTimeout(timer);
        reject(new Error(`cannot start ${natsBinary()} (${String(error)}): install nats-server or set EVENTBUS_TEST_NATS_SERVER`));
      });
      child.stderr?.on("data", (chunk: Buffer) => {
        this.output += chunk.toString();
        output += chunk.toString();
        const match = /Listening for client connections on [^\s]*:(\d+)/.exec(output);
        if (match) {
          this.port = Number(match[1]);
          clearTimeout(timer);
          resolve();
        }
      });
    });
  }

  /** Sends the process a signal: `SIGSTOP` freezes it (its connections stay open and
   * unanswered), `SIGCONT` lets it go on. */
  signal(signal: NodeJS.Signals): void {
    this.child?.kill(signal);
  }

  /** SIGKILL, as a crash; the store is kept for {@link restart}. */
  async kill(): Promise<void> {
    const child = this.child;
    if (child && child.exitCode === null && child.signalCode === null) {
      const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
      child.kill("SIGKILL");
      await exited;
    }
  }

  /** Starts the server again after {@link kill} (killing it first if it runs), on the same port
   * with the same JetStream store, as an operator restarting it would. */
  async restart(timeoutMs = 15_000): Promise<void> {
    await this.kill();
    await this.launch(timeoutMs);
  }

  /** Kills the server and deletes its store. */
  async stop(): Promise<void> {
    await this.kill();
    if (this.dir) rmSync(this.dir, { recursive: true, force: true });
    this.dir = undefined;
  }
}
