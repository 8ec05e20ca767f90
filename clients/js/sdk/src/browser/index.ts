/**
 * "@mqchat/client/browser": what only a browser has. Persistent stores in IndexedDB:
 *
 *     import { ChatClient } from "@mqchat/client";
 *     import { indexedDBStores } from "@mqchat/client/browser";
 *     const client = new ChatClient({ ...options, ...indexedDBStores(user, device) });
 */

import { databaseName, IndexedDBOutboxStore, IndexedDBStateStore } from "./indexeddb.js";

export { databaseName, IndexedDBOutboxStore, IndexedDBStateStore, openDatabase } from "./indexeddb.js";

/** The outbox and state stores of one user's device, in one IndexedDB database. */
export function indexedDBStores(
  user: string,
  device: string,
  factory?: IDBFactory,
): { outbox: IndexedDBOutboxStore; state: IndexedDBStateStore } {
  const name = databaseName(user, device);
  return { outbox: new IndexedDBOutboxStore(name, factory), state: new IndexedDBStateStore(name, factory) };
}
