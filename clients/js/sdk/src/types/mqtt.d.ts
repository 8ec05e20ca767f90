// What the core compiles against for "mqtt" (see tsconfig.json): MQTT.js's connect, typed by
// the shape the SDK uses. The emitted code imports the real MQTT.js.
import type { MqttConnect } from "../transport.js";

declare const mqtt: { connect: MqttConnect };
export default mqtt;
