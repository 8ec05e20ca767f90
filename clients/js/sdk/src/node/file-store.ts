/**
 * Stores in JSON files, for Node (a bot, a CLI, a test harness): each write goes to a temporary
 * file that is flushed to disk and then renamed over the old one, so a crash leaves either the
 * old or the new content, never half of one. Writes are made one at a time, in call order.
 *
 *     JsonFileOutboxStore(path)   {"version":1,"outbox":[PendingSend…]}   the order first added
 *     JsonFileStateStore(path)    {"version":1,"cursor","delivered","channels"}
 *
 * One file per user and device; the whole file is rewritten on each change (an outbox holds
 * what is unsent, a state a few numbers per conversation).
 */

import { mkdir, open, readFile, rename } from "node:fs/promises";
import { dirname } from "node:path";

import type { OutboxStore, PendingSend } from "../outbox.js";
import { applyChannel, applyDelivered, emptySnapshot, type StateSnapshot, type StateStore } from "../state.js";

const VERSION = 1;

async function readJson(path: string): Promise<Record<string, unknown> | null> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if ((error as { code?: string }).code === "ENOENT") return null;
    throw error;
  }
  const value: unknown = JSON.parse(text);
  if (typeof value !== "object" || value === null || Array.isArray(value))
    throw new Error(`${path} is not a JSON object`);
  return value as Record<string, unknown>;
}

/** Write path atomically: a flushed temporary file renamed over it. */
async function writeJson(path: string, value: unknown): Promise<void> {
  await mkdir(dirname(path), { recursive: true });
  const temporary = `${path}.${process.pid}.tmp`;
  const file = await open(temporary, "w", 0o600);
  try {
    await file.writeFile(JSON.stringify(value), "utf8");
    await file.sync();
  } finally {
    await file.close();
  }
  await rename(temporary, path);
}

abstract class JsonFile {
  readonly path: string;
  #chain: Promise<unknown> = Promise.resolve();

  constructor(path: string) {
    this.path = path;
  }

  /** Run fn after every earlier call has finished. */
  protected serial<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#chain.then(fn);
    this.#chain = run.catch(() => undefined);
    return run;
  }

  async close(): Promise<void> {
    await this.#chain;
  }
}

export class JsonFileOutboxStore extends JsonFile implements OutboxStore {
  #entries: Map<string, PendingSend> | null = null;

  load(): Promise<PendingSend[]> {
    return this.serial(async () => [...(await this.#load()).values()].map((e) => ({ ...e, media: [...e.media] })));
  }

  add(entry: PendingSend): Promise<void> {
    return this.serial(async () => {
      (await this.#load()).set(entry.id, { ...entry, media: [...entry.media] });
      await this.#save();
    });
  }

  remove(id: string): Promise<void> {
    return this.serial(async () => {
      if ((await this.#load()).delete(id)) await this.#save();
    });
  }

  async #load(): Promise<Map<string, PendingSend>> {
    if (this.#entries === null) {
      const file = await readJson(this.path);
      const rows = Array.isArray(file?.["outbox"]) ? (file["outbox"] as PendingSend[]) : [];
      this.#entries = new Map(rows.map((row) => [row.id, row]));
    }
    return this.#entries;
  }

  #save(): Promise<void> {
    return writeJson(this.path, { version: VERSION, outbox: [...(this.#entries ?? new Map()).values()] });
  }
}

export class JsonFileStateStore extends JsonFile implements StateStore {
  #state: StateSnapshot | null = null;

  load(): Promise<StateSnapshot> {
    return this.serial(async () => {
      const state = await this.#load();
      return { cursor: state.cursor, delivered: { ...state.delivered }, channels: [...state.channels] };
    });
  }

  setCursor(cursor: string | null): Promise<void> {
    return this.#change((state) => {
      state.cursor = cursor;
    });
  }

  setDelivered(conv: string, seq: number): Promise<void> {
    return this.#change((state) => applyDelivered(state, conv, seq));
  }

  setChannel(conv: string, member: boolean): Promise<void> {
    return this.#change((state) => applyChannel(state, conv, member));
  }

  #change(change: (state: StateSnapshot) => void): Promise<void> {
    return this.serial(async () => {
      const state = await this.#load();
      change(state);
      await writeJson(this.path, { version: VERSION, ...state });
    });
  }

  async #load(): Promise<StateSnapshot> {
    if (this.#state === null) {
      const file = await readJson(this.path);
      const state = emptySnapshot();
      if (typeof file?.["cursor"] === "string") state.cursor = file["cursor"];
      if (typeof file?.["delivered"] === "object" && file["delivered"] !== null)
        state.delivered = { ...(file["delivered"] as Record<string, number>) };
      if (Array.isArray(file?.["channels"]))
        state.channels = (file["channels"] as unknown[]).filter((c): c is string => typeof c === "string");
      this.#state = state;
    }
    return this.#state;
  }
}
