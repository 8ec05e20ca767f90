/**
 * One conversation: who it is with (presence, members), the messages in seq order with ticks on
 * mine, "earlier messages" (scrollback), who is typing, and the composer.
 */
import type { Chat, Message, Pending } from "../chat";
import type { Conversation, State, Tick } from "../state";
import { fill, h } from "./dom";
import { presenceText, time, typingText } from "./format";

const TICKS: Record<Tick, string> = { sending: "○", sent: "✓", delivered: "✓✓", read: "✓✓", failed: "!" };
const TYPING_REPEAT_MS = 3000; // a "true" again while the user goes on typing
const TYPING_IDLE_MS = 4000; // then "false"
const PAGE = 30;

export class ConversationPane {
  readonly element: HTMLElement;
  private conv: Conversation | null = null;
  private readonly title = h("h2", { id: "conv-title" });
  private readonly subtitle = h("p", { class: "conv-subtitle" });
  private readonly older = h("button", { type: "button", class: "older" }, "Load earlier messages");
  private readonly log = h("ol", { class: "log", role: "log", "aria-labelledby": "conv-title", "aria-live": "polite" });
  private readonly scroller = h("div", { class: "scroller" }, this.older, this.log);
  private readonly typingLine = h("p", { class: "typing", role: "status", "aria-live": "polite" });
  private readonly input = h("textarea", { id: "composer-input", rows: 1, placeholder: "Message", maxlength: 4000 });
  private readonly items = new Map<string, HTMLLIElement>();
  private typingSentAt = 0;
  private typingIdle: ReturnType<typeof setTimeout> | undefined;
  private typingExpiry: ReturnType<typeof setTimeout> | undefined;
  private loadingOlder = false;

  constructor(
    private readonly chat: Chat,
    private readonly state: State,
  ) {
    const composer = h(
      "form",
      { class: "composer", "aria-label": "Send a message" },
      h("label", { for: "composer-input", class: "visually-hidden" }, "Message"),
      this.input,
      h("button", { type: "submit" }, "Send"),
    );
    composer.addEventListener("submit", (event) => {
      event.preventDefault();
      this.send();
    });
    this.input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        this.send();
      }
    });
    this.input.addEventListener("input", () => this.typed());
    this.input.addEventListener("blur", () => this.stopTyping());
    this.older.addEventListener("click", () => void this.loadOlder());
    this.scroller.addEventListener("scroll", () => {
      if (this.scroller.scrollTop < 40) void this.loadOlder();
    });
    document.addEventListener("visibilitychange", () => this.markRead());
    this.element = h(
      "section",
      { class: "pane", "aria-label": "Conversation" },
      h("header", { class: "conv-header" }, this.title, this.subtitle),
      this.scroller,
      this.typingLine,
      composer,
    );
    this.showEmpty();
  }

  private showEmpty(): void {
    this.title.textContent = "No conversation open";
    this.subtitle.textContent = "Pick one on the left, or open a chat with a user id.";
    this.element.classList.add("empty");
  }

  /** Show conv (null: none). */
  open(conv: Conversation | null): void {
    this.stopTyping();
    this.conv = conv;
    this.items.clear();
    fill(this.log);
    this.input.value = "";
    if (!conv) {
      this.showEmpty();
      return;
    }
    this.element.classList.remove("empty");
    this.render();
    this.scroller.scrollTop = this.scroller.scrollHeight;
    if (conv.messages.size < PAGE) void this.loadOlder();
    this.input.focus();
  }

  get current(): Conversation | null {
    return this.conv;
  }

  render(): void {
    const conv = this.conv;
    if (!conv) return;
    this.title.textContent = conv.title;
    this.subtitle.textContent = this.subtitleText(conv);
    this.renderLog(conv);
    this.renderTyping(conv);
    this.markRead();
  }

  private subtitleText(conv: Conversation): string {
    if (conv.kind === "dm") {
      const peer = conv.members.find((user) => user !== this.state.me);
      return peer ? presenceText(this.state.presence.get(peer)) : "notes to yourself";
    }
    const online = conv.members.filter((user) => this.state.presence.get(user)?.state === "online").length;
    return `${conv.members.length} members: ${conv.members.join(", ")}${online ? ` · ${online} online` : ""}`;
  }

  private renderLog(conv: Conversation): void {
    const atBottom = this.scroller.scrollHeight - this.scroller.scrollTop - this.scroller.clientHeight < 48;
    const heightBefore = this.scroller.scrollHeight;
    const firstBefore = this.log.firstElementChild;
    const wanted: [string, HTMLLIElement][] = [];
    for (const message of [...conv.messages.values()].sort((a, b) => a.seq - b.seq)) {
      const key = `s${message.seq}`;
      const item = this.items.get(key) ?? this.messageItem(conv, message);
      this.setTick(item, message.from === this.state.me ? this.state.tick(conv, message) : null);
      wanted.push([key, item]);
    }
    for (const [id, pending] of [...conv.pending, ...conv.failed]) {
      const key = `p${id}`;
      const item = this.items.get(key) ?? this.pendingItem(pending);
      const failed = conv.failed.get(id);
      this.setTick(item, failed ? "failed" : "sending");
      if (failed) item.title = `not sent: ${failed.reason}`;
      wanted.push([key, item]);
    }
    const keep = new Set(wanted.map(([key]) => key));
    for (const [key, item] of this.items) {
      if (!keep.has(key)) {
        item.remove();
        this.items.delete(key);
      }
    }
    let cursor: Element | null = this.log.firstElementChild;
    for (const [key, item] of wanted) {
      this.items.set(key, item);
      if (item === cursor) cursor = cursor.nextElementSibling;
      else this.log.insertBefore(item, cursor);
    }
    this.older.hidden = !conv.hasOlder || lowestSeq(conv) <= 1;
    if (atBottom) this.scroller.scrollTop = this.scroller.scrollHeight;
    else if (firstBefore && this.log.firstElementChild !== firstBefore) {
      this.scroller.scrollTop += this.scroller.scrollHeight - heightBefore; // older ones went in above
    }
  }

  private messageItem(conv: Conversation, message: Message): HTMLLIElement {
    const mine = message.from === this.state.me;
    return h(
      "li",
      { class: mine ? "msg mine" : "msg", "data-seq": message.seq },
      !mine && conv.kind !== "dm" ? h("span", { class: "from" }, message.from) : null,
      h("p", { class: "body" }, message.kind === "deleted" ? "(deleted)" : message.body || `(${message.kind})`),
      h("span", { class: "meta" }, h("time", { datetime: new Date(message.ts).toISOString() }, time(message.ts))),
    );
  }

  private pendingItem(pending: Pending): HTMLLIElement {
    return h(
      "li",
      { class: "msg mine", "data-pending": pending.id },
      h("p", { class: "body" }, pending.body),
      h("span", { class: "meta" }, h("time", {}, time(pending.ts))),
    );
  }

  private setTick(item: HTMLLIElement, tick: Tick | null): void {
    const meta = item.querySelector(".meta");
    if (!meta || tick === null || item.dataset.tick === tick) return;
    item.dataset.tick = tick;
    meta.querySelector(".tick")?.remove();
    meta.append(h("span", { class: `tick tick-${tick}`, role: "img", "aria-label": tick, title: tick }, TICKS[tick]));
  }

  private renderTyping(conv: Conversation): void {
    const typers = this.state.typers(conv);
    this.typingLine.textContent = typingText(typers);
    clearTimeout(this.typingExpiry);
    if (typers.length > 0) this.typingExpiry = setTimeout(() => this.render(), 1000);
  }

  /** Everything shown is read while the page is visible. */
  private markRead(): void {
    const conv = this.conv;
    if (!conv || document.visibilityState !== "visible") return;
    const top = highestSeq(conv);
    if (top > conv.read && this.chat.markRead(conv.conv, top)) this.state.markRead(conv, top);
  }

  private async loadOlder(): Promise<void> {
    const conv = this.conv;
    if (!conv || this.loadingOlder || !conv.hasOlder) return;
    const before = conv.messages.size > 0 ? lowestSeq(conv) : conv.lastSeq + 1;
    if (before <= 1) {
      conv.hasOlder = false;
      return;
    }
    this.loadingOlder = true;
    try {
      const page = await this.chat.history(conv.conv, before, PAGE);
      if (!page.more) conv.hasOlder = false;
      if (this.conv === conv) this.render();
    } catch {
      // shown again on the next scroll or click
    } finally {
      this.loadingOlder = false;
    }
  }

  private send(): void {
    const conv = this.conv;
    const body = this.input.value.trim();
    if (!conv || !body) return;
    this.input.value = "";
    this.stopTyping();
    this.state.addPending(this.chat.send(conv.conv, body));
    this.scroller.scrollTop = this.scroller.scrollHeight;
  }

  private typed(): void {
    const conv = this.conv;
    if (!conv) return;
    if (Date.now() - this.typingSentAt > TYPING_REPEAT_MS) {
      this.typingSentAt = Date.now();
      this.chat.typing(conv.conv, true);
    }
    clearTimeout(this.typingIdle);
    this.typingIdle = setTimeout(() => this.stopTyping(), TYPING_IDLE_MS);
  }

  private stopTyping(): void {
    clearTimeout(this.typingIdle);
    if (this.typingSentAt && this.conv) this.chat.typing(this.conv.conv, false);
    this.typingSentAt = 0;
  }
}

function lowestSeq(conv: Conversation): number {
  let low = Infinity;
  for (const seq of conv.messages.keys()) low = Math.min(low, seq);
  return low === Infinity ? conv.lastSeq + 1 : low;
}

function highestSeq(conv: Conversation): number {
  let high = 0;
  for (const seq of conv.messages.keys()) high = Math.max(high, seq);
  return high;
}
