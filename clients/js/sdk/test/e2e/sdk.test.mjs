// The SDK against a real `mqchat serve` over WebSocket (tests/test_js_sdk.py starts the server and
// runs this file with its addresses in MQCHAT_E2E_WS_URL, MQCHAT_E2E_HTTP_URL and the HS256
// secret in MQCHAT_E2E_SECRET). Everything goes to 127.0.0.1; every wait is bounded.
//
//     ChatClient ──ws──► proxy (net, in this file: cut at will) ──► mqchat serve (WebSocket)
//                └─────────── HTTP: sync, history, groups, media, presence ──► mqchat serve
import assert from "node:assert/strict";
import { createHmac, randomUUID } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { connect as tcpConnect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { ChatClient, dmConv } from "../../dist/index.js";
import { jsonFileStores } from "../../dist/node/index.js";

const WS_URL = process.env["MQCHAT_E2E_WS_URL"] ?? "";
const HTTP_URL = process.env["MQCHAT_E2E_HTTP_URL"] ?? "";
const SECRET = process.env["MQCHAT_E2E_SECRET"] ?? "";
const RUN = randomUUID().slice(0, 8); // fresh users per run
const WAIT_MS = 20_000;

/** An HS256 access token (protocol section 2): sub, dev, iat, exp. @param {string} user @param {string} device */
function token(user, device) {
  const b64 = (/** @type {object} */ obj) => Buffer.from(JSON.stringify(obj)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const unsigned = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: user, dev: device, iat: now - 5, exp: now + 600 })}`;
  return `${unsigned}.${createHmac("sha256", SECRET).update(unsigned).digest("base64url")}`;
}

/** A TCP proxy to the server's WebSocket port that can cut every connection at once and refuse
 * new ones until restored. */
class Proxy {
  /** @type {Set<import("node:net").Socket>} */
  #sockets = new Set();
  #cut = false;
  port = 0;
  server = createServer((inbound) => {
    if (this.#cut) {
      inbound.destroy(); // accepted and dropped: the connect fails
      return;
    }
    const target = new URL(WS_URL);
    const outbound = tcpConnect(Number(target.port), "127.0.0.1");
    for (const [a, b] of [
      [inbound, outbound],
      [outbound, inbound],
    ]) {
      this.#sockets.add(a);
      a.pipe(b);
      a.on("error", () => b.destroy());
      a.on("close", () => {
        this.#sockets.delete(a);
        b.destroy();
      });
    }
  });

  async start() {
    await new Promise((resolve) => this.server.listen(0, "127.0.0.1", () => resolve(undefined)));
    this.port = /** @type {import("node:net").AddressInfo} */ (this.server.address()).port;
    return `ws://127.0.0.1:${this.port}${new URL(WS_URL).pathname}`;
  }

  /** Drop every connection abruptly (no MQTT DISCONNECT, no WebSocket close) and refuse new ones. */
  cut() {
    this.#cut = true;
    for (const socket of this.#sockets) socket.destroy();
  }

  restore() {
    this.#cut = false;
  }

  async stop() {
    this.cut();
    await new Promise((resolve) => this.server.close(() => resolve(undefined)));
  }
}

/** Wait until check() is true; fail with what() after ms. @param {() => boolean} check @param {() => string} what */
async function until(check, what, ms = WAIT_MS) {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) assert.fail(`not within ${ms} ms: ${what()}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** @param {string} user @param {string} device @param {Partial<import("../../dist/index.js").ChatClientOptions>} [extra] */
function client(user, device, extra = {}) {
  const id = `${user}-${device}`; // device ids are unique across the deployment (section 2)
  return new ChatClient({
    url: WS_URL,
    httpUrl: HTTP_URL,
    user,
    device: id,
    token: token(user, id),
    gapGraceMs: 300,
    resendAfterMs: 3000,
    ...extra,
  });
}

/** Record every message a client is handed, by conversation. @param {ChatClient} c */
function inbox(c) {
  /** @type {import("../../dist/index.js").Message[]} */
  const messages = [];
  c.onMessage((m) => void messages.push(m));
  return { messages, of: (/** @type {string} */ conv) => messages.filter((m) => m.conv === conv) };
}

const proxy = new Proxy();
let proxied = ""; // ws:// through the proxy
let scratch = "";

before(async () => {
  assert.ok(
    WS_URL && HTTP_URL && SECRET,
    "run by tests/test_js_sdk.py: MQCHAT_E2E_WS_URL, MQCHAT_E2E_HTTP_URL and MQCHAT_E2E_SECRET",
  );
  proxied = await proxy.start();
  scratch = await mkdtemp(join(tmpdir(), "mqchat-e2e-"));
});

after(async () => {
  await proxy.stop();
  await rm(scratch, { recursive: true, force: true });
});

test("two clients: messages, acks, receipts, typing, presence", { timeout: 60_000 }, async () => {
  const [alice, bob] = [`alice-${RUN}`, `bob-${RUN}`];
  const conv = dmConv(alice, bob);
  const a = client(alice, "web");
  const b = client(bob, "rn");
  const [ain, bin] = [inbox(a), inbox(b)];
  /** @type {import("../../dist/index.js").Receipt[]} */
  const receipts = [];
  /** @type {import("../../dist/index.js").Typing[]} */
  const typing = [];
  /** @type {import("../../dist/index.js").Presence[]} */
  const presence = [];
  a.onReceipt((r) => void receipts.push(r));
  b.onTyping((t) => void typing.push(t));
  a.onPresence((p) => void presence.push(p));
  try {
    await a.connect();
    await b.connect();
    const ack = await a.sendAndWait(conv, "hi Bob");
    assert.equal(ack.seq, 1);
    await until(
      () => bin.of(conv).length === 1,
      () => "bob gets it",
    );
    b.markRead(conv, 1); // bob reads it: alice hears of it (a sender's own messages count as read)
    await until(
      () => receipts.some((r) => r.user === bob && r.read === 1),
      () => JSON.stringify(receipts),
    );
    await b.sendAndWait(conv, "hi Alice");
    await until(
      () => bin.of(conv).length === 2 && ain.of(conv).length === 2,
      () => `bob ${bin.messages.length}, alice ${ain.messages.length}`,
    );
    assert.deepEqual(
      bin.of(conv).map((m) => [m.seq, m.from, m.body]),
      [
        [1, alice, "hi Bob"],
        [2, bob, "hi Alice"],
      ],
    );
    assert.deepEqual(
      ain.of(conv).map((m) => m.seq),
      [1, 2],
    ); // her own message too (section 5, msg)

    assert.ok(a.setTyping(conv, true));
    await until(
      () => typing.some((t) => t.user === alice && t.state),
      () => JSON.stringify(typing),
    );

    await a.watchPresence([bob]); // they share a conversation with a message now
    await until(
      () => presence.some((p) => p.user === bob && p.state === "online"),
      () => JSON.stringify(presence),
    );
    const [answer] = await a.presence([bob]);
    assert.equal(answer?.state, "online");
    await b.registerPushToken({ platform: "fcm", token: `fcm-${RUN}` });
    assert.equal(await b.unregisterPushToken(), true);
  } finally {
    await a.close();
    await b.close();
  }
});

test(
  "a member added to a group late gets its messages from the join on, in order, with no repair loop",
  { timeout: 60_000 },
  async () => {
    const [alice, carol] = [`al-${RUN}`, `cl-${RUN}`];
    const a = client(alice, "web");
    const c = client(carol, "web");
    const cin = inbox(c);
    try {
      await a.connect();
      await c.connect();
      await c.waitSynced();
      const group = await a.createGroup("late", []);
      for (const n of [1, 2, 3]) await a.sendAndWait(group.conv, `before ${n}`);
      const added = await a.addMembers(group.conv, [carol]);
      const joined = added.members.find((m) => m.user === carol)?.joined_seq ?? 0;
      assert.ok(joined > 1, `joined_seq ${joined}`);
      for (const n of [1, 2, 3]) await a.sendAndWait(group.conv, `after ${n}`);
      await until(
        () => cin.of(group.conv).length === 3,
        () => JSON.stringify({ messages: cin.messages, stats: c.statistics() }),
      );
      assert.deepEqual(
        cin.of(group.conv).map((m) => m.body),
        ["after 1", "after 2", "after 3"],
      );
      assert.deepEqual(
        cin.of(group.conv).map((m) => m.seq),
        [joined, joined + 1, joined + 2],
      );
      const fetches = c.statistics().gapFetches;
      await new Promise((resolve) => setTimeout(resolve, 1500)); // five grace periods
      assert.equal(c.statistics().gapFetches, fetches, "no repair fetches once delivered");
      assert.equal(c.statistics().held, 0);
    } finally {
      await a.close();
      await c.close();
    }
  },
);

test(
  "groups and media: a group is created, its members hear of it, a file goes through",
  { timeout: 60_000 },
  async () => {
    const [alice, bob] = [`ag-${RUN}`, `bg-${RUN}`];
    const a = client(alice, "web");
    const b = client(bob, "rn");
    const bin = inbox(b);
    /** @type {import("../../dist/index.js").ConvEvent[]} */
    const convs = [];
    b.onConv((c) => void convs.push(c));
    try {
      await a.connect();
      await b.connect();
      const group = await a.createGroup("e2e", [bob]);
      assert.deepEqual(group.members.map((m) => m.user).sort(), [alice, bob].sort());
      await until(
        () => convs.some((c) => c.conv === group.conv && c.event === "created"),
        () => JSON.stringify(convs),
      );
      await a.sendAndWait(group.conv, "welcome");
      const pdf = new TextEncoder().encode("%PDF-1.4\n% mqchat e2e\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n");
      const sent = await a.sendFile(group.conv, pdf, {
        contentType: "application/pdf",
        filename: "notes.pdf",
        caption: "the notes",
      });
      await a.waitAcked(sent.id, WAIT_MS);
      await until(
        () => bin.of(group.conv).length === 2,
        () => JSON.stringify(bin.messages),
      );
      const [text, file] = bin.of(group.conv);
      assert.equal(text?.body, "welcome");
      assert.equal(file?.kind, "media");
      assert.equal(file?.body, "the notes");
      assert.deepEqual(
        file?.attachments.map((x) => [x.id, x.type, x.size, x.name]),
        [[sent.media.id, "application/pdf", pdf.length, "notes.pdf"]],
      );
      assert.deepEqual(await b.media.download(sent.media.id), pdf);
      const page = await b.history(group.conv, 3, 10);
      assert.deepEqual(
        page.messages.map((m) => m.seq),
        [1, 2],
      );
    } finally {
      await a.close();
      await b.close();
    }
  },
);

test(
  "a cut connection while 50 messages are sent: after the reconnect each arrives once, in seq order",
  { timeout: 90_000 },
  async () => {
    const [alice, bob] = [`ac-${RUN}`, `bc-${RUN}`];
    const conv = dmConv(alice, bob);
    const a = client(alice, "phone", { url: proxied, random: () => 0.2 }); // through the proxy
    const b = client(bob, "rn");
    const ain = inbox(a);
    /** @type {string[]} */
    const states = [];
    a.onConnectionChange((c) => void states.push(c.state));
    try {
      await a.connect();
      await b.connect();
      await b.sendAndWait(conv, "before the cut");
      await until(
        () => ain.of(conv).length === 1,
        () => "the first message",
      );

      proxy.cut();
      await until(
        () => !a.connected,
        () => "alice notices the cut",
      );
      const acked = [];
      for (let n = 0; n < 50; n++) acked.push(b.sendAndWait(conv, `during the cut ${n}`));
      await Promise.all(acked);
      const offline = await a.send(conv, "sent while cut"); // waits in alice's outbox
      await new Promise((resolve) => setTimeout(resolve, 1500)); // a few failed reconnects
      proxy.restore();

      await until(
        () => ain.of(conv).length === 52,
        () => `alice has ${ain.of(conv).length} of 52`,
        45_000,
      );
      await a.waitAcked(offline, WAIT_MS);
      const seqs = ain.of(conv).map((m) => m.seq);
      assert.deepEqual(
        seqs,
        Array.from({ length: 52 }, (_, i) => i + 1),
        "each once, in seq order",
      );
      assert.deepEqual(
        ain
          .of(conv)
          .slice(1, 51)
          .map((m) => m.body),
        Array.from({ length: 50 }, (_, n) => `during the cut ${n}`),
      );
      assert.equal(ain.of(conv).at(-1)?.body, "sent while cut");
      assert.ok(states.includes("disconnected") && states.at(-1) === "connected", states.join(","));
      assert.ok(a.statistics().reconnects >= 1);

      // A device of alice's that was never connected has no session queue: it catches up over HTTP
      // alone (the sync includes the newest 50, the rest comes from …/messages?after=0).
      const tablet = client(alice, "tablet");
      const tin = inbox(tablet);
      try {
        await tablet.connect();
        await tablet.waitSynced();
        await until(
          () => tin.of(conv).length === 52,
          () => `the tablet has ${tin.of(conv).length} of 52`,
        );
        assert.deepEqual(
          tin.of(conv).map((m) => m.seq),
          seqs,
        );
      } finally {
        await tablet.close();
      }
    } finally {
      await a.close();
      await b.close();
      proxy.restore();
    }
  },
);

test(
  "a persistent outbox: sends made while cut go out from a new client on the same files",
  { timeout: 60_000 },
  async () => {
    const [alice, bob] = [`ap-${RUN}`, `bp-${RUN}`];
    const conv = dmConv(alice, bob);
    const url = proxied;
    const stores = () => jsonFileStores(join(scratch, alice));
    const first = client(alice, "laptop", { url, ...stores() });
    const b = client(bob, "rn");
    const bin = inbox(b);
    try {
      await first.connect();
      await b.connect();
      proxy.cut();
      await until(
        () => !first.connected,
        () => "the cut",
      );
      for (const n of [1, 2, 3]) await first.send(conv, `queued ${n}`, { id: `q-${RUN}-${n}` });
      await first.close(); // the app quits with three sends unacked
      proxy.restore();
      const second = client(alice, "laptop", { url, ...stores() });
      try {
        await second.connect();
        for (const n of [1, 2, 3]) assert.equal((await second.waitAcked(`q-${RUN}-${n}`, WAIT_MS)).seq, n);
        await until(
          () => bin.of(conv).length === 3,
          () => JSON.stringify(bin.messages),
        );
        assert.deepEqual(
          bin.of(conv).map((m) => m.body),
          ["queued 1", "queued 2", "queued 3"],
        );
        assert.equal(second.statistics().pending, 0);
      } finally {
        await second.close();
      }
    } finally {
      await first.close();
      await b.close();
      proxy.restore();
    }
  },
);
