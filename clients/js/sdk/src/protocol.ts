/**
 * Wire protocol v1 as docs/protocol.md describes it: ids, topics, the requests a device builds
 * and the typed events it receives. Pure: building and checking, no I/O; `events.ts` parses.
 *
 *     device ── send / recv / read / typing ──► u/{user}/{device}/out
 *     device ◄── ack, error ─────────────────── u/{user}/{device}/in
 *     device ◄── msg, receipt, typing, conv ─── u/{user}/in        (channels: c/{conv}/in)
 *     device ◄── {"state","last_seen"} ──────── p/{user}           (retained presence)
 *
 * Field names are the wire's (`from`, `dev`, `last_seen`, `retry_after_ms` …), so an event
 * reads as the JSON in the spec. A value the wire leaves out is `null` in a parsed event.
 */

export const PROTOCOL_VERSION = 1;
/** The largest request payload the server takes by default (`max_envelope_bytes`). */
export const MAX_ENVELOPE_BYTES = 64 * 1024;
/** Media ids one `send` may carry. */
export const MAX_MEDIA_PER_MESSAGE = 32;

export type JsonValue = null | boolean | number | string | JsonValue[] | { [key: string]: JsonValue };
export type JsonObject = { [key: string]: JsonValue };

// --- ids (section 2 and 4) ---------------------------------------------------------------------

const ID_RE = /^[A-Za-z0-9_.@-]{1,64}$/;
const ULID_RE = /^[0-9A-HJKMNP-TV-Z]{26}$/;

/** A user, device, client message or media id: 1–64 characters of `[A-Za-z0-9_.@-]`. */
export function isValidId(value: unknown): value is string {
  return typeof value === "string" && ID_RE.test(value);
}

/** A conversation id: `dm:{a}:{b}` with a ≤ b (byte order), or `g:{ULID}`. */
export function isConv(value: unknown): value is string {
  if (typeof value !== "string" || value.length > 140) return false;
  if (value.startsWith("dm:")) {
    const parts = value.split(":");
    if (parts.length !== 3) return false;
    const [, a, b] = parts as [string, string, string];
    return isValidId(a) && isValidId(b) && a <= b; // ids are ASCII: UTF-16 order is byte order
  }
  return value.startsWith("g:") && ULID_RE.test(value.slice(2));
}

/** The 1:1 conversation of two users, whichever order they are given in. */
export function dmConv(a: string, b: string): string {
  if (!isValidId(a) || !isValidId(b)) throw new TypeError("user ids must be 1-64 characters of [A-Za-z0-9_.@-]");
  return a <= b ? `dm:${a}:${b}` : `dm:${b}:${a}`;
}

// --- topics (section 3) --------------------------------------------------------------------------

export const outTopic = (user: string, device: string): string => `u/${user}/${device}/out`;
export const userInTopic = (user: string): string => `u/${user}/in`;
export const deviceInTopic = (user: string, device: string): string => `u/${user}/${device}/in`;
export const presenceTopic = (user: string): string => `p/${user}`;
export const channelTopic = (conv: string): string => `c/${conv}/in`;

// --- requests (section 5), in the key order every mqchat SDK writes ------------------------------

export type MessageKind = "text" | "media";

export interface SendRequest {
  type: "send";
  id: string;
  conv: string;
  body: string;
  kind: MessageKind;
  media?: string[]; // media only: 1–32 finished uploads of the sender's
}

export interface WatermarkRequest {
  type: "recv" | "read";
  conv: string;
  seq: number;
}

export interface TypingRequest {
  type: "typing";
  conv: string;
  state: boolean;
}

export type Request = SendRequest | WatermarkRequest | TypingRequest;

/** A `send`: `{"type","id","conv","body","kind"[,"media"]}`. */
export function sendRequest(args: {
  id: string;
  conv: string;
  body: string;
  kind?: MessageKind;
  media?: readonly string[];
}): SendRequest {
  const request: SendRequest = {
    type: "send",
    id: args.id,
    conv: args.conv,
    body: args.body,
    kind: args.kind ?? "text",
  };
  if (args.media !== undefined && args.media.length > 0) request.media = [...args.media];
  return request;
}

export function watermarkRequest(type: "recv" | "read", conv: string, seq: number): WatermarkRequest {
  return { type, conv, seq };
}

export function typingRequest(conv: string, state: boolean): TypingRequest {
  return { type: "typing", conv, state };
}

/** Why the server would refuse a request: its error code and a reason for people. */
export interface Refusal {
  code: string;
  reason: string;
}

/** How the server would refuse a request (section 5's validation, in its order), or null when it
 * is valid: clients check before publishing what would only be refused. */
export function checkRequest(request: Request): Refusal | null {
  const refuse = (code: string, reason: string): Refusal => ({ code, reason });
  if (utf8Length(encodeRequest(request)) > MAX_ENVELOPE_BYTES)
    return refuse("too_large", `over ${MAX_ENVELOPE_BYTES} bytes`);
  if (!isConv(request.conv)) return refuse("bad_conv", "conv must be dm:{a}:{b} (a <= b) or g:{ULID}");
  if (request.type === "send") {
    if (!isValidId(request.id)) return refuse("bad_request", "id must be 1-64 characters of [A-Za-z0-9_.@-]");
    if (request.kind !== "text" && request.kind !== "media")
      return refuse("bad_request", 'kind must be "text" or "media"');
    if (typeof request.body !== "string") return refuse("bad_request", "body must be a string");
    const media = request.media ?? [];
    if (
      request.kind === "media" &&
      (media.length < 1 || media.length > MAX_MEDIA_PER_MESSAGE || !media.every(isValidId))
    ) {
      return refuse("bad_request", `media must list 1-${MAX_MEDIA_PER_MESSAGE} media ids`);
    }
    if (request.kind === "text" && request.body === "")
      return refuse("bad_request", "a text message needs a non-empty body");
  } else if (request.type === "typing") {
    if (typeof request.state !== "boolean") return refuse("bad_request", "state must be true or false");
  } else if (!Number.isSafeInteger(request.seq) || request.seq < 0) {
    return refuse("bad_request", "seq must be a non-negative integer");
  }
  return null;
}

/** The UTF-8 length of a string without encoding it. */
function utf8Length(text: string): number {
  let bytes = 0;
  for (const char of text) {
    const code = char.codePointAt(0) as number;
    bytes += code < 0x80 ? 1 : code < 0x800 ? 2 : code < 0x10000 ? 3 : 4;
  }
  return bytes;
}

/** Compact JSON, the only encoding on the wire (MQTT.js sends a string as its UTF-8 bytes). */
export function encodeRequest(request: Request): string {
  return JSON.stringify(request);
}

// --- events (section 5) --------------------------------------------------------------------------

/** What the server says of one file of a media message (`attachments`). */
export interface Attachment {
  id: string;
  type: string; // content type ("application/octet-stream" when encrypted)
  size: number; // bytes
  name: string | null; // the file name the sender gave (never for an encrypted file)
  width: number | null; // images: pixels as displayed (both or neither)
  height: number | null;
  thumbnail: string | null; // images: a small JPEG, base64 (`data:image/jpeg;base64,` + it)
  encrypted: boolean;
}

/** A stored message of a conversation (`msg`), the device's own ones included. */
export interface Message {
  type: "msg";
  conv: string;
  seq: number;
  mid: string; // the server's id, a ULID
  from: string; // the sending user
  dev: string; // the sending device
  id: string; // the sender's client message id
  ts: number; // server time, ms since the epoch
  kind: string; // "text" | "media" | "deleted" | a later kind
  body: string;
  media: string[]; // the media ids of a media message, as sent
  attachments: Attachment[];
}

/** The server stored a send of this device durably as `seq` of `conv`. */
export interface Ack {
  type: "ack";
  id: string;
  conv: string;
  seq: number;
  mid: string;
  ts: number;
}

/** The server refused a request of this device; `code` is one of section 6 (or a later one). */
export interface ErrorReply {
  type: "error";
  code: string;
  message: string;
  id: string | null; // the request's id (sends only)
  conv: string | null;
  retry_after_ms: number | null; // rate_limited only
}

/** A user's delivered / read watermarks in a conversation (coalesced). */
export interface Receipt {
  type: "receipt";
  conv: string;
  user: string;
  delivered: number;
  read: number;
}

/** Someone started (`state: true`) or stopped typing; a `true` older than ~6 s means stopped. */
export interface Typing {
  type: "typing";
  conv: string;
  user: string;
  state: boolean;
}

/** A group or channel changed: created, members_added, members_removed, admin_added … */
export interface ConvEvent {
  type: "conv";
  conv: string;
  kind: string; // "group" | "channel"
  event: string;
  users: string[];
  by: string;
}

/** The retained `p/{user}` (and `GET /v1/presence`): online since, or last seen (ms). */
export interface Presence {
  type: "presence";
  user: string;
  state: string; // "online" | "offline"
  last_seen: number | null; // null: never seen
}

/** An envelope of a type this SDK does not know (section 9: ignore it, or look inside). */
export interface OtherEvent {
  type: "other";
  name: string; // its "type"
  data: JsonObject;
}

export type ServerEvent = Message | Ack | ErrorReply | Receipt | Typing | ConvEvent | Presence | OtherEvent;

// --- error codes (section 6) ---------------------------------------------------------------------

/** How a refused request is retried: `no` (final), `after_retry_after` (rate_limited: the same id
 * once `retry_after_ms` has passed), `same_id` (internal: publish it again unchanged),
 * `backoff` (unavailable: again with backoff), `from_offset` (an upload: HEAD, then PATCH). */
export type Retry = "no" | "after_retry_after" | "same_id" | "backoff" | "from_offset";

export const ERROR_CODES: Readonly<Record<string, { retry: Retry; http: number | null }>> = {
  bad_json: { retry: "no", http: 400 },
  bad_request: { retry: "no", http: 400 },
  unknown_type: { retry: "no", http: 400 },
  unsupported: { retry: "no", http: 400 },
  bad_conv: { retry: "no", http: 400 },
  not_member: { retry: "no", http: 403 },
  not_found: { retry: "no", http: 404 },
  too_large: { retry: "no", http: 413 },
  id_reused: { retry: "no", http: 400 },
  bad_seq: { retry: "no", http: 400 },
  bad_cursor: { retry: "no", http: 400 },
  rate_limited: { retry: "after_retry_after", http: 429 },
  unauthorized: { retry: "no", http: 401 },
  forbidden: { retry: "no", http: 403 },
  internal: { retry: "same_id", http: 500 },
  unavailable: { retry: "backoff", http: 503 },
  bad_media: { retry: "no", http: 400 },
  unsupported_type: { retry: "no", http: 415 },
  offset_mismatch: { retry: "from_offset", http: 409 },
  checksum_mismatch: { retry: "no", http: 460 },
  quota_exceeded: { retry: "no", http: 413 },
  bad_range: { retry: "no", http: 416 },
  upload_lost: { retry: "no", http: 410 },
};

/** How to retry a request refused with `code`; an unknown code is final (section 9). */
export function retryOf(code: string): Retry {
  return Object.hasOwn(ERROR_CODES, code) ? (ERROR_CODES[code] as { retry: Retry }).retry : "no";
}

/** Whether a request refused with `code` may succeed if sent again (unchanged, or later). */
export function isRetryable(code: string): boolean {
  return retryOf(code) !== "no";
}
