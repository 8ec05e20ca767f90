/**
 * What a ChatClient is given (ChatClientOptions) and what it reports (ClientStatistics), and the
 * access token it connects with: a fixed string, or a function asked again whenever the server
 * refuses the current one (CONNACK 4/5, HTTP 401): section 8, refresh the token before retrying.
 */

import type { Clock } from "./clock.js";
import type { Tokens } from "./http.js";
import type { OutboxStore } from "./outbox.js";
import type { FetchLike } from "./platform.js";
import type { StateStore } from "./state.js";
import type { MqttConnect } from "./transport.js";

export interface ChatClientOptions {
  url: string; // MQTT over WebSocket: ws://host:port/mqtt or wss://…
  httpUrl?: string; // the HTTP API (http(s)://host:port): catch-up, ordering, groups, media …
  user: string;
  device: string; // unique across the deployment: a per-install id
  token: string | (() => string | Promise<string>); // a function is asked again when refused
  keepalive?: number; // seconds (30)
  connectTimeoutMs?: number; // each connect, SUBACK and HTTP attempt (10 s)
  resendAfterMs?: number; // an unacked send is published again after this (5 s)
  gapGraceMs?: number; // a msg that jumps ahead is held this long before the gap is fetched (1 s)
  autoRecv?: boolean; // publish recv for what the app took (true)
  reconnect?: boolean; // reconnect after a lost connection (true)
  oneAtATime?: boolean; // a send waits for the answer to the one before it in its conversation
  outbox?: OutboxStore; // where unacked sends survive a restart (memory)
  state?: StateStore; // the sync cursor, last delivered seq, followed channels (memory)
  presence?: string[]; // users whose p/{user} to watch from the start
  maxBufferedEvents?: number; // events waiting for the app, at most (10,000)
  clock?: Clock;
  random?: () => number; // [0, 1), for backoff jitter
  fetch?: FetchLike; // the global fetch by default
  sha256?: (bytes: Uint8Array) => Promise<string>; // hex; WebCrypto by default
  mqttConnect?: MqttConnect; // MQTT.js by default
}

export interface ClientStatistics {
  connected: boolean;
  pending: number; // sends awaiting an ack
  received: number; // messages handed to the app's queue
  duplicates: number; // msg events and acks dropped as already seen
  reconnects: number;
  resends: number;
  rateLimited: number;
  eventsDropped: number; // waiting events discarded past maxBufferedEvents
  gapsDetected: number;
  gapFetches: number;
  syncRequests: number;
  held: number; // messages waiting behind gaps
}

/** The current token, and a fresh one on demand (from a token function only). */
export class TokenSource implements Tokens {
  #token: string | null;
  readonly #get: (() => string | Promise<string>) | null;

  constructor(token: ChatClientOptions["token"]) {
    this.#token = typeof token === "string" ? token : null;
    this.#get = typeof token === "string" ? null : token;
  }

  async current(): Promise<string> {
    this.#token ??= await (this.#get as () => string | Promise<string>)();
    return this.#token;
  }

  async refresh(): Promise<string | null> {
    if (this.#get === null) return null;
    this.#token = await this.#get();
    return this.#token;
  }

  set(token: string): void {
    this.#token = token;
  }
}
