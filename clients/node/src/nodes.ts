/**
 * {@link Nodes}: the bus nodes a client may use, a gRPC client per node (made on first use), the
 * one in use now, and the move to another when one fails.
 *
 * When a call fails the way a node that is gone fails ({@link movesOn}: UNAVAILABLE, a broken
 * connection), the client probes the other nodes' gRPC health (`grpc.health.v1.Health/Check`,
 * service `""`) in order, starting after the failed one, and moves to the first that answers
 * SERVING; when none does, to the next in order. Only the first failure of the calls that were
 * in flight on a node moves the client: a call that finds the client already moved off its
 * node takes that move. The Python client's `Endpoints` and `Nodes` follow the same rules.
 */
import { debuglog } from "node:util";

import * as grpc from "@grpc/grpc-js";

import type { BusError } from "./errors";
import type { EventBusServiceClient } from "./generated/eventbus/v1/EventBusService";
import type { HealthClient } from "./generated/grpc/health/v1/Health";
import type { HealthCheckResponse__Output } from "./generated/grpc/health/v1/HealthCheckResponse";
import { protos } from "./proto";

/** How long a health probe of a candidate node may take, in milliseconds. */
export const PROBE_TIMEOUT_MS = 500;

/** With every node down, a client moves on after each failed retry, a few times a second. The
 * first move of an outage is a `console.warn`; later ones within this many milliseconds go to
 * `util.debuglog("eventbus")` (printed when `NODE_DEBUG` names `eventbus`), and the next warning
 * says how many there were (`moves_since_last_warning`), as the Rust SDK does.
 * {@link BusOptions.onFailover} is called for every move all the same. */
export const WARN_EVERY_MS = 10_000;

/** Where {@link Nodes} logs its moves; a parameter so that tests can read them. */
export interface MoveLog {
  warn(message: string): void;
  debug(message: string): void;
}

const debug = debuglog("eventbus");
const consoleLog: MoveLog = { warn: (message) => console.warn(message), debug: (message) => debug(message) };

const CHANNEL_OPTIONS: grpc.ChannelOptions = {
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
};

/** A client moved from one bus node to another: given to {@link BusOptions.onFailover}. */
export interface Failover {
  /** What moved: `"subscription"`, `"publisher"`, `"query"` or `"call"` (a unary call). */
  what: "subscription" | "publisher" | "query" | "call";
  /** The node it was on and the one it moved to (`host:port`). */
  fromEndpoint: string;
  toEndpoint: string;
  /** The failure that moved it. */
  error: BusError;
  /** For a subscription: its topic pattern. */
  pattern?: string;
  /** For a subscription: the last sequence it delivered (it resumes after it); undefined for a
   * MANUAL-ack member, which resumes from its group's cursor. */
  afterSequence?: bigint;
}

/** What a client sends to say who it is and whom it trusts (see `BusOptions`): for TLS
 * targets a CA and a client certificate with its key (PEM); on every call the bearer token. */
export interface Security {
  tlsCa?: Buffer;
  tlsCert?: Buffer;
  tlsKey?: Buffer;
  token?: string;
}

/** One node: where it is, whether it is TLS (always, for `https://`: never plaintext), and the
 * credentials. */
export interface Target {
  address: string;
  tls: boolean;
  security?: Security;
}

/** The channel credentials and client options for `target`. */
function connection(target: Target): [grpc.ChannelCredentials, grpc.ClientOptions] {
  const security = target.security ?? {};
  const credentials = target.tls
    ? grpc.credentials.createSsl(security.tlsCa ?? null, security.tlsKey ?? null, security.tlsCert ?? null)
    : grpc.credentials.createInsecure();
  const token = security.token;
  if (!token) return [credentials, CHANNEL_OPTIONS];
  const withToken: grpc.Interceptor = (options, nextCall) =>
    new grpc.InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        metadata.set("authorization", `Bearer ${token}`);
        next(metadata, listener);
      },
    });
  return [credentials, { ...CHANNEL_OPTIONS, interceptors: [withToken] }];
}

interface Clients {
  bus: EventBusServiceClient;
  health: HealthClient;
}

/** The nodes of one {@link Bus}; see the module docs. */
export class Nodes {
  private current = 0;
  private readonly clients = new Map<number, Clients>();
  private closed = false;
  /** When a move was last logged as a warning (by {@link clock}), and the moves logged at debug
   * level since: see {@link WARN_EVERY_MS}. */
  private warned?: number;
  private quietMoves = 0;

  /** `clock` (milliseconds) and `log` are parameters for tests, which need not wait out
   * {@link WARN_EVERY_MS} nor read the console. */
  constructor(
    readonly targets: Target[],
    private readonly onFailover?: (failover: Failover) => void,
    private readonly clock: () => number = () => performance.now(),
    private readonly log: MoveLog = consoleLog,
  ) {}

  /** The node in use now (an index into {@link targets}). */
  get index(): number {
    return this.current;
  }

  address(index: number): string {
    return this.targets[index].address;
  }

  /** The event API's client for node `index`. */
  client(index: number): EventBusServiceClient {
    return this.clientsOf(index).bus;
  }

  private clientsOf(index: number): Clients {
    let clients = this.clients.get(index);
    if (!clients) {
      const target = this.targets[index];
      const [credentials, options] = connection(target);
      const loaded = protos();
      clients = {
        bus: new loaded.eventbus.v1.EventBusService(target.address, credentials, options),
        health: new loaded.grpc.health.v1.Health(target.address, credentials, options),
      };
      // A client made after close() is closed at once: its calls fail with CANCELLED-like errors.
      if (this.closed) {
        clients.bus.close();
        clients.health.close();
      }
      this.clients.set(index, clients);
    }
    return clients;
  }

  /** Node `index`'s health for `service` (`""`: the node as a whole), by name: `SERVING`,
   * `NOT_SERVING`, ..., or the failure of the probe. */
  health(index: number, service = "", timeoutMs = PROBE_TIMEOUT_MS): Promise<string> {
    const health = this.clientsOf(index).health;
    return new Promise((resolve) => {
      health.Check({ service }, { deadline: Date.now() + timeoutMs },
        (error: grpc.ServiceError | null, response?: HealthCheckResponse__Output) => {
          if (error) resolve(`${grpc.status[error.code]}: ${error.details}`);
          else resolve(String(response?.status));
        });
    });
  }

  /** The nodes to try after `failed`, in order: the next ones, then `failed` itself. */
  candidates(failed: number): number[] {
    const count = this.targets.length;
    return Array.from({ length: count }, (_, step) => (failed + step + 1) % count);
  }

  /** Moves to `index` (when the client is still on `from`); returns the node in use now. */
  choose(from: number, index: number): number {
    if (this.current === from) this.current = index;
    return this.current;
  }

  /** Moves off `failed` (when the client is still on it) to the first other node whose health
   * is SERVING, else to the next in order; resolves to the node to use now. */
  async failOver(failed: number): Promise<number> {
    if (this.targets.length < 2 || this.current !== failed) return this.current;
    let serving: number | undefined;
    for (const index of this.candidates(failed)) {
      if (await this.health(index) === "SERVING") {
        serving = index;
        break;
      }
    }
    return this.choose(failed, serving ?? this.candidates(failed)[0]);
  }

  /** Logs a move (a warning, or debug level within {@link WARN_EVERY_MS} of the last warning)
   * and hands it to the hook, whose exceptions are logged. */
  report(failover: Failover): void {
    if (failover.fromEndpoint === failover.toEndpoint) return;
    const where = failover.pattern ? ` ${failover.pattern}` : "";
    const after = failover.afterSequence !== undefined ? ` after sequence ${failover.afterSequence}` : "";
    const moved = `${failover.what}${where} moved from ${failover.fromEndpoint} to ${failover.toEndpoint}${after} (${failover.error.message})`;
    const now = this.clock();
    if (this.warned === undefined || now - this.warned >= WARN_EVERY_MS) {
      const quiet = this.quietMoves > 0 ? `; moves_since_last_warning=${this.quietMoves}` : "";
      this.log.warn(`eventbus: ${moved}${quiet}`);
      this.warned = now;
      this.quietMoves = 0;
    } else {
      this.log.debug(moved);
      this.quietMoves += 1;
    }
    try {
      this.onFailover?.(failover);
    } catch (error) {
      console.error("eventbus: onFailover threw:", error);
    }
  }

  close(): void {
    this.closed = true;
    for (const { bus, health } of this.clients.values()) {
      bus.close();
      health.close();
    }
  }
}
