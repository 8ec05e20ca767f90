"""The SDK as a mobile client: catch-up over HTTP, per-conversation order, a persisted outbox,
automatic ``recv`` and ``mark_read``.

Most tests run against the real wiring (the ``stack`` fixture: broker + bridge + SQLite store).
Gap repair needs a message missing from the live stream, which the ACL does not let a test forge,
so that test runs against a plain broker with a fake HTTP API (``httpx.MockTransport``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest

from clients import ChatClient, HistoryFailed, Message, OrderingBuffer, OtherEvent, SqliteOutbox, SqliteState
from mqchat.ids import dm_conv
from mqchat.protocol import encode, msg_envelope, user_in_topic
from tests.conftest import Stack
from tests.helpers import unique
from tests.test_clients import free_port, running_broker

HOST = "127.0.0.1"
WAIT = 10.0  # upper bound of any single wait


def client_for(stack: Stack, user: str, device: str, *, state_path: Path | None = None, **options: Any) -> ChatClient:
    return ChatClient(
        host=HOST,
        port=options.pop("port", stack.mqtt_port),
        user=user,
        device=device,
        token=stack.token(user, device),
        http_url=f"http://{HOST}:{stack.http_port}",
        state_path=state_path,
        **options,
    )


async def take_messages(client: ChatClient, count: int, *, within: float = WAIT) -> list[Message]:
    """The next ``count`` Messages of the client's event stream (other events are skipped)."""
    got: list[Message] = []
    async with asyncio.timeout(within):
        async for event in client.events():
            if isinstance(event, Message):
                got.append(event)
                if len(got) == count:
                    return got
    raise AssertionError(f"the event stream ended after {len(got)} messages")


async def assert_no_message(client: ChatClient, *, within: float = 0.5) -> None:
    with pytest.raises(TimeoutError):
        await take_messages(client, 1, within=within)


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def send_all(client: ChatClient, conv: str, bodies: list[str]) -> None:
    ids = [await client.send(conv, body) for body in bodies]
    for msg_id in ids:
        await client.wait_acked(msg_id, timeout=WAIT)


class CuttableProxy:
    """A TCP forwarder to the broker that can be cut, like a phone losing its network."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> CuttableProxy:
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cut()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self._target)
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in self._writers:
            writer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the handlers see the abort and finish


# --- against the real server -------------------------------------------------------------------


async def test_offline_device_catches_up_in_order_exactly_once(stack: Stack, tmp_path: Path) -> None:
    alice, bob = unique("alice"), unique("bob")
    alice_dev, bob_dev = unique("a-phone"), unique("b-phone")
    conv = dm_conv(alice, bob)
    state = tmp_path / "bob.sqlite"
    # Bob's phone was set up once (a persistent session that the broker may queue for), then went offline.
    async with client_for(stack, bob, bob_dev, state_path=state):
        pass
    async with client_for(stack, alice, alice_dev) as a:
        await send_all(a, conv, [f"m{i}" for i in range(1, 31)])

        async with client_for(stack, bob, bob_dev, state_path=state) as b:
            got = await take_messages(b, 30)
            assert [m.seq for m in got] == list(range(1, 31))
            assert [m.body for m in got] == [f"m{i}" for i in range(1, 31)]
            await b.wait_synced(WAIT)
            await assert_no_message(b)  # the broker's queue and the HTTP catch-up overlap: no repeats
            stats = b.statistics()
            assert stats.delivered_in_order == 30
            assert stats.received == 30
            assert stats.sync_requests >= 1

            async def delivered_is_30() -> bool:  # auto recv raised the server's watermark
                state_now = await stack.store.conversation_state(conv=conv, user=bob)
                return state_now is not None and state_now.delivered == 30

            await eventually(delivered_is_30)

        saved = SqliteState(state, user=bob)
        try:
            assert saved.delivered() == {conv: 30}
            assert saved.cursor() is not None  # everything it covers reached the app
        finally:
            saved.close()

        # A restart of the app: nothing is repeated, the next message comes once.
        async with client_for(stack, bob, bob_dev, state_path=state) as b2:
            await send_all(a, conv, ["m31"])
            [next_msg] = await take_messages(b2, 1)
            assert (next_msg.seq, next_msg.body) == (31, "m31")
            await b2.wait_synced(WAIT)
            await assert_no_message(b2)


async def test_a_member_added_late_gets_messages_from_the_join_on(stack: Stack, tmp_path: Path) -> None:
    """History starts at the join point: the first page of a late joiner starts above seq 1, and
    the range before it is not a gap to wait on (nor to fetch again every grace period)."""
    owner, late = unique("owner"), unique("late")
    async with stack.http(owner) as http:
        conv = (await http.post("/v1/groups", json={"name": "late", "members": []})).json()["conv"]
    async with (
        client_for(stack, owner, unique("o-phone")) as o,
        client_for(stack, late, unique("l-phone"), state_path=tmp_path / "late.sqlite", gap_grace_s=0.2) as c,
    ):
        await c.wait_synced(WAIT)
        await send_all(o, conv, ["before 1", "before 2", "before 3"])
        async with stack.http(owner) as http:
            r = await http.post(f"/v1/groups/{conv}/members", json={"members": [late]})
        joined = next(m["joined_seq"] for m in r.json()["members"] if m["user"] == late)
        assert joined > 1
        await send_all(o, conv, ["after 1", "after 2", "after 3"])
        got = await take_messages(c, 3)
        assert [(m.seq, m.body) for m in got] == [(joined + i, f"after {i + 1}") for i in range(3)]
        fetches = c.statistics().gap_fetches
        await asyncio.sleep(1.0)  # five grace periods: nothing is waited for, nothing fetched again
        assert c.statistics().gap_fetches == fetches
        assert c._ordering is not None
        assert c._ordering.held() == 0
    # A restart syncs from the start: the included messages begin at the join point too.
    async with client_for(stack, late, unique("l-tablet"), gap_grace_s=0.2) as c2:
        got = await take_messages(c2, 3)
        assert [m.seq for m in got] == [joined, joined + 1, joined + 2]
        await c2.wait_synced(WAIT)
        assert c2._ordering is not None
        assert c2._ordering.held() == 0


async def test_persisted_outbox_is_resent_by_the_next_client(stack: Stack, tmp_path: Path) -> None:
    alice, bob = unique("alice"), unique("bob")
    alice_dev = unique("a-phone")
    conv = dm_conv(alice, bob)
    state = tmp_path / "alice.sqlite"
    async with CuttableProxy(stack.mqtt_port) as proxy:
        a = client_for(stack, alice, alice_dev, state_path=state, port=proxy.port, rng=random.Random(3))
        async with a:
            await proxy.cut()  # the network goes away before anything is sent

            async def offline() -> bool:
                return not a.statistics().connected

            await eventually(offline)
            msg_id = await a.send(conv, "written on the underground")
            assert a.statistics().pending == 1
        # the app was closed with the message unacked: it waits in the file

    box = SqliteOutbox(state)
    try:
        assert [e.id for e in box.pending()] == [msg_id]
    finally:
        box.close()

    async with client_for(stack, alice, alice_dev, state_path=state) as again:
        ack = await again.wait_acked(msg_id, timeout=WAIT)
        assert (ack.id, ack.conv, ack.seq) == (msg_id, conv, 1)
        assert again.statistics().pending == 0
    box = SqliteOutbox(state)
    try:
        assert box.pending() == []
    finally:
        box.close()
    async with stack.http(bob) as http:
        page = (await http.get(f"/v1/conversations/{conv}/messages", params={"after": 0})).json()
    assert [(m["seq"], m["id"], m["body"]) for m in page["messages"]] == [(1, msg_id, "written on the underground")]


async def test_mark_read_updates_the_server_and_the_peer_gets_a_receipt(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with (
        client_for(stack, alice, unique("a-phone")) as a,
        client_for(stack, bob, unique("b-phone")) as b,
    ):
        await send_all(a, conv, ["one", "two", "three"])
        assert [m.seq for m in await take_messages(b, 3)] == [1, 2, 3]
        await b.mark_read(conv, 2)

        async def read_is_2() -> bool:
            state_now = await stack.store.conversation_state(conv=conv, user=bob)
            return state_now is not None and (state_now.delivered, state_now.read) == (3, 2)

        await eventually(read_is_2)
        async with asyncio.timeout(WAIT):
            async for event in a.events():
                is_receipt = isinstance(event, OtherEvent) and event.type == "receipt"
                if is_receipt and event.data.get("user") == bob and event.data.get("read") == 2:
                    assert event.data["conv"] == conv
                    assert event.data["delivered"] == 3
                    break
        with pytest.raises(ValueError, match="seq"):
            await b.mark_read(conv, -1)


# --- gap repair against a fake HTTP API ---------------------------------------------------------


class FakeHistory:
    """The HTTP API of one conversation at the protocol level, for httpx.MockTransport."""

    def __init__(self, conv: str, messages: list[dict[str, Any]]) -> None:
        self.conv = conv
        self.messages = messages
        self.requests: list[httpx.Request] = []
        self.fail_next = 0  # answer this many calls with 503 first

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        assert request.headers["authorization"] == "Bearer t"
        if self.fail_next:
            self.fail_next -= 1
            return httpx.Response(503, json={"error": "unavailable", "message": "try later"})
        if request.url.path == "/v1/conversations":
            if request.url.params.get("since") == "forged":
                return httpx.Response(400, json={"error": "bad_cursor", "message": "not ours"})
            return httpx.Response(200, json={"conversations": [], "cursor": "c1", "more": False})
        assert request.url.path == f"/v1/conversations/{self.conv}/messages"
        after = int(request.url.params["after"])
        page = [m for m in self.messages if m["seq"] > after]
        last = max((m["seq"] for m in self.messages), default=0)
        return httpx.Response(200, json={"conv": self.conv, "messages": page, "more": False, "last_seq": last})

    def paths(self) -> list[str]:
        return [r.url.path for r in self.requests]


def forged_msg(conv: str, sender: str, seq: int) -> dict[str, Any]:
    return msg_envelope(
        conv=conv,
        seq=seq,
        mid=f"M{seq:025d}",
        sender=sender,
        device="d",
        id=f"x{seq}",
        ts=seq,
        kind="text",
        body=f"b{seq}",
    )


@pytest.fixture
async def plain_broker() -> AsyncIterator[int]:
    port = free_port()
    async with running_broker(port):
        yield port


@pytest.mark.filterwarnings("ignore:`BrokerSysPlugin`:DeprecationWarning")
async def test_a_gap_is_held_back_then_fetched_over_http(plain_broker: int, tmp_path: Path) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    history = FakeHistory(conv, [forged_msg(conv, alice, seq) for seq in range(1, 6)])
    state = tmp_path / "bob.sqlite"
    seeded = SqliteState(state, user=bob)
    seeded.set_cursor("forged")  # a cursor the server does not know: dropped, synced without one
    seeded.close()
    history.fail_next = 1  # and the first call fails transiently: retried
    bob_client = ChatClient(
        host=HOST,
        port=plain_broker,
        user=bob,
        device=unique("b-phone"),
        token="t",
        http_url="http://history.test",
        http_transport=httpx.MockTransport(history),
        state_path=state,
        gap_grace_s=0.3,
        rng=random.Random(5),
    )
    async with bob_client as b, aiomqtt.Client(HOST, plain_broker, identifier=unique("server")) as server:
        await b.wait_synced(WAIT)
        syncs = [r for r in history.requests if r.url.path == "/v1/conversations"]
        assert [r.url.params.get("since") for r in syncs] == ["forged", "forged", None]
        assert b.statistics().sync_requests == 3

        async def publish(seq: int) -> None:
            await server.publish(user_in_topic(bob), encode(history.messages[seq - 1]), qos=1)

        for seq in (1, 2, 4, 5):  # 3 is lost on the wire
            await publish(seq)
        first = await take_messages(b, 2)
        assert [m.seq for m in first] == [1, 2]
        started = time.monotonic()
        rest = await take_messages(b, 3)
        assert [m.seq for m in rest] == [3, 4, 5]
        assert time.monotonic() - started >= 0.2  # held for the grace period, not fetched at once
        await publish(4)  # a late duplicate
        await assert_no_message(b, within=0.3)
        stats = b.statistics()
        assert (stats.gaps_detected, stats.gap_fetches, stats.delivered_in_order) == (1, 1, 5)
        assert stats.duplicates == 1
        assert history.paths().count(f"/v1/conversations/{conv}/messages") == 1

        # A gap that closes within the grace period costs no HTTP call.
        history.messages += [forged_msg(conv, alice, 6), forged_msg(conv, alice, 7)]
        await publish(7)
        await publish(6)
        assert [m.seq for m in await take_messages(b, 2)] == [6, 7]
        await asyncio.sleep(0.4)
        stats = b.statistics()
        assert (stats.gaps_detected, stats.gap_fetches) == (2, 1)

    saved = SqliteState(state, user=bob)
    try:
        assert saved.cursor() == "c1"
        assert saved.delivered() == {conv: 7}
    finally:
        saved.close()


def test_ordering_buffer_releases_in_seq_order() -> None:
    def msg(seq: int) -> Message:
        return Message(
            conv="dm:a:b", seq=seq, mid="M", sender="a", device="d", id=f"x{seq}", ts=0, kind="text", body=""
        )

    buffer = OrderingBuffer(grace=1.0, start={"dm:a:b": 2})
    assert buffer.offer(msg(2), now=0).duplicate
    opened = buffer.offer(msg(5), now=0)
    assert opened.gap_opened
    assert not opened.ready
    assert not buffer.offer(msg(4), now=0.5).gap_opened  # the same gap
    assert buffer.gaps_due(0.9) == []
    assert buffer.gaps_due(1.0) == ["dm:a:b"]
    assert [m.seq for m in buffer.offer(msg(3), now=1.0).ready] == [3, 4, 5]
    assert buffer.next_deadline() is None
    buffer.offer(msg(8), now=2.0)
    assert [m.seq for m in buffer.skip_gap("dm:a:b", now=3.0)] == [8]
    assert buffer.last("dm:a:b") == 8
    assert buffer.held() == 0


async def test_the_sdk_follows_channels_it_is_added_to_and_leaves_them(stack: Stack, tmp_path: Path) -> None:
    owner, reader = unique("owner"), unique("reader")
    async with stack.http(owner) as http:
        r = await http.post("/v1/groups", json={"name": "news", "members": [], "kind": "channel"})
        conv = r.json()["conv"]
    state = tmp_path / "reader.sqlite3"
    async with client_for(stack, reader, "r1", state_path=state) as client:
        await client.wait_synced(timeout=WAIT)
        async with stack.http(owner) as http:
            assert (await http.post(f"/v1/groups/{conv}/members", json={"members": [reader]})).status_code == 200
        async with client_for(stack, owner, "o1") as poster:
            await poster.wait_synced(timeout=WAIT)
            deadline = time.monotonic() + WAIT
            while True:  # the conv event makes the client subscribe; until then a post is not live
                await poster.send_and_wait(conv, "live post", timeout=WAIT)
                try:
                    got = await take_messages(client, 1, within=0.5)
                    break
                except (AssertionError, TimeoutError):
                    assert time.monotonic() < deadline, "the channel was never followed"
            assert got[0].conv == conv
    # A new client on the same state follows the channel from its first connect.
    async with client_for(stack, reader, "r1", state_path=state) as client:
        await client.wait_synced(timeout=WAIT)
        async with client_for(stack, owner, "o2") as poster:
            await poster.send_and_wait(conv, "after restart", timeout=WAIT)
        bodies = [m.body for m in await take_messages(client, 1)]
        assert bodies[-1] == "after restart"
        async with stack.http(owner) as http:
            assert (await http.delete(f"/v1/groups/{conv}/members/{reader}")).status_code == 200
        await asyncio.sleep(0.5)
        async with client_for(stack, owner, "o3") as poster:
            await poster.send_and_wait(conv, "not for you", timeout=WAIT)
        await assert_no_message(client, within=1.0)
    assert SqliteState(state, user=reader).channels() == set()


async def test_the_sdk_reads_presence_and_registers_push_tokens(stack: Stack) -> None:
    alice, bob, stranger = unique("alice"), unique("bob"), unique("stranger")
    async with stack.http(alice) as http:
        assert (await http.post("/v1/groups", json={"name": "g", "members": [bob]})).status_code == 201
    async with client_for(stack, alice, "a1") as a, client_for(stack, bob, "b1") as b:
        await a.wait_synced(timeout=WAIT)
        deadline = time.monotonic() + WAIT
        while not (found := await b.presence(alice))[alice].online:
            assert time.monotonic() < deadline, found
            await asyncio.sleep(0.05)
        assert found[alice].last_seen is not None
        with pytest.raises(HistoryFailed) as refused:
            await b.presence(stranger)
        assert refused.value.code == "forbidden"
        await b.register_push_token("fcm", "bob-fcm-token")
        await b.set_muted(dm_conv(alice, bob))
    async with stack.http(bob, "b1") as http:
        assert (await http.delete("/v1/devices/b1/push")).status_code == 204, "the SDK registered the token"
