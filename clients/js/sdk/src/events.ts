/**
 * What a device receives, parsed: MQTT payloads into typed events, HTTP answers into pages.
 *
 *     parseEvent(payload, topic) ── p/{user} ──► Presence
 *                                └─ else ─────► parseEnvelope(JSON object) ──► Message | Ack |
 *                                               ErrorReply | Receipt | Typing | ConvEvent | OtherEvent
 *     parseSyncPage(body)      GET /v1/conversations          ──► SyncPage
 *     parseMessagesPage(body)  GET /v1/conversations/{c}/messages ──► MessagesPage
 *
 * The network is not trusted: an event parser returns null for anything it cannot read and never
 * throws; a page parser throws HttpError("bad_response") for an answer that is not a page. A media
 * message's `attachments` are read leniently, as the Python SDK reads them: an element without a
 * usable id, type and size is left out, an unreadable optional field is dropped, the message stands.
 */

import { HttpError } from "./errors.js";
import { utf8Decode } from "./platform.js";
import type {
  Attachment,
  ConvEvent,
  JsonObject,
  JsonValue,
  Message,
  Presence,
  Receipt,
  ServerEvent,
  Typing,
} from "./protocol.js";

const BASE64_RE = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

function isObject(value: unknown): value is JsonObject {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function str(obj: JsonObject, key: string): string | null {
  const value = obj[key];
  return typeof value === "string" ? value : null;
}

function int(obj: JsonObject, key: string): number | null {
  const value = obj[key];
  return typeof value === "number" && Number.isInteger(value) ? value : null;
}

function strings(value: JsonValue | undefined): string[] | null {
  if (!Array.isArray(value) || !value.every((v) => typeof v === "string")) return null;
  return value as string[];
}

/** Decode one payload into a JSON object; null when it is not one. */
export function decodeObject(payload: string | Uint8Array): JsonObject | null {
  let text: string;
  try {
    text = typeof payload === "string" ? payload : utf8Decode(payload);
    const value: unknown = JSON.parse(text);
    return isObject(value) ? value : null;
  } catch {
    return null;
  }
}

/** Parse one MQTT payload. `topic` tells presence (`p/{user}`, which has no "type") apart. */
export function parseEvent(payload: string | Uint8Array, topic?: string): ServerEvent | null {
  const obj = decodeObject(payload);
  if (obj === null) return null;
  if (topic !== undefined && topic.startsWith("p/")) return parsePresence(topic.slice(2), obj);
  return parseEnvelope(obj);
}

/** Parse one decoded envelope (an element of a history page, say); null when malformed. */
export function parseEnvelope(obj: JsonObject): ServerEvent | null {
  const type = str(obj, "type");
  switch (type) {
    case null:
      return null;
    case "msg":
      return parseMessage(obj);
    case "ack": {
      const [id, conv, mid, seq, ts] = [
        str(obj, "id"),
        str(obj, "conv"),
        str(obj, "mid"),
        int(obj, "seq"),
        int(obj, "ts"),
      ];
      if (id === null || conv === null || mid === null || seq === null || ts === null) return null;
      return { type: "ack", id, conv, seq, mid, ts };
    }
    case "error": {
      const [code, message] = [str(obj, "code"), str(obj, "message")];
      if (code === null || message === null) return null;
      for (const key of ["id", "conv"]) {
        if (obj[key] !== undefined && obj[key] !== null && str(obj, key) === null) return null;
      }
      const retryAfter = int(obj, "retry_after_ms");
      return {
        type: "error",
        code,
        message,
        id: str(obj, "id"),
        conv: str(obj, "conv"),
        retry_after_ms: retryAfter !== null && retryAfter >= 0 ? retryAfter : null,
      };
    }
    case "receipt":
      return parseReceipt(obj);
    case "typing":
      return parseTyping(obj);
    case "conv":
      return parseConv(obj);
    default:
      return { type: "other", name: type, data: obj };
  }
}

/** A `msg` envelope; null when a required field is missing or of the wrong type. */
export function parseMessage(obj: JsonObject): Message | null {
  if (str(obj, "type") !== "msg") return null;
  const [conv, mid, from, dev, id] = [
    str(obj, "conv"),
    str(obj, "mid"),
    str(obj, "from"),
    str(obj, "dev"),
    str(obj, "id"),
  ];
  const [kind, body, seq, ts] = [str(obj, "kind"), str(obj, "body"), int(obj, "seq"), int(obj, "ts")];
  if (conv === null || mid === null || from === null || dev === null || id === null) return null;
  if (kind === null || body === null || seq === null || ts === null) return null;
  const media = obj["media"] === undefined ? [] : strings(obj["media"]);
  if (media === null) return null;
  return {
    type: "msg",
    conv,
    seq,
    mid,
    from,
    dev,
    id,
    ts,
    kind,
    body,
    media: [...media],
    attachments: parseAttachments(obj["attachments"]),
  };
}

/** The readable elements of a msg's `attachments` (anything else: none); never throws. */
export function parseAttachments(raw: JsonValue | undefined): Attachment[] {
  if (!Array.isArray(raw)) return [];
  const found: Attachment[] = [];
  for (const item of raw) {
    const attachment = isObject(item) ? parseAttachment(item) : null;
    if (attachment !== null) found.push(attachment);
  }
  return found;
}

function parseAttachment(obj: JsonObject): Attachment | null {
  const [id, type, size] = [str(obj, "id"), str(obj, "type"), int(obj, "size")];
  if (!id || type === null || size === null || size < 0) return null;
  let [width, height] = [int(obj, "width"), int(obj, "height")];
  if (width === null || height === null || width <= 0 || height <= 0) width = height = null;
  const thumbnail = str(obj, "thumbnail");
  return {
    id,
    type,
    size,
    name: str(obj, "name"),
    width,
    height,
    thumbnail: thumbnail && BASE64_RE.test(thumbnail) ? thumbnail : null,
    encrypted: obj["encrypted"] === true,
  };
}

function parseReceipt(obj: JsonObject): Receipt | null {
  const [conv, user, delivered, read] = [str(obj, "conv"), str(obj, "user"), int(obj, "delivered"), int(obj, "read")];
  if (conv === null || user === null || delivered === null || read === null) return null;
  return { type: "receipt", conv, user, delivered, read };
}

function parseTyping(obj: JsonObject): Typing | null {
  const [conv, user, state] = [str(obj, "conv"), str(obj, "user"), obj["state"]];
  if (conv === null || user === null || typeof state !== "boolean") return null;
  return { type: "typing", conv, user, state };
}

function parseConv(obj: JsonObject): ConvEvent | null {
  const [conv, kind, event, by, users] = [
    str(obj, "conv"),
    str(obj, "kind"),
    str(obj, "event"),
    str(obj, "by"),
    strings(obj["users"]),
  ];
  if (conv === null || kind === null || event === null || by === null || users === null) return null;
  return { type: "conv", conv, kind, event, users: [...users], by };
}

/** The retained `{"state","last_seen"}` of `p/{user}`, or an element of `GET /v1/presence`. */
export function parsePresence(user: string, obj: JsonObject): Presence | null {
  const state = str(obj, "state");
  const lastSeen = obj["last_seen"] ?? null;
  if (state === null || !(lastSeen === null || (typeof lastSeen === "number" && Number.isInteger(lastSeen))))
    return null;
  return { type: "presence", user, state, last_seen: lastSeen };
}

// --- HTTP pages ----------------------------------------------------------------------------------

/** One conversation of a sync page: the user's state there and its newest messages. */
export interface ConversationSummary {
  conv: string;
  kind: string; // "dm" | "group" | "channel"
  last_seq: number;
  delivered: number;
  read: number;
  unread: number;
  updated_at: number;
  messages: Message[]; // ascending (with include_messages)
  messages_more: boolean;
}

export interface SyncPage {
  conversations: ConversationSummary[];
  cursor: string;
  more: boolean;
}

export interface MessagesPage {
  conv: string;
  messages: Message[]; // ascending
  more: boolean;
  last_seq: number;
}

function badResponse(what: string): HttpError {
  return new HttpError("bad_response", what);
}

function pageInt(obj: JsonObject, key: string, fallback?: number): number {
  const value = obj[key] === undefined ? fallback : obj[key];
  if (typeof value !== "number" || !Number.isInteger(value))
    throw badResponse(`${JSON.stringify(key)} is not an integer`);
  return value;
}

function pageMessages(raw: JsonValue | undefined): Message[] {
  if (raw === undefined || raw === null) return [];
  if (!Array.isArray(raw)) throw badResponse("'messages' is not a list");
  return raw.map((item) => {
    const msg = isObject(item) ? parseMessage(item) : null;
    if (msg === null) throw badResponse("an element of 'messages' is not a msg envelope");
    return msg;
  });
}

function summary(obj: JsonValue): ConversationSummary {
  if (!isObject(obj) || typeof obj["conv"] !== "string") throw badResponse("a conversation without 'conv'");
  return {
    conv: obj["conv"],
    kind: typeof obj["kind"] === "string" ? obj["kind"] : "",
    last_seq: pageInt(obj, "last_seq"),
    delivered: pageInt(obj, "delivered", 0),
    read: pageInt(obj, "read", 0),
    unread: pageInt(obj, "unread", 0),
    updated_at: pageInt(obj, "updated_at", 0),
    messages: pageMessages(obj["messages"]),
    messages_more: obj["messages_more"] === true,
  };
}

/** `GET /v1/conversations` → SyncPage; HttpError("bad_response") when it is not one. */
export function parseSyncPage(body: unknown): SyncPage {
  if (!isObject(body) || !Array.isArray(body["conversations"]) || typeof body["cursor"] !== "string") {
    throw badResponse("a sync page without 'conversations' or 'cursor'");
  }
  return { conversations: body["conversations"].map(summary), cursor: body["cursor"], more: body["more"] === true };
}

/** `GET /v1/conversations/{conv}/messages` → MessagesPage; HttpError("bad_response") otherwise. */
export function parseMessagesPage(conv: string, body: unknown): MessagesPage {
  if (!isObject(body)) throw badResponse("a messages page that is not a JSON object");
  return {
    conv,
    messages: pageMessages(body["messages"]),
    more: body["more"] === true,
    last_seq: pageInt(body, "last_seq", 0),
  };
}

/** `GET /v1/presence` → one Presence per user the server answered for. */
export function parsePresencePage(body: unknown): Presence[] {
  const users = isObject(body) ? body["users"] : undefined;
  if (!Array.isArray(users)) throw badResponse("a presence answer without 'users'");
  const found: Presence[] = [];
  for (const item of users) {
    if (!isObject(item) || typeof item["user"] !== "string") continue;
    const presence = parsePresence(item["user"], item);
    if (presence !== null) found.push(presence);
  }
  return found;
}
