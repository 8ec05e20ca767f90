/**
 * The topics a client follows beyond its two base ones (protocol section 8, step 2):
 *
 *     channels   c/{conv}/in of every channel the user is in: from the sync (kind "channel") and
 *                from conv events naming the user (added / removed); remembered in the state store
 *     presence   p/{user} of the users the app watches (retained: the current state comes at once)
 *
 * Both are subscribed again on every connect (forTopics), and at once when they change while
 * connected. A SUBACK that refuses one (0x80) is reported as RequestRefused("forbidden"); a refused
 * channel is no longer followed (the user is not a member), and a refused user is no longer watched
 * (presence is allowed between users who share a conversation: watch them again once they do).
 */

import { SUBACK_REFUSED, type Connection } from "./connection.js";
import { RequestRefused } from "./errors.js";
import { channelTopic, presenceTopic } from "./protocol.js";
import type { StateWriter } from "./state.js";

export class Subscriptions {
  readonly #connection: Connection;
  readonly #state: StateWriter;
  readonly #report: (error: Error) => void;
  readonly #channels = new Set<string>();
  readonly #watched = new Set<string>();

  constructor(options: { connection: Connection; state: StateWriter; report: (error: Error) => void }) {
    this.#connection = options.connection;
    this.#state = options.state;
    this.#report = options.report;
  }

  /** The channels a state store remembers, and the users to watch from the start. */
  load(channels: readonly string[], watched: readonly string[]): void {
    channels.forEach((conv) => this.#channels.add(conv));
    watched.forEach((user) => this.#watched.add(user));
  }

  /** Subscribe everything followed (after a connect). */
  async resubscribe(): Promise<void> {
    const topics = [...[...this.#channels].map(channelTopic), ...[...this.#watched].map(presenceTopic)];
    if (topics.length > 0) await this.#subscribe(topics);
  }

  /** Start or stop following channel conv: remembered, and (un)subscribed now if connected. */
  follow(conv: string, member: boolean): void {
    if (this.#channels.has(conv) === member) return;
    if (member) this.#channels.add(conv);
    else this.#channels.delete(conv);
    this.#state.setChannel(conv, member);
    if (!this.#connection.connected) return; // the next connect subscribes
    if (member)
      this.#subscribe([channelTopic(conv)]).catch(() => undefined); // again on the next connect
    else this.#connection.unsubscribe([channelTopic(conv)]);
  }

  async watch(users: readonly string[]): Promise<void> {
    const fresh = users.filter((user) => !this.#watched.has(user));
    fresh.forEach((user) => this.#watched.add(user));
    if (fresh.length > 0 && this.#connection.connected) await this.#subscribe(fresh.map(presenceTopic));
  }

  unwatch(users: readonly string[]): void {
    const watched = users.filter((user) => this.#watched.delete(user));
    if (watched.length > 0 && this.#connection.connected) this.#connection.unsubscribe(watched.map(presenceTopic));
  }

  async #subscribe(topics: string[]): Promise<void> {
    const granted = await this.#connection.subscribe(topics);
    topics.forEach((topic, i) => {
      if (granted[i] !== SUBACK_REFUSED) return;
      this.#report(new RequestRefused("forbidden", `the server refused the subscription to ${topic}`));
      if (topic.startsWith("c/")) this.follow(topic.slice(2, -3), false); // no longer a member
      else if (topic.startsWith("p/")) this.#watched.delete(topic.slice(2)); // watch() asks again
    });
  }
}
