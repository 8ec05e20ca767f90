// State stores: memory and JSON files (the Node entry); the file is replaced whole on each change.
import assert from "node:assert/strict";
import { mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

import { MemoryStateStore, StateWriter } from "../../dist/index.js";
import { jsonFileStores, JsonFileStateStore } from "../../dist/node/index.js";

/** @param {import("../../dist/index.js").StateStore} store */
async function exercise(store) {
  const writer = new StateWriter(store, (e) => assert.fail(String(e)));
  writer.setCursor("c1");
  writer.setDelivered("dm:a:b", 5);
  writer.setDelivered("dm:a:b", 3); // lower: ignored
  writer.setDelivered("g:01J9ZK3M4N5P6Q7R8S9T0VWXYZ", 1);
  writer.setChannel("g:01J9ZK3M4N5P6Q7R8S9T0VWXYZ", true);
  writer.setChannel("g:01J9ZK3M4N5P6Q7R8S9T0VWXZZ", true);
  writer.setChannel("g:01J9ZK3M4N5P6Q7R8S9T0VWXZZ", false);
  await writer.flushed();
  return store.load();
}

const expected = {
  cursor: "c1",
  delivered: { "dm:a:b": 5, "g:01J9ZK3M4N5P6Q7R8S9T0VWXYZ": 1 },
  channels: ["g:01J9ZK3M4N5P6Q7R8S9T0VWXYZ"],
};

test("MemoryStateStore", async () => {
  assert.deepEqual(await exercise(new MemoryStateStore()), expected);
});

test("JsonFileStateStore: what a restarted process reads back", async () => {
  const dir = await mkdtemp(join(tmpdir(), "mqchat-state-"));
  try {
    const { state } = jsonFileStores(dir);
    assert.deepEqual(await state.load(), { cursor: null, delivered: {}, channels: [] });
    assert.deepEqual(await exercise(state), expected);
    await state.close();
    assert.deepEqual(await new JsonFileStateStore(join(dir, "state.json")).load(), expected);
    assert.deepEqual(JSON.parse(await readFile(join(dir, "state.json"), "utf8")), { version: 1, ...expected });
    assert.deepEqual(await readdir(dir), ["state.json"]); // no temporary file left behind
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});
