/** The default MQTT client: MQTT.js, over ws:// or wss:// (subprotocol `mqtt`, binary frames). */

import mqtt from "mqtt";

import type { MqttConnect } from "./transport.js";

export const mqttJsConnect: MqttConnect = (url, options) => mqtt.connect(url, options);
