/**
 * ChatClient: one device of one user (protocol section 8, "Client recipe").
 *
 *     app ── send(conv, body) ──► Outbox ──► OutboxStore (durable) ──► u/{user}/{device}/out (QoS 1)
 *                                  ▲   └── again with the same id after every connect, and while
 *                                  │       unacked for resendAfterMs (the server dedups)
 *                       ack / final error settle it; sendAndWait() / waitAcked() resolve
 *                                  │
 *     MQTT in ── u/{user}/{device}/in : ack, error ───────┐
 *             ├─ u/{user}/in, c/{conv}/in : msg, receipt, typing, conv
 *             └─ p/{user} : presence (watchPresence)       ▼
 *                                   parseEvent ─► msg ─► Catchup (seq order, once) ─┐
 *     HTTP ── GET /v1/conversations?since=cursor ─► Catchup ───────────────────────┤
 *          └─ GET …/{conv}/messages?after=last  (after every connect, and per gap)  ▼
 *                                   EventHub ─► on(type) listeners, events() iterators
 *                                            ─► delivered: StateStore (last seq, cursor),
 *                                               recv watermark (autoRecv)
 *
 * Connection (connection.ts) keeps the MQTT connection up with backoff and full jitter; on every
 * connect it subscribes u/{user}/in and u/{user}/{device}/in (SUBACK checked), the followed
 * channels and the watched presence topics, then re-publishes the outbox and catches up;
 * pause() / resume() take the connection down and up again when the app knows the network went.
 */

import { Catchup } from "./catchup.js";
import { systemClock, type Clock } from "./clock.js";
import { Connection } from "./connection.js";
import { ClientEvents } from "./client-events.js";
import { ClientClosed, ConnectionFailed, RequestRefused, SendFailed } from "./errors.js";
import { parseEvent, type ConversationSummary, type MessagesPage } from "./events.js";
import { HttpApi, type Group, type PushRegistration } from "./http.js";
import { MediaApi, type UploadedMedia, type UploadOptions, type UploadSource } from "./media.js";
import { mqttJsConnect } from "./mqttjs.js";
import { TokenSource, type ChatClientOptions, type ClientStatistics } from "./options.js";
import { MemoryOutboxStore, Outbox, type OutboxStore } from "./outbox.js";
import { globalFetch, newAbortController, newUlid } from "./platform.js";
import * as p from "./protocol.js";
import { MemoryStateStore, StateWriter, type StateStore } from "./state.js";
import { Subscriptions } from "./subscriptions.js";
import { Watermarks } from "./watermarks.js";

export type { ChatClientOptions, ClientStatistics } from "./options.js";

export class ChatClient extends ClientEvents {
  readonly user: string;
  readonly device: string;
  readonly #o: ChatClientOptions;
  readonly #clock: Clock;
  readonly #tokens: TokenSource;
  readonly #stop = newAbortController();
  readonly #connection: Connection;
  readonly #outboxStore: OutboxStore;
  readonly #stateStore: StateStore;
  readonly #state: StateWriter;
  readonly #outbox: Outbox;
  readonly #watermarks: Watermarks;
  readonly #http: HttpApi | null;
  readonly #media: MediaApi | null;
  readonly #subscriptions: Subscriptions;
  #catchup: Catchup | null = null;
  #phase: "new" | "connecting" | "open" | "closed" = "new";
  #fatal: Error | null = null;
  #duplicateAcks = 0;

  constructor(options: ChatClientOptions) {
    super(options.maxBufferedEvents ?? 10_000);
    if (!p.isValidId(options.user) || !p.isValidId(options.device))
      throw new TypeError("user and device ids must be 1-64 characters of [A-Za-z0-9_.@-]");
    if (!/^wss?:\/\//.test(options.url))
      throw new TypeError("url must be ws:// or wss:// (MQTT over WebSocket, path /mqtt)");
    this.user = options.user;
    this.device = options.device;
    this.#o = options;
    this.#clock = options.clock ?? systemClock;
    const random = options.random ?? Math.random;
    this.#tokens = new TokenSource(options.token);
    this.#outboxStore = options.outbox ?? new MemoryOutboxStore();
    this.#stateStore = options.state ?? new MemoryStateStore();
    this.#state = new StateWriter(this.#stateStore, (error) => this.report(error));
    const outTopic = p.outTopic(this.user, this.device);
    this.#connection = new Connection(
      {
        url: options.url,
        user: this.user,
        device: this.device,
        tokens: this.#tokens,
        keepalive: options.keepalive ?? 30,
        connectTimeoutMs: options.connectTimeoutMs ?? 10_000,
        reconnect: options.reconnect ?? true,
        baseTopics: [p.userInTopic(this.user), p.deviceInTopic(this.user, this.device)],
        connect: options.mqttConnect ?? mqttJsConnect,
        clock: this.#clock,
        random,
      },
      {
        message: (topic, payload) => this.#dispatch(topic, payload),
        up: () => this.#connected(),
        change: (change) => this.connectionChanged(change),
        fatal: (error) => this.#end(error),
      },
    );
    this.#outbox = new Outbox({
      store: this.#outboxStore,
      clock: this.#clock,
      random,
      resendAfterMs: options.resendAfterMs ?? 5000,
      oneAtATime: options.oneAtATime ?? false,
      publish: (request) => this.#connection.publish(outTopic, p.encodeRequest(request)),
      onStoreError: (error) => this.report(error),
    });
    this.#subscriptions = new Subscriptions({
      connection: this.#connection,
      state: this.#state,
      report: (e) => this.report(e),
    });
    this.#watermarks = new Watermarks({
      publish: (payload) => this.#connection.publish(outTopic, payload),
      clock: this.#clock,
    });
    this.#http =
      options.httpUrl === undefined
        ? null
        : new HttpApi({
            baseUrl: options.httpUrl,
            tokens: this.#tokens,
            fetch: options.fetch ?? globalFetch(),
            clock: this.#clock,
            random,
            timeoutMs: options.connectTimeoutMs ?? 10_000,
            signal: this.#stop.signal,
          });
    this.#media =
      this.#http === null
        ? null
        : new MediaApi({ http: this.#http, random, ...(options.sha256 ? { sha256: options.sha256 } : {}) });
  }

  // --- lifecycle ---------------------------------------------------------------------------------

  /** Load the stores and connect; resolves once connected and subscribed. The first connect is
   * not retried: it rejects with ConnectionFailed (or AuthFailed), and the client is closed. */
  async connect(): Promise<void> {
    if (this.#phase !== "new") throw new ClientClosed("connect() may be called once");
    this.#phase = "connecting";
    try {
      const [snapshot] = await Promise.all([this.#stateStore.load(), this.#outbox.open()]);
      this.#subscriptions.load(snapshot.channels, this.#o.presence ?? []);
      this.#catchup = new Catchup({
        http: this.#http,
        clock: this.#clock,
        graceMs: this.#o.gapGraceMs ?? 1000,
        cursor: snapshot.cursor,
        delivered: snapshot.delivered,
        state: this.#state,
        hooks: {
          deliver: (messages) => messages.forEach((msg) => this.hub.push(msg)),
          synced: (conversations) => this.synced(conversations),
          follow: (conv) => this.#subscriptions.follow(conv, true),
          error: (error) => this.report(error),
        },
      });
      await this.#connection.start();
      this.#phase = "open";
    } catch (error) {
      await this.close();
      throw error;
    }
  }

  /** Disconnect and stop. Unacked sends stay in the outbox store; waiters get ClientClosed. */
  async close(): Promise<void> {
    if (this.#phase === "closed") return;
    this.#phase = "closed";
    this.#stop.abort();
    this.#catchup?.close();
    this.#watermarks.close();
    await this.#connection.close();
    this.#end(null);
    await this.#outbox.close(this.#fatal ?? new ClientClosed("the client is closed"));
    await this.#state.flushed();
    await this.#outboxStore.close?.();
    await this.#stateStore.close?.();
  }

  get connected(): boolean {
    return this.#connection.connected;
  }

  /** The device lost its network (a browser's `offline` event, say): end the connection now and
   * make no new one until resume(). Sends wait in the outbox and watermarks in memory meanwhile;
   * onConnectionChange reports "disconnected" with retryInMs null. */
  pause(): void {
    this.#connection.pause();
  }

  /** Connect again at once after pause(); the outbox, the watermarks and the catch-up follow, as
   * after every connect. */
  resume(): void {
    this.#connection.resume();
  }

  /** Use a new access token from the next connect (and HTTP call) on. */
  setToken(token: string): void {
    this.#tokens.set(token);
  }

  /** Resolves when the catch-up after the latest connect has finished (or given up). */
  waitSynced(): Promise<void> {
    return this.#catchup?.synced() ?? Promise.resolve();
  }

  // --- sending -----------------------------------------------------------------------------------

  /** Put a text message in the outbox and publish it; the client message id. Resolves once the
   * send is stored in the outbox (published, or waiting for a connection); the ack comes later. */
  async send(conv: string, body: string, options: { id?: string } = {}): Promise<string> {
    return this.#send(conv, body, "text", [], options.id);
  }

  /** Send finished uploads (`media.upload`) as one message, with `caption` as its body. */
  async sendMedia(
    conv: string,
    media: string | readonly string[],
    caption = "",
    options: { id?: string } = {},
  ): Promise<string> {
    return this.#send(conv, caption, "media", typeof media === "string" ? [media] : [...media], options.id);
  }

  /** Upload a file (resumably) and send it; MediaFailed when the upload fails (nothing is sent). */
  async sendFile(
    conv: string,
    source: UploadSource,
    options: UploadOptions & { caption?: string; id?: string } = {},
  ): Promise<{ id: string; media: UploadedMedia }> {
    this.#checkConv(conv);
    const media = await this.media.upload(source, options);
    return { id: await this.sendMedia(conv, media.id, options.caption ?? "", { id: options.id }), media };
  }

  /** Send and wait for the ack; SendFailed on a final error reply, ConnectionFailed on timeout. */
  async sendAndWait(conv: string, body: string, options: { id?: string; timeoutMs?: number } = {}): Promise<p.Ack> {
    const id = await this.send(conv, body, { id: options.id });
    return this.waitAcked(id, options.timeoutMs ?? 10_000);
  }

  /** The ack of a send (at once if it came lately); SendFailed on a final error reply. */
  waitAcked(id: string, timeoutMs: number | null = null): Promise<p.Ack> {
    if (this.#fatal !== null) return Promise.reject(this.#fatal);
    return this.#outbox.waitAcked(
      id,
      timeoutMs,
      () => new ConnectionFailed(`no ack for ${id} within ${timeoutMs} ms (it stays in the outbox)`),
    );
  }

  async #send(
    conv: string,
    body: string,
    kind: p.MessageKind,
    media: string[],
    id: string | undefined,
  ): Promise<string> {
    this.#checkOpen();
    const request = p.sendRequest({ id: id ?? newUlid(), conv, body, kind, media });
    const refusal = p.checkRequest(request);
    if (refusal !== null)
      throw new RequestRefused(refusal.code, `the server would refuse this send: ${refusal.reason}`);
    await this.#outbox.add({ id: request.id, conv, body, kind, media });
    return request.id;
  }

  /** The user has read conv up to seq: a `read` now, or after reconnecting. */
  markRead(conv: string, seq: number): void {
    this.#checkConv(conv);
    if (!Number.isSafeInteger(seq) || seq < 0) throw new TypeError("seq must be a non-negative integer");
    this.#watermarks.read(conv, seq);
  }

  /** This user's devices have received conv up to seq (sent for you with autoRecv). */
  markReceived(conv: string, seq: number): void {
    this.#checkConv(conv);
    this.#watermarks.received(conv, seq);
  }

  /** The user started (true) or stopped typing: QoS 0, never stored; false when offline. Send
   * true again every few seconds while they go on (peers treat a `true` older than ~6 s as stopped). */
  setTyping(conv: string, state: boolean): boolean {
    this.#checkConv(conv);
    return this.#connection.publish(
      p.outTopic(this.user, this.device),
      p.encodeRequest(p.typingRequest(conv, state)),
      0,
    );
  }

  // --- presence, groups, devices, history ----------------------------------------------------------

  /** Subscribe to users' retained presence (now, and on every connect): `presence` events. */
  watchPresence(users: readonly string[]): Promise<void> {
    return this.#subscriptions.watch(users);
  }

  unwatchPresence(users: readonly string[]): void {
    this.#subscriptions.unwatch(users);
  }

  presence(users: readonly string[]): Promise<p.Presence[]> {
    return this.http.presence(users);
  }

  createGroup(name: string, members: readonly string[] = [], kind: "group" | "channel" = "group"): Promise<Group> {
    return this.http.createGroup(name, members, kind);
  }

  addMembers(conv: string, members: readonly string[]): Promise<Group> {
    return this.http.addMembers(conv, members);
  }

  removeMember(conv: string, user: string): Promise<Group> {
    return this.http.removeMember(conv, user);
  }

  leaveGroup(conv: string): Promise<Group> {
    return this.http.removeMember(conv, this.user);
  }

  registerPushToken(registration: PushRegistration): Promise<void> {
    return this.http.registerPushToken(this.device, registration);
  }

  unregisterPushToken(): Promise<boolean> {
    return this.http.unregisterPushToken(this.device);
  }

  /** Scrollback: the messages just below `before` (the lowest seq held), ascending. */
  history(conv: string, before: number, limit = 50): Promise<MessagesPage> {
    return this.http.messagesBefore(conv, before, limit);
  }

  /** Every conversation of the user with unread counts and watermarks (not the catch-up's
   * cursor: this lists them all). */
  conversations(): Promise<ConversationSummary[]> {
    return this.http.conversations();
  }

  get http(): HttpApi {
    if (this.#http === null) throw new TypeError("this needs the HTTP API: give the client httpUrl");
    return this.#http;
  }

  get media(): MediaApi {
    if (this.#media === null) throw new TypeError("media needs the HTTP API: give the client httpUrl");
    return this.#media;
  }

  // --- statistics and internals ----------------------------------------------------------------

  statistics(): ClientStatistics {
    const outbox = this.#outbox.statistics();
    const catchup = this.#catchup?.statistics() ?? { received: 0, duplicates: 0, gapsDetected: 0, gapFetches: 0 };
    return {
      connected: this.connected,
      pending: outbox.pending,
      received: catchup.received,
      duplicates: catchup.duplicates + this.#duplicateAcks,
      reconnects: this.#connection.reconnects,
      resends: outbox.resends,
      rateLimited: outbox.rateLimited,
      eventsDropped: this.hub.dropped,
      gapsDetected: catchup.gapsDetected,
      gapFetches: catchup.gapFetches,
      syncRequests: this.#http?.syncRequests ?? 0,
      held: this.#catchup?.held() ?? 0,
    };
  }

  /** A msg reached the app: remember it (the cursor may be saved now) and acknowledge it. */
  protected override delivered(event: p.ServerEvent): void {
    if (event.type !== "msg") return;
    this.#catchup?.handedOver(event);
    if (this.#o.autoRecv ?? true) this.#watermarks.received(event.conv, event.seq);
  }

  /** A connection is up. The outbox is replayed first, in the same turn as the connection became
   * usable, so no send made meanwhile goes out ahead of older ones. Replies cannot be missed: the
   * connection calls this only after the SUBACK of the base topics (u/{user}/in and the device's
   * u/{user}/{device}/in, where ack and error replies come), and with clean = false the broker
   * keeps that subscription across connects anyway. Channels and presence follow (their messages
   * are caught up by the sync, which starts once they are subscribed). */
  async #connected(): Promise<void> {
    this.#outbox.replayAll();
    this.#watermarks.flush();
    await this.#subscriptions.resubscribe();
    void this.#catchup?.requestSync();
  }

  #dispatch(topic: string, payload: Uint8Array): void {
    const event = parseEvent(payload, topic);
    if (event === null) return; // not an envelope this SDK can read: ignored (section 8, step 7)
    switch (event.type) {
      case "msg":
        this.#catchup?.offerLive(event);
        return;
      case "ack":
        if (this.#outbox.ack(event)) this.hub.push(event);
        else this.#duplicateAcks += 1;
        return;
      case "error":
        if (event.id !== null) {
          if (this.#outbox.refused({ ...event, id: event.id }) !== "final") return; // kept in the outbox
          this.report(new SendFailed(event));
        } else {
          this.report(new RequestRefused(event.code, event.message, event));
        }
        break;
      case "conv":
        if (event.kind === "channel" && event.users.includes(this.user))
          this.#subscriptions.follow(event.conv, event.event !== "members_removed");
        break;
      default:
        break;
    }
    this.hub.push(event);
  }

  /** The client ended: for good with `fatal`, or closed (null). */
  #end(fatal: Error | null): void {
    if (fatal !== null && this.#fatal === null) {
      this.#fatal = fatal;
      this.report(fatal);
      void this.close();
    }
    this.hub.close(this.#fatal);
  }

  #checkOpen(): void {
    if (this.#fatal !== null) throw this.#fatal;
    if (this.#phase === "closed") throw new ClientClosed("the client is closed");
    if (this.#phase === "new") throw new ClientClosed("call connect() first");
  }

  #checkConv(conv: string): void {
    if (!p.isConv(conv)) throw new TypeError("conv must be a conversation id: dm:{a}:{b} (sorted) or g:{ulid}");
  }
}
