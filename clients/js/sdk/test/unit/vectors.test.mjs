// The shared protocol vectors (clients/vectors/, see its README) replayed through the SDK; the
// Python SDK replays the same files in tests/test_vectors.py.
import assert from "node:assert/strict";
import { describe, test } from "node:test";

import {
  backoffDelayMs,
  Catchup,
  checkRequest,
  dmConv,
  encodeMetadata,
  encodeRequest,
  ERROR_CODES,
  HttpApi,
  HttpError,
  isConv,
  isRetryable,
  isValidId,
  MediaApi,
  MemoryOutboxStore,
  MemoryStateStore,
  Outbox,
  parseEvent,
  retryOf,
  sendRequest,
  StateWriter,
  typingRequest,
  watermarkRequest,
} from "../../dist/index.js";
import { FakeClock, fixedTokens, ScriptedFetch, settle, vector } from "../helpers.mjs";

const BASE = "http://vectors.test";

/** @param {ScriptedFetch} scripted @param {FakeClock} clock */
function httpApi(scripted, clock) {
  return new HttpApi({
    baseUrl: BASE,
    tokens: fixedTokens,
    fetch: scripted.fetch,
    clock,
    random: () => 0,
    timeoutMs: 10_000,
    signal: new AbortController().signal,
  });
}

/** @param {{topic: string, payload?: string, payload_base64?: string}} c */
function payloadOf(c) {
  return c.payload !== undefined
    ? new TextEncoder().encode(c.payload)
    : new Uint8Array(Buffer.from(/** @type {string} */ (c.payload_base64), "base64"));
}

describe("ids.json", () => {
  const v = vector("ids.json");
  test("ids", () => {
    for (const id of v.valid_ids) assert.ok(isValidId(id), id);
    for (const id of v.invalid_ids) assert.ok(!isValidId(id), JSON.stringify(id));
  });
  test("conversation ids", () => {
    for (const conv of v.valid_convs) assert.ok(isConv(conv), conv);
    for (const conv of v.invalid_convs) assert.ok(!isConv(conv), JSON.stringify(conv));
    for (const { a, b, conv } of v.dm) assert.equal(dmConv(a, b), conv);
  });
});

describe("requests.json", () => {
  const v = vector("requests.json");
  for (const c of v.valid) {
    test(`builds: ${c.name}`, () => {
      const request =
        c.request === "send"
          ? sendRequest(c.args)
          : c.request === "typing"
            ? typingRequest(c.args.conv, c.args.state)
            : watermarkRequest(c.request, c.args.conv, c.args.seq);
      assert.equal(encodeRequest(request), c.json);
      assert.equal(checkRequest(request), null);
    });
  }
  for (const c of v.invalid) {
    test(`refuses: ${c.name}`, () => {
      const request =
        c.request === "send"
          ? sendRequest(c.args)
          : c.request === "typing"
            ? typingRequest(c.args.conv, c.args.state)
            : watermarkRequest(c.request, c.args.conv, c.args.seq);
      assert.equal(checkRequest(request)?.code, c.code);
    });
  }
});

describe("events.json and events-large.json", () => {
  for (const file of ["events.json", "events-large.json"]) {
    for (const c of vector(file).cases) {
      test(`${file}: ${c.name}`, () => assert.deepEqual(parseEvent(payloadOf(c), c.topic), c.expected));
    }
  }
});

describe("errors.json", () => {
  const v = vector("errors.json");
  test("every code: its retry and HTTP status, and no code missing", () => {
    for (const c of [...v.codes, ...v.unknown_codes]) {
      assert.equal(retryOf(c.code), c.retry, c.code);
      assert.equal(isRetryable(c.code), c.retryable, c.code);
    }
    for (const c of v.codes) assert.equal(ERROR_CODES[c.code]?.http, c.http, c.code);
    assert.deepEqual(Object.keys(ERROR_CODES).sort(), v.codes.map((/** @type {{code: string}} */ c) => c.code).sort());
  });
  for (const c of v.send_replies) {
    test(`outbox: ${c.name}`, async () => {
      const clock = new FakeClock();
      /** @type {string[]} */
      const published = [];
      const outbox = new Outbox({
        store: new MemoryOutboxStore(),
        clock,
        random: () => 0.5,
        resendAfterMs: 5000,
        oneAtATime: false,
        publish: (r) => published.push(r.id) > 0,
        onStoreError: (e) => assert.fail(String(e)),
      });
      await outbox.open();
      for (const id of c.pending) await outbox.add({ id, conv: "dm:alice:bob", body: "x", kind: "text", media: [] });
      if (c.acked_before) assert.ok(outbox.ack(/** @type {any} */ (parseEvent(c.acked_before))));
      const reply = /** @type {any} */ (parseEvent(c.reply));
      assert.equal(outbox.refused(reply), c.outcome);
      assert.deepEqual(
        outbox.pending().map((e) => e.id),
        c.pending_after,
      );
      if (c.held_ms !== undefined) {
        published.length = 0;
        await clock.advanceTo(c.held_ms - 1);
        assert.deepEqual(published, [], "nothing is published during the hold");
        await clock.advanceTo(c.held_ms);
        assert.deepEqual(published, c.pending_after, "then every pending send, in order");
      } else if (c.outcome === "retry") {
        published.length = 0;
        await clock.advanceTo(1000); // attempt 0's backoff is at most 1 s; the others wait resendAfterMs
        assert.deepEqual(published, [reply.id], "published again, unchanged");
      }
      await outbox.close(new Error("closed"));
    });
  }
});

describe("sync.json", () => {
  const v = vector("sync.json");
  for (const c of v.sync_pages) {
    test(`sync page: ${c.name}`, async () => {
      const scripted = new ScriptedFetch();
      scripted.queue.push({ request: c.request, response: c.response });
      const call = httpApi(scripted, new FakeClock()).sync(c.since, { attempts: 1 });
      if (c.error !== undefined) await assert.rejects(call, (e) => e instanceof HttpError && e.code === c.error);
      else assert.deepEqual(await call, c.expected);
      assert.deepEqual(scripted.unexpected, []);
    });
  }
  for (const c of v.messages_pages) {
    test(`messages page: ${c.name}`, async () => {
      const scripted = new ScriptedFetch();
      scripted.queue.push({ request: c.request, response: c.response });
      const call = httpApi(scripted, new FakeClock()).messagesAfter(c.conv, c.after, { attempts: 1 });
      if (c.error !== undefined) await assert.rejects(call, (e) => e instanceof HttpError && e.code === c.error);
      else assert.deepEqual(await call, c.expected);
      assert.deepEqual(scripted.unexpected, []);
    });
  }
});

describe("gaps.json", () => {
  for (const scenario of vector("gaps.json").scenarios) {
    test(scenario.name, async () => {
      const clock = new FakeClock();
      const scripted = new ScriptedFetch();
      const store = new MemoryStateStore({ cursor: scenario.cursor, delivered: scenario.delivered });
      const state = new StateWriter(store, (e) => assert.fail(String(e)));
      /** @type {[string, number][]} */
      const delivered = [];
      /** @type {Catchup} */
      const catchup = new Catchup({
        http: httpApi(scripted, clock),
        clock,
        graceMs: scenario.grace_ms,
        cursor: scenario.cursor,
        delivered: scenario.delivered,
        state,
        hooks: {
          deliver: (messages) => {
            for (const m of messages) {
              delivered.push([m.conv, m.seq]);
              catchup.handedOver(m); // the app takes it at once
            }
          },
          synced: () => undefined,
          follow: () => undefined,
          error: () => undefined,
        },
      });
      for (const [i, step] of scenario.steps.entries()) {
        const where = `step ${i} at ${step.at_ms} ms`;
        const before = catchup.statistics();
        const mark = delivered.length;
        scripted.queue.push(...(step.http ?? []));
        await clock.advanceTo(step.at_ms); // a gap due now is fetched by the client's own timer
        if (step.live !== undefined)
          catchup.offerLive(/** @type {any} */ (parseEvent(JSON.stringify(step.live), "u/alice/in")));
        if (step.sync === true) await catchup.requestSync();
        await settle();
        const after = catchup.statistics();
        assert.deepEqual(scripted.unexpected, [], where);
        assert.deepEqual(scripted.queue, [], `${where}: every expected request made`);
        assert.deepEqual(delivered.slice(mark), step.deliver ?? [], where);
        assert.equal(after.duplicates - before.duplicates, step.duplicate === true ? 1 : 0, `${where}: duplicates`);
        assert.equal(
          after.gapsDetected - before.gapsDetected,
          step.gap_opened === true ? 1 : 0,
          `${where}: gaps detected`,
        );
        assert.equal(after.gapFetches - before.gapFetches, (step.gaps_due ?? []).length, `${where}: gap fetches`);
        if (step.cursor_saved !== undefined) {
          await state.flushed();
          assert.equal((await store.load()).cursor, step.cursor_saved, where);
        }
      }
      catchup.close();
    });
  }
});

describe("backoff.json", () => {
  const v = vector("backoff.json");
  for (const c of v.cases) {
    test(`attempt ${c.attempt}, random ${c.random}`, () => {
      assert.equal(
        backoffDelayMs(c.attempt, () => c.random, v.first_ms, v.cap_ms),
        c.delay_ms,
      );
      assert.equal(
        backoffDelayMs(c.attempt, () => c.random),
        c.delay_ms,
      ); // the SDK's defaults are section 8's
    });
  }
});

describe("tus.json", () => {
  const v = vector("tus.json");
  test("Upload-Metadata", () => {
    for (const c of v.metadata) assert.equal(encodeMetadata(Object.fromEntries(c.pairs)), c.header);
    for (const key of v.invalid_keys) assert.throws(() => encodeMetadata({ [key]: "x" }), TypeError, key);
  });
  for (const c of v.uploads) {
    test(`POST /v1/media headers: ${c.name}`, async () => {
      const scripted = new ScriptedFetch();
      scripted.queue.push({
        request: { method: "POST", path: "/v1/media" },
        response: { status: 403, body: { error: "forbidden", message: "stop here" } },
      });
      const media = new MediaApi({ http: httpApi(scripted, new FakeClock()), random: () => 0 });
      const bytes = new Uint8Array(Buffer.from(c.file_base64, "base64"));
      await assert.rejects(
        media.upload(bytes, { contentType: c.content_type, filename: c.filename, encrypted: c.encrypted }),
      );
      const { headers } = scripted.seen[0] ?? assert.fail("no request");
      const { Authorization, ...tus } = headers;
      assert.equal(Authorization, "Bearer t0ken");
      assert.deepEqual(tus, c.headers);
    });
  }
});
