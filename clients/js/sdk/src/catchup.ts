/**
 * Receiving messages exactly once, in seq order per conversation: live ones and caught-up ones
 * (protocol section 8, steps 4–5 and "Reconnect and catch up").
 *
 *     live msg (MQTT) ──┬─► OrderingBuffer ──► deliver(ready)    seq order per conversation,
 *     HTTP pages ───────┘    held behind gaps                     each (conv, seq) once
 *
 *     requestSync()   after every connect: GET /v1/conversations?since=<cursor>&include_messages=50
 *                     while `more`; per conversation its included messages, then …/messages?after=
 *                     <last> until complete; a cursor is saved once the app has taken everything
 *                     it covers (handedOver)
 *     gap timer       a gap that outlives graceMs is fetched with …/messages?after=<last>; still
 *                     open: wait another grace; a fetch the server refuses: delivered past it
 *     after= pages    authoritative: one that starts above after + 1 starts at the user's join
 *                     point, so the range before it is skipped, not waited for
 *
 * One HTTP catch-up at a time (sync and gap repairs share a lock). Without an HTTP API there is no
 * catch-up: msg events are delivered as they arrive, duplicates dropped. The same steps, in the
 * same order, as the Python SDK's ChatClient (clients/aio.py), so both replay the shared vectors.
 */

import type { Clock } from "./clock.js";
import { ClientClosed, HttpError } from "./errors.js";
import type { ConversationSummary } from "./events.js";
import type { HttpApi } from "./http.js";
import { OrderingBuffer, SeenMessages } from "./ordering.js";
import type { Message } from "./protocol.js";
import type { StateWriter } from "./state.js";

export const SYNC_INCLUDE_MESSAGES = 50;

export interface CatchupHooks {
  /** Messages to hand to the app, in order. */
  deliver(messages: Message[]): void;
  /** A sync page's conversations (unread counts, watermarks), before their messages. */
  synced(conversations: ConversationSummary[]): void;
  /** A channel the sync lists: follow it (subscribe to c/{conv}/in). */
  follow(conv: string): void;
  /** A catch-up that failed (it is tried again after the next connect or gap). */
  error(error: Error): void;
}

export interface CatchupStatistics {
  received: number; // messages handed to deliver()
  duplicates: number; // live msg events dropped as already seen
  gapsDetected: number; // live msgs that arrived ahead of a missing seq
  gapFetches: number; // gaps that outlived the grace and were fetched over HTTP
}

export class Catchup {
  readonly #http: HttpApi | null;
  readonly #clock: Clock;
  readonly #hooks: CatchupHooks;
  readonly #state: StateWriter;
  readonly #ordering: OrderingBuffer | null;
  readonly #seen = new SeenMessages();
  readonly #handed: Map<string, number>; // the last seq the app took, per conversation
  #cursor: string | null; // the last saved cursor
  #pendingCursors: { cursor: string; covered: Map<string, number> }[] = [];
  #lock: Promise<void> = Promise.resolve();
  #syncWanted = false;
  #syncing: Promise<void> | null = null;
  #gapTimer: unknown = null;
  #gapsRunning = false;
  #closed = false;
  readonly #stats: CatchupStatistics = { received: 0, duplicates: 0, gapsDetected: 0, gapFetches: 0 };

  constructor(options: {
    http: HttpApi | null;
    clock: Clock;
    graceMs: number;
    cursor: string | null;
    delivered: Readonly<Record<string, number>>;
    state: StateWriter;
    hooks: CatchupHooks;
  }) {
    this.#http = options.http;
    this.#clock = options.clock;
    this.#hooks = options.hooks;
    this.#state = options.state;
    this.#cursor = options.cursor;
    this.#handed = new Map(Object.entries(options.delivered));
    this.#ordering =
      options.http !== null ? new OrderingBuffer({ graceMs: options.graceMs, start: options.delivered }) : null;
  }

  statistics(): CatchupStatistics {
    return { ...this.#stats };
  }

  /** The last seq released in order for conv (taken by the app or on its way). */
  last(conv: string): number {
    return this.#ordering?.last(conv) ?? this.#handed.get(conv) ?? 0;
  }

  /** Messages held behind gaps. */
  held(): number {
    return this.#ordering?.held() ?? 0;
  }

  close(): void {
    this.#closed = true;
    if (this.#gapTimer !== null) this.#clock.clearTimeout(this.#gapTimer);
    this.#gapTimer = null;
  }

  /** A msg event from MQTT. */
  offerLive(msg: Message): void {
    if (this.#ordering === null) {
      if (!this.#seen.firstTime(msg.conv, msg.seq)) {
        this.#stats.duplicates += 1;
        return;
      }
      this.#deliver([msg]);
      return;
    }
    this.#offer([msg], true);
  }

  /** The app took msg: remember it, and save each sync cursor whose messages it now has. */
  handedOver(msg: Message): void {
    if (msg.seq > (this.#handed.get(msg.conv) ?? 0)) {
      this.#handed.set(msg.conv, msg.seq);
      this.#state.setDelivered(msg.conv, msg.seq);
    }
    this.#saveCursors();
  }

  /** Catch up (again, if one is running: the connection came back meanwhile); resolves when the
   * catch-up it asked for has finished or given up. At once without an HTTP API. */
  requestSync(): Promise<void> {
    if (this.#http === null || this.#closed) return Promise.resolve();
    this.#syncWanted = true;
    this.#syncing ??= this.#runSyncs().finally(() => {
      this.#syncing = null;
    });
    return this.#syncing;
  }

  /** The catch-up under way, if any. */
  synced(): Promise<void> {
    return this.#syncing ?? Promise.resolve();
  }

  async #runSyncs(): Promise<void> {
    while (this.#syncWanted && !this.#closed) {
      this.#syncWanted = false;
      try {
        await this.#locked(() => this.#sync());
      } catch (error) {
        if (!(error instanceof ClientClosed)) this.#hooks.error(asError(error));
      }
    }
  }

  /** Catch up every conversation changed since the saved cursor. */
  async #sync(): Promise<void> {
    const http = this.#http as HttpApi;
    let cursor = this.#cursor;
    for (;;) {
      let page;
      try {
        page = await http.sync(cursor, { includeMessages: SYNC_INCLUDE_MESSAGES });
      } catch (error) {
        if (!(error instanceof HttpError) || error.code !== "bad_cursor" || cursor === null) throw error;
        // The server does not know the saved cursor: sync from the start.
        this.#pendingCursors = [];
        this.#cursor = null;
        this.#state.setCursor(null);
        cursor = null;
        continue;
      }
      this.#hooks.synced(page.conversations);
      const covered = new Map<string, number>();
      for (const summary of page.conversations) {
        if (summary.kind === "channel") this.#hooks.follow(summary.conv);
        await this.#catchUp(summary);
        covered.set(summary.conv, this.last(summary.conv));
      }
      this.#pendingCursors.push({ cursor: page.cursor, covered });
      this.#saveCursors();
      cursor = page.cursor;
      if (!page.more) return;
    }
  }

  async #catchUp(summary: ConversationSummary): Promise<void> {
    const included = summary.messages;
    const first = included[0];
    if (first !== undefined && !summary.messages_more) {
      // Nothing older is readable: a first seq above last + 1 is this user's join point.
      this.#deliver((this.#ordering as OrderingBuffer).skipTo(summary.conv, first.seq, this.#clock.now()));
    }
    if (first !== undefined && first.seq <= this.last(summary.conv) + 1) this.#offer(included, false);
    if (this.last(summary.conv) < summary.last_seq) await this.#fetchAfter(summary.conv);
  }

  /** Fetch `messages?after=<last released>` pages until the server has no more. */
  async #fetchAfter(conv: string): Promise<void> {
    const http = this.#http as HttpApi;
    for (;;) {
      const after = this.last(conv);
      const page = await http.messagesAfter(conv, after);
      const first = page.messages[0];
      if (first !== undefined) {
        // The page is authoritative: a first seq above after + 1 means the range before it is not
        // readable by this user (they joined the group later), not a gap to wait on.
        this.#deliver((this.#ordering as OrderingBuffer).skipTo(conv, first.seq, this.#clock.now()));
      }
      this.#offer(page.messages, false);
      if (!page.more || this.last(conv) <= after) return;
    }
  }

  #offer(messages: readonly Message[], live: boolean): void {
    const ordering = this.#ordering as OrderingBuffer;
    const now = this.#clock.now();
    for (const msg of messages) {
      const offered = ordering.offer(msg, now);
      if (offered.duplicate) {
        if (live) this.#stats.duplicates += 1;
        continue;
      }
      if (offered.gapOpened) {
        if (live) this.#stats.gapsDetected += 1;
        this.#armGaps();
      }
      this.#deliver(offered.ready);
    }
  }

  #deliver(messages: Message[]): void {
    if (messages.length === 0) return;
    this.#stats.received += messages.length;
    this.#hooks.deliver(messages);
  }

  #saveCursors(): void {
    while (this.#pendingCursors.length > 0) {
      const { cursor, covered } = this.#pendingCursors[0] as { cursor: string; covered: Map<string, number> };
      for (const [conv, seq] of covered) if ((this.#handed.get(conv) ?? 0) < seq) return;
      this.#pendingCursors.shift();
      this.#cursor = cursor;
      this.#state.setCursor(cursor);
    }
  }

  // --- gaps --------------------------------------------------------------------------------------

  /** Wake at the earliest gap deadline (unless repairs run now: they arm it when done). */
  #armGaps(): void {
    if (this.#gapsRunning || this.#closed || this.#ordering === null) return;
    if (this.#gapTimer !== null) this.#clock.clearTimeout(this.#gapTimer);
    this.#gapTimer = null;
    const deadline = this.#ordering.nextDeadline();
    if (deadline === null) return;
    this.#gapTimer = this.#clock.setTimeout(
      () => {
        this.#gapTimer = null;
        void this.#runGaps();
      },
      Math.max(0, deadline - this.#clock.now()),
    );
  }

  async #runGaps(): Promise<void> {
    const ordering = this.#ordering as OrderingBuffer;
    this.#gapsRunning = true;
    try {
      for (const conv of ordering.gapsDue(this.#clock.now())) {
        if (this.#closed) return;
        this.#stats.gapFetches += 1;
        try {
          await this.#locked(() => this.#repairGap(conv));
        } catch (error) {
          if (error instanceof ClientClosed) return;
          this.#hooks.error(asError(error));
          ordering.rearm(conv, this.#clock.now());
        }
      }
    } finally {
      this.#gapsRunning = false;
      this.#armGaps();
    }
  }

  /** Fetch a gap; still open (the missing msg is in flight): wait another grace. */
  async #repairGap(conv: string): Promise<void> {
    const ordering = this.#ordering as OrderingBuffer;
    if (!ordering.hasGap(conv)) return; // a sync or a late msg filled it meanwhile
    try {
      await this.#fetchAfter(conv);
    } catch (error) {
      if (!(error instanceof HttpError) || error.code === "transport") throw error;
      // The server will not give the missing range (not_member, say): deliver what follows it.
      this.#hooks.error(error);
      this.#deliver(ordering.skipGap(conv, this.#clock.now()));
      return;
    }
    ordering.rearm(conv, this.#clock.now());
  }

  /** Run fn when no other catch-up runs. */
  #locked(fn: () => Promise<void>): Promise<void> {
    const run = this.#lock.then(fn);
    this.#lock = run.catch(() => undefined);
    return run;
  }
}

function asError(error: unknown): Error {
  return error instanceof Error ? error : new Error(String(error));
}
