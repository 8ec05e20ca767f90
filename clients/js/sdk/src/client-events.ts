/**
 * The app's side of a ChatClient: where its events go.
 *
 *     on(type) / onMessage, onAck, onReceipt, onTyping, onPresence, onConv   protocol events, in order
 *     events()            the same as an async iterator
 *     onError             what went wrong (SendFailed, RequestRefused, HttpError, a listener's throw,
 *                         the fatal AuthFailed / ConnectionFailed)
 *     onConnectionChange  connecting → connected → disconnected (retryInMs) → … → closed
 *     onSync              each sync page's conversations: unread counts and watermarks
 *
 * Protocol events go through an EventHub (delivery.ts): a msg counts as delivered (its seq saved,
 * a recv sent) once every listener returned, awaiting a returned promise, and every open iterator
 * yielded it. Register listeners before connect(): events wait for a first listener, not longer.
 */

import type { ConnectionChange } from "./connection.js";
import { EventHub, type EventMap, type EventType, type Listener } from "./delivery.js";
import type { ConversationSummary } from "./events.js";
import type { Ack, ConvEvent, Message, Presence, Receipt, ServerEvent, Typing } from "./protocol.js";

export abstract class ClientEvents {
  protected readonly hub: EventHub;
  readonly #errorListeners = new Set<(error: Error) => void>();
  readonly #connectionListeners = new Set<(change: ConnectionChange) => void>();
  readonly #syncListeners = new Set<(conversations: ConversationSummary[]) => void>();

  constructor(maxBuffered: number) {
    this.hub = new EventHub({
      maxBuffered,
      onListenerError: (error) => this.report(error),
      delivered: (event) => this.delivered(event),
    });
  }

  /** An event reached the app (every listener and iterator has it). */
  protected abstract delivered(event: ServerEvent): void;

  /** Listen to one protocol event type ("*": every one); returns the function that stops it. */
  on<K extends EventType>(type: K | "*", listener: Listener<EventMap[K]>): () => void {
    return this.hub.on(type, listener);
  }

  /** Messages, per conversation in seq order, each (conv, seq) once (with httpUrl). */
  onMessage = (listener: Listener<Message>): (() => void) => this.on("msg", listener);
  /** Acks of this device's sends (waitAcked() resolves with them too). */
  onAck = (listener: Listener<Ack>): (() => void) => this.on("ack", listener);
  onReceipt = (listener: Listener<Receipt>): (() => void) => this.on("receipt", listener);
  onTyping = (listener: Listener<Typing>): (() => void) => this.on("typing", listener);
  /** The retained presence of the users watched (watchPresence). */
  onPresence = (listener: Listener<Presence>): (() => void) => this.on("presence", listener);
  onConv = (listener: Listener<ConvEvent>): (() => void) => this.on("conv", listener);

  onError(listener: (error: Error) => void): () => void {
    this.#errorListeners.add(listener);
    return () => this.#errorListeners.delete(listener);
  }

  onConnectionChange(listener: (change: ConnectionChange) => void): () => void {
    this.#connectionListeners.add(listener);
    return () => this.#connectionListeners.delete(listener);
  }

  onSync(listener: (conversations: ConversationSummary[]) => void): () => void {
    this.#syncListeners.add(listener);
    return () => this.#syncListeners.delete(listener);
  }

  /** Every protocol event, in order; ends when the client closes, throws when it fails. */
  events(): AsyncIterableIterator<ServerEvent> {
    return this.hub.iterate();
  }

  protected report(error: unknown): void {
    const failure = error instanceof Error ? error : new Error(String(error));
    for (const listener of this.#errorListeners) {
      try {
        listener(failure);
      } catch {
        // an error listener's own failure has nowhere else to go
      }
    }
  }

  protected connectionChanged(change: ConnectionChange): void {
    for (const listener of this.#connectionListeners) listener(change);
  }

  protected synced(conversations: ConversationSummary[]): void {
    for (const listener of this.#syncListeners) listener(conversations);
  }
}
