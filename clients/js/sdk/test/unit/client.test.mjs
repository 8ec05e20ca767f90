// ChatClient against MQTT in memory (helpers.mjs FakeBroker) and a clock moved by hand: the
// connect recipe, the outbox across a cut, events, receipts, typing, channels and presence.
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  AuthFailed,
  ChatClient,
  ConnectionFailed,
  MemoryOutboxStore,
  MemoryStateStore,
  RequestRefused,
  SendFailed,
} from "../../dist/index.js";
import { FakeBroker, FakeClock, settle } from "../helpers.mjs";

const AB = "dm:alice:bob";
const OUT = "u/alice/phone/out";

/** @param {number} seq @param {string} [conv] */
function msg(seq, conv = AB) {
  return {
    type: "msg",
    conv,
    seq,
    mid: `M${seq}`,
    from: "bob",
    dev: "bob-pixel",
    id: `b-${seq}`,
    ts: 1000 + seq,
    kind: "text",
    body: `hello ${seq}`,
  };
}

/** @param {Partial<import("../../dist/index.js").ChatClientOptions>} [extra] */
function setUp(extra = {}) {
  const broker = new FakeBroker();
  const clock = new FakeClock();
  const client = new ChatClient({
    url: "ws://127.0.0.1:1/mqtt",
    user: "alice",
    device: "phone",
    token: "t0ken",
    mqttConnect: broker.connect,
    clock,
    random: () => 0,
    ...extra,
  });
  return { broker, clock, client };
}

test("connects as protocol section 2 says and subscribes its two in-topics (SUBACK checked)", async () => {
  const { broker, client } = setUp();
  /** @type {string[]} */
  const states = [];
  client.onConnectionChange((c) => states.push(c.state));
  await client.connect();
  assert.deepEqual(broker.last.options, {
    protocolVersion: 4,
    username: "alice",
    password: "t0ken",
    clientId: "phone",
    clean: false,
    keepalive: 30,
    connectTimeout: 10_000,
    reconnectPeriod: 0,
  });
  assert.equal(broker.last.url, "ws://127.0.0.1:1/mqtt");
  assert.deepEqual(broker.last.subscribed, ["u/alice/in", "u/alice/phone/in"]);
  assert.deepEqual(states, ["connecting", "connected"]);
  assert.ok(client.connected);
  await client.close();
  assert.equal(states.at(-1), "closed");
  assert.ok(broker.last.ended);
});

test("a refused base subscription fails the connect", async () => {
  const { broker, client } = setUp();
  broker.granted = (topics) => topics.map((t) => (t === "u/alice/in" ? 0x80 : 1));
  await assert.rejects(client.connect(), (e) => e instanceof ConnectionFailed && /u\/alice\/in/.test(e.message));
});

test("the first connect is not retried: ConnectionFailed", async () => {
  const { broker, client } = setUp();
  broker.unreachable = true;
  await assert.rejects(client.connect(), ConnectionFailed);
  assert.equal(broker.clients.length, 1);
});

test("CONNACK 5 with a fixed token is AuthFailed; a token function is asked once more", async () => {
  const fixed = setUp();
  fixed.broker.refuseWith = 5;
  await assert.rejects(fixed.client.connect(), AuthFailed);

  let asked = 0;
  const fresh = setUp({ token: async () => `token-${++asked}` });
  fresh.broker.refuseWith = 5;
  const connecting = fresh.client.connect();
  await settle();
  fresh.broker.refuseWith = null; // the fresh token is accepted
  await fresh.clock.advance(1000);
  await connecting;
  assert.deepEqual(
    fresh.broker.clients.map((c) => c.options.password),
    ["token-1", "token-2"],
  );
  await fresh.client.close();
});

test("a send is published exactly, acked once; a duplicate ack is dropped", async () => {
  const { broker, client } = setUp();
  /** @type {string[]} */
  const acks = [];
  client.onAck((a) => void acks.push(a.id));
  await client.connect();
  const id = await client.send(AB, "hi Bob", { id: "m-1" });
  assert.equal(id, "m-1");
  assert.deepEqual(broker.last.published, [
    { topic: OUT, payload: { type: "send", id: "m-1", conv: AB, body: "hi Bob", kind: "text" }, qos: 1 },
  ]);
  const waiting = client.waitAcked(id);
  const ack = { type: "ack", id: "m-1", conv: AB, seq: 7, mid: "M7", ts: 5 };
  broker.last.deliver("u/alice/phone/in", ack);
  broker.last.deliver("u/alice/phone/in", ack);
  assert.deepEqual(await waiting, ack);
  await settle();
  assert.deepEqual(acks, ["m-1"]);
  assert.equal(client.statistics().duplicates, 1);
  assert.equal(client.statistics().pending, 0);
  await client.close();
});

test("a cut connection: reconnect with backoff, then every unacked send again, same ids, in order", async () => {
  const { broker, clock, client } = setUp({ random: () => 0.5 });
  /** @type {import("../../dist/index.js").ConnectionChange[]} */
  const changes = [];
  client.onConnectionChange((c) => void changes.push(c));
  await client.connect();
  for (const n of [1, 2, 3]) await client.send(AB, `m${n}`, { id: `m-${n}` });
  broker.last.deliver("u/alice/phone/in", { type: "ack", id: "m-2", conv: AB, seq: 2, mid: "M2", ts: 1 });
  const first = broker.last;
  first.drop();
  await settle();
  assert.equal(client.connected, false);
  await client.send(AB, "m4", { id: "m-4" }); // offline: kept for the next connect
  const lost = changes.at(-1);
  assert.equal(lost?.state, "disconnected");
  assert.equal(lost?.retryInMs, 500); // attempt 0: random(0, 1 s)
  await clock.advance(500);
  assert.notEqual(broker.last, first);
  assert.ok(client.connected);
  assert.deepEqual(
    broker.last.sent(OUT).map((e) => e.id),
    ["m-1", "m-3", "m-4"],
  );
  assert.equal(client.statistics().reconnects, 1);
  await client.close();
});

test("an unacked send is published again after resendAfterMs", async () => {
  const { broker, clock, client } = setUp({ resendAfterMs: 4000 });
  await client.connect();
  await client.send(AB, "m1", { id: "m-1" });
  await clock.advance(3999);
  assert.equal(broker.last.sent(OUT).length, 1);
  await clock.advance(2001); // the resend timer runs every resendAfterMs / 2
  assert.deepEqual(
    broker.last.sent(OUT).map((e) => e.id),
    ["m-1", "m-1"],
  );
  assert.equal(client.statistics().resends, 1);
  await client.close();
});

test("error replies: a final one fails the send (SendFailed), one without id is RequestRefused", async () => {
  const { broker, client } = setUp();
  /** @type {Error[]} */
  const errors = [];
  /** @type {string[]} */
  const seen = [];
  client.onError((e) => void errors.push(e));
  client.on("error", (e) => void seen.push(e.code));
  await client.connect();
  const id = await client.send("dm:bob:carol", "hi", { id: "m-9" });
  const waiting = client.waitAcked(id);
  broker.last.deliver("u/alice/phone/in", {
    type: "error",
    code: "not_member",
    message: "no",
    id: "m-9",
    conv: "dm:bob:carol",
  });
  await assert.rejects(waiting, (e) => e instanceof SendFailed && e.code === "not_member");
  broker.last.deliver("u/alice/phone/in", {
    type: "error",
    code: "forbidden",
    message: "you may not publish to u/bob/in",
  });
  await settle();
  assert.deepEqual(seen, ["not_member", "forbidden"]);
  assert.ok(errors[0] instanceof SendFailed);
  assert.ok(errors[1] instanceof RequestRefused && errors[1].code === "forbidden");
  assert.equal(client.statistics().pending, 0);
  await client.close();
});

test("a send the server would refuse is refused before it is stored", async () => {
  const { client } = setUp();
  await client.connect();
  await assert.rejects(client.send("dm:bob:alice", "hi"), (e) => e instanceof RequestRefused && e.code === "bad_conv");
  await assert.rejects(client.send(AB, ""), (e) => e instanceof RequestRefused && e.code === "bad_request");
  await assert.rejects(client.sendMedia(AB, []), (e) => e instanceof RequestRefused && e.code === "bad_request");
  assert.equal(client.statistics().pending, 0);
  await client.close();
});

test("events wait for a listener; a msg counts as delivered when the listener's promise settles", async () => {
  const state = new MemoryStateStore();
  const { broker, clock, client } = setUp({ state });
  await client.connect();
  for (const seq of [1, 2, 2, 3]) broker.last.deliver("u/alice/in", msg(seq));
  await settle();
  /** @type {number[]} */
  const got = [];
  /** @type {() => void} */
  let release = () => undefined;
  client.onMessage(async (m) => {
    got.push(m.seq);
    if (m.seq === 3) await new Promise((resolve) => (release = () => resolve(undefined)));
  });
  await settle();
  assert.deepEqual(got, [1, 2, 3]); // without http: arrival order, duplicates dropped
  assert.deepEqual((await state.load()).delivered, { [AB]: 2 }); // 3 is not taken yet
  release();
  await settle();
  await clock.advance(200); // recv is coalesced
  assert.deepEqual(broker.last.sent(OUT), [{ type: "recv", conv: AB, seq: 3 }]);
  assert.deepEqual((await state.load()).delivered, { [AB]: 3 });
  await client.close();
});

test("events() yields every event in order and ends at close", async () => {
  const { broker, client } = setUp();
  await client.connect();
  const events = client.events();
  broker.last.deliver("u/alice/in", msg(1));
  broker.last.deliver("u/alice/in", { type: "receipt", conv: AB, user: "bob", delivered: 1, read: 1 });
  broker.last.deliver("u/alice/in", { type: "typing", conv: AB, user: "bob", state: true });
  broker.last.deliver("u/alice/in", { type: "brand_new", x: 1 });
  broker.last.deliver("u/alice/in", "not json");
  /** @type {string[]} */
  const types = [];
  for (let i = 0; i < 4; i++) types.push((await events.next()).value?.type ?? "end");
  assert.deepEqual(types, ["msg", "receipt", "typing", "other"]);
  const ending = events.next();
  await client.close();
  assert.deepEqual(await ending, { value: undefined, done: true });
});

test("markRead while offline goes out after the reconnect; typing is QoS 0", async () => {
  const { broker, clock, client } = setUp();
  await client.connect();
  assert.equal(client.setTyping(AB, true), true);
  assert.deepEqual(broker.last.published.at(-1), {
    topic: OUT,
    payload: { type: "typing", conv: AB, state: true },
    qos: 0,
  });
  broker.last.drop();
  await settle();
  assert.equal(client.setTyping(AB, false), false);
  client.markRead(AB, 5);
  client.markRead(AB, 4); // watermarks only go up
  await clock.advance(1000);
  assert.deepEqual(broker.last.sent(OUT), [{ type: "read", conv: AB, seq: 5 }]);
  await client.close();
});

test("channels: followed from conv events (subscribed now and on every connect), left on removal", async () => {
  const channel = "g:01J9ZK3M4N5P6Q7R8S9T0VWXYZ";
  const state = new MemoryStateStore();
  const { broker, clock, client } = setUp({ state });
  /** @type {string[]} */
  const convs = [];
  client.onConv((c) => void convs.push(c.event));
  await client.connect();
  broker.last.deliver("u/alice/in", {
    type: "conv",
    conv: channel,
    kind: "channel",
    event: "members_added",
    users: ["alice"],
    by: "bob",
  });
  await settle();
  assert.deepEqual(broker.last.subscribed.slice(2), [`c/${channel}/in`]);
  broker.last.drop();
  await clock.advance(1000);
  assert.deepEqual(broker.last.subscribed, ["u/alice/in", "u/alice/phone/in", `c/${channel}/in`]);
  broker.last.deliver(`c/${channel}/in`, {
    type: "conv",
    conv: channel,
    kind: "channel",
    event: "members_removed",
    users: ["alice"],
    by: "bob",
  });
  await settle();
  assert.deepEqual(broker.last.unsubscribed, [`c/${channel}/in`]);
  assert.deepEqual(convs, ["members_added", "members_removed"]);
  assert.deepEqual((await state.load()).channels, []);
  await client.close();
});

test("presence: watched users' retained p/{user}, on every connect; a refusal is reported", async () => {
  const { broker, client } = setUp({ presence: ["bob"] });
  /** @type {unknown[]} */
  const seen = [];
  /** @type {Error[]} */
  const errors = [];
  client.onPresence((p) => void seen.push(p));
  client.onError((e) => void errors.push(e));
  broker.granted = (topics) => topics.map((t) => (t === "p/mallory" ? 0x80 : 1));
  await client.connect();
  assert.deepEqual(broker.last.subscribed, ["u/alice/in", "u/alice/phone/in", "p/bob"]);
  broker.last.deliver("p/bob", { state: "online", last_seen: 17 });
  await client.watchPresence(["mallory"]);
  await settle();
  assert.deepEqual(seen, [{ type: "presence", user: "bob", state: "online", last_seen: 17 }]);
  assert.ok(errors[0] instanceof RequestRefused && /p\/mallory/.test(errors[0].message));
  // A refused user is not kept: watching again (once the two share a conversation) asks again.
  broker.granted = (topics) => topics.map(() => 1);
  await client.watchPresence(["mallory", "bob"]);
  assert.deepEqual(broker.last.subscribed.slice(3), ["p/mallory", "p/mallory"]);
  await client.close();
});

test("pause() ends the connection and makes no new one; resume() connects at once and replays", async () => {
  const { broker, clock, client } = setUp();
  /** @type {import("../../dist/index.js").ConnectionChange[]} */
  const changes = [];
  client.onConnectionChange((c) => void changes.push(c));
  await client.connect();
  const first = broker.last;
  client.pause();
  assert.equal(client.connected, false);
  await settle();
  assert.equal(first.ended, true);
  assert.deepEqual(changes.at(-1), { state: "disconnected", attempt: 0, retryInMs: null, error: null });
  await client.send(AB, "m1", { id: "m-1" }); // kept in the outbox
  client.markRead(AB, 3);
  await clock.advance(120_000); // no reconnect while paused, however long
  assert.equal(broker.last, first);
  assert.deepEqual(first.sent(OUT), []);
  client.resume();
  await settle();
  assert.notEqual(broker.last, first);
  assert.ok(client.connected);
  assert.equal(changes.at(-1)?.state, "connected");
  assert.deepEqual(broker.last.sent(OUT), [
    { type: "send", id: "m-1", conv: AB, kind: "text", body: "m1" },
    { type: "read", conv: AB, seq: 3 },
  ]);
  await client.close();
});

test("resume() during a backoff wait connects at once", async () => {
  const { broker, client } = setUp({ random: () => 0.99 });
  await client.connect();
  const first = broker.last;
  first.drop();
  await settle();
  assert.equal(client.connected, false); // waiting up to 1 s
  client.pause();
  client.resume();
  await settle();
  assert.notEqual(broker.last, first);
  assert.ok(client.connected);
  await client.close();
});

test("an outbox store that outlives the client: a new client sends what the old one could not", async () => {
  const outbox = new MemoryOutboxStore();
  const first = setUp({ outbox });
  await first.client.connect();
  first.broker.last.drop();
  await settle();
  await first.client.send(AB, "sent while offline", { id: "m-1" });
  await first.client.close();
  const second = setUp({ outbox });
  await second.client.connect();
  assert.deepEqual(second.broker.last.sent(OUT), [
    { type: "send", id: "m-1", conv: AB, body: "sent while offline", kind: "text" },
  ]);
  await second.client.close();
});

test("a reconnect replays the outbox before channels and presence are subscribed again", async () => {
  const { broker, clock, client } = setUp({ presence: ["bob"] });
  /** @type {string[]} */
  const log = [];
  broker.granted = (topics) => {
    log.push(`subscribe ${topics.join(" ")} after ${broker.last.sent(OUT).length} sends`);
    if (topics.includes("p/bob") && broker.clients.length === 2) void client.send(AB, "m2", { id: "m-2" });
    return topics.map(() => 1);
  };
  await client.connect();
  broker.last.drop();
  await settle();
  await client.send(AB, "m1", { id: "m-1" }); // offline: kept for the next connect
  await clock.advance(500);
  await settle();
  assert.ok(client.connected);
  // The reply topic is subscribed (SUBACK checked) before anything is published; the send made
  // during the presence round trip goes out after the older one.
  assert.deepEqual(log.slice(2), ["subscribe u/alice/in u/alice/phone/in after 0 sends", "subscribe p/bob after 1 sends"]);
  assert.deepEqual(
    broker.last.sent(OUT).map((e) => e.id),
    ["m-1", "m-2"],
  );
  await client.close();
});

test("the backoff starts again only after a connection stayed up for 10 s", async () => {
  const { broker, clock, client } = setUp({ random: () => 0.5 });
  /** @type {(number | null)[]} */
  const delays = [];
  client.onConnectionChange((c) => void (c.state === "disconnected" && delays.push(c.retryInMs)));
  await client.connect();
  // Kicked off at once, again and again (another client with the same device id): no reset.
  for (const wait of [500, 1000, 2000]) {
    broker.last.drop();
    await settle();
    await clock.advance(wait);
    assert.ok(client.connected);
  }
  await clock.advance(9_999);
  broker.last.drop();
  await settle();
  await clock.advance(4000);
  assert.ok(client.connected);
  await clock.advance(10_000); // stayed up: the next cut starts from the first delay
  broker.last.drop();
  await settle();
  assert.deepEqual(delays, [500, 1000, 2000, 4000, 500]);
  await client.close();
});
