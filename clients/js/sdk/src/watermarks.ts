/**
 * `recv` and `read` watermarks on their way out (protocol section 8, step 8).
 *
 *     received(conv, seq)  the app took msgs up to seq: a recv, coalesced (one per conversation
 *                          per COALESCE_MS, carrying the highest seq)
 *     read(conv, seq)      the user saw them: a read, published at once
 *     flush()              after every connect: whatever could not go out while offline
 *
 * Both are monotonic on the server (a lower value is ignored), so sending one again is harmless
 * and only the highest seq per conversation is kept while waiting.
 */

import type { Clock } from "./clock.js";
import { encodeRequest, watermarkRequest } from "./protocol.js";

export const COALESCE_MS = 200;

export class Watermarks {
  readonly #publish: (payload: string) => boolean; // false when offline
  readonly #clock: Clock;
  readonly #recvDue = new Map<string, number>();
  readonly #readDue = new Map<string, number>();
  #timer: unknown = null;
  #closed = false;

  constructor(options: { publish: (payload: string) => boolean; clock: Clock }) {
    this.#publish = options.publish;
    this.#clock = options.clock;
  }

  received(conv: string, seq: number): void {
    this.#recvDue.set(conv, Math.max(seq, this.#recvDue.get(conv) ?? 0));
    if (this.#timer === null && !this.#closed) {
      this.#timer = this.#clock.setTimeout(() => {
        this.#timer = null;
        this.flush();
      }, COALESCE_MS);
    }
  }

  read(conv: string, seq: number): void {
    this.#readDue.set(conv, Math.max(seq, this.#readDue.get(conv) ?? 0));
    this.flush();
  }

  /** Publish everything due; what cannot go out now waits for the next flush. */
  flush(): void {
    for (const [kind, due] of [
      ["read", this.#readDue],
      ["recv", this.#recvDue],
    ] as const) {
      for (const [conv, seq] of [...due]) {
        if (!this.#publish(encodeRequest(watermarkRequest(kind, conv, seq)))) return;
        due.delete(conv);
      }
    }
  }

  close(): void {
    this.#closed = true;
    if (this.#timer !== null) this.#clock.clearTimeout(this.#timer);
    this.#timer = null;
  }
}
