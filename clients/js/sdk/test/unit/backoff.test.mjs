// Backoff with full jitter (section 8) and the clock's sleep.
import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelayMs, ClientClosed, newUlid, sleep } from "../../dist/index.js";
import { FakeClock } from "../helpers.mjs";

test("the delay is uniform over [0, min(30 s, 1 s x 2^attempt))", () => {
  for (let attempt = 0; attempt < 40; attempt++) {
    const ceiling = Math.min(30_000, 1000 * 2 ** attempt);
    for (let i = 0; i < 50; i++) {
      const delay = backoffDelayMs(attempt);
      assert.ok(delay >= 0 && delay < ceiling, `${attempt}: ${delay}`);
    }
    assert.equal(
      backoffDelayMs(attempt, () => 0.999999),
      0.999999 * ceiling,
    );
  }
  assert.equal(
    backoffDelayMs(-3, () => 0.5),
    500,
  ); // a negative attempt counts as the first
});

test("sleep waits on the clock and ends early when the signal aborts", async () => {
  const clock = new FakeClock();
  let woke = false;
  const nap = sleep(clock, 1000).then(() => (woke = true));
  await clock.advance(999);
  assert.equal(woke, false);
  await clock.advance(1);
  await nap;
  assert.equal(woke, true);
  const stop = new AbortController();
  const cut = sleep(clock, 1000, stop.signal);
  stop.abort();
  await assert.rejects(cut, ClientClosed);
  assert.equal(clock.pending(), 0);
  await assert.rejects(sleep(clock, 5, stop.signal), ClientClosed);
});

test("new client message ids are ULIDs: 26 characters, sorted by time", () => {
  const earlier = newUlid(1_767_225_600_000);
  const later = newUlid(1_767_225_600_001);
  assert.match(earlier, /^[0-9A-HJKMNP-TV-Z]{26}$/);
  assert.ok(earlier.slice(0, 10) < later.slice(0, 10));
  assert.equal(new Set(Array.from({ length: 1000 }, () => newUlid())).size, 1000);
});
