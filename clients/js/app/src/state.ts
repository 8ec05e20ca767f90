/**
 * What the views show, built from the events of a Chat: the conversations (messages by seq,
 * this device's unacked sends, every member's watermarks, who types), and who is online.
 * Every change calls `onChange` with the conversation it touched ("" for the list as a whole).
 */
import type { Ack, Chat, ConvKind, Failure, Message, Pending, Presence, Receipt, Typing } from "./chat";

export type Tick = "sending" | "sent" | "delivered" | "read" | "failed";

export interface Marks {
  delivered: number;
  read: number;
}

export interface Conversation {
  conv: string;
  kind: ConvKind;
  title: string;
  members: string[]; // everyone, me included (for a group: once its details are loaded)
  lastSeq: number;
  read: number; // my watermarks
  delivered: number;
  messages: Map<number, Message>;
  pending: Map<string, Pending>; // sent from this device, not acked yet
  failed: Map<string, Pending & { reason: string }>;
  marks: Map<string, Marks>; // the other members' watermarks
  typing: Map<string, number>; // user → until when (ms) the "typing" is believed
  hasOlder: boolean; // scrollback may find more
  lastActivity: number;
}

export const TYPING_SHOWN_MS = 6000;

export class State {
  readonly me: string;
  readonly conversations = new Map<string, Conversation>();
  readonly presence = new Map<string, Presence>();
  onChange: (conv: string) => void = () => undefined;
  private readonly marksKey: string;
  private readonly storedMarks: Record<string, Record<string, Marks>>;

  constructor(chat: Chat) {
    this.me = chat.user;
    // Other members' watermarks arrive only as events, so they are kept across reloads here.
    this.marksKey = `mqchat.marks.${chat.user}`;
    this.storedMarks = loadMarks(this.marksKey);
    chat.on("restored", (pending) => {
      this.conversation(pending.conv).pending.set(pending.id, pending);
      this.onChange(pending.conv);
    });
    chat.on("conversation", (state) => {
      const conv = this.conversation(state.conv, state.kind);
      conv.lastSeq = Math.max(conv.lastSeq, state.lastSeq);
      conv.read = Math.max(conv.read, state.read);
      conv.delivered = Math.max(conv.delivered, state.delivered);
      conv.lastActivity = Math.max(conv.lastActivity, state.updatedAt);
      this.onChange(state.conv);
    });
    chat.on("message", (message) => this.onMessage(message));
    chat.on("ack", (ack) => this.onAck(ack));
    chat.on("failed", (failure) => this.onFailed(failure));
    chat.on("receipt", (receipt) => this.onReceipt(receipt));
    chat.on("typing", (typing) => this.onTyping(typing));
    chat.on("presence", (presence) => {
      this.presence.set(presence.user, presence);
      this.onChange("");
    });
  }

  /** The conversation, created empty when first heard of. */
  conversation(conv: string, kind?: ConvKind): Conversation {
    let found = this.conversations.get(conv);
    if (!found) {
      const isDm = conv.startsWith("dm:");
      const members = isDm ? [...new Set(conv.split(":").slice(1))] : [];
      found = {
        conv,
        kind: kind ?? (isDm ? "dm" : "group"),
        title: isDm ? dmTitle(members, this.me) : "group",
        members,
        lastSeq: 0,
        read: 0,
        delivered: 0,
        messages: new Map(),
        pending: new Map(),
        failed: new Map(),
        marks: new Map(Object.entries(this.storedMarks[conv] ?? {})),
        typing: new Map(),
        hasOlder: true,
        lastActivity: 0,
      };
      this.conversations.set(conv, found);
    }
    if (kind) found.kind = kind;
    return found;
  }

  /** Conversations, the most recently active first. */
  list(): Conversation[] {
    return [...this.conversations.values()].sort((a, b) => b.lastActivity - a.lastActivity);
  }

  unread(conv: Conversation): number {
    return Math.max(0, conv.lastSeq - conv.read);
  }

  /** The tick of one of my messages: the least any other member has reached. */
  tick(conv: Conversation, message: Message): Tick {
    const others = conv.members.filter((user) => user !== this.me);
    if (others.length === 0) return "sent";
    const marks = others.map((user) => conv.marks.get(user) ?? { delivered: 0, read: 0 });
    if (marks.every((m) => m.read >= message.seq)) return "read";
    if (marks.every((m) => Math.max(m.delivered, m.read) >= message.seq)) return "delivered";
    return "sent";
  }

  /** Users typing in conv now (expired claims dropped). */
  typers(conv: Conversation): string[] {
    const now = Date.now();
    return [...conv.typing].filter(([, until]) => until > now).map(([user]) => user);
  }

  markRead(conv: Conversation, seq: number): void {
    conv.read = Math.max(conv.read, seq);
    conv.delivered = Math.max(conv.delivered, seq);
    this.onChange(conv.conv);
  }

  /** I left, or was removed from, conv. */
  forget(conv: string): void {
    this.conversations.delete(conv);
    this.onChange("");
  }

  setGroup(conv: string, name: string, members: string[]): void {
    const found = this.conversation(conv, "group");
    found.title = name;
    found.members = members;
    this.onChange(conv);
  }

  addPending(pending: Pending): void {
    const conv = this.conversation(pending.conv);
    conv.pending.set(pending.id, pending);
    conv.lastActivity = Date.now();
    this.onChange(pending.conv);
  }

  private onMessage(message: Message): void {
    const conv = this.conversation(message.conv);
    conv.messages.set(message.seq, message);
    conv.lastSeq = Math.max(conv.lastSeq, message.seq);
    conv.lastActivity = Math.max(conv.lastActivity, message.ts);
    if (message.seq === 1) conv.hasOlder = false;
    if (message.from === this.me) {
      conv.pending.delete(message.id);
      conv.read = Math.max(conv.read, message.seq); // sending reads everything before
    }
    conv.typing.delete(message.from);
    this.onChange(message.conv);
  }

  private onAck(ack: Ack): void {
    const conv = this.conversation(ack.conv);
    conv.pending.delete(ack.id);
    conv.lastSeq = Math.max(conv.lastSeq, ack.seq);
    conv.read = Math.max(conv.read, ack.seq);
    this.onChange(ack.conv);
  }

  private onFailed(failure: Failure): void {
    const conv = this.conversation(failure.conv);
    const pending = conv.pending.get(failure.id);
    conv.pending.delete(failure.id);
    if (pending) conv.failed.set(failure.id, { ...pending, reason: failure.message });
    this.onChange(failure.conv);
  }

  private onReceipt(receipt: Receipt): void {
    const conv = this.conversation(receipt.conv);
    if (receipt.user === this.me) {
      // Read on another device of mine.
      conv.read = Math.max(conv.read, receipt.read);
      conv.delivered = Math.max(conv.delivered, receipt.delivered);
    } else {
      const old = conv.marks.get(receipt.user) ?? { delivered: 0, read: 0 };
      conv.marks.set(receipt.user, {
        delivered: Math.max(old.delivered, receipt.delivered),
        read: Math.max(old.read, receipt.read),
      });
      this.saveMarks();
    }
    this.onChange(receipt.conv);
  }

  private onTyping(typing: Typing): void {
    const conv = this.conversation(typing.conv);
    if (typing.state) conv.typing.set(typing.user, Date.now() + TYPING_SHOWN_MS);
    else conv.typing.delete(typing.user);
    this.onChange(typing.conv);
  }

  private saveMarks(): void {
    for (const conv of this.conversations.values()) {
      if (conv.marks.size > 0) this.storedMarks[conv.conv] = Object.fromEntries(conv.marks);
    }
    localStorage.setItem(this.marksKey, JSON.stringify(this.storedMarks));
  }
}

function loadMarks(key: string): Record<string, Record<string, Marks>> {
  try {
    const stored: unknown = JSON.parse(localStorage.getItem(key) ?? "{}");
    return typeof stored === "object" && stored !== null ? (stored as Record<string, Record<string, Marks>>) : {};
  } catch {
    return {};
  }
}

function dmTitle(members: string[], me: string): string {
  const other = members.find((user) => user !== me);
  return other ?? `${me} (you)`;
}
