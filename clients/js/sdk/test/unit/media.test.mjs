// Uploads over tus 1.0 against a tus server in memory: resuming after a cut from the server's
// offset, final answers, an upload gone midway, retries that run out; downloads checked.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { test } from "node:test";

import { HttpApi, MediaApi, MediaFailed, systemClock } from "../../dist/index.js";
import { fixedTokens, response } from "../helpers.mjs";

/** @typedef {{size: number, meta: Record<string, string>, bytes: number[], ready: boolean}} Upload */

/** A tus server: POST creates, HEAD tells the offset, PATCH appends at the offset. */
class TusServer {
  /** @type {Map<string, Upload>} */
  uploads = new Map();
  /** @type {string[]} */
  log = [];
  /** PATCHes to cut: each keeps this many bytes of its body, then the connection drops. @type {number[]} */
  cuts = [];
  /** Answer HEAD with 404 (the upload expired) this many times. */
  headGone = 0;
  created = 0;

  /** @type {import("../../dist/index.js").FetchLike} */
  fetch = async (url, init = {}) => {
    const { pathname } = new URL(url);
    const method = init.method ?? "GET";
    const headers = init.headers ?? {};
    this.log.push(`${method} ${pathname}`);
    const parts = pathname.split("/");
    const id = (pathname.endsWith("/info") ? parts.at(-2) : parts.at(-1)) ?? "";
    if (method === "POST" && pathname === "/v1/media") {
      const meta = Object.fromEntries(
        (headers["Upload-Metadata"] ?? "").split(",").map((pair) => {
          const [key, value = ""] = pair.split(" ");
          return [key, Buffer.from(value, "base64").toString("utf8")];
        }),
      );
      const created = `u${++this.created}`;
      this.uploads.set(created, { size: Number(headers["Upload-Length"]), meta, bytes: [], ready: false });
      return response({ status: 201, headers: { Location: `/v1/media/uploads/${created}` }, body: { id: created } });
    }
    const upload = this.uploads.get(id);
    if (method === "HEAD") {
      if (this.headGone > 0 || upload === undefined) {
        this.headGone -= 1;
        this.uploads.delete(id);
        return response({ status: 404 });
      }
      return response({ status: 200, headers: { "Upload-Offset": String(upload.bytes.length) } });
    }
    if (method === "PATCH" && upload !== undefined) {
      if (Number(headers["Upload-Offset"]) !== upload.bytes.length)
        return response({ status: 409, body: { error: "offset_mismatch", message: "" } });
      const body = /** @type {Uint8Array} */ (init.body);
      const cut = this.cuts.shift();
      upload.bytes.push(...body.subarray(0, cut ?? body.length));
      if (cut !== undefined) throw new TypeError("fetch failed: the connection was reset");
      if (upload.bytes.length === upload.size) {
        if (createHash("sha256").update(Uint8Array.from(upload.bytes)).digest("hex") !== upload.meta["sha256"]) {
          this.uploads.delete(id);
          return response({ status: 460, body: { error: "checksum_mismatch", message: "the sha256 does not match" } });
        }
        upload.ready = true;
      }
      return response({ status: 204, headers: { "Upload-Offset": String(upload.bytes.length) } });
    }
    if (method === "GET" && pathname.endsWith("/info") && upload !== undefined) {
      const info = {
        id,
        type: upload.meta["filetype"] ?? "application/octet-stream",
        size: upload.size,
        state: upload.ready ? "ready" : "uploading",
        offset: upload.bytes.length,
        sha256: upload.meta["sha256"],
        name: upload.meta["filename"] ?? null,
      };
      return response({ status: 200, body: info });
    }
    if (method === "GET" && upload?.ready) return response({ status: 200, body: Uint8Array.from(upload.bytes) });
    return response({ status: 404, body: { error: "not_found", message: "" } });
  };
}

/** @param {TusServer} server @param {{retries?: number, sha256?: (b: Uint8Array) => Promise<string>}} [extra] */
function mediaApi(server, extra = {}) {
  const http = new HttpApi({
    baseUrl: "http://media.test",
    tokens: fixedTokens,
    fetch: server.fetch,
    clock: systemClock,
    random: () => 0,
    timeoutMs: 5000,
    signal: new AbortController().signal,
  });
  return new MediaApi({ http, random: () => 0, chunkBytes: 1000, ...extra });
}

const photo = Uint8Array.from({ length: 3500 }, (_, i) => (i * 7) % 256);

test("an upload cut mid-PATCH resumes from the offset the server holds (HEAD)", async () => {
  const server = new TusServer();
  server.cuts = [400]; // the first PATCH keeps 400 bytes of its 1000, then the connection drops
  /** @type {number[]} */
  const progress = [];
  const media = await mediaApi(server).upload(photo, {
    contentType: "image/png",
    filename: "photo.png",
    onProgress: (done) => void progress.push(done),
  });
  const stored = /** @type {Upload} */ (server.uploads.get("u1"));
  assert.deepEqual(Uint8Array.from(stored.bytes), photo);
  assert.equal(media.resumes, 1);
  assert.equal(media.state, "ready");
  assert.deepEqual(server.log, [
    "POST /v1/media",
    "PATCH /v1/media/uploads/u1",
    "HEAD /v1/media/uploads/u1",
    "PATCH /v1/media/uploads/u1",
    "PATCH /v1/media/uploads/u1",
    "PATCH /v1/media/uploads/u1",
    "PATCH /v1/media/uploads/u1",
    "GET /v1/media/u1/info",
  ]);
  assert.deepEqual(stored.meta, {
    sha256: createHash("sha256").update(photo).digest("hex"),
    filetype: "image/png",
    filename: "photo.png",
  });
  assert.equal(progress.at(-1), photo.length);
});

test("sha256 comes from WebCrypto", async () => {
  const server = new TusServer();
  const media = await mediaApi(server).upload(new Blob([photo], { type: "image/png" }));
  assert.equal(media.sha256, createHash("sha256").update(photo).digest("hex"));
  assert.equal(media.type, "image/png"); // the Blob's type
});

test("checksum_mismatch is final: MediaFailed, nothing retried", async () => {
  const server = new TusServer();
  const api = mediaApi(server, { sha256: async () => "0".repeat(64) });
  await assert.rejects(
    api.upload(photo),
    (e) => e instanceof MediaFailed && e.code === "checksum_mismatch" && e.status === 460,
  );
  assert.equal(server.log.filter((l) => l.startsWith("POST")).length, 1);
});

test("an upload gone from the server midway starts over, once", async () => {
  const server = new TusServer();
  server.cuts = [10];
  server.headGone = 1;
  const media = await mediaApi(server).upload(photo);
  assert.equal(media.id, "u2");
  assert.equal(server.log.filter((l) => l.startsWith("POST")).length, 2);
});

test("failures without progress run out: MediaFailed gave_up", async () => {
  const server = new TusServer();
  server.cuts = [0, 0, 0, 0];
  await assert.rejects(
    mediaApi(server, { retries: 2 }).upload(photo),
    (e) => e instanceof MediaFailed && e.code === "gave_up",
  );
});

test("a download is checked against the file's size and sha256", async () => {
  const server = new TusServer();
  const api = mediaApi(server);
  const media = await api.upload(photo);
  assert.deepEqual(await api.download(media.id), photo);
  const original = server.fetch;
  server.fetch = async (url, init) =>
    new URL(url).pathname === `/v1/media/${media.id}`
      ? response({ status: 200, body: "x".repeat(photo.length) })
      : original(url, init);
  await assert.rejects(
    mediaApi(server).download(media.id),
    (e) => e instanceof MediaFailed && e.code === "checksum_mismatch",
  );
});
