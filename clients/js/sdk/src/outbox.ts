/**
 * The outbox: sends not yet acknowledged by the server (protocol section 8, step 3).
 *
 *     add(entry) ──► OutboxStore.add (durable first) ──► published now, or when its turn comes
 *     replayAll()            after every connect: every pending send again, in the order first added
 *     tick() (every resendAfter/2)  sends unacked for resendAfterMs: again, same id, same order
 *     ack(ack)        ──► settled: removed; waiters resolve; a repeated ack is a duplicate
 *     refused(reply)  ──► rate_limited: every send held until retry_after_ms, then all pending
 *                         again in order (none is stored ahead of the refused one)
 *                     ├─► internal / unavailable: kept, published again after a backoff
 *                     └─► any other code (or one this SDK does not know): final, removed, SendFailed
 *
 * Publishing hands a request to MQTT.js, which writes packets in call order on one connection, so
 * a replay is synchronous and a conversation keeps this device's order. The store is written
 * through in call order; `pending()` is the in-memory view. `oneAtATime` publishes a send only
 * once the one before it in the same conversation is answered (behind bridge workers that share
 * a broker, two sends in flight may be stored in either order).
 */

import { backoffDelayMs, type Clock } from "./clock.js";
import { SendFailed } from "./errors.js";
import { retryOf, sendRequest, type Ack, type ErrorReply, type MessageKind, type SendRequest } from "./protocol.js";

/** One unacknowledged send: enough to publish it again unchanged. */
export interface PendingSend {
  id: string;
  conv: string;
  body: string;
  kind: MessageKind;
  media: string[];
}

export function pendingRequest(entry: PendingSend): SendRequest {
  return sendRequest(entry);
}

/** Where unacknowledged sends wait across restarts. Calls are made one at a time, in order. */
export interface OutboxStore {
  /** Every entry, in the order first added. */
  load(): Promise<PendingSend[]>;
  /** Store an entry; adding an id again replaces the entry and keeps its place. */
  add(entry: PendingSend): Promise<void>;
  /** Forget the entry with this id (nothing when there is none). */
  remove(id: string): Promise<void>;
  close?(): Promise<void>;
}

/** An outbox store in memory: entries are lost with the process. */
export class MemoryOutboxStore implements OutboxStore {
  readonly #entries = new Map<string, PendingSend>();

  async load(): Promise<PendingSend[]> {
    return [...this.#entries.values()].map((e) => ({ ...e, media: [...e.media] }));
  }

  async add(entry: PendingSend): Promise<void> {
    this.#entries.set(entry.id, { ...entry, media: [...entry.media] });
  }

  async remove(id: string): Promise<void> {
    this.#entries.delete(id);
  }
}

/** What a refused send leads to. */
export type ReplyOutcome = "retry" | "final" | "stale";

export interface OutboxStatistics {
  pending: number;
  resends: number; // entries published again (timeouts, internal / unavailable, after a hold)
  rateLimited: number; // sends refused as rate_limited (kept, published again when allowed)
}

interface Waiter {
  resolve(ack: Ack): void;
  reject(error: Error): void;
  timer: unknown; // the waiter's timeout, if it has one
}

const REMEMBERED_RESULTS = 4096;

export class Outbox {
  readonly #store: OutboxStore;
  readonly #clock: Clock;
  readonly #random: () => number;
  readonly #resendAfterMs: number;
  readonly #oneAtATime: boolean;
  readonly #publish: (request: SendRequest) => boolean;
  readonly #onStoreError: (error: unknown) => void;
  readonly #entries = new Map<string, PendingSend>(); // insertion order = the order first added
  readonly #lastSent = new Map<string, number>();
  readonly #failures = new Map<string, number>(); // internal / unavailable replies per entry
  readonly #results = new Map<string, Ack | ErrorReply>();
  readonly #waiters = new Map<string, Waiter[]>();
  #writes: Promise<void> = Promise.resolve();
  #held = false; // after a rate_limited send: nothing is published until #holdUntil
  #holdUntil = 0;
  #timer: unknown = null;
  #timerAt = 0;
  #closed = false;
  #resends = 0;
  #rateLimited = 0;

  constructor(options: {
    store: OutboxStore;
    clock: Clock;
    random: () => number;
    resendAfterMs: number;
    oneAtATime: boolean;
    publish: (request: SendRequest) => boolean; // false when offline: a later replay publishes it
    onStoreError: (error: unknown) => void;
  }) {
    this.#store = options.store;
    this.#clock = options.clock;
    this.#random = options.random;
    this.#resendAfterMs = options.resendAfterMs;
    this.#oneAtATime = options.oneAtATime;
    this.#publish = options.publish;
    this.#onStoreError = options.onStoreError;
  }

  /** Load what an earlier run left unacknowledged and start the resend timer. */
  async open(): Promise<void> {
    for (const entry of await this.#store.load()) this.#entries.set(entry.id, entry);
    this.#schedule(this.#resendAfterMs / 2);
  }

  /** Stop the timer and fail the waiters; pending entries stay in the store. */
  close(error: Error): Promise<void> {
    this.#closed = true;
    if (this.#timer !== null) this.#clock.clearTimeout(this.#timer);
    this.#timer = null;
    for (const id of [...this.#waiters.keys()]) for (const waiter of this.#take(id)) waiter.reject(error);
    return this.#writes;
  }

  pending(): PendingSend[] {
    return [...this.#entries.values()];
  }

  has(id: string): boolean {
    return this.#entries.has(id);
  }

  statistics(): OutboxStatistics {
    return { pending: this.#entries.size, resends: this.#resends, rateLimited: this.#rateLimited };
  }

  /** Persist a new send, then publish it unless older ones must go first. */
  async add(entry: PendingSend): Promise<void> {
    const write = this.#writes.then(() => this.#store.add(entry));
    this.#writes = write.catch(() => undefined);
    await write; // a send the store refused is not sent: the caller hears why
    this.#results.delete(entry.id);
    this.#entries.set(entry.id, entry);
    if (this.#held) {
      // The replay after the hold takes it, in order.
      this.#lastSent.set(entry.id, Math.max(this.#clock.now(), this.#holdUntil) - this.#resendAfterMs);
      return;
    }
    if (this.#oneAtATime && this.#heads().get(entry.conv) !== entry.id) return; // its turn comes on an answer
    this.#publishNow(entry);
  }

  /** After a connect: every pending send again, in order (unless a hold is on). */
  replayAll(): void {
    this.#replay(true);
  }

  /** The resend timer: end a hold that is over, publish again what went unacked too long. */
  tick(): void {
    if (this.#held && this.#clock.now() >= this.#holdUntil) this.#held = false;
    this.#replay(false);
  }

  /** An ack arrived; false when it repeats one already settled. */
  ack(ack: Ack): boolean {
    if (this.#results.get(ack.id)?.type === "ack") return false;
    this.#settle(ack.id, ack);
    for (const waiter of this.#take(ack.id)) waiter.resolve(ack);
    return true;
  }

  /** An error reply naming a send: retried (kept), final (removed: waiters get SendFailed), or
   * stale (it answers a resend of a send already acked: the message is stored). */
  refused(reply: ErrorReply & { id: string }): ReplyOutcome {
    if (this.#results.get(reply.id)?.type === "ack") return "stale";
    const retry = retryOf(reply.code);
    if (this.#entries.has(reply.id) && retry === "after_retry_after") {
      this.#hold(reply.retry_after_ms ?? 1000);
      return "retry";
    }
    if (this.#entries.has(reply.id) && (retry === "same_id" || retry === "backoff")) {
      const failures = this.#failures.get(reply.id) ?? 0;
      this.#failures.set(reply.id, failures + 1);
      const delay = backoffDelayMs(failures, this.#random);
      this.#lastSent.set(reply.id, this.#clock.now() + delay - this.#resendAfterMs);
      this.#schedule(delay);
      return "retry";
    }
    this.#settle(reply.id, reply);
    const failure = new SendFailed(reply);
    for (const waiter of this.#take(reply.id)) waiter.reject(failure);
    return "final";
  }

  /** The ack of a send: at once if it came lately; SendFailed for an error reply; `onTimeout()`'s
   * error when timeoutMs passes first (the send stays in the outbox). */
  waitAcked(id: string, timeoutMs: number | null, onTimeout: () => Error): Promise<Ack> {
    const result = this.#results.get(id);
    if (result?.type === "ack") return Promise.resolve(result);
    if (result?.type === "error") return Promise.reject(new SendFailed(result));
    return new Promise<Ack>((resolve, reject) => {
      const waiter: Waiter = { resolve, reject, timer: null };
      if (timeoutMs !== null) {
        waiter.timer = this.#clock.setTimeout(() => {
          const left = (this.#waiters.get(id) ?? []).filter((w) => w !== waiter);
          if (left.length > 0) this.#waiters.set(id, left);
          else this.#waiters.delete(id);
          reject(onTimeout());
        }, timeoutMs);
      }
      this.#waiters.set(id, [...(this.#waiters.get(id) ?? []), waiter]);
    });
  }

  #hold(delayMs: number): void {
    this.#rateLimited += 1;
    this.#held = true;
    this.#holdUntil = Math.max(this.#holdUntil, this.#clock.now() + delayMs);
    for (const id of this.#entries.keys()) this.#lastSent.set(id, this.#holdUntil - this.#resendAfterMs);
    this.#schedule(this.#holdUntil - this.#clock.now());
  }

  #replay(everything: boolean): void {
    if (this.#held) return;
    const now = this.#clock.now();
    const heads = this.#oneAtATime ? new Set(this.#heads().values()) : null;
    for (const entry of this.#entries.values()) {
      if (heads !== null && !heads.has(entry.id)) continue;
      const last = this.#lastSent.get(entry.id);
      if (!everything && last !== undefined && now - last < this.#resendAfterMs) continue;
      if (!everything && last !== undefined) this.#resends += 1;
      this.#publishNow(entry);
    }
  }

  #publishNow(entry: PendingSend): void {
    this.#lastSent.set(entry.id, this.#clock.now());
    this.#publish(pendingRequest(entry)); // offline: the replay after the next connect takes it
  }

  /** The id of each conversation's oldest pending send. */
  #heads(): Map<string, string> {
    const heads = new Map<string, string>();
    for (const entry of this.#entries.values()) if (!heads.has(entry.conv)) heads.set(entry.conv, entry.id);
    return heads;
  }

  #settle(id: string, result: Ack | ErrorReply): void {
    const wasPending = this.#entries.delete(id);
    this.#lastSent.delete(id);
    this.#failures.delete(id);
    if (wasPending) {
      const write = this.#writes.then(() => this.#store.remove(id));
      this.#writes = write.catch(this.#onStoreError);
    }
    this.#results.delete(id);
    this.#results.set(id, result);
    if (this.#results.size > REMEMBERED_RESULTS) {
      const oldest = this.#results.keys().next();
      if (oldest.done !== true) this.#results.delete(oldest.value);
    }
    if (this.#oneAtATime) this.#replay(false); // the next send of that conversation goes now
  }

  #take(id: string): Waiter[] {
    const waiters = this.#waiters.get(id) ?? [];
    this.#waiters.delete(id);
    for (const waiter of waiters) if (waiter.timer !== null) this.#clock.clearTimeout(waiter.timer);
    return waiters;
  }

  /** Run tick() in ms, unless it is due sooner already; it then runs every resendAfter / 2. */
  #schedule(ms: number): void {
    const at = this.#clock.now() + Math.max(0, ms);
    if (this.#timer !== null && this.#timerAt <= at) return;
    if (this.#timer !== null) this.#clock.clearTimeout(this.#timer);
    this.#timerAt = at;
    this.#timer = this.#clock.setTimeout(
      () => {
        this.#timer = null;
        this.tick();
        if (!this.#closed) this.#schedule(this.#resendAfterMs / 2);
      },
      Math.max(0, ms),
    );
  }
}
