// OrderingBuffer and SeenMessages: seq order per conversation, each (conv, seq) once.
import assert from "node:assert/strict";
import { test } from "node:test";

import { OrderingBuffer, SeenMessages } from "../../dist/index.js";

/** @param {number} seq @param {string} [conv] @returns {import("../../dist/index.js").Message} */
function msg(seq, conv = "dm:a:b") {
  return {
    type: "msg",
    conv,
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
  };
}

/** @param {import("../../dist/index.js").Offered} offered */
const seqs = (offered) => offered.ready.map((m) => m.seq);

test("releases in seq order, holds behind a gap, gives the gap a deadline", () => {
  const buffer = new OrderingBuffer({ graceMs: 1000, start: { "dm:a:b": 2 } });
  assert.ok(buffer.offer(msg(2), 0).duplicate);
  const opened = buffer.offer(msg(5), 0);
  assert.ok(opened.gapOpened);
  assert.deepEqual(seqs(opened), []);
  assert.ok(!buffer.offer(msg(4), 500).gapOpened); // the same gap
  assert.ok(buffer.offer(msg(4), 600).duplicate); // held already
  assert.deepEqual(buffer.gapsDue(999), []);
  assert.deepEqual(buffer.gapsDue(1000), ["dm:a:b"]);
  assert.equal(buffer.held(), 2);
  assert.deepEqual(seqs(buffer.offer(msg(3), 1000)), [3, 4, 5]);
  assert.equal(buffer.nextDeadline(), null);
  assert.equal(buffer.last("dm:a:b"), 5);
});

test("skipGap releases what is held past the missing range; rearm waits another grace", () => {
  const buffer = new OrderingBuffer({ graceMs: 100 });
  assert.deepEqual(seqs(buffer.offer(msg(1), 0)), [1]);
  buffer.offer(msg(4), 0);
  buffer.offer(msg(5), 0);
  buffer.rearm("dm:a:b", 50);
  assert.equal(buffer.nextDeadline(), 150);
  assert.deepEqual(
    buffer.skipGap("dm:a:b", 200).map((m) => m.seq),
    [4, 5],
  );
  assert.equal(buffer.last("dm:a:b"), 5);
  assert.equal(buffer.held(), 0);
  assert.deepEqual(buffer.skipGap("dm:a:b", 300), []);
  buffer.rearm("dm:a:b", 300); // no gap: nothing to arm
  assert.equal(buffer.nextDeadline(), null);
});

test("a closed gap with a later one open restarts the grace for the later one", () => {
  const buffer = new OrderingBuffer({ graceMs: 1000 });
  buffer.offer(msg(1), 0);
  buffer.offer(msg(3), 0);
  buffer.offer(msg(5), 0);
  assert.deepEqual(seqs(buffer.offer(msg(2), 800)), [2, 3]);
  assert.equal(buffer.nextDeadline(), 1800);
});

test("conversations do not wait for each other", () => {
  const buffer = new OrderingBuffer({ graceMs: 1000 });
  buffer.offer(msg(2, "dm:a:b"), 0);
  assert.deepEqual(seqs(buffer.offer(msg(1, "dm:a:c"), 0)), [1]);
  assert.ok(buffer.hasGap("dm:a:b"));
  assert.ok(!buffer.hasGap("dm:a:c"));
});

test("SeenMessages: once per (conv, seq), bounded, the least recently seen forgotten first", () => {
  const seen = new SeenMessages(2);
  assert.ok(seen.firstTime("c", 1));
  assert.ok(seen.firstTime("d", 1)); // another conversation
  assert.ok(!seen.firstTime("c", 1)); // a duplicate, and now the most recently seen
  assert.ok(seen.firstTime("c", 2)); // past capacity: (d, 1) is forgotten
  assert.ok(!seen.firstTime("c", 1));
  assert.ok(seen.firstTime("d", 1));
});
