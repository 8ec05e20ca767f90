// The HTTP API client: retries with backoff (and Retry-After), a fresh token after a 401, the
// per-attempt timeout, close, the history page size fallback, paths and queries.
import assert from "node:assert/strict";
import { test } from "node:test";

import { ClientClosed, HttpApi, HttpError, pathSegment } from "../../dist/index.js";
import { FakeClock, fixedTokens, response, settle } from "../helpers.mjs";

/** @param {import("../../dist/index.js").FetchLike} fetch @param {Partial<ConstructorParameters<typeof HttpApi>[0]>} [extra] */
function api(fetch, extra = {}) {
  const clock = new FakeClock();
  const stop = new AbortController();
  const http = new HttpApi({
    baseUrl: "http://api.test/",
    tokens: fixedTokens,
    fetch,
    clock,
    random: () => 0.5,
    timeoutMs: 1000,
    signal: stop.signal,
    ...extra,
  });
  return { http, clock, stop };
}

test("503 and 429 are retried after the backoff, at least the server's Retry-After", async () => {
  /** @type {string[]} */
  const calls = [];
  const answers = [
    response({ status: 503, body: { error: "unavailable", message: "" } }),
    response({ status: 429, headers: { "Retry-After": "3" }, body: { error: "rate_limited", message: "" } }),
    response({ status: 200, body: { users: [] } }),
  ];
  const { http, clock } = api(async (url) => {
    calls.push(url);
    return /** @type {import("../../dist/index.js").FetchResponse} */ (answers.shift());
  });
  const call = http.presence(["bob", "carol"]);
  await settle();
  assert.equal(calls.length, 1);
  assert.equal(calls[0], "http://api.test/v1/presence?users=bob%2Ccarol");
  await clock.advance(500); // attempt 0: 0.5 × 1 s
  assert.equal(calls.length, 2);
  await clock.advance(2999); // attempt 1 would be 1 s; the server said 3 s
  assert.equal(calls.length, 2);
  await clock.advance(1);
  assert.deepEqual(await call, []);
});

test("a final answer throws HttpError with the server's code, not retried", async () => {
  let calls = 0;
  const { http } = api(async () => {
    calls += 1;
    return response({ status: 403, body: { error: "forbidden", message: "mallory hides her presence" } });
  });
  await assert.rejects(
    http.presence(["mallory"]),
    (e) => e instanceof HttpError && e.code === "forbidden" && e.status === 403,
  );
  assert.equal(calls, 1);
});

test("a 401 is tried once more with a fresh token from the token function", async () => {
  /** @type {string[]} */
  const auth = [];
  let n = 0;
  const tokens = { current: async () => `t${n}`, refresh: async () => `t${++n}` };
  const { http } = api(
    async (_url, init) => {
      auth.push(init?.headers?.["Authorization"] ?? "");
      return auth.length === 1
        ? response({ status: 401, body: { error: "unauthorized", message: "expired" } })
        : response({ status: 204 });
    },
    { tokens },
  );
  await http.unregisterPushToken("phone");
  assert.deepEqual(auth, ["Bearer t0", "Bearer t1"]);
});

test("each attempt is bounded by the timeout; closing stops at once", async () => {
  /** @type {(() => void)[]} */
  const hanging = [];
  const { http, clock, stop } = api(
    (_url, init) =>
      new Promise((_resolve, reject) => {
        init?.signal?.addEventListener("abort", () => reject(new Error("aborted")));
        hanging.push(() => undefined);
      }),
  );
  const call = http.group("g:01J9ZK3M4N5P6Q7R8S9T0VWXYZ");
  const failed = assert.rejects(call, (e) => e instanceof ClientClosed);
  await clock.advance(1000); // the first attempt times out
  await clock.advance(500); // the backoff
  assert.equal(hanging.length, 2);
  stop.abort();
  await failed;
});

test("history pages fall back to 100 where the server caps them lower", async () => {
  /** @type {string[]} */
  const urls = [];
  const { http } = api(async (url) => {
    urls.push(url);
    return urls.length === 1
      ? response({ status: 400, body: { error: "bad_request", message: "limit" } })
      : response({ status: 200, body: { messages: [], more: false, last_seq: 0 } });
  });
  await http.messagesAfter("dm:alice:bob", 3);
  assert.deepEqual(urls, [
    "http://api.test/v1/conversations/dm:alice:bob/messages?after=3&limit=500",
    "http://api.test/v1/conversations/dm:alice:bob/messages?after=3&limit=100",
  ]);
});

test("groups and push tokens: the calls of section 7", async () => {
  /** @type {[string, string, unknown][]} */
  const calls = [];
  const group = {
    conv: "g:01J9ZK3M4N5P6Q7R8S9T0VWXYZ",
    name: "team",
    kind: "group",
    creator: "alice",
    created_at: 5,
    members: [{ user: "alice", role: "admin", joined_seq: 1 }],
  };
  const { http } = api(async (url, init) => {
    calls.push([
      init?.method ?? "GET",
      url.replace("http://api.test", ""),
      init?.body === undefined ? null : JSON.parse(String(init.body)),
    ]);
    return response(
      init?.method === "PUT"
        ? { status: 200, body: { device: "phone" } }
        : { status: init?.method === "POST" ? 201 : 200, body: group },
    );
  });
  assert.deepEqual(await http.createGroup("team", ["bob"]), group);
  await http.addMembers(group.conv, ["carol"]);
  await http.removeMember(group.conv, "bob@x");
  await http.registerPushToken("phone", { platform: "fcm", token: "abc" });
  assert.deepEqual(calls, [
    ["POST", "/v1/groups", { name: "team", members: ["bob"], kind: "group" }],
    ["POST", `/v1/groups/${group.conv}/members`, { members: ["carol"] }],
    ["DELETE", `/v1/groups/${group.conv}/members/bob@x`, null],
    ["PUT", "/v1/devices/phone/push", { platform: "fcm", token: "abc", sandbox: false }],
  ]);
  assert.equal(pathSegment("a b/c:d@e"), "a%20b%2Fc:d@e");
});

test("the bearer token goes only to the base URL's origin", async () => {
  /** @type {Record<string, string | undefined>} */
  const auth = {};
  /** @type {(string | undefined)[]} */
  const sent = [];
  const { http } = api(async (url, init = {}) => {
    auth[url] = /** @type {Record<string, string>} */ (init.headers ?? {}).Authorization;
    sent.push(auth[url]);
    return response({ status: 204 });
  });
  const urls = {
    "/v1/media/m1": "Bearer t0ken",
    "http://api.test/v1/media/m1": "Bearer t0ken",
    "http://API.test:80/v1/media/m1": "Bearer t0ken",
    "https://api.test/v1/media/m1": undefined, // another scheme
    "http://api.test:8080/v1/media/m1": undefined, // another port
    "http://files.test/v1/media/m1": undefined, // a tus Location on another host
    "http://api.test.files.test/v1/media/m1": undefined,
    "http://api.test@files.test/v1/media/m1": undefined,
  };
  for (const url of Object.keys(urls)) await http.fetchOnce("HEAD", url, { headers: { "Tus-Resumable": "1.0.0" } });
  assert.deepEqual(sent, Object.values(urls));
  const secure = api(async (url, init = {}) => {
    auth[url] = /** @type {Record<string, string>} */ (init.headers ?? {}).Authorization;
    return response({ status: 204 });
  }, { baseUrl: "https://api.test" }).http;
  await secure.fetchOnce("HEAD", "http://api.test/v1/media/m2"); // a downgrade to http
  await secure.fetchOnce("HEAD", "https://api.test:443/v1/media/m2");
  assert.equal(auth["http://api.test/v1/media/m2"], undefined);
  assert.equal(auth["https://api.test:443/v1/media/m2"], "Bearer t0ken");
});
