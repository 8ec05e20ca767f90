/**
 * What the views use of mqchat's protocol (docs/protocol.md): an adapter over the TypeScript SDK
 * `@mqchat/client`, which does the client recipe (the outbox, reconnect and catch-up, seq order,
 * each message once, receipts). The views never see a topic, an envelope or the SDK, only the
 * events and calls below.
 *
 *   views ──send/markRead/typing/history/createGroup/watchPresence──▶ Chat ──▶ ChatClient
 *   views ◀──message/ack/failed/receipt/typing/presence/conversation/conv/status── Chat ◀── ChatClient
 *
 * The SDK keeps its outbox and catch-up state in IndexedDB (per user and device): unacked sends
 * and the catch-up's cursor survive a reload. What is left here:
 *   - at start, the state and newest messages of every conversation (a sync from no cursor, which
 *     moves nothing): the page holds messages in memory only, so what it shows after a reload
 *     comes from the server; older ones come page by page (history);
 *   - the browser's offline / online events pause and resume the connection;
 *   - presence refused for a user (no shared conversation yet) is asked again after 10 s, or at
 *     once after a message in a 1:1 conversation with them;
 *   - tokens that the sign-in can mint again (the dev sign-in) are renewed at 80 % of their life;
 *     a pasted token is not (asking again would give the same token);
 *   - the server refusing the credentials for good (AuthFailed) ends the chat: "ended" tells the
 *     views, which go back to the sign-in.
 *
 * Each message is reported once per (conv, seq), whichever way it came (the SDK, the first
 * page, scrollback).
 */
import { AuthFailed, ChatClient, newUlid, RequestRefused, SendFailed } from "@mqchat/client";
import type {
  ConnectionChange,
  ConversationSummary,
  Group as GroupBody,
  Message as Envelope,
  SyncPage,
} from "@mqchat/client";
import { indexedDBStores } from "@mqchat/client/browser";

export { HttpError } from "@mqchat/client";

// --- the protocol's shapes, as the views see them ----------------------------------------------

export interface Message {
  conv: string;
  seq: number;
  mid: string;
  from: string;
  dev: string;
  id: string;
  ts: number;
  kind: string;
  body: string;
}

export type ConvKind = "dm" | "group" | "channel";

export interface ConversationState {
  conv: string;
  kind: ConvKind;
  lastSeq: number;
  delivered: number; // my (the user's) watermarks
  read: number;
  unread: number;
  updatedAt: number;
}

export interface Ack {
  id: string;
  conv: string;
  seq: number;
  mid: string;
  ts: number;
}

export interface Failure {
  id: string;
  conv: string;
  code: string;
  message: string;
}

export interface Receipt {
  conv: string;
  user: string;
  delivered: number;
  read: number;
}

export interface Typing {
  conv: string;
  user: string;
  state: boolean;
}

export interface Presence {
  user: string;
  state: "online" | "offline";
  lastSeen: number | null;
}

export interface ConvChange {
  conv: string;
  kind: ConvKind;
  event: string; // created, members_added, members_removed, admin_added
  users: string[];
  by: string;
}

export interface Group {
  conv: string;
  name: string;
  kind: ConvKind;
  creator: string;
  members: { user: string; role: string; joinedSeq: number }[];
}

export interface Pending {
  id: string;
  conv: string;
  body: string;
  ts: number; // when the user sent it (this device's clock)
}

export interface Page {
  messages: Message[];
  more: boolean;
  lastSeq: number;
}

export type Status = "connecting" | "online" | "offline";

export interface Credentials {
  token: string;
  expiresIn: number | null; // seconds until it is renewed at 80 %; null: never renewed (a pasted token)
}

export interface ChatOptions {
  user: string;
  device: string;
  wsUrl: string;
  httpBase: string; // "" for the page's own origin
  credentials: () => Promise<Credentials>; // called at start, before expiry and after a refusal
}

export interface ChatEvents {
  status: Status;
  message: Message;
  ack: Ack;
  failed: Failure;
  receipt: Receipt;
  typing: Typing;
  presence: Presence;
  conversation: ConversationState;
  conv: ConvChange;
  synced: undefined;
  restored: Pending; // a send an earlier page left unacked (in the outbox, sent again)
  ended: string; // the server refused the credentials for good: why, for the sign-in screen
}

/** The 1:1 conversation id of two users: their ids sorted (byte order). */
export function dmConv(a: string, b: string): string {
  const [lo, hi] = a < b ? [a, b] : [b, a];
  return `dm:${lo}:${hi}`;
}

export const ID_RE = /^[A-Za-z0-9_.@-]{1,64}$/;
/** ID_RE for an input's pattern attribute (compiled with the v flag, where "-" is escaped). */
export const ID_PATTERN = "[A-Za-z0-9_.@\\-]{1,64}";

const SYNC_MESSAGES = 50;
const PRESENCE_RETRY_MS = 10_000;
const RENEW_MIN_MS = 5_000; // a token that claims to expire sooner is not renewed in a loop
const RENEW_RETRY_MS = 30_000; // after a failed renewal (the old token may still be good)
const TIMER_MAX_MS = 2 ** 31 - 1; // setTimeout fires at once for anything longer (~24.8 days)

type Listener<T> = (event: T) => void;

// --- the adapter -------------------------------------------------------------------------------

export class Chat {
  readonly user: string;
  readonly device: string;
  private readonly options: ChatOptions;
  private readonly stores: ReturnType<typeof indexedDBStores>;
  private readonly client: ChatClient;
  private readonly listeners = new Map<keyof ChatEvents, Set<Listener<never>>>();
  private readonly outbox = new Map<string, Pending>(); // sends not acked yet, as the views know them
  private readonly seen = new Map<string, Set<number>>(); // per conversation: the seqs reported
  private readonly presenceAsked = new Map<string, number>();
  private statusNow: Status = "connecting";
  private offline = false;
  private stopped = false;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private opened: () => void = () => undefined;
  private sends: Promise<void>; // sends go to the SDK in order, once its outbox is open

  constructor(options: ChatOptions) {
    this.options = options;
    this.user = options.user;
    this.device = options.device;
    this.sends = new Promise((resolve) => (this.opened = resolve));
    this.stores = indexedDBStores(options.user, options.device);
    this.client = new ChatClient({
      url: options.wsUrl,
      httpUrl: options.httpBase || location.origin,
      user: options.user,
      device: options.device,
      token: () => this.freshToken(),
      ...this.stores,
    });
    this.client.onMessage((message) => {
      if (message.conv.startsWith("dm:")) {
        for (const user of message.conv.split(":").slice(1)) this.presenceAsked.delete(user);
      }
      this.report([message]);
    });
    this.client.onAck((ack) => {
      this.outbox.delete(ack.id);
      this.emit("ack", { id: ack.id, conv: ack.conv, seq: ack.seq, mid: ack.mid, ts: ack.ts });
    });
    this.client.onReceipt(({ conv, user, delivered, read }) => this.emit("receipt", { conv, user, delivered, read }));
    this.client.onTyping(({ conv, user, state }) => this.emit("typing", { conv, user, state }));
    this.client.onPresence((presence) => {
      const state = presence.state === "online" ? "online" : "offline";
      this.emit("presence", { user: presence.user, state, lastSeen: presence.last_seen });
    });
    this.client.onConv(({ conv, kind, event, users, by }) => {
      this.emit("conv", { conv, kind: convKind(conv, kind), event, users, by });
    });
    this.client.onSync((conversations) => conversations.forEach((summary) => this.emitConversation(summary)));
    this.client.onError((error) => this.onError(error));
    this.client.onConnectionChange((change) => this.onConnectionChange(change));
  }

  get status(): Status {
    return this.statusNow;
  }

  on<K extends keyof ChatEvents>(type: K, listener: Listener<ChatEvents[K]>): () => void {
    const set = this.listeners.get(type) ?? new Set<Listener<never>>();
    this.listeners.set(type, set);
    set.add(listener as Listener<never>);
    return () => {
      set.delete(listener as Listener<never>);
    };
  }

  private emit<K extends keyof ChatEvents>(type: K, event: ChatEvents[K]): void {
    for (const listener of this.listeners.get(type) ?? []) (listener as Listener<ChatEvents[K]>)(event);
  }

  private setStatus(status: Status): void {
    if (status === this.statusNow) return;
    this.statusNow = status;
    this.emit("status", status);
  }

  // --- connection ----------------------------------------------------------------------------

  /** Report the sends an earlier page left unacked, connect (rejects when the server cannot be
   * reached or refuses the credentials), then load the newest messages of every conversation. */
  async start(): Promise<void> {
    for (const entry of await this.stores.outbox.load()) {
      const pending = { id: entry.id, conv: entry.conv, body: entry.body, ts: ulidTime(entry.id) };
      this.outbox.set(pending.id, pending);
      this.emit("restored", pending);
    }
    await this.client.connect();
    this.opened();
    window.addEventListener("offline", this.goOffline);
    window.addEventListener("online", this.goOnline);
    if (!navigator.onLine) this.goOffline();
    await this.loadNewest().catch(() => undefined);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    window.removeEventListener("offline", this.goOffline);
    window.removeEventListener("online", this.goOnline);
    clearTimeout(this.refreshTimer);
    await this.client.close();
  }

  /** The browser lost its network: end the connection now (as a phone does), catch up later. */
  private readonly goOffline = (): void => {
    this.offline = true;
    this.setStatus("offline");
    this.client.pause();
  };

  private readonly goOnline = (): void => {
    this.offline = false;
    this.setStatus("connecting");
    this.client.resume();
  };

  private onConnectionChange(change: ConnectionChange): void {
    if (change.state === "connected") this.setStatus("online");
    else if (change.state === "closed" || this.offline) this.setStatus("offline");
    else this.setStatus("connecting");
  }

  /** A token for the SDK (asked at start and after a refusal); one the sign-in can mint again
   * is renewed at 80 % of its life. */
  private async freshToken(): Promise<string> {
    clearTimeout(this.refreshTimer);
    const { token, expiresIn } = await this.options.credentials();
    if (expiresIn !== null) this.renewIn(expiresIn * 800);
    return token;
  }

  private renewIn(ms: number): void {
    clearTimeout(this.refreshTimer);
    if (this.stopped) return;
    const renew = (): void => {
      void this.freshToken()
        .then((fresh) => this.client.setToken(fresh))
        .catch(() => this.renewIn(RENEW_RETRY_MS));
    };
    this.refreshTimer = setTimeout(renew, Math.min(TIMER_MAX_MS, Math.max(RENEW_MIN_MS, ms)));
  }

  private onError(error: Error): void {
    if (error instanceof AuthFailed) {
      // Fatal: the SDK has stopped (a fresh token was refused too). Back to the sign-in.
      clearTimeout(this.refreshTimer);
      this.stopped = true;
      this.emit("ended", "The server refused this sign-in (the token expired or was revoked): sign in again.");
      return;
    }
    if (!(error instanceof SendFailed)) return; // the SDK retries the rest (catch-up, resends)
    const { id, conv, code, message } = error.reply;
    if (id !== null) this.failed(id, conv, code, message);
  }

  private failed(id: string, conv: string | null, code: string, message: string): void {
    const pending = this.outbox.get(id);
    this.outbox.delete(id);
    this.emit("failed", { id, conv: conv ?? pending?.conv ?? "", code, message });
  }

  // --- messages ------------------------------------------------------------------------------

  /** Report messages not reported before. */
  private report(messages: readonly Envelope[]): void {
    for (const envelope of messages) {
      let seen = this.seen.get(envelope.conv);
      if (!seen) this.seen.set(envelope.conv, (seen = new Set()));
      if (seen.has(envelope.seq)) continue;
      seen.add(envelope.seq);
      this.emit("message", toMessage(envelope));
    }
  }

  /** Every conversation's state and newest messages: a sync from no cursor (the SDK's catch-up
   * keeps its own cursor and brings what comes after). */
  private async loadNewest(): Promise<void> {
    let cursor: string | null = null;
    for (;;) {
      const query = { includeMessages: SYNC_MESSAGES, limit: 100, attempts: 3 };
      const page: SyncPage = await this.client.http.sync(cursor, query);
      for (const summary of page.conversations) {
        this.emitConversation(summary);
        this.report(summary.messages);
      }
      if (!page.more) break;
      cursor = page.cursor;
    }
    this.emit("synced", undefined);
  }

  private emitConversation(summary: ConversationSummary): void {
    this.emit("conversation", {
      conv: summary.conv,
      kind: convKind(summary.conv, summary.kind),
      lastSeq: summary.last_seq,
      delivered: summary.delivered,
      read: summary.read,
      unread: summary.unread,
      updatedAt: summary.updated_at,
    });
  }

  /** Scrollback: the page below `before`; its messages are reported too. */
  async history(conv: string, before: number, limit = 30): Promise<Page> {
    const page = await this.client.history(conv, before, limit);
    this.report(page.messages);
    return { messages: page.messages.map(toMessage), more: page.more, lastSeq: page.last_seq };
  }

  // --- requests ------------------------------------------------------------------------------

  /** Send a text: in the SDK's outbox (IndexedDB) until acked, published now if connected. */
  send(conv: string, body: string): Pending {
    const pending = { id: newUlid(), conv, body, ts: Date.now() };
    this.outbox.set(pending.id, pending);
    this.sends = this.sends
      .then(async () => {
        await this.client.send(conv, body, { id: pending.id });
      })
      .catch((error: unknown) => {
        const code = error instanceof RequestRefused ? error.code : "not_sent";
        this.failed(pending.id, conv, code, error instanceof Error ? error.message : code);
      });
    return pending;
  }

  /** The user has seen conv up to seq: said now, or after the next connect. Always true (the
   * views' "said" flag: nothing to repeat). */
  markRead(conv: string, seq: number): boolean {
    this.client.markRead(conv, seq);
    return true;
  }

  /** Tell the other members that the user types (true) or stopped (false); nothing offline. */
  typing(conv: string, state: boolean): void {
    this.client.setTyping(conv, state);
  }

  /** Follow the online state of these users (allowed for those who share a conversation: one
   * refused now is asked again after 10 s, or at once after a message between the two). */
  async watchPresence(users: string[]): Promise<void> {
    const now = Date.now();
    const fresh = users.filter(
      (user) => user !== this.user && now - (this.presenceAsked.get(user) ?? 0) > PRESENCE_RETRY_MS,
    );
    if (fresh.length === 0) return;
    for (const user of fresh) this.presenceAsked.set(user, now);
    await this.client.watchPresence(fresh).catch(() => undefined); // those watched already: nothing
  }

  async createGroup(name: string, members: string[]): Promise<Group> {
    return toGroup(await this.client.createGroup(name, members, "group"));
  }

  async group(conv: string): Promise<Group> {
    return toGroup(await this.client.http.group(conv));
  }
}

// --- from the SDK's shapes ---------------------------------------------------------------------

function toMessage(envelope: Envelope): Message {
  const { conv, seq, mid, from, dev, id, ts, kind, body } = envelope;
  return { conv, seq, mid, from, dev, id, ts, kind, body };
}

function toGroup(body: GroupBody): Group {
  return {
    conv: body.conv,
    name: body.name,
    kind: convKind(body.conv, body.kind),
    creator: body.creator,
    members: body.members.map((m) => ({ user: m.user, role: m.role, joinedSeq: m.joined_seq })),
  };
}

function convKind(conv: string, kind: string): ConvKind {
  if (kind === "dm" || kind === "group" || kind === "channel") return kind;
  return conv.startsWith("dm:") ? "dm" : "group";
}

const CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/** When a send was made: the time in its id (a ULID); now for an id that is not one. */
function ulidTime(id: string): number {
  if (!/^[0-9A-HJKMNP-TV-Z]{26}$/.test(id)) return Date.now();
  let ms = 0;
  for (const char of id.slice(0, 10)) ms = ms * 32 + CROCKFORD.indexOf(char);
  return ms;
}
