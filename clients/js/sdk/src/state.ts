/**
 * What a device remembers between runs (protocol section 8): the sync cursor, the last seq handed
 * to the app per conversation, and the channels it follows. With it a restarted app neither loses
 * nor repeats a message.
 *
 * StateStore is the interface; MemoryStateStore forgets with the process. The browser entry has
 * IndexedDBStateStore, the Node entry JsonFileStateStore. One store per user and device.
 */

export interface StateSnapshot {
  cursor: string | null; // of the last sync whose messages the app has all taken
  delivered: Record<string, number>; // conv → the last seq handed to the app
  channels: string[]; // followed: c/{conv}/in is subscribed on every connect
}

/** Calls are made one at a time, in order; a write need not be durable before it resolves only
 * if the app accepts repeating (never losing) messages after a crash. */
export interface StateStore {
  load(): Promise<StateSnapshot>;
  /** Remember a sync cursor (null forgets it: the next sync starts from the beginning). */
  setCursor(cursor: string | null): Promise<void>;
  /** Every message of conv up to seq reached the app (a lower seq than the stored one is ignored). */
  setDelivered(conv: string, seq: number): Promise<void>;
  /** Start (member) or stop following a channel. */
  setChannel(conv: string, member: boolean): Promise<void>;
  close?(): Promise<void>;
}

export function emptySnapshot(): StateSnapshot {
  return { cursor: null, delivered: {}, channels: [] };
}

/** Apply one change to a snapshot (the stores that keep a whole snapshot share this). */
export function applyDelivered(snapshot: StateSnapshot, conv: string, seq: number): void {
  if (seq > (snapshot.delivered[conv] ?? 0)) snapshot.delivered[conv] = seq;
}

export function applyChannel(snapshot: StateSnapshot, conv: string, member: boolean): void {
  const channels = new Set(snapshot.channels);
  if (member) channels.add(conv);
  else channels.delete(conv);
  snapshot.channels = [...channels].sort();
}

/** State for the life of the process. */
export class MemoryStateStore implements StateStore {
  readonly #state: StateSnapshot;

  constructor(initial: Partial<StateSnapshot> = {}) {
    this.#state = { ...emptySnapshot(), ...initial };
    this.#state.delivered = { ...this.#state.delivered };
    this.#state.channels = [...this.#state.channels];
  }

  async load(): Promise<StateSnapshot> {
    return { cursor: this.#state.cursor, delivered: { ...this.#state.delivered }, channels: [...this.#state.channels] };
  }

  async setCursor(cursor: string | null): Promise<void> {
    this.#state.cursor = cursor;
  }

  async setDelivered(conv: string, seq: number): Promise<void> {
    applyDelivered(this.#state, conv, seq);
  }

  async setChannel(conv: string, member: boolean): Promise<void> {
    applyChannel(this.#state, conv, member);
  }
}

/** A store's writes in call order, each after the one before it; a failed write is reported and
 * does not stop the ones after it. */
export class StateWriter {
  readonly #store: StateStore;
  readonly #onError: (error: unknown) => void;
  #chain: Promise<void> = Promise.resolve();

  constructor(store: StateStore, onError: (error: unknown) => void) {
    this.#store = store;
    this.#onError = onError;
  }

  setCursor(cursor: string | null): void {
    this.#then(() => this.#store.setCursor(cursor));
  }

  setDelivered(conv: string, seq: number): void {
    this.#then(() => this.#store.setDelivered(conv, seq));
  }

  setChannel(conv: string, member: boolean): void {
    this.#then(() => this.#store.setChannel(conv, member));
  }

  /** Resolves once every write asked for so far is done. */
  flushed(): Promise<void> {
    return this.#chain;
  }

  #then(write: () => Promise<void>): void {
    this.#chain = this.#chain.then(write).catch(this.#onError);
  }
}
