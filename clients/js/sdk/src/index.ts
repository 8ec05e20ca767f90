/**
 * @mqchat/client — the mqchat client SDK for browsers, React Native and Node.
 *
 *     const client = new ChatClient({ url: "wss://chat.example/mqtt", httpUrl: "https://chat.example",
 *                                     user: "alice", device: "alice-web-1", token });
 *     client.onMessage((msg) => show(msg));          // per conversation in seq order, each once
 *     await client.connect();
 *     const id = await client.send(dmConv("alice", "bob"), "hi Bob");   // outbox: survives reconnects
 *
 * The core needs only ES2022 and the platform's fetch, timers and TextEncoder; persistent stores
 * are in "@mqchat/client/browser" (IndexedDB) and "@mqchat/client/node" (JSON files).
 */

export { ChatClient, type ChatClientOptions, type ClientStatistics } from "./client.js";
export { backoffDelayMs, BACKOFF_CAP_MS, BACKOFF_FIRST_MS, sleep, systemClock, type Clock } from "./clock.js";
export type { ConnectionChange, ConnectionState } from "./connection.js";
export type { EventMap, EventType, Listener } from "./delivery.js";
export {
  AuthFailed,
  ClientClosed,
  ConnectionFailed,
  HttpError,
  MediaFailed,
  MqchatError,
  RequestRefused,
  SendFailed,
} from "./errors.js";
export {
  decodeObject,
  parseAttachments,
  parseEnvelope,
  parseEvent,
  parseMessage,
  parseMessagesPage,
  parsePresence,
  parsePresencePage,
  parseSyncPage,
  type ConversationSummary,
  type MessagesPage,
  type SyncPage,
} from "./events.js";
export {
  HttpApi,
  parseGroup,
  pathSegment,
  type Group,
  type GroupMember,
  type PushRegistration,
  type Tokens,
} from "./http.js";
export {
  CHUNK_BYTES,
  encodeMetadata,
  MediaApi,
  type MediaInfo,
  type UploadedMedia,
  type UploadOptions,
  type UploadSource,
} from "./media.js";
export { OrderingBuffer, SeenMessages, type Offered } from "./ordering.js";
export {
  MemoryOutboxStore,
  Outbox,
  pendingRequest,
  type OutboxStatistics,
  type OutboxStore,
  type PendingSend,
  type ReplyOutcome,
} from "./outbox.js";
export { base64Encode, newUlid, type FetchInit, type FetchLike, type FetchResponse } from "./platform.js";
export * from "./protocol.js";
export {
  applyChannel,
  applyDelivered,
  emptySnapshot,
  MemoryStateStore,
  StateWriter,
  type StateSnapshot,
  type StateStore,
} from "./state.js";
export type { MqttClientLike, MqttConnect, MqttConnectOptions, MqttError } from "./transport.js";
export { COALESCE_MS, Watermarks } from "./watermarks.js";
export { Catchup, SYNC_INCLUDE_MESSAGES, type CatchupHooks, type CatchupStatistics } from "./catchup.js";
