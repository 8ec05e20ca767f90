/**
 * "@mqchat/client/node": what only Node has. Persistent stores in JSON files:
 *
 *     import { ChatClient } from "@mqchat/client";
 *     import { jsonFileStores } from "@mqchat/client/node";
 *     const client = new ChatClient({ ...options, ...jsonFileStores("./state/alice-bot") });
 */

import { join } from "node:path";

import { JsonFileOutboxStore, JsonFileStateStore } from "./file-store.js";

export { JsonFileOutboxStore, JsonFileStateStore } from "./file-store.js";

/** The outbox and state stores of one device, as outbox.json and state.json in a directory. */
export function jsonFileStores(directory: string): { outbox: JsonFileOutboxStore; state: JsonFileStateStore } {
  return {
    outbox: new JsonFileOutboxStore(join(directory, "outbox.json")),
    state: new JsonFileStateStore(join(directory, "state.json")),
  };
}
