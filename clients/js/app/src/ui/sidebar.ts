/** The left column: open a 1:1 chat, create a group, and the conversation list with unread counts. */
import { dmConv, ID_PATTERN, ID_RE } from "../chat";
import type { Conversation, State } from "../state";
import { h, fill } from "./dom";
import { presenceText } from "./format";

export interface SidebarActions {
  open(conv: string): void;
  createGroup(name: string, members: string[]): Promise<void>;
}

export class Sidebar {
  readonly element: HTMLElement;
  private readonly list = h("ul", { class: "conv-list" });
  private readonly groupError = h("p", { class: "error", role: "alert" });

  constructor(
    private readonly state: State,
    private readonly actions: SidebarActions,
  ) {
    this.element = h(
      "nav",
      { class: "sidebar", "aria-label": "Conversations" },
      this.newChatForm(),
      this.newGroupForm(),
      h("h2", { class: "visually-hidden" }, "Conversations"),
      this.list,
    );
  }

  private newChatForm(): HTMLFormElement {
    const peer = h("input", {
      id: "new-chat-user",
      name: "user",
      required: true,
      pattern: ID_PATTERN,
      placeholder: "user id",
    });
    const form = h(
      "form",
      { class: "new-chat", "aria-label": "New chat" },
      h("label", { for: "new-chat-user" }, "Chat with"),
      h("div", { class: "row" }, peer, h("button", { type: "submit" }, "Open")),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const user = peer.value.trim();
      if (!ID_RE.test(user)) return;
      peer.value = "";
      this.actions.open(dmConv(this.state.me, user));
    });
    return form;
  }

  private newGroupForm(): HTMLElement {
    const name = h("input", { id: "new-group-name", name: "name", required: true, maxlength: 200 });
    const members = h("input", { id: "new-group-members", name: "members", required: true, placeholder: "bob, carol" });
    const form = h(
      "form",
      { "aria-label": "New group" },
      h("label", { for: "new-group-name" }, "Group name"),
      name,
      h("label", { for: "new-group-members" }, "Members"),
      members,
      this.groupError,
      h("button", { type: "submit" }, "Create group"),
    );
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const users = members.value.split(/[\s,]+/).filter(Boolean);
      const bad = users.find((user) => !ID_RE.test(user));
      if (bad) {
        this.groupError.textContent = `not a user id: ${bad}`;
        return;
      }
      this.groupError.textContent = "";
      this.actions
        .createGroup(name.value.trim(), users)
        .then(() => {
          name.value = "";
          members.value = "";
          details.open = false;
        })
        .catch((e: unknown) => {
          this.groupError.textContent = e instanceof Error ? e.message : String(e);
        });
    });
    const details = h("details", { class: "new-group" }, h("summary", {}, "New group"), form);
    return details;
  }

  render(openConv: string | null): void {
    const active = document.activeElement;
    const focused = active instanceof HTMLElement && this.list.contains(active) ? active.dataset.conv : undefined;
    fill(this.list, ...this.state.list().map((conv) => h("li", {}, this.item(conv, conv.conv === openConv))));
    if (focused) this.list.querySelector<HTMLElement>(`[data-conv="${CSS.escape(focused)}"]`)?.focus();
  }

  private item(conv: Conversation, current: boolean): HTMLButtonElement {
    const unread = current ? 0 : this.state.unread(conv);
    const last = [...conv.messages.values()].reduce<number>((top, m) => Math.max(top, m.seq), 0);
    const preview = conv.messages.get(last);
    const peer = conv.kind === "dm" ? conv.members.find((user) => user !== this.state.me) : undefined;
    const presence = peer ? this.state.presence.get(peer) : undefined;
    return h(
      "button",
      {
        class: "conv",
        type: "button",
        "aria-current": current ? "true" : null,
        "data-conv": conv.conv,
        onclick: () => this.actions.open(conv.conv),
      },
      h(
        "span",
        { class: "conv-title" },
        presence ? h("span", { class: `dot dot-${presence.state}`, title: presenceText(presence) }) : null,
        conv.kind === "dm" ? "" : "# ",
        conv.title,
      ),
      unread > 0 ? h("span", { class: "badge", "aria-label": `${unread} unread` }, String(unread)) : null,
      h("span", { class: "conv-preview" }, preview ? `${this.who(preview.from)}: ${preview.body}` : ""),
    );
  }

  private who(user: string): string {
    return user === this.state.me ? "you" : user;
  }
}
