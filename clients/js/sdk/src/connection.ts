/**
 * One device's MQTT connection, kept up (protocol section 8, steps 1–2).
 *
 *     start() ──► connect (MQTT 3.1.1, username = user, password = token, client id = device,
 *                 clean = false) ──► SUBSCRIBE the base topics (QoS 1), SUBACK checked
 *                 ──► up(): the client subscribes channels and presence, re-publishes its
 *                     outbox, catches up ──► messages until the connection drops
 *             ◄── lost: wait backoffDelayMs(attempt) (full jitter, 1 s doubling to 30 s) and
 *                 connect again; attempt resets once a connection has stayed up for
 *                 STABLE_CONNECTION_MS (a connection cut at once, e.g. by another client
 *                 taking over the same device id, backs off further each time)
 *
 * pause() ends the connection at once and makes no new one until resume() (a device that knows it
 * lost its network: waiting for keepalive to notice takes up to 1.5 × keepalive); resume() connects
 * at once.
 *
 * The first connect is not retried: start() rejects (ConnectionFailed), so the app learns at once
 * that the server is unreachable. A CONNACK refused for credentials (return code 4 or 5) is
 * retried only with a fresh token from the app's token function, and fails for good (AuthFailed)
 * with a fixed token or when a fresh one is refused too. A refused base subscription is fatal:
 * the device cannot hear its replies. Each connection is its own MQTT.js client with its
 * reconnects off, so no packet of a dead connection goes out on a new one.
 */

import { backoffDelayMs, sleep, type Clock } from "./clock.js";
import { AuthFailed, ClientClosed, ConnectionFailed } from "./errors.js";
import type { Tokens } from "./http.js";
import { newAbortController, type AbortSignalLike } from "./platform.js";
import type { MqttClientLike, MqttConnect, MqttError } from "./transport.js";

const AUTH_REFUSALS = new Set([4, 5, 134, 135]); // CONNACK 3.1.1 codes and their MQTT 5 twins
const CLOSE_WAIT_MS = 3000;
export const SUBACK_REFUSED = 0x80;
/** How long a connection must stay up before the backoff starts again from the first delay. */
export const STABLE_CONNECTION_MS = 10_000;

export type ConnectionState = "connecting" | "connected" | "disconnected" | "closed";

/** A change of the connection, as onConnectionChange reports it. */
export interface ConnectionChange {
  state: ConnectionState;
  attempt: number; // reconnect attempts since a connection last stayed up (STABLE_CONNECTION_MS)
  retryInMs: number | null; // disconnected: when the next attempt starts (null: paused, at resume())
  error: Error | null; // why it went down (or failed for good)
}

export interface ConnectionHandlers {
  message(topic: string, payload: Uint8Array): void;
  /** The connection is up and the base topics subscribed; a throw ends this connection. */
  up(): Promise<void>;
  change(change: ConnectionChange): void;
  /** The connection ended for good (not called on close()). */
  fatal(error: Error): void;
}

interface Ended {
  error: Error | null;
  authRefused: boolean;
  fatal: Error | null;
}

export interface ConnectionOptions {
  url: string; // ws://host:port/mqtt or wss://…
  user: string;
  device: string;
  tokens: Tokens;
  keepalive: number; // seconds
  connectTimeoutMs: number;
  reconnect: boolean;
  baseTopics: string[]; // subscribed on every connect; a refusal is fatal
  connect: MqttConnect;
  clock: Clock;
  random: () => number;
}

export class Connection {
  readonly #options: ConnectionOptions;
  readonly #handlers: ConnectionHandlers;
  readonly #stop = newAbortController();
  #client: MqttClientLike | null = null; // the connection that is up
  #attempt: MqttClientLike | null = null; // the connection being made or up
  #running: Promise<void> | null = null;
  #paused = false;
  #wake = newAbortController(); // aborted by resume() and close(): a backoff wait or a pause ends
  reconnects = 0; // connections up after the first

  constructor(options: ConnectionOptions, handlers: ConnectionHandlers) {
    this.#options = options;
    this.#handlers = handlers;
  }

  get connected(): boolean {
    return this.#client !== null;
  }

  /** Connect; resolves once the first connection is up, rejects when it fails. */
  start(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.#running = this.#run(resolve, reject);
    });
  }

  /** Publish at QoS 1 on the current connection; false when there is none (offline). */
  publish(topic: string, payload: string, qos: 0 | 1 = 1): boolean {
    const client = this.#client;
    if (client === null) return false;
    client.publish(topic, payload, { qos }, () => undefined); // a lost PUBACK: the outbox resends
    return true;
  }

  /** SUBSCRIBE at QoS 1; the SUBACK's code per topic (0x80: refused). Rejects when offline or when
   * no SUBACK comes within the connect timeout. */
  subscribe(topics: string[]): Promise<number[]> {
    const client = this.#client;
    if (client === null) return Promise.reject(new ConnectionFailed("not connected"));
    return subscribeOn(client, topics, this.#options.clock, this.#options.connectTimeoutMs);
  }

  unsubscribe(topics: string[]): void {
    this.#client?.unsubscribe(topics, () => undefined);
  }

  /** End the connection now (no DISCONNECT: the network is gone) and make no new one until
   * resume(). */
  pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    const client = this.#attempt ?? this.#client;
    this.#client = null; // publish() is offline from now on
    client?.end(true);
  }

  /** Connect again at once after pause(). */
  resume(): void {
    if (!this.#paused) return;
    this.#paused = false;
    const wake = this.#wake;
    this.#wake = newAbortController();
    wake.abort();
  }

  /** Disconnect (a DISCONNECT when connected) and stop reconnecting. */
  async close(): Promise<void> {
    this.#stop.abort();
    this.#wake.abort();
    const [client, attempt] = [this.#client, this.#attempt];
    this.#client = null;
    if (client !== null) await endClient(client, false, this.#options.clock);
    else if (attempt !== null) attempt.end(true); // still connecting: give it up
    await this.#running?.catch(() => undefined);
  }

  async #run(started: () => void, failed: (error: Error) => void): Promise<void> {
    const { clock, random, tokens } = this.#options;
    let first = true;
    let attempt = 0;
    let freshToken = false; // the token of this attempt came from a refresh after a refusal
    for (;;) {
      while (this.#paused && !this.#stop.signal.aborted) await untilAborted(this.#wake.signal);
      if (this.#stop.signal.aborted) break;
      this.#handlers.change({ state: "connecting", attempt, retryInMs: null, error: null });
      let upAt = null as number | null; // set when this connection comes up
      const ended = await this.#connectOnce(() => {
        if (first) started();
        else this.reconnects += 1;
        first = false;
        upAt = clock.now();
        freshToken = false;
      });
      this.#attempt = null;
      if (upAt !== null && clock.now() - upAt >= STABLE_CONNECTION_MS) attempt = 0;
      if (this.#stop.signal.aborted) break;
      if (this.#paused) {
        attempt = 0;
        this.#handlers.change({ state: "disconnected", attempt, retryInMs: null, error: ended.error });
        continue;
      }
      let fatal = ended.fatal;
      if (fatal === null && ended.authRefused) {
        // Once with a fresh token (section 8: refresh the token before retrying), else for good.
        const refreshed: string | null = freshToken ? null : await tokens.refresh().catch(() => null);
        freshToken = refreshed !== null;
        if (!freshToken)
          fatal = new AuthFailed(`the server refused the credentials of user ${JSON.stringify(this.#options.user)}`);
      } else if (fatal === null && first) {
        fatal = new ConnectionFailed(`cannot connect to ${this.#options.url}: ${ended.error?.message ?? "closed"}`);
      } else if (fatal === null && !this.#options.reconnect) {
        fatal = new ConnectionFailed(`connection to ${this.#options.url} lost: ${ended.error?.message ?? "closed"}`);
      }
      if (fatal !== null) {
        this.#handlers.change({ state: "closed", attempt, retryInMs: null, error: fatal });
        if (first) failed(fatal);
        else this.#handlers.fatal(fatal);
        return;
      }
      const delay = backoffDelayMs(attempt, random);
      attempt += 1;
      this.#handlers.change({ state: "disconnected", attempt, retryInMs: delay, error: ended.error });
      try {
        await sleep(clock, delay, this.#wake.signal);
      } catch {
        if (this.#stop.signal.aborted) break; // closed while waiting; else resumed: connect now
      }
    }
    if (first) failed(new ClientClosed("the client was closed before it connected"));
    this.#handlers.change({ state: "closed", attempt, retryInMs: null, error: null });
  }

  /** One connection from CONNECT to its end. */
  async #connectOnce(onUp: () => void): Promise<Ended> {
    const o = this.#options;
    const ended: Ended = { error: null, authRefused: false, fatal: null };
    let client: MqttClientLike;
    try {
      const password = await o.tokens.current();
      client = o.connect(o.url, {
        protocolVersion: 4,
        username: o.user,
        password,
        clientId: o.device,
        clean: false,
        keepalive: o.keepalive,
        connectTimeout: o.connectTimeoutMs,
        reconnectPeriod: 0,
      });
    } catch (error) {
      return { ...ended, error: error instanceof Error ? error : new Error(String(error)) };
    }
    this.#attempt = client;
    return new Promise<Ended>((resolve) => {
      let done = false;
      client.on("error", (error: MqttError) => {
        if (typeof error.code === "number" && AUTH_REFUSALS.has(error.code)) ended.authRefused = true;
        ended.error = error;
      });
      client.on("message", (topic, payload) => {
        // From CONNACK on: a persistent session's queued events may come before the SUBACK.
        if (this.#attempt === client) this.#handlers.message(topic, payload);
      });
      client.on("close", () => {
        if (done) return;
        done = true;
        if (this.#client === client) this.#client = null;
        void endClient(client, true, o.clock).then(() => resolve(ended));
      });
      client.on("connect", () => {
        if (this.#stop.signal.aborted || this.#paused) {
          client.end(true);
          return;
        }
        void this.#setUp(client, ended, onUp);
      });
    });
  }

  async #setUp(client: MqttClientLike, ended: Ended, onUp: () => void): Promise<void> {
    const o = this.#options;
    try {
      const granted = await subscribeOn(client, o.baseTopics, o.clock, o.connectTimeoutMs);
      const refused = o.baseTopics.filter((_, i) => granted[i] === SUBACK_REFUSED);
      if (refused.length > 0) {
        ended.fatal = new ConnectionFailed(`the server refused the subscription to ${refused.join(", ")}`);
        client.end(true);
        return;
      }
      if (!client.connected || this.#stop.signal.aborted) return;
      this.#client = client;
      onUp();
      this.#handlers.change({ state: "connected", attempt: 0, retryInMs: null, error: null });
      await this.#handlers.up();
    } catch (error) {
      ended.error = error instanceof Error ? error : new Error(String(error));
      client.end(true); // a fresh connection does it all again
    }
  }
}

function subscribeOn(client: MqttClientLike, topics: string[], clock: Clock, timeoutMs: number): Promise<number[]> {
  return new Promise((resolve, reject) => {
    const timer = clock.setTimeout(() => {
      reject(new ConnectionFailed(`no SUBACK within ${timeoutMs} ms`));
      client.end(true);
    }, timeoutMs);
    client.subscribe(topics, { qos: 1 }, (error, _granted, suback) => {
      clock.clearTimeout(timer);
      const codes = suback?.granted;
      if (Array.isArray(codes) && codes.length === topics.length) {
        resolve(codes.map((code) => (typeof code === "number" ? code : SUBACK_REFUSED)));
      } else {
        reject(error ?? new ConnectionFailed("a SUBSCRIBE was not answered"));
      }
    });
  });
}

/** Resolves once signal is aborted. */
function untilAborted(signal: AbortSignalLike): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) resolve();
    else signal.addEventListener("abort", () => resolve());
  });
}

/** End an MQTT.js client; force: close at once. Bounded: a client that never says it is done
 * is forced after a few seconds. */
function endClient(client: MqttClientLike, force: boolean, clock: Clock): Promise<void> {
  return new Promise((resolve) => {
    const timer = clock.setTimeout(() => {
      client.end(true);
      resolve();
    }, CLOSE_WAIT_MS);
    client.end(force, () => {
      clock.clearTimeout(timer);
      resolve();
    });
  });
}
