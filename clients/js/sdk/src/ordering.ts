/**
 * Per-conversation ordering: messages leave strictly in `seq` order, each (conv, seq) once.
 *
 *     offer(msg) ──► seq <= last or already held ──► dropped (duplicate)
 *                ├─► seq == last + 1 ──► released, with every held successor that now follows on
 *                └─► seq >  last + 1 ──► held; the gap (last, lowest held) opens with a deadline
 *                                        of now + grace
 *     gapsDue(now) ──► conversations whose gap outlived its grace: the client fetches
 *                      `messages?after=last` over HTTP and offers the result
 *
 * A gap that a fetch could not close is re-armed (rearm); one that can never be closed is given
 * up with skipGap, which releases what is held. An `after=` page (or a sync item's included
 * messages with nothing older) is authoritative: when it starts above `last + 1`, the range before
 * it is not readable by this user (a member added to a group reads from their join point on), and
 * skipTo moves past it. Time is passed in (ms), so the buffer is testable
 * without waiting. The same rules as the Python SDK's clients/ordering.py.
 */

import type { Message } from "./protocol.js";

/** What one offer did. */
export interface Offered {
  ready: Message[]; // to deliver now, in seq order
  duplicate: boolean;
  gapOpened: boolean;
}

export class OrderingBuffer {
  readonly #graceMs: number;
  readonly #last = new Map<string, number>();
  readonly #held = new Map<string, Map<number, Message>>();
  readonly #gapDeadline = new Map<string, number>();

  /** `start`: the last seq already delivered, per conversation (from the state store). */
  constructor(options: { graceMs: number; start?: Readonly<Record<string, number>> }) {
    this.#graceMs = options.graceMs;
    for (const [conv, seq] of Object.entries(options.start ?? {})) this.#last.set(conv, seq);
  }

  /** The last seq released for conv (0 when none). */
  last(conv: string): number {
    return this.#last.get(conv) ?? 0;
  }

  /** How many messages wait behind gaps. */
  held(): number {
    let count = 0;
    for (const held of this.#held.values()) count += held.size;
    return count;
  }

  hasGap(conv: string): boolean {
    return (this.#held.get(conv)?.size ?? 0) > 0;
  }

  offer(msg: Message, now: number): Offered {
    const { conv, seq } = msg;
    const last = this.last(conv);
    const held = this.#held.get(conv);
    if (seq <= last || held?.has(seq)) return { ready: [], duplicate: true, gapOpened: false };
    if (seq > last + 1) {
      const hadGap = held !== undefined && held.size > 0;
      const map = held ?? new Map<number, Message>();
      map.set(seq, msg);
      this.#held.set(conv, map);
      if (!hadGap) this.#gapDeadline.set(conv, now + this.#graceMs);
      return { ready: [], duplicate: false, gapOpened: !hadGap };
    }
    this.#last.set(conv, seq);
    return { ready: [msg, ...this.#releaseFollowing(conv, now)], duplicate: false, gapOpened: false };
  }

  /** Conversations whose gap has been open for the grace period. */
  gapsDue(now: number): string[] {
    return [...this.#gapDeadline].filter(([, deadline]) => deadline <= now).map(([conv]) => conv);
  }

  /** The earliest gap deadline, or null when no gap is open. */
  nextDeadline(): number | null {
    let next: number | null = null;
    for (const deadline of this.#gapDeadline.values()) next = next === null ? deadline : Math.min(next, deadline);
    return next;
  }

  /** A fetch did not close the gap (the message is still in flight): wait another grace. */
  rearm(conv: string, now: number): void {
    if (this.hasGap(conv)) this.#gapDeadline.set(conv, now + this.#graceMs);
  }

  /** Give up on the missing range before the lowest held message; release what follows on. */
  skipGap(conv: string, now: number): Message[] {
    const held = this.#held.get(conv);
    if (held === undefined || held.size === 0) return [];
    this.#last.set(conv, Math.min(...held.keys()) - 1);
    return this.#releaseFollowing(conv, now);
  }

  /** The server has nothing readable before `seq` beyond what was released: release what is held
   * below `seq` (in order, past its holes), continue just before `seq`, and release what follows
   * on. Nothing happens when `seq` already follows on. */
  skipTo(conv: string, seq: number, now: number): Message[] {
    if (seq <= this.last(conv) + 1) return [];
    const held = this.#held.get(conv);
    const ready: Message[] = [];
    if (held !== undefined) {
      for (const s of [...held.keys()].filter((s) => s < seq).sort((a, b) => a - b)) {
        ready.push(held.get(s) as Message);
        held.delete(s);
      }
    }
    this.#last.set(conv, seq - 1);
    ready.push(...this.#releaseFollowing(conv, now));
    // A later gap is still open: its grace starts now.
    if (ready.length > 0 && this.hasGap(conv)) this.#gapDeadline.set(conv, now + this.#graceMs);
    return ready;
  }

  #releaseFollowing(conv: string, now: number): Message[] {
    const ready: Message[] = [];
    const held = this.#held.get(conv);
    if (held !== undefined) {
      let last = this.last(conv);
      for (let next = held.get(last + 1); next !== undefined; next = held.get(last + 1)) {
        held.delete(last + 1);
        ready.push(next);
        last += 1;
      }
      this.#last.set(conv, last);
    }
    if (held !== undefined && held.size > 0) {
      // The old gap closed and a later one is still open: its grace starts now.
      if (ready.length > 0) this.#gapDeadline.set(conv, now + this.#graceMs);
    } else {
      this.#held.delete(conv);
      this.#gapDeadline.delete(conv);
    }
    return ready;
  }
}

/** The (conv, seq) pairs seen lately, to drop redelivered `msg` events when there is no HTTP
 * catch-up (and so no ordering). Bounded: the oldest pairs are forgotten past `capacity`. */
export class SeenMessages {
  readonly #capacity: number;
  readonly #seen = new Set<string>();

  constructor(capacity = 65_536) {
    this.#capacity = capacity;
  }

  /** Record (conv, seq); true the first time it is seen, false for a duplicate. */
  firstTime(conv: string, seq: number): boolean {
    const key = `${seq} ${conv}`;
    if (this.#seen.has(key)) {
      this.#seen.delete(key); // most recently seen: kept longest
      this.#seen.add(key);
      return false;
    }
    this.#seen.add(key);
    if (this.#seen.size > this.#capacity) {
      const oldest = this.#seen.values().next();
      if (oldest.done !== true) this.#seen.delete(oldest.value);
    }
    return true;
  }
}
