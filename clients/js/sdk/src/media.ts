/**
 * Attachments over the HTTP API: resumable uploads (the tus 1.0 core protocol, over fetch) and
 * downloads (protocol section 7, "Media").
 *
 *     upload(source)   sha256 of the bytes (WebCrypto) ─► POST /v1/media (Upload-Length,
 *                      Upload-Metadata: filetype, sha256, filename | encrypted) ─► 201, Location
 *                      ─► PATCH Location, Upload-Offset: N, the bytes from N a chunk at a time
 *                         ─► 204, Upload-Offset ─► … until every byte is there (the last PATCH
 *                            makes the server check the sha256 and the type)
 *                         ─► a cut, a timeout, 408/429/5xx or 409: HEAD (after a backoff) ─► PATCH
 *                            from its Upload-Offset
 *                      ─► GET /v1/media/{id}/info ─► UploadedMedia
 *     download(id)     GET …/info (size, sha256) ─► GET /v1/media/{id} ─► bytes, checked
 *     info(id), delete(id)
 *
 * At most `retries` failed attempts in a row without progress (any byte that reaches the server
 * starts the count again), then MediaFailed("gave_up"). An upload gone from the server midway
 * (404/410: expired, or its check's answer was lost) starts over once. 460 checksum_mismatch,
 * 415 unsupported_type, 413 too_large / quota_exceeded and the like are final: MediaFailed with
 * the server's code. The bytes are held in memory while uploading (WebCrypto has no streaming
 * digest); the server's files are at most 100 MiB by default.
 */

import { backoffDelayMs, sleep } from "./clock.js";
import { HttpError, MediaFailed } from "./errors.js";
import { errorOf, pathSegment, RETRYABLE_STATUS, retryAfterMs, type HttpApi } from "./http.js";
import { base64Encode, utf8Encode, webCryptoSha256, type FetchResponse } from "./platform.js";

export const CHUNK_BYTES = 1024 * 1024;
const TUS = { "Tus-Resumable": "1.0.0" };
const GONE = new Set([404, 410]);
const METADATA_KEY_RE = /^[A-Za-z0-9_.-]{1,64}$/;
const RESTARTS = 1;

/** The bytes of a file to upload: a Uint8Array, or anything with Blob's size and slice (a File). */
export type UploadSource =
  | Uint8Array
  | {
      readonly size: number;
      readonly type?: string;
      readonly name?: string;
      slice(start?: number, end?: number): { arrayBuffer(): Promise<ArrayBuffer> };
    };

export interface UploadOptions {
  contentType?: string; // default: the Blob's type, else application/octet-stream
  filename?: string; // default: the File's name
  encrypted?: boolean; // an end-to-end encrypted file: the server learns neither type nor name
  onProgress?: (done: number, total: number) => void;
}

/** What `GET /v1/media/{id}/info` says of an upload or a file. */
export interface MediaInfo {
  id: string;
  type: string;
  size: number;
  state: string; // "uploading" | "ready"
  offset: number;
  sha256: string;
  name: string | null;
  width: number | null;
  height: number | null;
  thumbnail: string | null; // base64 JPEG
  encrypted: boolean;
}

/** A finished upload: a file the user may now send (`sendMedia(conv, media.id)`). */
export interface UploadedMedia extends MediaInfo {
  resumes: number; // times the bytes were sent again from the server's offset after a failure
}

/** tus `Upload-Metadata`: `key base64(UTF-8 value)` pairs joined by commas, in the order given (an
 * empty value is sent as the key alone). Keys are 1–64 characters of `[A-Za-z0-9_.-]`. */
export function encodeMetadata(pairs: Readonly<Record<string, string>>): string {
  return Object.entries(pairs)
    .map(([key, value]) => {
      if (!METADATA_KEY_RE.test(key)) throw new TypeError(`not a tus metadata key: ${JSON.stringify(key)}`);
      const encoded = base64Encode(utf8Encode(value));
      return encoded === "" ? key : `${key} ${encoded}`;
    })
    .join(",");
}

function parseInfo(body: unknown): MediaInfo {
  const obj = (typeof body === "object" && body !== null ? body : {}) as Record<string, unknown>;
  const { id, type, state, sha256, size, offset } = obj;
  if (typeof id !== "string" || typeof type !== "string" || typeof state !== "string" || typeof sha256 !== "string") {
    throw new MediaFailed("bad_response", "media info without id, type, state or sha256");
  }
  if (!Number.isInteger(size) || !Number.isInteger(offset))
    throw new MediaFailed("bad_response", "media info without an integer size or offset");
  const positive = (key: string): number | null =>
    Number.isInteger(obj[key]) && (obj[key] as number) > 0 ? (obj[key] as number) : null;
  return {
    id,
    type,
    size: size as number,
    state,
    offset: offset as number,
    sha256,
    name: typeof obj["name"] === "string" ? obj["name"] : null,
    width: positive("width"),
    height: positive("height"),
    thumbnail: typeof obj["thumbnail"] === "string" && obj["thumbnail"] !== "" ? obj["thumbnail"] : null,
    encrypted: obj["encrypted"] === true,
  };
}

async function bytesOf(source: UploadSource): Promise<Uint8Array> {
  return source instanceof Uint8Array ? source : new Uint8Array(await source.slice(0, source.size).arrayBuffer());
}

/** An upload is not on the server any more (expired, deleted, or dropped by its check). */
class Gone extends Error {}

/** One attempt failed in a way worth retrying; never leaves this module. */
class Transient extends Error {
  readonly retryAfterMs: number | null;

  constructor(problem: string, retryAfterMs: number | null = null) {
    super(problem);
    this.retryAfterMs = retryAfterMs;
  }
}

export class MediaApi {
  readonly #http: HttpApi;
  readonly #sha256: (bytes: Uint8Array) => Promise<string>;
  readonly #random: () => number;
  readonly #retries: number;
  readonly #chunkBytes: number;
  uploads = 0;
  resumes = 0;
  failures = 0;

  constructor(options: {
    http: HttpApi;
    random: () => number;
    sha256?: (bytes: Uint8Array) => Promise<string>;
    retries?: number;
    chunkBytes?: number;
  }) {
    this.#http = options.http;
    this.#random = options.random;
    this.#sha256 = options.sha256 ?? webCryptoSha256;
    this.#retries = options.retries ?? 8;
    this.#chunkBytes = options.chunkBytes ?? CHUNK_BYTES;
  }

  async info(id: string): Promise<MediaInfo> {
    return parseInfo(await this.#call("GET", `/v1/media/${pathSegment(id)}/info`));
  }

  /** Delete an upload (finished or not) of one's own. */
  async delete(id: string): Promise<void> {
    await this.#call("DELETE", `/v1/media/uploads/${pathSegment(id)}`);
  }

  /** The bytes of a file one may read, checked against its size and sha256. */
  async download(id: string): Promise<Uint8Array> {
    const info = await this.info(id);
    const path = `/v1/media/${pathSegment(id)}`;
    const bytes = await this.#retrying(`GET ${path}`, async () => {
      const response = await this.#send("GET", path);
      if (response.status !== 200) throw this.#failure(`GET ${path}`, response.status, await response.text());
      return new Uint8Array(await response.arrayBuffer());
    });
    if (bytes.length !== info.size || (await this.#sha256(bytes)) !== info.sha256) {
      throw new MediaFailed(
        bytes.length !== info.size ? "size_mismatch" : "checksum_mismatch",
        `${id}: the bytes received are not the file the server described`,
      );
    }
    return bytes;
  }

  /** Upload a file and return it once the server checked it; see the module's description. */
  async upload(source: UploadSource, options: UploadOptions = {}): Promise<UploadedMedia> {
    const bytes = await bytesOf(source);
    if (bytes.length === 0) throw new TypeError("an empty file cannot be uploaded");
    const sha256 = await this.#sha256(bytes);
    const meta: Record<string, string> = { sha256 };
    if (options.encrypted === true) {
      meta["encrypted"] = "1";
    } else {
      meta["filetype"] =
        options.contentType ?? (source instanceof Uint8Array ? undefined : source.type) ?? "application/octet-stream";
      const name = options.filename ?? (source instanceof Uint8Array ? undefined : source.name);
      if (name) meta["filename"] = name;
    }
    for (let restart = 0; ; restart++) {
      try {
        const url = await this.#create(bytes.length, encodeMetadata(meta));
        const resumes = await this.#sendFrom(url, bytes, options.onProgress);
        const info = await this.info(url.replace(/\/+$/, "").split("/").pop() as string);
        if (info.state !== "ready")
          throw new MediaFailed("bad_response", `every byte of ${info.id} is there, yet it is not ready`);
        this.uploads += 1;
        return { ...info, resumes };
      } catch (error) {
        if (!(error instanceof Gone) || restart >= RESTARTS)
          throw error instanceof Gone
            ? new MediaFailed("not_found", "the upload is gone from the server (expired or deleted)")
            : error;
      }
    }
  }

  async #create(size: number, metadata: string): Promise<string> {
    const headers = { ...TUS, "Upload-Length": String(size), "Upload-Metadata": metadata };
    return this.#retrying("POST /v1/media", async () => {
      const response = await this.#send("POST", "/v1/media", { headers });
      const text = await response.text();
      if (response.status !== 201) throw this.#failure("POST /v1/media", response.status, text, response);
      let location = response.headers.get("location");
      if (!location) {
        try {
          const body = JSON.parse(text) as { upload_url?: unknown };
          location = typeof body.upload_url === "string" ? body.upload_url : null;
        } catch {
          location = null;
        }
      }
      if (!location) throw new MediaFailed("bad_response", "POST /v1/media answered without a Location");
      return location;
    });
  }

  /** PATCH the bytes from the server's offset until it holds all of them; the resumes. */
  async #sendFrom(url: string, bytes: Uint8Array, onProgress?: (done: number, total: number) => void): Promise<number> {
    let offset = 0;
    let failures = 0; // attempts in a row that moved nothing
    let resumes = 0;
    let problem: Transient | null = null; // why the last attempt failed: ask where to resume
    for (;;) {
      if (problem !== null) {
        if (failures > this.#retries)
          throw new MediaFailed("gave_up", `upload ${url}: ${problem.message} (${failures} attempts without progress)`);
        await sleep(
          this.#http.clock,
          Math.max(problem.retryAfterMs ?? 0, backoffDelayMs(failures - 1, this.#random)),
          this.#http.signal,
        );
        let reported: number;
        try {
          reported = await this.#head(url);
        } catch (error) {
          if (!(error instanceof Transient)) throw error;
          [problem, failures] = [error, failures + 1];
          continue;
        }
        if (reported > offset) failures = 0; // the failed PATCH delivered bytes
        [offset, problem] = [reported, null];
        resumes += 1;
        this.resumes += 1;
      }
      onProgress?.(offset, bytes.length);
      if (offset >= bytes.length && (await this.#ready(url))) return resumes;
      try {
        const reached = await this.#patch(url, bytes, offset);
        if (reached > offset) failures = 0;
        offset = reached;
        if (offset >= bytes.length) {
          onProgress?.(offset, bytes.length);
          return resumes;
        }
      } catch (error) {
        if (!(error instanceof Transient)) throw error;
        this.failures += 1;
        [problem, failures] = [error, failures + 1];
      }
    }
  }

  /** One PATCH of a chunk from offset; the server's new offset. */
  async #patch(url: string, bytes: Uint8Array, offset: number): Promise<number> {
    const headers = { ...TUS, "Content-Type": "application/offset+octet-stream", "Upload-Offset": String(offset) };
    const response = await this.#send("PATCH", url, {
      headers,
      body: bytes.subarray(offset, Math.min(bytes.length, offset + this.#chunkBytes)),
    });
    const text = await response.text();
    if (response.status === 204) return offsetOf(response);
    if (response.status === 409) throw transient(`409 ${errorOf(409, text).code}`);
    if (GONE.has(response.status)) throw new Gone(url);
    if (RETRYABLE_STATUS.has(response.status))
      throw transient(`${response.status} ${errorOf(response.status, text).code}`, retryAfterMs(response));
    throw this.#failure(`PATCH ${url}`, response.status, text);
  }

  /** Where the upload stands; Gone when it is not on the server any more. */
  async #head(url: string): Promise<number> {
    const response = await this.#send("HEAD", url, { headers: TUS });
    if (GONE.has(response.status)) throw new Gone(url);
    if (RETRYABLE_STATUS.has(response.status)) throw transient(`HEAD ${response.status}`, retryAfterMs(response));
    if (response.status !== 200) throw this.#failure(`HEAD ${url}`, response.status, "");
    return offsetOf(response);
  }

  /** Every byte is there: has the server made it a file (or must a PATCH finish it)? */
  async #ready(url: string): Promise<boolean> {
    try {
      return (await this.info(url.replace(/\/+$/, "").split("/").pop() as string)).state === "ready";
    } catch (error) {
      if (error instanceof HttpError && error.code === "not_found") throw new Gone(url);
      throw error;
    }
  }

  /** One request; a network failure or a timeout throws Transient. */
  async #send(
    method: string,
    url: string,
    init: { headers?: Record<string, string>; body?: Uint8Array } = {},
  ): Promise<FetchResponse> {
    try {
      return await this.#http.fetchOnce(method, url, init);
    } catch (error) {
      if (error instanceof HttpError && error.code === "transport") throw transient(error.message);
      throw error;
    }
  }

  /** A JSON call answered 2xx, retried on transient failures. */
  async #call(method: string, path: string): Promise<unknown> {
    return this.#retrying(`${method} ${path}`, async () => {
      const response = await this.#send(method, path, method === "DELETE" ? { headers: TUS } : {});
      const text = await response.text();
      if (response.status < 200 || response.status >= 300)
        throw this.#failure(`${method} ${path}`, response.status, text, response);
      return text === "" ? null : (JSON.parse(text) as unknown);
    });
  }

  async #retrying<T>(what: string, attempt: () => Promise<T>): Promise<T> {
    for (let failures = 0; ; failures++) {
      try {
        return await attempt();
      } catch (error) {
        if (!(error instanceof Transient)) throw error;
        this.failures += 1;
        if (failures >= this.#retries)
          throw new MediaFailed("gave_up", `${what}: ${error.message} (${failures + 1} attempts)`);
        await sleep(
          this.#http.clock,
          Math.max(error.retryAfterMs ?? 0, backoffDelayMs(failures, this.#random)),
          this.#http.signal,
        );
      }
    }
  }

  /** A final answer as MediaFailed; a retryable status as a transient error. */
  #failure(what: string, status: number, text: string, response?: FetchResponse): Transient | MediaFailed {
    const { code, message } = errorOf(status, text);
    if (RETRYABLE_STATUS.has(status))
      return transient(`${status} ${code}`, response === undefined ? null : retryAfterMs(response));
    return new MediaFailed(code, `${what}: ${status} ${message}`.trimEnd(), { status });
  }
}

function transient(problem: string, retryAfter: number | null = null): Transient {
  return new Transient(problem, retryAfter);
}

function offsetOf(response: FetchResponse): number {
  const value = response.headers.get("upload-offset") ?? "";
  if (!/^\d+$/.test(value)) throw new MediaFailed("bad_response", "an answer without an Upload-Offset");
  return Number(value);
}
