// The core types "mqtt" by src/types/mqtt.d.ts (MQTT.js's own types pull in Node's). This file is
// type-checked against MQTT.js's real types (tsconfig.test.json): `connect` below only compiles
// while MQTT.js's client has the shape the SDK uses. It also runs MQTT.js once, for real.
import assert from "node:assert/strict";
import { test } from "node:test";

import mqtt from "mqtt";

import { mqttJsConnect } from "../../dist/mqttjs.js";

/** @type {import("../../dist/index.js").MqttConnect} */
const connect = (url, options) => mqtt.connect(url, options);

test("MQTT.js fits the SDK's MqttConnect and reports a refused connection as error, then close", async () => {
  assert.equal(typeof connect, "function");
  const options = {
    protocolVersion: /** @type {const} */ (4),
    username: "u",
    password: "p",
    clientId: "d",
    clean: false,
    keepalive: 30,
    connectTimeout: 2000,
    reconnectPeriod: /** @type {const} */ (0),
  };
  const client = mqttJsConnect("ws://127.0.0.1:9/mqtt", options); // nothing listens on port 9
  /** @type {string[]} */
  const seen = [];
  await new Promise((resolve) => {
    client.on("error", () => void seen.push("error"));
    client.on("close", () => resolve(seen.push("close")));
  });
  assert.deepEqual(seen.slice(-1), ["close"]);
  assert.equal(client.connected, false);
  client.end(true);
});
