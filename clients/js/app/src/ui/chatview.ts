/** The signed-in screen: a top bar (who, connection state, sign out), the conversation list and
 * the open conversation, re-rendered (coalesced) whenever the state changes. */
import type { Chat, Status } from "../chat";
import { HttpError } from "../chat";
import type { State } from "../state";
import { ConversationPane } from "./conversation";
import { h } from "./dom";
import { Sidebar } from "./sidebar";

const STATUS_TEXT: Record<Status, string> = { connecting: "connecting…", online: "online", offline: "offline" };

export class ChatView {
  readonly element: HTMLElement;
  private readonly sidebar: Sidebar;
  private readonly pane: ConversationPane;
  private readonly status = h("span", { class: "status", role: "status" });
  private readonly groupsAsked = new Set<string>();
  private renderQueued = false;
  private paneDirty = false;

  constructor(
    private readonly chat: Chat,
    private readonly state: State,
    onSignOut: () => void,
  ) {
    this.sidebar = new Sidebar(state, {
      open: (conv) => this.open(conv),
      createGroup: async (name, members) => {
        try {
          const group = await chat.createGroup(name, members);
          state.setGroup(group.conv, group.name, group.members.map((m) => m.user));
          this.open(group.conv);
        } catch (e) {
          throw new Error(e instanceof HttpError ? e.message || e.code : "the server cannot be reached");
        }
      },
    });
    this.pane = new ConversationPane(chat, state);
    this.element = h(
      "div",
      { class: "chat" },
      h(
        "header",
        { class: "topbar" },
        h("span", { class: "brand" }, "mqchat"),
        h("span", { class: "me" }, "signed in as ", h("strong", {}, chat.user), ` on ${chat.device}`),
        this.status,
        h("button", { type: "button", class: "sign-out", onclick: onSignOut }, "Sign out"),
      ),
      h("div", { class: "layout" }, this.sidebar.element, this.pane.element),
    );
    this.showStatus(chat.status);
    chat.on("status", (status) => this.showStatus(status));
    chat.on("conv", (change) => {
      if (change.event === "members_removed" && change.users.includes(chat.user)) {
        state.forget(change.conv);
        if (this.pane.current?.conv === change.conv) this.pane.open(null);
        return;
      }
      const conv = state.conversation(change.conv, change.kind);
      if (conv.lastActivity === 0) conv.lastActivity = Date.now();
      this.loadGroup(change.conv, true);
    });
    state.onChange = (conv) => {
      if (conv === "" || conv === this.pane.current?.conv) this.paneDirty = true;
      this.queueRender();
    };
    setInterval(() => this.pane.render(), 30_000); // "last seen 5 min ago" moves on
  }

  open(conv: string): void {
    const found = this.state.conversation(conv);
    if (found.lastActivity === 0) found.lastActivity = Date.now();
    this.pane.open(found);
    void this.chat.watchPresence(found.members);
    this.queueRender();
  }

  private showStatus(status: Status): void {
    this.status.textContent = STATUS_TEXT[status];
    this.status.className = `status status-${status}`;
  }

  private queueRender(): void {
    if (this.renderQueued) return;
    this.renderQueued = true;
    setTimeout(() => {
      this.renderQueued = false;
      this.render();
    }, 0);
  }

  private render(): void {
    const open = this.pane.current;
    this.sidebar.render(open?.conv ?? null);
    if (this.paneDirty) this.pane.render();
    this.paneDirty = false;
    const peers = new Set<string>();
    for (const conv of this.state.conversations.values()) {
      if (conv.kind !== "dm") this.loadGroup(conv.conv, false);
      if (conv.lastSeq > 0) for (const user of conv.members) peers.add(user);
    }
    void this.chat.watchPresence([...peers]);
  }

  /** A group's name and members, once (again after a membership change). */
  private loadGroup(conv: string, again: boolean): void {
    if (!conv.startsWith("g:") || (this.groupsAsked.has(conv) && !again)) return;
    this.groupsAsked.add(conv);
    this.chat
      .group(conv)
      .then((group) => this.state.setGroup(conv, group.name, group.members.map((m) => m.user)))
      .catch(() => undefined);
  }
}
