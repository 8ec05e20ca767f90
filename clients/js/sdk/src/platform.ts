/**
 * The few platform objects the core uses, typed by their shape rather than by a DOM or Node lib,
 * so the core compiles against ES2022 alone and runs wherever they exist: browsers, Node 20+,
 * React Native (Hermes has fetch, timers, TextEncoder and AbortController; give the client a
 * `sha256` function where WebCrypto is missing).
 *
 *     fetch, Headers-like answers, AbortController   HTTP: sync, history, groups, media
 *     setTimeout / clearTimeout, performance.now     the system clock (clock.ts)
 *     TextEncoder / TextDecoder                      UTF-8 (payloads, tus metadata)
 *     crypto.subtle.digest("SHA-256", …)             the sha256 of an upload
 *
 * base64 is done here in plain code: `btoa` works on Latin-1 strings only and is not everywhere.
 */

/** What the SDK reads of a fetch Response. */
export interface FetchResponse {
  readonly status: number;
  readonly headers: { get(name: string): string | null };
  text(): Promise<string>;
  arrayBuffer(): Promise<ArrayBuffer>;
}

export interface FetchInit {
  method?: string;
  headers?: Record<string, string>;
  body?: string | Uint8Array;
  signal?: AbortSignalLike;
  redirect?: "follow" | "manual" | "error";
}

/** `fetch` as browsers, Node 20 and React Native have it (only what the SDK passes). */
export type FetchLike = (url: string, init?: FetchInit) => Promise<FetchResponse>;

export interface AbortSignalLike {
  readonly aborted: boolean;
  addEventListener(type: "abort", listener: () => void): void;
  removeEventListener(type: "abort", listener: () => void): void;
}

interface AbortControllerLike {
  readonly signal: AbortSignalLike;
  abort(reason?: unknown): void;
}

interface Globals {
  fetch?: FetchLike;
  AbortController?: new () => AbortControllerLike;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
  performance?: { now(): number };
  TextEncoder: new () => { encode(text: string): Uint8Array };
  TextDecoder: new (label?: string, options?: { fatal?: boolean }) => { decode(bytes: Uint8Array): string };
  crypto?: {
    subtle?: { digest(algorithm: string, data: Uint8Array): Promise<ArrayBuffer> };
    getRandomValues?(array: Uint8Array): Uint8Array;
  };
}

const platform = globalThis as unknown as Globals;

/** The global fetch; an error naming the option to pass when there is none. */
export function globalFetch(): FetchLike {
  const fetch = platform.fetch;
  if (fetch === undefined) throw new TypeError("no global fetch here: pass the client a `fetch` function");
  return fetch.bind(globalThis);
}

export function newAbortController(): AbortControllerLike {
  if (platform.AbortController === undefined) throw new TypeError("no AbortController on this platform");
  return new platform.AbortController();
}

export const setTimer = (fn: () => void, ms: number): unknown => platform.setTimeout(fn, ms);
export const clearTimer = (handle: unknown): void => platform.clearTimeout(handle);

/** Milliseconds from a monotonic source when there is one (wall time otherwise). */
export function monotonicMs(): number {
  return platform.performance !== undefined ? platform.performance.now() : Date.now();
}

let encoder: { encode(text: string): Uint8Array } | undefined;
let decoder: { decode(bytes: Uint8Array): string } | undefined;

export function utf8Encode(text: string): Uint8Array {
  encoder ??= new platform.TextEncoder();
  return encoder.encode(text);
}

/** Strict UTF-8: malformed bytes throw (the caller treats the payload as unreadable). */
export function utf8Decode(bytes: Uint8Array): string {
  decoder ??= new platform.TextDecoder("utf-8", { fatal: true });
  return decoder.decode(bytes);
}

/** The hex SHA-256 of bytes with WebCrypto. */
export async function webCryptoSha256(bytes: Uint8Array): Promise<string> {
  const subtle = platform.crypto?.subtle;
  if (subtle === undefined)
    throw new TypeError("no WebCrypto (crypto.subtle) here: pass the client a `sha256` function");
  const digest = new Uint8Array(await subtle.digest("SHA-256", bytes));
  return Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** n random bytes: from crypto.getRandomValues where there is one, else Math.random. */
export function randomBytes(n: number): Uint8Array {
  const bytes = new Uint8Array(n);
  const crypto = platform.crypto;
  if (crypto?.getRandomValues !== undefined) return crypto.getRandomValues(bytes);
  for (let i = 0; i < n; i++) bytes[i] = Math.floor(Math.random() * 256);
  return bytes;
}

const CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/** A new ULID (26 characters, time-sortable): a fresh client message id for every send. */
export function newUlid(nowMs: number = Date.now()): string {
  let time = "";
  for (let t = Math.floor(nowMs), i = 0; i < 10; i++, t = Math.floor(t / 32)) time = CROCKFORD[t % 32]! + time;
  return time + Array.from(randomBytes(16), (b) => CROCKFORD[b % 32]!).join("");
}

const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/** Standard base64 with padding (RFC 4648 section 4). */
export function base64Encode(bytes: Uint8Array): string {
  let out = "";
  for (let i = 0; i < bytes.length; i += 3) {
    const [a, b, c] = [bytes[i] as number, bytes[i + 1], bytes[i + 2]];
    const n = (a << 16) | ((b ?? 0) << 8) | (c ?? 0);
    out += ALPHABET[(n >> 18) & 63]! + ALPHABET[(n >> 12) & 63]!;
    out += b === undefined ? "=" : ALPHABET[(n >> 6) & 63]!;
    out += c === undefined ? "=" : ALPHABET[n & 63]!;
  }
  return out;
}
