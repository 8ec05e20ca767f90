/**
 * The part of an MQTT client the SDK uses, by shape. MQTT.js's MqttClient has it (mqttjs.ts
 * connects with MQTT.js; test/unit/mqtt-types.test.mjs checks the fit against MQTT.js's own
 * types); a test or an app may hand the client another `MqttConnect`.
 */

export interface MqttConnectOptions {
  protocolVersion: 4; // MQTT 3.1.1: the server refuses every other level
  username: string; // the user id
  password: string; // the access token
  clientId: string; // the device id
  clean: boolean; // false: a persistent session (QoS 1 events queued while away)
  keepalive: number; // seconds
  connectTimeout: number; // ms until a CONNACK
  reconnectPeriod: 0; // the SDK reconnects itself, with backoff and jitter
}

/** MQTT.js's error for a refused CONNACK carries its return code in `code`. */
export type MqttError = Error & { code?: number | string };

export interface MqttClientLike {
  readonly connected: boolean;
  on(event: "connect", listener: (connack: { sessionPresent?: boolean }) => void): unknown;
  on(event: "message", listener: (topic: string, payload: Uint8Array) => void): unknown;
  on(event: "error", listener: (error: MqttError) => void): unknown;
  on(event: "close", listener: () => void): unknown;
  subscribe(
    topics: string[],
    options: { qos: 0 | 1 },
    callback: (error: Error | null, granted?: unknown, suback?: { granted?: ReadonlyArray<unknown> }) => void,
  ): unknown;
  unsubscribe(topics: string[], callback: (error?: Error) => void): unknown;
  publish(topic: string, payload: string, options: { qos: 0 | 1 }, callback: (error?: Error) => void): unknown;
  /** force: close the socket at once; otherwise a DISCONNECT once in-flight packets are done. */
  end(force: boolean, callback?: () => void): unknown;
}

export type MqttConnect = (url: string, options: MqttConnectOptions) => MqttClientLike;
