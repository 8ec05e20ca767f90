/**
 * Stores in the browser's IndexedDB, so a reloaded tab neither loses an unsent message nor shows
 * one twice. One database per user and device (its name), two object stores:
 *
 *     outbox   PendingSend rows keyed by an auto-increment position (the order first added),
 *              unique index on `id`: adding an id again replaces the row in its place
 *     state    "cursor" → string | null, "delivered" → {conv: seq}, "channels" → [conv]
 *
 * Each call is one transaction, committed before its promise resolves.
 */

import type { OutboxStore, PendingSend } from "../outbox.js";
import { applyChannel, applyDelivered, emptySnapshot, type StateSnapshot, type StateStore } from "../state.js";

const VERSION = 1;
const OUTBOX = "outbox";
const STATE = "state";

interface OutboxRow extends PendingSend {
  position?: number;
}

function request<T>(req: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error ?? new Error("IndexedDB request failed"));
  });
}

function committed(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error ?? new Error("IndexedDB transaction failed"));
    tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
  });
}

/** Open (creating on first use) the database of one user and device. */
export function openDatabase(name: string, factory: IDBFactory = indexedDB): Promise<IDBDatabase> {
  const open = factory.open(name, VERSION);
  open.onupgradeneeded = () => {
    const db = open.result;
    if (!db.objectStoreNames.contains(OUTBOX)) {
      db.createObjectStore(OUTBOX, { keyPath: "position", autoIncrement: true }).createIndex("id", "id", {
        unique: true,
      });
    }
    if (!db.objectStoreNames.contains(STATE)) db.createObjectStore(STATE);
  };
  return request(open);
}

/** A database name for a user's device: `mqchat:{user}:{device}`. */
export function databaseName(user: string, device: string): string {
  return `mqchat:${user}:${device}`;
}

abstract class IndexedDBStore {
  readonly #name: string;
  readonly #factory: IDBFactory | undefined;
  #db: Promise<IDBDatabase> | null = null;

  constructor(name: string, factory?: IDBFactory) {
    this.#name = name;
    this.#factory = factory;
  }

  protected async transaction(store: string, mode: IDBTransactionMode): Promise<IDBTransaction> {
    this.#db ??= openDatabase(this.#name, this.#factory ?? indexedDB);
    return (await this.#db).transaction(store, mode);
  }

  async close(): Promise<void> {
    const db = this.#db;
    this.#db = null;
    if (db !== null) (await db).close();
  }
}

export class IndexedDBOutboxStore extends IndexedDBStore implements OutboxStore {
  async load(): Promise<PendingSend[]> {
    const tx = await this.transaction(OUTBOX, "readonly");
    const rows = (await request(tx.objectStore(OUTBOX).getAll())) as OutboxRow[];
    return rows.map(({ id, conv, body, kind, media }) => ({ id, conv, body, kind, media: [...media] }));
  }

  async add(entry: PendingSend): Promise<void> {
    const tx = await this.transaction(OUTBOX, "readwrite");
    const store = tx.objectStore(OUTBOX);
    const row: OutboxRow = {
      id: entry.id,
      conv: entry.conv,
      body: entry.body,
      kind: entry.kind,
      media: [...entry.media],
    };
    const position = await request(store.index("id").getKey(entry.id));
    if (position !== undefined) row.position = position as number;
    store.put(row);
    await committed(tx);
  }

  async remove(id: string): Promise<void> {
    const tx = await this.transaction(OUTBOX, "readwrite");
    const store = tx.objectStore(OUTBOX);
    const position = await request(store.index("id").getKey(id));
    if (position !== undefined) store.delete(position);
    await committed(tx);
  }
}

export class IndexedDBStateStore extends IndexedDBStore implements StateStore {
  async load(): Promise<StateSnapshot> {
    const tx = await this.transaction(STATE, "readonly");
    const store = tx.objectStore(STATE);
    const [cursor, delivered, channels] = await Promise.all([
      request(store.get("cursor")),
      request(store.get("delivered")),
      request(store.get("channels")),
    ]);
    const snapshot = emptySnapshot();
    if (typeof cursor === "string") snapshot.cursor = cursor;
    if (typeof delivered === "object" && delivered !== null)
      snapshot.delivered = { ...(delivered as Record<string, number>) };
    if (Array.isArray(channels)) snapshot.channels = channels.filter((c): c is string => typeof c === "string");
    return snapshot;
  }

  async setCursor(cursor: string | null): Promise<void> {
    const tx = await this.transaction(STATE, "readwrite");
    tx.objectStore(STATE).put(cursor, "cursor");
    await committed(tx);
  }

  async setDelivered(conv: string, seq: number): Promise<void> {
    await this.#update("delivered", (snapshot) => applyDelivered(snapshot, conv, seq));
  }

  async setChannel(conv: string, member: boolean): Promise<void> {
    await this.#update("channels", (snapshot) => applyChannel(snapshot, conv, member));
  }

  /** Read one key, change it, write it back: one transaction. */
  async #update(key: "delivered" | "channels", change: (snapshot: StateSnapshot) => void): Promise<void> {
    const tx = await this.transaction(STATE, "readwrite");
    const store = tx.objectStore(STATE);
    const snapshot = emptySnapshot();
    const value: unknown = await request(store.get(key));
    if (key === "delivered" && typeof value === "object" && value !== null)
      snapshot.delivered = { ...(value as Record<string, number>) };
    if (key === "channels" && Array.isArray(value)) snapshot.channels = value as string[];
    change(snapshot);
    store.put(key === "delivered" ? snapshot.delivered : snapshot.channels, key);
    await committed(tx);
  }
}
