/** How times and presence read on screen. */
import type { Presence } from "../chat";

const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const day = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short" });

export function time(ms: number): string {
  return clock.format(ms);
}

/** "online", "last seen 5 min ago", "last seen today at 09:14", "last seen 3 Mar". */
export function presenceText(presence: Presence | undefined, now = Date.now()): string {
  if (!presence) return "";
  if (presence.state === "online") return "online";
  if (presence.lastSeen === null) return "offline";
  const minutes = Math.floor((now - presence.lastSeen) / 60_000);
  if (minutes < 1) return "last seen just now";
  if (minutes < 60) return `last seen ${minutes} min ago`;
  if (new Date(presence.lastSeen).toDateString() === new Date(now).toDateString()) {
    return `last seen today at ${time(presence.lastSeen)}`;
  }
  return `last seen ${day.format(presence.lastSeen)}`;
}

export function typingText(users: string[]): string {
  if (users.length === 0) return "";
  if (users.length === 1) return `${users[0]} is typing…`;
  return `${users.slice(0, -1).join(", ")} and ${users.at(-1)} are typing…`;
}
