"""The presence registry shared by several processes through Redis.

Same contract as ``MemoryPresence`` (see ``storage.presence``), across every process that shares
one Redis and one ``prefix``. Every change that decides a transition runs in one Lua script, so
of several processes racing on the same user exactly one makes the transition; the script
PUBLISHes it, and every process (the one that made it included) hears it on the pub/sub channel
and hands it to its listeners.

Keys (``P`` = prefix, ``mqchat:`` by default)::

    P node:{node}       "1", PX ttl: this process is alive (refreshed every ttl/3)
    P nodes             set of node ids that registered (alive or awaiting reaping)
    P nodedev:{node}    set of "len(user):{user}{device}": devices connected through that node
    P dev:{user}        hash device -> "{node}|{conn}"
    P state:{user}      hash state ("online"|"offline"), last_seen (ms), left_at (ms, grace window)
    P due               zset user -> deadline (ms): last device gone, offline unless back by then
    P presence          pub/sub channel: {"user", "state", "last_seen"} per transition
    P relay:{node}      pub/sub channel: events relayed to that process, a JSON list of
                        [topic, qos, "t", text] (or [topic, qos, "b", base64] for a binary payload);
                        or {"takeover": [user, device, conn]}: that device of this process's
                        connection conn has connected through another process

Liveness: a process that stops refreshing ``node:{node}`` (killed, frozen, cut off) is dead once
the key expires; any process's sweep then removes that node's devices (those still naming it)
in bounded atomic batches, and users left without a device go offline at once (the TTL was
their grace window). A process that comes back after its key expired re-registers the devices
it still holds, unless they have connected elsewhere since.

A graceful ``aclose`` stops the workers (heartbeat, listener, sweep), then removes this
process's devices as disconnects would (offline after the grace window, turned by the sweep of
any process still running) and retires the node.

Relaying: ``relay`` queues events (without waiting); a worker looks up, in one round trip, which
processes hold the devices of each event's user (``dev:{user}``; every node in ``nodes`` for an
event for no user), and PUBLISHes one message per process in another. Each process subscribes to
its own ``relay:{node}`` on the presence subscription and hands what it hears, in order, to its
``relay_to`` callback. Either queue full, or Redis away: events are dropped and counted
(``mqchat_relay_dropped_total``); devices catch up from the store.

Limits: pub/sub delivers at most once; a transition published while a process is reconnecting
to Redis is not heard by that process (logged). Scripts touch keys derived from their
arguments, so this needs a standalone Redis (or a primary with replicas), not Redis Cluster.
Deadlines and ``last_seen`` use each process's wall clock.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from mqchat.clock import SYSTEM_CLOCK, Clock
from storage.presence import OFFLINE, ONLINE, Deliver, Event, Presence, PresenceRegistry, Routed

logger = logging.getLogger(__name__)

BATCH = 256  # users or devices handled by one script call
MAX_BATCHES = 4  # script calls per kind of work per sweep
KEEPALIVE_S = 10.0  # ping the subscription after this long without a message
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
RELAY_QUEUE = 10_000  # relay batches waiting to be sent, or heard and waiting to be delivered
RELAY_ROUND = 64  # batches sent together: one lookup and one publish round trip

RELAYED = Counter("mqchat_relay_events_total", "Events relayed between processes", ["direction"])
RELAY_DROPPED = Counter(
    "mqchat_relay_dropped_total",
    "Relayed events dropped (devices catch up from the store)",
    ["reason"],
)

# Shared by every script. Device members are "len(user):{user}{device}" (length in bytes), so
# neither name needs escaping. Payloads are built by hand so that last_seen stays an exact integer.
_LIB = """
local function split_member(m)
  local sep = string.find(m, ':', 1, true)
  local n = tonumber(string.sub(m, 1, sep - 1))
  return string.sub(m, sep + 1, sep + n), string.sub(m, sep + n + 1)
end
local function publish(channel, user, state, last_seen)
  redis.call('PUBLISH', channel,
    '{"user":' .. cjson.encode(user) .. ',"state":"' .. state .. '","last_seen":' .. last_seen .. '}')
end
-- Remove a node's device member m if its connection still names that node (tag "node|");
-- returns the user when that was their last device, else nil.
local function release(prefix, tag, m)
  local user, device = split_member(m)
  local dev_key = prefix .. 'dev:' .. user
  local current = redis.call('HGET', dev_key, device)
  if current and string.sub(current, 1, #tag) == tag then
    redis.call('HDEL', dev_key, device)
    if redis.call('HLEN', dev_key) == 0 then
      return user
    end
  end
  return nil
end
local function go_offline(prefix, channel, user, last_seen)
  local state_key = prefix .. 'state:' .. user
  redis.call('ZREM', prefix .. 'due', user)
  redis.call('HDEL', state_key, 'left_at')
  if redis.call('HGET', state_key, 'state') == 'online' then
    redis.call('HSET', state_key, 'state', 'offline', 'last_seen', last_seen)
    publish(channel, user, 'offline', last_seen)
    return 1
  end
  return 0
end
"""

# KEYS: dev:{user}, state:{user}, due, nodedev:{node}
# ARGV: user, device, "node|conn", now ms, channel, member, only if absent ("1": re-registering),
#       "node|", relay channel prefix
# A device that was connected through another process (a takeover): that process hears of it on
# its relay channel, {"takeover": [user, device, its connection]}, and ends the stale session.
_CONNECT = (
    _LIB
    + """
local current = redis.call('HGET', KEYS[1], ARGV[2])
if ARGV[7] == '1' then
  if current and current ~= ARGV[3] then
    return -1
  end
elseif current and current ~= ARGV[3] and string.sub(current, 1, #ARGV[8]) ~= ARGV[8] then
  local bar = string.find(current, '|', 1, true)
  if bar then
    redis.call('PUBLISH', ARGV[9] .. string.sub(current, 1, bar - 1),
      '{"takeover":' .. cjson.encode({ARGV[1], ARGV[2], string.sub(current, bar + 1)}) .. '}')
  end
end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[4], ARGV[6])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HGET', KEYS[2], 'state') ~= 'online' then
  redis.call('HSET', KEYS[2], 'state', 'online', 'last_seen', ARGV[4])
  redis.call('HDEL', KEYS[2], 'left_at')
  publish(ARGV[5], ARGV[1], 'online', ARGV[4])
  return 1
end
return 0
"""
)

# KEYS: dev:{user}, state:{user}, due, nodedev:{node}
# ARGV: user, device, "node|conn", deadline ms, now ms, member, "node|"
_DISCONNECT = """
local current = redis.call('HGET', KEYS[1], ARGV[2])
if current ~= ARGV[3] then
  if (not current) or string.sub(current, 1, #ARGV[7]) ~= ARGV[7] then
    redis.call('SREM', KEYS[4], ARGV[6])
  end
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[2])
redis.call('SREM', KEYS[4], ARGV[6])
if redis.call('HLEN', KEYS[1]) == 0 then
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  redis.call('HSET', KEYS[2], 'left_at', ARGV[5])
  return 1
end
return 0
"""

# KEYS: due. ARGV: prefix, now ms, batch, channel. Returns how many due users it took.
_SWEEP_DUE = (
    _LIB
    + """
local users = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, user in ipairs(users) do
  redis.call('ZREM', KEYS[1], user)
  if redis.call('EXISTS', ARGV[1] .. 'dev:' .. user) == 0 then
    local left_at = redis.call('HGET', ARGV[1] .. 'state:' .. user, 'left_at') or ARGV[2]
    go_offline(ARGV[1], ARGV[4], user, left_at)
  end
end
return #users
"""
)

# KEYS: nodes. ARGV: prefix, node, now ms, batch, channel. Returns -2: already retired (by
# another process); -1: the node is alive; 0: this call retired it; 1: more devices to reap.
_REAP = (
    _LIB
    + """
if redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 0 then
  return -2
end
if redis.call('EXISTS', ARGV[1] .. 'node:' .. ARGV[2]) == 1 then
  return -1
end
local set = ARGV[1] .. 'nodedev:' .. ARGV[2]
local tag = ARGV[2] .. '|'
for _, m in ipairs(redis.call('SPOP', set, tonumber(ARGV[4]))) do
  local user = release(ARGV[1], tag, m)
  if user then
    go_offline(ARGV[1], ARGV[5], user, ARGV[3])
  end
end
if redis.call('SCARD', set) == 0 then
  redis.call('SREM', KEYS[1], ARGV[2])
  return 0
end
return 1
"""
)

# KEYS: nodedev:{node}, due. ARGV: prefix, node, now ms, deadline ms, batch. Returns devices left.
_DRAIN = (
    _LIB
    + """
local tag = ARGV[2] .. '|'
for _, m in ipairs(redis.call('SPOP', KEYS[1], tonumber(ARGV[5]))) do
  local user = release(ARGV[1], tag, m)
  if user then
    redis.call('ZADD', KEYS[2], ARGV[4], user)
    redis.call('HSET', ARGV[1] .. 'state:' .. user, 'left_at', ARGV[3])
  end
end
return redis.call('SCARD', KEYS[1])
"""
)

# KEYS: dev:{user}. ARGV: prefix. The devices whose node is alive.
_DEVICES = """
local alive = {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local value = flat[i + 1]
  local bar = string.find(value, '|', 1, true)
  if bar and redis.call('EXISTS', ARGV[1] .. 'node:' .. string.sub(value, 1, bar - 1)) == 1 then
    table.insert(alive, flat[i])
  end
end
return alive
"""

# KEYS: node:{node}, nodes. ARGV: node, ttl ms. Returns 1 if the liveness key was still there.
_HEARTBEAT = """
local existed = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], '1', 'PX', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return existed
"""


def redis_target(url: str) -> str:
    """host:port (or the socket path) of a Redis URL, without credentials: safe to log."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return f"unix:{parts.path}"
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:
        return "<unparsable Redis URL>"


async def _close_quietly(pubsub: PubSub) -> None:
    with contextlib.suppress(Exception):
        await pubsub.aclose()


def _member(user: str, device: str) -> str:
    return f"{len(user.encode())}:{user}{device}"


class RedisPresence(PresenceRegistry):
    """The registry of several processes sharing one Redis (one instance per process)."""

    def __init__(
        self,
        url: str,
        *,
        node: str | None = None,
        grace_s: float = 5.0,
        sweep_interval_s: float = 0.25,
        ttl_s: float = 15.0,
        prefix: str = "mqchat:",
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__(grace_s=grace_s, sweep_interval_s=sweep_interval_s, clock=clock)
        self.node = node or secrets.token_hex(8)
        if "|" in self.node:
            raise ValueError("a presence node id cannot contain '|'")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.target = redis_target(url)
        # Every script is safe to run again after a failure that hides whether it ran, so commands
        # are retried: a pooled connection that went stale (Redis restarted, failed over) is
        # replaced instead of failing the call.
        self._redis = Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=5.0,
            socket_timeout=10.0,
            retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.01), 3),
        )
        self._pubsub: PubSub | None = None
        self._retire_at_close = False  # set once registered; abandon() clears it
        # Devices connected through this process (user, device) -> conn: re-registered if this
        # node was declared dead while it was in fact still running.
        self._local: dict[tuple[str, str], str] = {}
        self._channel = f"{prefix}presence"
        self._relay_channel = f"{prefix}relay:{self.node}"
        self._deliver: Deliver | None = None
        self._outbox: asyncio.Queue[Sequence[Routed]] = asyncio.Queue(RELAY_QUEUE)
        self._inbox: asyncio.Queue[list[Event]] = asyncio.Queue(RELAY_QUEUE)
        self._k_nodes = f"{prefix}nodes"
        self._k_due = f"{prefix}due"
        self._k_alive = f"{prefix}node:{self.node}"
        self._k_nodedev = f"{prefix}nodedev:{self.node}"
        self._tag = f"{self.node}|"
        self._connect = self._redis.register_script(_CONNECT)
        self._disconnect = self._redis.register_script(_DISCONNECT)
        self._sweep_due = self._redis.register_script(_SWEEP_DUE)
        self._reap = self._redis.register_script(_REAP)
        self._drain = self._redis.register_script(_DRAIN)
        self._devices = self._redis.register_script(_DEVICES)
        self._heartbeat_script = self._redis.register_script(_HEARTBEAT)

    # --- the contract ---------------------------------------------------------------------------

    async def connected(self, user: str, device: str, conn: str) -> None:
        self._local[(user, device)] = conn
        await self._register(user, device, conn, only_if_absent=False)

    async def disconnected(self, user: str, device: str, conn: str) -> None:
        if self._local.get((user, device)) == conn:
            del self._local[(user, device)]
        now = self.clock.time_ms()
        await self._disconnect(
            keys=[self._k_dev(user), self._k_state(user), self._k_due, self._k_nodedev],
            args=[
                user,
                device,
                self._value(conn),
                now + round(self.grace_s * 1000),
                now,
                _member(user, device),
                self._tag,
            ],
        )

    async def forget(self, user: str) -> None:
        for held in [key for key in self._local if key[0] == user]:
            del self._local[held]
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._k_dev(user), self._k_state(user))
            pipe.zrem(self._k_due, user)
            await pipe.execute()

    async def lookup(self, users: Iterable[str]) -> dict[str, Presence]:
        wanted = list(dict.fromkeys(users))
        if not wanted:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for user in wanted:
                pipe.hmget(self._k_state(user), ["state", "last_seen"])
            rows: list[list[str | None]] = await pipe.execute()
        found: dict[str, Presence] = {}
        for user, (state, last_seen) in zip(wanted, rows, strict=True):
            if state is None:
                found[user] = Presence(user, OFFLINE, None)
            else:
                found[user] = Presence(user, state, int(last_seen) if last_seen is not None else None)
        return found

    async def devices(self, user: str) -> frozenset[str]:
        alive: list[str] = await self._devices(keys=[self._k_dev(user)], args=[self.prefix])
        return frozenset(alive)

    async def sweep(self) -> None:
        now = self.clock.time_ms()
        for _ in range(MAX_BATCHES):
            taken: int = await self._sweep_due(keys=[self._k_due], args=[self.prefix, now, BATCH, self._channel])
            if taken < BATCH:
                break
        nodes = sorted(n for n in await self._redis.smembers(self._k_nodes) if isinstance(n, str) and n != self.node)
        if not nodes:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for node in nodes:
                pipe.exists(f"{self.prefix}node:{node}")
            alive: list[int] = await pipe.execute()
        for node, is_alive in zip(nodes, alive, strict=True):
            if is_alive:
                continue
            for _ in range(MAX_BATCHES):
                outcome: int = await self._reap(
                    keys=[self._k_nodes], args=[self.prefix, node, now, BATCH, self._channel]
                )
                if outcome != 1:
                    break
            if outcome == 0:
                logger.warning("presence: node %s stopped refreshing its liveness key; its devices were removed", node)

    # --- lifecycle ------------------------------------------------------------------------------

    async def _start(self) -> None:
        """Register this node and subscribe before returning (so no later transition is missed);
        raises if Redis cannot be reached."""
        # Devices left under this node id by an earlier run (a fixed node id reused after a
        # crash) leave as if disconnected: offline after the grace window unless they return.
        await self._drain_devices()
        await self._heartbeat()
        self._pubsub = await self._subscribe()
        self._retire_at_close = True
        self.start_worker(self._heartbeat_loop(), name="presence-heartbeat")
        self.start_worker(self._listen_loop(), name="presence-listen")
        self.start_worker(self._relay_send_loop(), name="relay-send")
        self.start_worker(self._relay_deliver_loop(), name="relay-deliver")
        await super()._start()

    async def _stopped(self) -> None:
        """After the workers: this node's devices go offline after the grace window, as if they
        disconnected (unless abandoned), and the node retires."""
        try:
            if self._retire_at_close:
                await self._retire()
        finally:
            self._local.clear()
            await self._close_connections()

    async def abandon(self) -> None:
        """Stop heartbeats and listening without cleaning up, as a killed process would: this
        node's devices stay registered until its liveness key expires, then any other process's
        sweep turns them offline."""
        self._retire_at_close = False
        await self.aclose()

    async def _retire(self) -> None:
        try:
            await self._drain_devices()
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(self._k_alive)
                pipe.srem(self._k_nodes, self.node)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            logger.warning(
                "presence: could not retire node %s at Redis %s (%s: %s); its devices go offline once its TTL ends",
                self.node,
                self.target,
                type(exc).__name__,
                exc,
            )

    async def _drain_devices(self) -> None:
        """Remove this node's devices as disconnects would (users left without one are due)."""
        now = self.clock.time_ms()
        deadline = now + round(self.grace_s * 1000)
        while await self._drain(
            keys=[self._k_nodedev, self._k_due], args=[self.prefix, self.node, now, deadline, BATCH]
        ):
            pass

    async def _close_connections(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await _close_quietly(pubsub)
        with contextlib.suppress(Exception):
            await self._redis.aclose()

    # --- liveness -------------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        existed: int = await self._heartbeat_script(
            keys=[self._k_alive, self._k_nodes], args=[self.node, max(1, round(self.ttl_s * 1000))]
        )
        if existed or not self._local:
            return
        logger.warning(
            "presence: node %s had been declared dead; re-registering its %d devices", self.node, len(self._local)
        )
        for (user, device), conn in list(self._local.items()):
            if self._local.get((user, device)) == conn:
                await self._register(user, device, conn, only_if_absent=True)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.clock.sleep(self.ttl_s / 3)
            try:
                await self._heartbeat()
            except Exception as exc:
                logger.warning(
                    "presence: heartbeat of node %s to Redis %s failed (%s: %s); retrying",
                    self.node,
                    self.target,
                    type(exc).__name__,
                    exc,
                )

    # --- hearing transitions --------------------------------------------------------------------

    async def _subscribe(self) -> PubSub:
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel, self._relay_channel)
            # SUBSCRIBE only counts once Redis confirms it: until then a PUBLISH could pass us by.
            confirmed = 0
            async with asyncio.timeout(10.0):
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "subscribe":
                        confirmed += 1
                        if confirmed == 2:
                            return pubsub
        except BaseException:
            await _close_quietly(pubsub)
            raise

    async def _listen_loop(self) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            try:
                if self._pubsub is None:
                    self._pubsub = await self._subscribe()
                    logger.warning(
                        "presence: subscribed again at Redis %s; transitions made meanwhile were not heard",
                        self.target,
                    )
                backoff = BACKOFF_MIN_S
                await self._pump(self._pubsub)
            except Exception as exc:
                logger.warning(
                    "presence: subscription at Redis %s failed (%s: %s); retrying in %.1fs",
                    self.target,
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                pubsub, self._pubsub = self._pubsub, None
                if pubsub is not None:
                    await _close_quietly(pubsub)
                await self.clock.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _pump(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged: float | None = None
        while True:
            message = await pubsub.get_message(timeout=1.0)
            now = loop.time()
            if message is not None:
                heard, pinged = now, None
                if message["type"] == "message":
                    if message["channel"] == self._relay_channel:
                        self._hear_relayed(message["data"])
                    else:
                        self._hear(message["data"])
                elif message["type"] == "subscribe":
                    logger.warning(
                        "presence: subscribed again at Redis %s; transitions made meanwhile were not heard",
                        self.target,
                    )
            elif pinged is not None and now - pinged > KEEPALIVE_S:
                raise ConnectionError("no answer to a ping on the presence subscription")
            elif pinged is None and now - heard > KEEPALIVE_S:
                # Any reply proves the connection alive (the client reports a subscriber's PONG
                # as a message of an odd type, which is ignored above).
                await pubsub.ping()
                pinged = now

    def _hear(self, data: Any) -> None:
        try:
            decoded = json.loads(data)
            user, state, last_seen = decoded["user"], decoded["state"], decoded["last_seen"]
            if not isinstance(user, str) or state not in (ONLINE, OFFLINE) or not isinstance(last_seen, int):
                raise ValueError("unexpected fields")
        except (ValueError, TypeError, KeyError):
            logger.warning("presence: ignored a malformed message on %s", self._channel)
            return
        self._emit(Presence(user, state, last_seen))

    # --- relaying events between processes -------------------------------------------------------

    def relay_to(self, deliver: Deliver | None) -> None:
        self._deliver = deliver

    def relay(self, events: Sequence[Routed]) -> None:
        if not events:
            return
        _enqueue(self._outbox, events, full="send_queue_full")

    async def _relay_send_loop(self) -> None:
        while True:
            events = list(await self._outbox.get())
            for _ in range(RELAY_ROUND - 1):  # what queued meanwhile goes in the same round trips
                if self._outbox.empty():
                    break
                events.extend(self._outbox.get_nowait())
            try:
                await self._send_relayed(events)
            except Exception as exc:  # Redis away: these events are lost to the relay, not to the store
                RELAY_DROPPED.labels(reason="redis").inc(len(events))
                logger.warning(
                    "relay: could not relay %d events through Redis %s (%s: %s); devices catch up from the store",
                    len(events),
                    self.target,
                    type(exc).__name__,
                    exc,
                )

    async def _send_relayed(self, events: Sequence[Routed]) -> None:
        users = list(dict.fromkeys(user for user, _ in events if user is not None))
        everywhere = any(user is None for user, _ in events)
        async with self._redis.pipeline(transaction=False) as pipe:
            for user in users:
                pipe.hvals(self._k_dev(user))
            if everywhere:
                pipe.smembers(self._k_nodes)
            found: list[Any] = await pipe.execute()
        holders = {
            user: {v.partition("|")[0] for v in values} for user, values in zip(users, found[: len(users)], strict=True)
        }
        all_nodes: set[str] = set(found[-1]) if everywhere else set()
        batches: dict[str, list[list[Any]]] = {}
        for owner, (topic, payload, qos) in events:
            encoded = _encode_event(topic, payload, qos)
            for node in holders[owner] if owner is not None else all_nodes:
                if node != self.node:
                    batches.setdefault(node, []).append(encoded)
        if not batches:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for node, batch in batches.items():
                pipe.publish(f"{self.prefix}relay:{node}", json.dumps(batch, separators=(",", ":")))
            heard: list[int] = await pipe.execute()
        for batch, listeners in zip(batches.values(), heard, strict=True):
            if listeners:
                RELAYED.labels(direction="sent").inc(len(batch))
            else:  # a node that died (its registrations not yet reaped) or restarted under a new id
                RELAY_DROPPED.labels(reason="no_listener").inc(len(batch))

    def _hear_relayed(self, data: Any) -> None:
        try:
            decoded = json.loads(data)
            if isinstance(decoded, dict):
                user, device, conn = decoded["takeover"]
                if not all(isinstance(x, str) for x in (user, device, conn)):
                    raise ValueError("unexpected fields")
                self._taken_over(user, device, conn)
                return
            events = [_decode_event(item) for item in decoded]
        except (ValueError, TypeError, KeyError, IndexError):
            logger.warning("relay: ignored a malformed message on %s", self._relay_channel)
            return
        _enqueue(self._inbox, events, full="deliver_queue_full")

    async def _relay_deliver_loop(self) -> None:
        while True:
            events = await self._inbox.get()
            deliver = self._deliver
            if deliver is None:
                RELAY_DROPPED.labels(reason="no_receiver").inc(len(events))
                continue
            for event in events:
                try:
                    await deliver(event)
                except Exception:  # one event's failure is its own
                    RELAY_DROPPED.labels(reason="deliver_failed").inc()
                    logger.exception("relay: delivering a relayed event on %s failed", event[0])
                else:
                    RELAYED.labels(direction="delivered").inc()

    # --- helpers --------------------------------------------------------------------------------

    async def _register(self, user: str, device: str, conn: str, *, only_if_absent: bool) -> None:
        await self._connect(
            keys=[self._k_dev(user), self._k_state(user), self._k_due, self._k_nodedev],
            args=[
                user,
                device,
                self._value(conn),
                self.clock.time_ms(),
                self._channel,
                _member(user, device),
                "1" if only_if_absent else "0",
                self._tag,
                f"{self.prefix}relay:",
            ],
        )

    def _value(self, conn: str) -> str:
        return f"{self.node}|{conn}"

    def _k_dev(self, user: str) -> str:
        return f"{self.prefix}dev:{user}"

    def _k_state(self, user: str) -> str:
        return f"{self.prefix}state:{user}"


def _enqueue(queue: asyncio.Queue[Any], events: Sequence[Any], *, full: str) -> None:
    """events onto one of the relay's queues; when it is full they are dropped, and counted."""
    try:
        queue.put_nowait(events)
    except asyncio.QueueFull:
        RELAY_DROPPED.labels(reason=full).inc(len(events))


def _encode_event(topic: str, payload: bytes, qos: int) -> list[Any]:
    try:
        return [topic, qos, "t", payload.decode("utf-8")]
    except UnicodeDecodeError:
        return [topic, qos, "b", base64.b64encode(payload).decode("ascii")]


def _decode_event(item: list[Any]) -> Event:
    topic, qos, kind, data = item
    if not isinstance(topic, str) or qos not in (0, 1) or not isinstance(data, str):
        raise ValueError("not a relayed event")
    if kind == "t":
        return topic, data.encode("utf-8"), qos
    if kind == "b":
        return topic, base64.b64decode(data, validate=True), qos
    raise ValueError(f"unknown payload kind {kind!r}")
