// The outbox: durable before published, order kept, resends, holds, one at a time, waiters, and
// a JSON-file store that a restarted process reads back in order.
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { MemoryOutboxStore, Outbox } from "../../dist/index.js";
import { JsonFileOutboxStore } from "../../dist/node/index.js";
import { FakeClock } from "../helpers.mjs";

const AB = "dm:a:b";
const AC = "dm:a:c";

/** @param {Partial<ConstructorParameters<typeof Outbox>[0]>} [extra] */
async function outbox(extra = {}) {
  const clock = new FakeClock();
  /** @type {string[]} */
  const published = [];
  const box = new Outbox({
    store: new MemoryOutboxStore(),
    clock,
    random: () => 0.5,
    resendAfterMs: 4000,
    oneAtATime: false,
    publish: (r) => published.push(r.id) > 0,
    onStoreError: (e) => assert.fail(String(e)),
    ...extra,
  });
  await box.open();
  return { box, clock, published };
}

/** @param {string} id @param {string} [conv] */
const entry = (id, conv = AB) => ({ id, conv, body: id, kind: /** @type {const} */ ("text"), media: [] });
/** @param {string} id @param {number} seq @param {string} [conv] */
const ack = (id, seq, conv = AB) => ({ type: /** @type {const} */ ("ack"), id, conv, seq, mid: "M", ts: 1 });

test("publishes in order; a connect replays every pending send; an ack settles once", async () => {
  const { box, published } = await outbox();
  for (const id of ["a", "b", "c"]) await box.add(entry(id));
  assert.deepEqual(published, ["a", "b", "c"]);
  assert.ok(box.ack(ack("b", 2)));
  assert.ok(!box.ack(ack("b", 2)));
  box.replayAll();
  assert.deepEqual(published.slice(3), ["a", "c"]);
  await box.close(new Error("closed"));
});

test("only what stayed unacked for resendAfterMs is published again", async () => {
  const { box, clock, published } = await outbox();
  await box.add(entry("a"));
  await clock.advanceTo(1000);
  await box.add(entry("b"));
  await clock.advanceTo(4000); // a is due, b is not yet
  assert.deepEqual(published, ["a", "b", "a"]);
  await clock.advanceTo(6000);
  assert.deepEqual(published, ["a", "b", "a", "b"]);
  assert.equal(box.statistics().resends, 2);
  await box.close(new Error("closed"));
});

test("rate_limited holds every send, new ones too, then publishes them all in the order first sent", async () => {
  const { box, clock, published } = await outbox();
  await box.add(entry("a"));
  await box.add(entry("b"));
  assert.equal(
    box.refused({ type: "error", code: "rate_limited", message: "", id: "a", conv: AB, retry_after_ms: 2000 }),
    "retry",
  );
  await box.add(entry("c")); // during the hold: waits its turn
  await clock.advanceTo(1999);
  assert.deepEqual(published, ["a", "b"]);
  await clock.advanceTo(2000);
  assert.deepEqual(published, ["a", "b", "a", "b", "c"]);
  assert.equal(box.statistics().rateLimited, 1);
  await box.close(new Error("closed"));
});

test("oneAtATime: a conversation's next send goes when the one before it is answered", async () => {
  const { box, published } = await outbox({ oneAtATime: true });
  for (const [id, conv] of [
    ["a1", AB],
    ["a2", AB],
    ["c1", AC],
    ["a3", AB],
  ])
    await box.add(entry(id, conv));
  assert.deepEqual(published, ["a1", "c1"]);
  box.ack(ack("a1", 1));
  assert.deepEqual(published, ["a1", "c1", "a2"]);
  box.refused({ type: "error", code: "not_member", message: "", id: "a2", conv: AB, retry_after_ms: null });
  assert.deepEqual(published, ["a1", "c1", "a2", "a3"]);
  await box.close(new Error("closed"));
});

test("waiters: resolved by the ack, rejected by a final error, by a timeout, and at close", async () => {
  const { box, clock } = await outbox();
  await box.add(entry("a"));
  await box.add(entry("b"));
  await box.add(entry("c"));
  const a = box.waitAcked("a", null, () => new Error("timeout"));
  const b = box.waitAcked("b", null, () => new Error("timeout"));
  const c = box.waitAcked("c", 500, () => new Error("timeout"));
  box.ack(ack("a", 1));
  box.refused({ type: "error", code: "bad_media", message: "", id: "b", conv: AB, retry_after_ms: null });
  assert.equal((await a).seq, 1);
  await assert.rejects(b, { name: "SendFailed" });
  const timedOut = assert.rejects(c, { message: "timeout" });
  await clock.advanceTo(500);
  await timedOut;
  assert.deepEqual(
    box.pending().map((e) => e.id),
    ["c"],
  ); // a timeout keeps the send
  assert.equal((await box.waitAcked("a", null, () => new Error("x"))).seq, 1); // lately settled
  const late = box.waitAcked("c", null, () => new Error("x"));
  await box.close(new Error("closed"));
  await assert.rejects(late, { message: "closed" });
});

test("a send the store refuses is not published", async () => {
  const store = new MemoryOutboxStore();
  store.add = async () => {
    throw new Error("disk full");
  };
  const { box, published } = await outbox({ store });
  await assert.rejects(box.add(entry("a")), { message: "disk full" });
  assert.deepEqual(published, []);
  assert.deepEqual(box.pending(), []);
});

test("JsonFileOutboxStore: a restarted process reads the unacked sends back in their order", async () => {
  const dir = await mkdtemp(join(tmpdir(), "mqchat-outbox-"));
  try {
    const path = join(dir, "outbox.json");
    const first = await outbox({ store: new JsonFileOutboxStore(path) });
    for (const id of ["a", "b", "c"]) await first.box.add(entry(id));
    first.box.ack(ack("b", 2));
    await first.box.add({ ...entry("a"), body: "edited" }); // same id: replaced in its place
    await first.box.close(new Error("closed"));
    assert.deepEqual(
      JSON.parse(await readFile(path, "utf8")).outbox.map((/** @type {any} */ e) => e.id),
      ["a", "c"],
    );
    const second = await outbox({ store: new JsonFileOutboxStore(path) });
    assert.deepEqual(
      second.box.pending().map((e) => [e.id, e.body]),
      [
        ["a", "edited"],
        ["c", "c"],
      ],
    );
    second.box.replayAll();
    assert.deepEqual(second.published, ["a", "c"]);
    await second.box.close(new Error("closed"));
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
