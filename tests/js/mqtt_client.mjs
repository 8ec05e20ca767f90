// One MQTT.js client (MQTT 3.1.1 over ws:// or wss://) scripted by the Python tests
// (tests/node.py) through JSON lines:
//
//   settings (argv[2], else the first stdin line)
//       {"url": "ws://127.0.0.1:PORT/mqtt", "username", "password", "clientId",
//        "ca": "/path/ca.pem" (wss only), "clean": true, "keepalive": 30}
//   stdin, one command a line (an optional "id" is echoed in the reply)
//       {"cmd": "subscribe", "topic": T or [T, ...], "qos": 1}  -> {"event": "suback", "granted": [1]}
//       {"cmd": "unsubscribe", "topic": T or [T, ...]}          -> {"event": "unsuback"}
//       {"cmd": "publish", "topic": T, "payload": S, "qos": 1, "retain": false}
//                                        -> {"event": "puback"} (qos 1), "pubcomp" (qos 2), "sent" (qos 0)
//       {"cmd": "end"}                   -> {"event": "close"}, exit status 0
//   stdout, as they happen
//       {"event": "connect", "sessionPresent": bool}
//       {"event": "message", "topic": T, "payload": S, "qos": n, "retain": bool}
//       {"event": "error", "message": ..., "code": ...}
//       {"event": "close"}
//
// reconnectPeriod is 0: a refused or lost connection is reported (error, then close) and the
// program exits with status 1; so does a bad command (status 2) or a failed one. Nothing is retried.
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";

import mqtt from "mqtt";

let client = null;
let ending = false;
let exiting = false;
let closed = false;

function report(event) {
    process.stdout.write(`${JSON.stringify(event)}\n`);
}

// Exit once everything reported so far is written (stdout to a pipe is asynchronous).
function exit(status) {
    if (exiting) return;
    exiting = true;
    process.stdout.write("", () => process.exit(status));
}

// The connection is gone (closed by us, refused, or lost): say so once, and go.
function closedDown() {
    if (closed) return;
    closed = true;
    report({ event: "close" });
    exit(ending ? 0 : 1);
}

function fail(status, error, extra = {}) {
    report({ event: "error", message: String(error?.message ?? error), code: error?.code ?? null, ...extra });
    if (client !== null) client.end(true);
    exit(status);
}

process.on("uncaughtException", (error) => fail(1, error, { uncaught: true }));
process.on("unhandledRejection", (error) => fail(1, error, { uncaught: true }));

function connect(settings) {
    const options = {
        protocolVersion: 4,
        reconnectPeriod: 0,
        connectTimeout: 10_000,
        clean: settings.clean ?? true,
        keepalive: settings.keepalive ?? 30,
    };
    if (settings.clientId !== undefined) options.clientId = settings.clientId;
    if (settings.username !== undefined) options.username = settings.username;
    if (settings.password !== undefined) options.password = settings.password;
    if (settings.ca) options.ca = readFileSync(settings.ca);
    client = mqtt.connect(settings.url, options);
    client.on("connect", (connack) => report({ event: "connect", sessionPresent: Boolean(connack.sessionPresent) }));
    client.on("message", (topic, payload, packet) =>
        report({ event: "message", topic, payload: payload.toString("utf8"), qos: packet.qos, retain: packet.retain }),
    );
    client.on("error", (error) => report({ event: "error", message: String(error.message), code: error.code ?? null }));
    client.on("close", closedDown);
}

function reply(command, event) {
    report(command.id === undefined ? event : { ...event, id: command.id });
}

function run(command) {
    switch (command.cmd) {
        case "subscribe":
            client.subscribe(command.topic, { qos: command.qos ?? 1 }, (error, _subs, packet) => {
                // A refusal (granted 0x80) is an answer, not a failure: the test reads granted.
                if (packet?.granted !== undefined) reply(command, { event: "suback", granted: packet.granted });
                else fail(1, error ?? "no SUBACK", { cmd: "subscribe", id: command.id ?? null });
            });
            return;
        case "unsubscribe":
            client.unsubscribe(command.topic, (error) => {
                if (error) fail(1, error, { cmd: "unsubscribe", id: command.id ?? null });
                else reply(command, { event: "unsuback" });
            });
            return;
        case "publish": {
            const qos = command.qos ?? 1;
            client.publish(command.topic, command.payload ?? "", { qos, retain: command.retain ?? false }, (error) => {
                if (error) fail(1, error, { cmd: "publish", id: command.id ?? null });
                else reply(command, { event: ["sent", "puback", "pubcomp"][qos] });
            });
            return;
        }
        case "end":
            ending = true;
            // DISCONNECT, then the close event; end()'s callback covers a connection that
            // never opened (no close event follows then).
            client.end(false, {}, closedDown);
            return;
        default:
            fail(2, `unknown command ${JSON.stringify(command.cmd)}`);
    }
}

function parse(line) {
    try {
        const value = JSON.parse(line);
        if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("not an object");
        return value;
    } catch (error) {
        fail(2, `bad JSON line ${JSON.stringify(line)}: ${error.message}`);
        return null;
    }
}

if (process.argv[2] !== undefined) {
    const settings = parse(process.argv[2]);
    if (settings !== null) connect(settings);
}

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on("line", (line) => {
    if (exiting || line.trim() === "") return;
    const value = parse(line);
    if (value === null) return;
    if (client === null) connect(value);
    else run(value);
});
// The test went away without "end": close the connection and go.
lines.on("close", () => {
    if (exiting) return;
    if (client === null) {
        fail(2, "stdin closed before the settings line");
        return;
    }
    run({ cmd: "end" });
});
