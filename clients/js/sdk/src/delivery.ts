/**
 * Handing events to the app: listeners by event type, and async iterators.
 *
 *     push(event) ──► queue ──► pump, one event at a time, in order:
 *                                 every listener of its type and of "*" (awaiting a returned
 *                                 promise; a throw is reported, not fatal), then every open
 *                                 iterator (waiting until it has yielded the event)
 *                              ──► delivered(event): a msg now counts as taken by the app
 *
 * Events wait in the queue while the app has no listener and no iterator, so none is lost
 * between `new ChatClient` and the first `on…` call. Past `maxBuffered` waiting events the
 * oldest is dropped and counted (`dropped`): a msg dropped so is not marked delivered, and comes
 * again from the next catch-up after a restart.
 */

import type { ServerEvent } from "./protocol.js";

/** Every protocol event by its `type`. */
export type EventMap = { [E in ServerEvent as E["type"]]: E };
export type EventType = keyof EventMap;
export type Listener<T> = (event: T) => void | Promise<void>;

class EventIterator implements AsyncIterableIterator<ServerEvent> {
  readonly #hub: EventHub;
  #offered: { event: ServerEvent; taken: () => void } | null = null;
  #waiting: ((result: IteratorResult<ServerEvent>) => void) | null = null;
  #failWaiting: ((error: Error) => void) | null = null;
  #done = false;
  #error: Error | null = null;

  constructor(hub: EventHub) {
    this.#hub = hub;
  }

  /** Resolves once the consumer took the event (or the iterator ended). */
  offer(event: ServerEvent): Promise<void> {
    if (this.#done) return Promise.resolve();
    if (this.#waiting !== null) {
      const waiting = this.#waiting;
      this.#waiting = this.#failWaiting = null;
      waiting({ value: event, done: false });
      return Promise.resolve();
    }
    return new Promise((taken) => {
      this.#offered = { event, taken };
    });
  }

  next(): Promise<IteratorResult<ServerEvent>> {
    const offered = this.#offered;
    if (offered !== null) {
      this.#offered = null;
      offered.taken();
      return Promise.resolve({ value: offered.event, done: false });
    }
    if (this.#error !== null) return Promise.reject(this.#error);
    if (this.#done) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => {
      this.#waiting = resolve;
      this.#failWaiting = reject;
    });
  }

  /** The consumer stopped (a `break` out of `for await`). */
  return(): Promise<IteratorResult<ServerEvent>> {
    this.end(null);
    return Promise.resolve({ value: undefined, done: true });
  }

  [Symbol.asyncIterator](): this {
    return this;
  }

  /** End the iterator: it finishes, or throws `error` at its next read. */
  end(error: Error | null): void {
    if (this.#done) return;
    this.#done = true;
    this.#error = error;
    this.#hub.forget(this);
    this.#offered?.taken();
    this.#offered = null;
    if (error !== null) this.#failWaiting?.(error);
    else this.#waiting?.({ value: undefined, done: true });
    this.#waiting = this.#failWaiting = null;
  }
}

export class EventHub {
  readonly #maxBuffered: number;
  readonly #onListenerError: (error: unknown) => void;
  readonly #delivered: (event: ServerEvent) => void;
  readonly #listeners = new Map<string, Set<Listener<ServerEvent>>>();
  readonly #iterators = new Set<EventIterator>();
  readonly #queue: ServerEvent[] = [];
  #pumping = false;
  #idleWaiters: (() => void)[] = [];
  #closed = false;
  dropped = 0;

  constructor(options: {
    maxBuffered: number;
    onListenerError: (error: unknown) => void;
    delivered: (event: ServerEvent) => void;
  }) {
    this.#maxBuffered = options.maxBuffered;
    this.#onListenerError = options.onListenerError;
    this.#delivered = options.delivered;
  }

  /** Listen to one event type ("*": all of them); returns the function that stops it. */
  on<K extends EventType>(type: K | "*", listener: Listener<EventMap[K]>): () => void {
    const set = this.#listeners.get(type) ?? new Set();
    const entry = listener as Listener<ServerEvent>;
    set.add(entry);
    this.#listeners.set(type, set);
    void this.#pump();
    return () => {
      set.delete(entry);
    };
  }

  /** Every event from now on (and those waiting), until the client closes. */
  iterate(): AsyncIterableIterator<ServerEvent> {
    const iterator = new EventIterator(this);
    if (this.#closed) iterator.end(null);
    else this.#iterators.add(iterator);
    void this.#pump();
    return iterator;
  }

  forget(iterator: EventIterator): void {
    this.#iterators.delete(iterator);
  }

  push(event: ServerEvent): void {
    if (this.#closed) return;
    this.#queue.push(event);
    if (this.#queue.length > this.#maxBuffered) {
      this.#queue.shift();
      this.dropped += 1;
    }
    void this.#pump();
  }

  /** End every iterator (with `error` when the client failed); nothing is delivered after it. */
  close(error: Error | null): void {
    this.#closed = true;
    this.#queue.length = 0;
    for (const iterator of [...this.#iterators]) iterator.end(error);
  }

  /** Resolves once every waiting event is delivered (or waits for a listener). */
  idle(): Promise<void> {
    if (!this.#pumping) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  #hasConsumers(): boolean {
    if (this.#iterators.size > 0) return true;
    for (const set of this.#listeners.values()) if (set.size > 0) return true;
    return false;
  }

  async #pump(): Promise<void> {
    if (this.#pumping) return;
    this.#pumping = true;
    try {
      while (this.#queue.length > 0 && this.#hasConsumers() && !this.#closed) {
        const event = this.#queue.shift() as ServerEvent;
        await this.#emit(event);
        if (!this.#closed) this.#delivered(event);
      }
    } finally {
      this.#pumping = false;
      for (const resolve of this.#idleWaiters.splice(0)) resolve();
    }
  }

  async #emit(event: ServerEvent): Promise<void> {
    const listeners = [...(this.#listeners.get(event.type) ?? []), ...(this.#listeners.get("*") ?? [])];
    const results = listeners.map((listener) => {
      try {
        return Promise.resolve(listener(event)).catch(this.#onListenerError);
      } catch (error) {
        this.#onListenerError(error);
        return Promise.resolve();
      }
    });
    await Promise.all(results);
    await Promise.all([...this.#iterators].map((iterator) => iterator.offer(event)));
  }
}
