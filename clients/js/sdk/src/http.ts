/**
 * The HTTP API of one user (protocol section 7), over fetch, with the device's token.
 *
 *     sync(since)              GET /v1/conversations?since=&limit=&include_messages=  ─► SyncPage
 *     messagesAfter(conv, n)   GET /v1/conversations/{conv}/messages?after=n&limit=   ─► MessagesPage
 *     messagesBefore(conv, n)  …/messages?before=n&limit=  (scrollback)                ─► MessagesPage
 *     presence(users)          GET /v1/presence?users=a,b                              ─► Presence[]
 *     createGroup, group, addMembers, removeMember, promote     /v1/groups…            ─► Group
 *     registerPushToken, unregisterPushToken                    /v1/devices/{d}/push
 *     setMuted                                                  /v1/conversations/{c}/settings
 *
 * Every attempt is bounded by timeoutMs. Transport failures, timeouts and 408/429/5xx answers are
 * retried with the reconnect backoff (at least the server's Retry-After): `attempts` times at most
 * (the catch-up never gives up until the client closes). A 401 is retried once with a fresh token
 * when the client has a token function. Any other answer throws HttpError with the server's
 * stable `error` code (`bad_cursor`, `not_member`, `forbidden` …).
 */

import { backoffDelayMs, sleep, type Clock } from "./clock.js";
import { ClientClosed, HttpError } from "./errors.js";
import {
  parseMessagesPage,
  parsePresencePage,
  parseSyncPage,
  type ConversationSummary,
  type MessagesPage,
  type SyncPage,
} from "./events.js";
import { newAbortController, type AbortSignalLike, type FetchLike, type FetchResponse } from "./platform.js";
import type { Presence } from "./protocol.js";

export const RETRYABLE_STATUS: ReadonlySet<number> = new Set([408, 429, 500, 502, 503, 504]);
const HISTORY_LIMIT = 500; // the server's default cap; an operator may set a lower one
const HISTORY_LIMIT_FALLBACK = 100; // the server's default page size, always accepted
const APP_CALL_ATTEMPTS = 5;

/** The device's access token: the current one, and a fresh one when the server refused it. */
export interface Tokens {
  current(): Promise<string>;
  /** A new token, or null when the client was given a fixed one. */
  refresh(): Promise<string | null>;
}

export interface GroupMember {
  user: string;
  role: string; // "admin" | "member"
  joined_seq: number; // the first seq this member can read
}

export interface Group {
  conv: string;
  name: string;
  kind: string; // "group" | "channel"
  creator: string;
  created_at: number;
  members: GroupMember[];
}

export interface PushRegistration {
  platform: "apns" | "fcm";
  token: string;
  sandbox?: boolean; // APNs: a development build
  topic?: string; // APNs: the app's bundle id, if not the server's
}

type Query = Record<string, string | number | null | undefined>;

/** A path segment as the Python SDK writes it: percent-encoded, ':' and '@' kept. */
export function pathSegment(value: string): string {
  return encodeURIComponent(value).replace(/%3A/gi, ":").replace(/%40/gi, "@");
}

export function withQuery(path: string, query: Query = {}): string {
  const pairs = Object.entries(query)
    .filter((pair): pair is [string, string | number] => pair[1] !== null && pair[1] !== undefined)
    .map(([key, value]) => `${encodeURIComponent(key)}=${encodeURIComponent(String(value))}`);
  return pairs.length > 0 ? `${path}?${pairs.join("&")}` : path;
}

/** The stable code and message of an error answer (`{"error","message"}`). */
export function errorOf(status: number, text: string): { code: string; message: string } {
  try {
    const body: unknown = JSON.parse(text);
    if (typeof body === "object" && body !== null && typeof (body as { error?: unknown }).error === "string") {
      const { error, message } = body as { error: string; message?: unknown };
      return { code: error, message: typeof message === "string" ? message : "" };
    }
  } catch {
    // not JSON: described by its status
  }
  return { code: `http_${status}`, message: "" };
}

/** Seconds of a Retry-After header (its delta-seconds form), as ms; null otherwise. */
export function retryAfterMs(response: FetchResponse): number | null {
  const value = response.headers.get("retry-after") ?? "";
  return /^\d+$/.test(value) ? Number(value) * 1000 : null;
}

export class HttpApi {
  readonly baseUrl: string;
  readonly #tokens: Tokens;
  readonly #fetch: FetchLike;
  readonly #clock: Clock;
  readonly #random: () => number;
  readonly #timeoutMs: number;
  readonly #signal: AbortSignalLike;
  #historyLimit = HISTORY_LIMIT;
  syncRequests = 0; // GET /v1/conversations attempts
  historyRequests = 0; // GET …/messages attempts

  constructor(options: {
    baseUrl: string;
    tokens: Tokens;
    fetch: FetchLike;
    clock: Clock;
    random: () => number;
    timeoutMs: number;
    signal: AbortSignalLike; // aborted when the client closes
  }) {
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.#tokens = options.tokens;
    this.#fetch = options.fetch;
    this.#clock = options.clock;
    this.#random = options.random;
    this.#timeoutMs = options.timeoutMs;
    this.#signal = options.signal;
  }

  get clock(): Clock {
    return this.#clock;
  }

  get signal(): AbortSignalLike {
    return this.#signal;
  }

  /** A path of this server (or an absolute URL, kept) as a URL. */
  url(pathOrUrl: string): string {
    return /^https?:\/\//.test(pathOrUrl)
      ? pathOrUrl
      : `${this.baseUrl}${pathOrUrl.startsWith("/") ? "" : "/"}${pathOrUrl}`;
  }

  /** Whether url is of the base URL's origin (scheme, host and port), the only one the bearer
   * token goes to: not a Location on another host, not the same host over plain http. */
  sameOrigin(url: string): boolean {
    const base = originOf(this.baseUrl);
    return base !== null && originOf(url) === base;
  }

  /** One attempt: the bearer token added (for the base URL's origin only), bounded by the timeout. Throws HttpError("transport")
   * when no answer came (a network failure, a timeout) and ClientClosed when the client closed. */
  async fetchOnce(
    method: string,
    pathOrUrl: string,
    init: { headers?: Record<string, string>; body?: string | Uint8Array; token?: string } = {},
  ): Promise<FetchResponse> {
    if (this.#signal.aborted) throw new ClientClosed("the client is closed");
    const url = this.url(pathOrUrl);
    const token = this.sameOrigin(url) ? (init.token ?? (await this.#tokens.current())) : null;
    const controller = newAbortController();
    const abort = (): void => controller.abort();
    const timer = this.#clock.setTimeout(abort, this.#timeoutMs);
    this.#signal.addEventListener("abort", abort);
    try {
      const request = {
        method,
        headers: token !== null ? { Authorization: `Bearer ${token}`, ...init.headers } : { ...init.headers },
        signal: controller.signal,
      };
      return await this.#fetch(
        url,
        init.body === undefined ? request : { ...request, body: init.body },
      );
    } catch (error) {
      if (this.#signal.aborted) throw new ClientClosed("the client is closed");
      throw new HttpError(
        "transport",
        `${method} ${pathOrUrl}: ${controller.signal.aborted ? "timed out" : String(error)}`,
      );
    } finally {
      this.#clock.clearTimeout(timer);
      this.#signal.removeEventListener("abort", abort);
    }
  }

  /** A JSON call, retried as the module says; the answer's JSON (null for 204). */
  async call(
    method: string,
    path: string,
    options: { query?: Query; json?: unknown; attempts?: number; counts?: "sync" | "history" } = {},
  ): Promise<unknown> {
    const target = withQuery(path, options.query);
    const headers: Record<string, string> = options.json === undefined ? {} : { "Content-Type": "application/json" };
    const body = options.json === undefined ? undefined : JSON.stringify(options.json);
    const attempts = options.attempts ?? APP_CALL_ATTEMPTS;
    let refreshed = false;
    for (let attempt = 0; ; attempt++) {
      if (options.counts === "sync") this.syncRequests += 1;
      if (options.counts === "history") this.historyRequests += 1;
      let problem: HttpError;
      let waitAtLeast = 0;
      try {
        const response = await this.fetchOnce(method, target, body === undefined ? { headers } : { headers, body });
        const text = await response.text();
        if (response.status >= 200 && response.status < 300) return text === "" ? null : parseJson(method, path, text);
        const { code, message } = errorOf(response.status, text);
        problem = new HttpError(code, `${method} ${path}: ${response.status} ${message}`.trimEnd(), {
          status: response.status,
          retryAfterMs: retryAfterMs(response),
        });
        if (response.status === 401 && !refreshed) {
          refreshed = true;
          if ((await this.#tokens.refresh()) !== null) continue; // once, with a fresh token
        }
        if (!RETRYABLE_STATUS.has(response.status)) throw problem;
        waitAtLeast = problem.retryAfterMs ?? 0;
      } catch (error) {
        if (!(error instanceof HttpError) || error.code !== "transport") throw error;
        problem = error;
      }
      if (attempt + 1 >= attempts) throw problem;
      await sleep(this.#clock, Math.max(waitAtLeast, backoffDelayMs(attempt, this.#random)), this.#signal);
    }
  }

  // --- sync and history --------------------------------------------------------------------------

  async sync(
    since: string | null,
    options: { limit?: number; includeMessages?: number; attempts?: number } = {},
  ): Promise<SyncPage> {
    const query = { since, limit: options.limit ?? 100, include_messages: options.includeMessages ?? 50 };
    const body = await this.call("GET", "/v1/conversations", {
      query,
      attempts: options.attempts ?? Infinity,
      counts: "sync",
    });
    return parseSyncPage(body);
  }

  /** Messages of conv with seq > after, ascending: one page of up to 500 (100 where the server
   * caps pages lower). */
  async messagesAfter(conv: string, after: number, options: { attempts?: number } = {}): Promise<MessagesPage> {
    for (;;) {
      try {
        const query = { after, limit: this.#historyLimit };
        const body = await this.call("GET", `/v1/conversations/${pathSegment(conv)}/messages`, {
          query,
          attempts: options.attempts ?? Infinity,
          counts: "history",
        });
        return parseMessagesPage(conv, body);
      } catch (error) {
        if (
          !(error instanceof HttpError) ||
          error.code !== "bad_request" ||
          this.#historyLimit === HISTORY_LIMIT_FALLBACK
        )
          throw error;
        this.#historyLimit = HISTORY_LIMIT_FALLBACK;
      }
    }
  }

  /** Every conversation of the user, its watermarks and unread count, without messages: a sync
   * from no cursor, page after page (it does not move the catch-up's cursor). */
  async conversations(): Promise<ConversationSummary[]> {
    const found: ConversationSummary[] = [];
    let cursor: string | null = null;
    for (let page = 0; page < 1000; page++) {
      const answer: SyncPage = await this.sync(cursor, { includeMessages: 0, limit: 500, attempts: APP_CALL_ATTEMPTS });
      found.push(...answer.conversations);
      if (!answer.more) break;
      cursor = answer.cursor;
    }
    return found;
  }

  /** Scrollback: the `limit` messages just below `before`, ascending; `more` when older ones exist. */
  async messagesBefore(conv: string, before: number, limit = 100): Promise<MessagesPage> {
    const body = await this.call("GET", `/v1/conversations/${pathSegment(conv)}/messages`, {
      query: { before, limit },
      counts: "history",
    });
    return parseMessagesPage(conv, body);
  }

  // --- presence, groups, devices -----------------------------------------------------------------

  /** State and last seen of users: yourself and users you share a conversation with (anyone
   * else: HttpError `forbidden` for the whole call). */
  async presence(users: readonly string[]): Promise<Presence[]> {
    return parsePresencePage(await this.call("GET", "/v1/presence", { query: { users: users.join(",") } }));
  }

  /** Create a group (or a channel); the caller is its first admin. Not retried: a retry after a
   * lost answer would create a second group. */
  async createGroup(
    name: string,
    members: readonly string[] = [],
    kind: "group" | "channel" = "group",
  ): Promise<Group> {
    return parseGroup(await this.call("POST", "/v1/groups", { json: { name, members, kind }, attempts: 1 }));
  }

  async group(conv: string): Promise<Group> {
    return parseGroup(await this.call("GET", `/v1/groups/${pathSegment(conv)}`));
  }

  async addMembers(conv: string, members: readonly string[]): Promise<Group> {
    return parseGroup(await this.call("POST", `/v1/groups/${pathSegment(conv)}/members`, { json: { members } }));
  }

  /** Remove a member (admins), or leave (yourself). */
  async removeMember(conv: string, user: string): Promise<Group> {
    return parseGroup(await this.call("DELETE", `/v1/groups/${pathSegment(conv)}/members/${pathSegment(user)}`));
  }

  async promote(conv: string, user: string): Promise<Group> {
    return parseGroup(await this.call("POST", `/v1/groups/${pathSegment(conv)}/admins/${pathSegment(user)}`));
  }

  async registerPushToken(device: string, registration: PushRegistration): Promise<void> {
    const body: Record<string, unknown> = {
      platform: registration.platform,
      token: registration.token,
      sandbox: registration.sandbox ?? false,
    };
    if (registration.topic !== undefined) body["topic"] = registration.topic;
    await this.call("PUT", `/v1/devices/${pathSegment(device)}/push`, { json: body });
  }

  /** Stop pushes to this device (on logout); false when it had no token. */
  async unregisterPushToken(device: string): Promise<boolean> {
    try {
      await this.call("DELETE", `/v1/devices/${pathSegment(device)}/push`);
      return true;
    } catch (error) {
      if (error instanceof HttpError && error.status === 404) return false;
      throw error;
    }
  }

  async setMuted(conv: string, muted: boolean): Promise<void> {
    await this.call("PUT", `/v1/conversations/${pathSegment(conv)}/settings`, { json: { muted } });
  }
}

function parseJson(method: string, path: string, text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    throw new HttpError("bad_response", `${method} ${path}: the answer is not JSON`);
  }
}

/** A group as the server renders it; HttpError("bad_response") when it is not one. */
export function parseGroup(body: unknown): Group {
  const obj = (typeof body === "object" && body !== null ? body : {}) as Record<string, unknown>;
  const members = Array.isArray(obj["members"]) ? obj["members"] : null;
  if (typeof obj["conv"] !== "string" || members === null)
    throw new HttpError("bad_response", "a group without 'conv' or 'members'");
  return {
    conv: obj["conv"],
    name: typeof obj["name"] === "string" ? obj["name"] : "",
    kind: typeof obj["kind"] === "string" ? obj["kind"] : "group",
    creator: typeof obj["creator"] === "string" ? obj["creator"] : "",
    created_at: typeof obj["created_at"] === "number" ? obj["created_at"] : 0,
    members: members.flatMap((m: unknown): GroupMember[] => {
      const member = (typeof m === "object" && m !== null ? m : {}) as Record<string, unknown>;
      if (typeof member["user"] !== "string") return [];
      return [
        {
          user: member["user"],
          role: typeof member["role"] === "string" ? member["role"] : "member",
          joined_seq: typeof member["joined_seq"] === "number" ? member["joined_seq"] : 0,
        },
      ];
    }),
  };
}

const DEFAULT_PORTS: Readonly<Record<string, string>> = { http: "80", https: "443" };

/** scheme://host:port of an absolute http(s) URL, lower-cased, the default port made explicit
 * (null for anything else). No URL global: the core runs where there may be none. */
export function originOf(url: string): string | null {
  const match = /^(https?):\/\/([^/?#]*)/i.exec(url);
  if (match === null) return null;
  const scheme = (match[1] as string).toLowerCase();
  const authority = (match[2] as string).toLowerCase();
  if (authority.includes("@")) return null; // user info: never sent credentials
  const hostPort = /^(\[[^\]]*\]|[^:]*)(?::(\d*))?$/.exec(authority);
  if (hostPort === null || hostPort[1] === "") return null;
  const port = hostPort[2] !== undefined && hostPort[2] !== "" ? String(Number(hostPort[2])) : DEFAULT_PORTS[scheme];
  return `${scheme}://${hostPort[1]}:${port}`;
}
