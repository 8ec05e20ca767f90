// What the unit tests share: a clock they move by hand, a fetch that answers from a script, an
// MQTT client in memory, and the shared protocol vectors (clients/vectors/).
import { EventEmitter } from "node:events";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

export const VECTORS = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "..", "vectors");

/** @param {string} name a file of clients/vectors/ @returns {any} */
export function vector(name) {
  return JSON.parse(readFileSync(join(VECTORS, name), "utf8"));
}

/** Let every promise job and I/O callback that is ready run (a few event loop turns). */
export async function settle(turns = 20) {
  for (let i = 0; i < turns; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** A Clock whose time moves only when a test says so. */
export class FakeClock {
  #now = 0;
  #next = 1;
  /** @type {Map<number, {at: number, fn: () => void}>} */
  #timers = new Map();

  now() {
    return this.#now;
  }

  /** @param {() => void} fn @param {number} ms */
  setTimeout(fn, ms) {
    const id = this.#next++;
    this.#timers.set(id, { at: this.#now + Math.max(0, ms), fn });
    return id;
  }

  /** @param {unknown} id */
  clearTimeout(id) {
    this.#timers.delete(/** @type {number} */ (id));
  }

  /** Timers waiting. */
  pending() {
    return this.#timers.size;
  }

  /** Move to `to` (ms), running each timer due on the way at its own time, in order, and letting
   * what it starts settle before the next one. @param {number} to */
  async advanceTo(to) {
    for (let guard = 0; guard < 10_000; guard++) {
      await settle(); // what the last step started may set timers of its own
      /** @type {[number, {at: number, fn: () => void}] | null} */
      let first = null;
      for (const entry of this.#timers)
        if (entry[1].at <= to && (first === null || entry[1].at < first[1].at)) first = entry;
      if (first === null) break;
      this.#timers.delete(first[0]);
      this.#now = Math.max(this.#now, first[1].at);
      first[1].fn();
    }
    this.#now = Math.max(this.#now, to);
  }

  /** @param {number} ms */
  advance(ms) {
    return this.advanceTo(this.#now + ms);
  }
}

/**
 * A fetch answering from a list of expected exchanges, in order. A request that is not the next
 * one expected is recorded in `unexpected` and answered 418 (final: no retry loop hides it).
 * @typedef {{method?: string, path: string, query?: Record<string, string>}} ExpectedRequest
 * @typedef {{status: number, body?: unknown, headers?: Record<string, string>}} ScriptedResponse
 */
export class ScriptedFetch {
  /** @type {{request: ExpectedRequest, response: ScriptedResponse}[]} */
  queue = [];
  /** @type {string[]} */
  unexpected = [];
  /** @type {{method: string, url: string, headers: Record<string, string>, body: unknown}[]} */
  seen = [];

  /** @type {import("../dist/index.js").FetchLike} */
  fetch = async (url, init = {}) => {
    const method = init.method ?? "GET";
    this.seen.push({ method, url, headers: init.headers ?? {}, body: init.body });
    const parsed = new URL(url);
    const next = this.queue.shift();
    const query = Object.fromEntries(parsed.searchParams);
    const path = decodeURIComponent(parsed.pathname);
    if (next === undefined) {
      this.unexpected.push(`${method} ${path}?${parsed.searchParams}: no request was expected`);
      return response({ status: 418, body: { error: "unexpected", message: "" } });
    }
    const want = next.request;
    const same =
      (want.method ?? "GET") === method &&
      want.path === path &&
      JSON.stringify(sorted(want.query ?? {})) === JSON.stringify(sorted(query));
    if (!same) {
      this.unexpected.push(`${method} ${path} ${JSON.stringify(query)}; expected ${JSON.stringify(want)}`);
      return response({ status: 418, body: { error: "unexpected", message: "" } });
    }
    return response(next.response);
  };
}

/** @param {Record<string, string>} obj */
function sorted(obj) {
  return Object.fromEntries(Object.entries(obj).sort(([a], [b]) => (a < b ? -1 : 1)));
}

/** A fetch Response from a scripted one. @param {ScriptedResponse} answer @returns {import("../dist/index.js").FetchResponse} */
export function response(answer) {
  const bytes = answer.body instanceof Uint8Array ? answer.body : null;
  const text =
    answer.body === undefined
      ? ""
      : bytes !== null
        ? ""
        : typeof answer.body === "string"
          ? answer.body
          : JSON.stringify(answer.body);
  const headers = new Map(Object.entries(answer.headers ?? {}).map(([k, v]) => [k.toLowerCase(), v]));
  return {
    status: answer.status,
    headers: { get: (name) => headers.get(name.toLowerCase()) ?? null },
    text: async () => text,
    arrayBuffer: async () => (bytes ?? new TextEncoder().encode(text)).slice().buffer,
  };
}

/** Tokens that never change. @type {import("../dist/index.js").Tokens} */
export const fixedTokens = { current: async () => "t0ken", refresh: async () => null };

/**
 * MQTT in memory, shaped like MQTT.js: `connect` is an MqttConnect; each call makes a FakeMqtt
 * client that connects on the next turn (or is refused with `refuseWith`).
 */
export class FakeBroker {
  /** @type {FakeMqtt[]} */
  clients = [];
  /** @type {number | null} a CONNACK return code to refuse the next connects with */
  refuseWith = null;
  /** @type {boolean} the next connects fail before a CONNACK (nothing listens) */
  unreachable = false;
  /** @type {(topics: string[]) => number[]} */
  granted = (topics) => topics.map(() => 1);

  /** @type {import("../dist/index.js").MqttConnect} */
  connect = (url, options) => {
    const client = new FakeMqtt(this, url, options);
    this.clients.push(client);
    setImmediate(() => client.open());
    return client;
  };

  /** The newest client. */
  get last() {
    return this.clients.at(-1) ?? assert_(null, "no client connected");
  }
}

/** @param {any} value @param {string} why @returns {never} */
function assert_(value, why) {
  throw new Error(why + String(value ?? ""));
}

export class FakeMqtt extends EventEmitter {
  connected = false;
  ended = false;
  /** @type {{topic: string, payload: any, qos: number}[]} */
  published = [];
  /** @type {string[]} */
  subscribed = [];
  /** @type {string[]} */
  unsubscribed = [];

  /** @param {FakeBroker} broker @param {string} url @param {import("../dist/index.js").MqttConnectOptions} options */
  constructor(broker, url, options) {
    super();
    this.broker = broker;
    this.url = url;
    this.options = options;
  }

  open() {
    if (this.ended) return;
    if (this.broker.unreachable) {
      this.emit("error", Object.assign(new Error("connect ECONNREFUSED"), { code: "ECONNREFUSED" }));
      this.drop();
    } else if (this.broker.refuseWith !== null) {
      this.emit(
        "error",
        Object.assign(new Error("Connection refused: Not authorized"), { code: this.broker.refuseWith }),
      );
      this.drop();
    } else {
      this.connected = true;
      this.emit("connect", { sessionPresent: false });
    }
  }

  /** @param {string[]} topics @param {{qos: 0 | 1}} _options @param {(error: Error | null, granted?: unknown, suback?: {granted?: ReadonlyArray<unknown>}) => void} callback */
  subscribe(topics, _options, callback) {
    this.subscribed.push(...topics);
    const granted = this.broker.granted(topics);
    setImmediate(() => (this.connected ? callback(null, [], { granted }) : callback(new Error("connection closed"))));
    return this;
  }

  /** @param {string[]} topics @param {(error?: Error) => void} callback */
  unsubscribe(topics, callback) {
    this.unsubscribed.push(...topics);
    setImmediate(() => callback());
    return this;
  }

  /** @param {string} topic @param {string} payload @param {{qos: 0 | 1}} options @param {(error?: Error) => void} callback */
  publish(topic, payload, options, callback) {
    if (!this.connected) {
      setImmediate(() => callback(new Error("connection closed")));
      return this;
    }
    this.published.push({ topic, payload: JSON.parse(payload), qos: options.qos });
    setImmediate(() => callback());
    return this;
  }

  /** @param {boolean} _force @param {() => void} [callback] */
  end(_force, callback) {
    if (!this.ended) this.drop();
    if (callback) setImmediate(callback);
    return this;
  }

  /** The connection is gone (a cut, a refusal, an end). */
  drop() {
    if (this.ended) return;
    this.ended = true;
    this.connected = false;
    setImmediate(() => this.emit("close"));
  }

  /** The server sends a PUBLISH. @param {string} topic @param {unknown} envelope */
  deliver(topic, envelope) {
    this.emit(
      "message",
      topic,
      new TextEncoder().encode(typeof envelope === "string" ? envelope : JSON.stringify(envelope)),
    );
  }

  /** What was published on a topic, as decoded envelopes. @param {string} topic */
  sent(topic) {
    return this.published.filter((p) => p.topic === topic).map((p) => p.payload);
  }
}
