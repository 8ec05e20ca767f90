/**
 * Errors the SDK throws and reports (`onError`).
 *
 *     MqchatError               anything of the SDK's
 *     ├── AuthFailed            the server refused the token (CONNACK 4/5, HTTP 401); not retried
 *     │                         unless the client can get a fresh token (a token function)
 *     ├── ConnectionFailed      the first connect failed, or a connection ended with reconnect off
 *     ├── SendFailed            a send was answered with a final `error` reply (`.reply`)
 *     ├── RequestRefused        another request (recv, read, typing, a publish the ACL refused)
 *     │                         was answered with an `error` reply, or a subscription with 0x80
 *     ├── HttpError             an HTTP call failed for good (`.code`: the server's stable code,
 *     │   │                     or `bad_response`, `http_<status>`, `gave_up`)
 *     │   └── MediaFailed       an upload, a download or a media call
 *     └── ClientClosed          the client was used after close()
 *
 * Messages never hold a token.
 */

import type { ErrorReply } from "./protocol.js";

export class MqchatError extends Error {
  override name = "MqchatError";
}

export class AuthFailed extends MqchatError {
  override name = "AuthFailed";
}

export class ConnectionFailed extends MqchatError {
  override name = "ConnectionFailed";
}

export class SendFailed extends MqchatError {
  override name = "SendFailed";
  readonly reply: ErrorReply;

  constructor(reply: ErrorReply) {
    super(`${reply.code}: ${reply.message}`);
    this.reply = reply;
  }

  get code(): string {
    return this.reply.code;
  }
}

export class RequestRefused extends MqchatError {
  override name = "RequestRefused";
  readonly code: string;
  readonly reply: ErrorReply | null;

  constructor(code: string, message: string, reply: ErrorReply | null = null) {
    super(`${code}: ${message}`);
    this.code = code;
    this.reply = reply;
  }
}

export class HttpError extends MqchatError {
  override name = "HttpError";
  readonly code: string;
  readonly status: number | null;
  readonly retryAfterMs: number | null;

  constructor(code: string, message: string, options: { status?: number | null; retryAfterMs?: number | null } = {}) {
    super(`${code}: ${message}`);
    this.code = code;
    this.status = options.status ?? null;
    this.retryAfterMs = options.retryAfterMs ?? null;
  }
}

export class MediaFailed extends HttpError {
  override name = "MediaFailed";
}

export class ClientClosed extends MqchatError {
  override name = "ClientClosed";
}
