// Handing events to the app: listeners awaited in order, iterators that pace delivery, a
// listener's throw reported, a bounded queue, the end of iterators at close.
import assert from "node:assert/strict";
import { test } from "node:test";

import { EventHub } from "../../dist/delivery.js";
import { settle } from "../helpers.mjs";

/** @param {number} seq @returns {import("../../dist/index.js").Message} */
const msg = (seq) => ({
  type: "msg",
  conv: "dm:a:b",
  seq,
  mid: "M",
  from: "a",
  dev: "d",
  id: `x${seq}`,
  ts: 0,
  kind: "text",
  body: "",
  media: [],
  attachments: [],
});
/** @param {string} user @returns {import("../../dist/index.js").Typing} */
const typing = (user) => ({ type: "typing", conv: "dm:a:b", user, state: true });

/** @param {number} [maxBuffered] */
function hub(maxBuffered = 100) {
  /** @type {unknown[]} */
  const errors = [];
  /** @type {string[]} */
  const delivered = [];
  const events = new EventHub({
    maxBuffered,
    onListenerError: (e) => void errors.push(e),
    delivered: (e) => void delivered.push(e.type === "msg" ? `msg ${e.seq}` : e.type),
  });
  return { events, errors, delivered };
}

test("one event at a time, in order; a msg is delivered once its listeners' promises settle", async () => {
  const { events, delivered } = hub();
  /** @type {string[]} */
  const log = [];
  events.on("msg", async (m) => {
    log.push(`start ${m.seq}`);
    await settle(2);
    log.push(`end ${m.seq}`);
  });
  events.on("*", (e) => void log.push(`any ${e.type}`));
  events.push(msg(1));
  events.push(typing("b"));
  events.push(msg(2));
  await events.idle();
  assert.deepEqual(log, ["start 1", "any msg", "end 1", "any typing", "start 2", "any msg", "end 2"]);
  assert.deepEqual(delivered, ["msg 1", "typing", "msg 2"]);
});

test("a throwing listener is reported and the others still get the event", async () => {
  const { events, errors, delivered } = hub();
  events.on("typing", () => {
    throw new Error("bug in the app");
  });
  events.on("typing", async () => Promise.reject(new Error("async bug")));
  /** @type {string[]} */
  const got = [];
  events.on("typing", (t) => void got.push(t.user));
  events.push(typing("b"));
  await events.idle();
  assert.deepEqual(got, ["b"]);
  assert.deepEqual(
    errors.map((e) => /** @type {Error} */ (e).message),
    ["bug in the app", "async bug"],
  );
  assert.deepEqual(delivered, ["typing"]);
});

test("an iterator paces delivery: an event counts as delivered once it is yielded", async () => {
  const { events, delivered } = hub();
  events.push(msg(1));
  events.push(msg(2));
  await settle();
  assert.deepEqual(delivered, []); // nobody listens yet: kept
  const it = events.iterate();
  assert.equal((await it.next()).value?.type, "msg");
  await settle();
  assert.deepEqual(delivered, ["msg 1"]);
  await it.next();
  await settle();
  assert.deepEqual(delivered, ["msg 1", "msg 2"]);
  await it.return?.();
  events.push(msg(3)); // the iterator is gone, and nobody else listens
  await settle();
  assert.deepEqual(delivered, ["msg 1", "msg 2"]);
});

test("past maxBuffered waiting events the oldest is dropped and counted", async () => {
  const { events, delivered } = hub(2);
  for (const seq of [1, 2, 3]) events.push(msg(seq));
  events.on("msg", () => undefined);
  await events.idle();
  assert.deepEqual(delivered, ["msg 2", "msg 3"]);
  assert.equal(events.dropped, 1);
});

test("close ends iterators: they finish, or throw the client's fatal error", async () => {
  const quiet = hub();
  const ending = quiet.events.iterate().next();
  quiet.events.close(null);
  assert.deepEqual(await ending, { value: undefined, done: true });

  const { events } = hub();
  const waiting = events.iterate().next();
  const idle = events.iterate();
  events.close(new Error("AuthFailed"));
  await assert.rejects(waiting, { message: "AuthFailed" });
  await assert.rejects(idle.next(), { message: "AuthFailed" });
  assert.deepEqual(await events.iterate().next(), { value: undefined, done: true });
});
