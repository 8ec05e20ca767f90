"""The client SDK against a real amqtt broker and a protocol-level fake bridge.

The fake bridge speaks wire protocol v1 over MQTT with aiomqtt: it reads ``u/+/+/out``, answers a
send with an ``ack`` to the sending device and a ``msg`` to every member's ``u/{m}/in``, dedups on
(user, id) like the real store, and can drop the first N sends or deliver every msg twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import json
import random
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from broker.server import MqchatBroker as Broker
from clients import (
    Ack,
    AuthFailed,
    BlockingChatClient,
    ChatClient,
    ErrorReply,
    MemoryOutbox,
    Message,
    OtherEvent,
    PendingSend,
    SendFailed,
    backoff_delay,
    cli,
    parse_event,
)
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import dm_conv, new_mid
from mqchat.ports import free_port
from mqchat.protocol import (
    OUT_TOPIC_FILTER,
    SendRequest,
    ack_envelope,
    device_in_topic,
    encode,
    error_envelope,
    msg_envelope,
    parse_out_topic,
    parse_request,
    user_in_topic,
)

pytestmark = [
    # amqtt's plugin manager warns with a stacklevel that lands in whoever builds the Broker.
    pytest.mark.filterwarnings("ignore:`BrokerSysPlugin`:DeprecationWarning"),
    # amqtt 0.12 drains before closing a client's stream, so when a client hangs up right after
    # DISCONNECT (paho does) the drain fails and the broker-side stream is never closed. Only that
    # server-side leak is ignored: a socket without a peer address, its transport and StreamWriter.
]

HOST = "127.0.0.1"
WAIT = 10.0  # upper bound of any single wait in these tests


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def _wait_until_clients_left(broker: Broker, *, within: float = 2.0) -> None:
    """amqtt's shutdown leaks the stream of a client still disconnecting: let such clients finish."""
    deadline = time.monotonic() + within
    sessions = broker._sessions  # no public view of connected clients in amqtt 0.12
    while time.monotonic() < deadline and any(s.transitions.state == "connected" for s, _ in sessions.values()):
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_broker(
    port: int, *, config: dict[str, Any] | None = None, drain: bool = True
) -> AsyncIterator[Broker]:
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"{HOST}:{port}"}}, **(config or {})})
    await broker.start()
    try:
        yield broker
    finally:
        if drain:
            await _wait_until_clients_left(broker)
        await broker.shutdown()


@pytest.fixture(autouse=True)
async def _collect_garbage() -> AsyncIterator[None]:
    """Collect while the test's loop still runs, so leaks show up in the test that made them."""
    yield
    gc.collect()
    await asyncio.sleep(0.01)


@pytest.fixture
async def port() -> AsyncIterator[int]:
    chosen = free_port()
    async with running_broker(chosen):
        yield chosen


@dataclass
class FakeBridge:
    drop_first: int = 0
    duplicate_msgs: bool = False
    dropped: int = 0
    sends_seen: int = 0
    seqs: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    stored: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    async def serve(self, mqtt: aiomqtt.Client) -> None:
        async for message in mqtt.messages:
            who = parse_out_topic(str(message.topic))
            if who is None or not isinstance(message.payload, bytes):
                continue
            await self.handle(mqtt, *who, message.payload)

    async def handle(self, mqtt: aiomqtt.Client, user: str, device: str, payload: bytes) -> None:
        reply_topic = device_in_topic(user, device)
        try:
            request = parse_request(payload)
        except RequestError as exc:
            env = error_envelope(exc.code, exc.message, id=exc.id, conv=exc.conv)
            await mqtt.publish(reply_topic, encode(env), qos=1)
            return
        if not isinstance(request, SendRequest):
            return
        self.sends_seen += 1
        if self.dropped < self.drop_first:
            self.dropped += 1
            return
        conv = request.conv
        if user not in conv.members:
            env = error_envelope(ErrorCode.NOT_MEMBER, "not a member", id=request.id, conv=conv.id)
            await mqtt.publish(reply_topic, encode(env), qos=1)
            return
        ack = self.stored.get((user, request.id))
        if ack is None:  # first time: store, fan out, ack
            self.seqs[conv.id] += 1
            seq, mid, ts = self.seqs[conv.id], new_mid(), int(time.time() * 1000)
            msg = msg_envelope(
                conv=conv.id,
                seq=seq,
                mid=mid,
                sender=user,
                device=device,
                id=request.id,
                ts=ts,
                kind=request.kind,
                body=request.body,
            )
            for member in conv.members:
                for _ in range(2 if self.duplicate_msgs else 1):
                    await mqtt.publish(user_in_topic(member), encode(msg), qos=1)
            ack = ack_envelope(id=request.id, conv=conv.id, seq=seq, mid=mid, ts=ts)
            self.stored[(user, request.id)] = ack
        await mqtt.publish(reply_topic, encode(ack), qos=1)


@contextlib.asynccontextmanager
async def fake_bridge(port: int, **options: Any) -> AsyncIterator[FakeBridge]:
    bridge = FakeBridge(**options)
    async with aiomqtt.Client(HOST, port, identifier=unique("bridge")) as mqtt:
        await mqtt.subscribe(OUT_TOPIC_FILTER, qos=1)
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(bridge.serve(mqtt), name="fake-bridge")
            try:
                yield bridge
            finally:
                task.cancel()


def chat_client(port: int, user: str, **options: Any) -> ChatClient:
    return ChatClient(host=HOST, port=port, user=user, device=unique("dev"), token="t", **options)


async def next_message(client: ChatClient, *, within: float = WAIT) -> Message:
    async with asyncio.timeout(within):
        async for event in client.events():
            if isinstance(event, Message):
                return event
    raise AssertionError("the event stream ended")


# --- parsing, outbox, backoff --------------------------------------------------------------


def test_parse_event_reads_each_type_and_never_raises() -> None:
    msg = msg_envelope(conv="dm:a:b", seq=3, mid="M", sender="a", device="d", id="x", ts=5, kind="text", body="hi")
    assert parse_event(encode(msg)) == Message(
        conv="dm:a:b", seq=3, mid="M", sender="a", device="d", id="x", ts=5, kind="text", body="hi"
    )
    ack = parse_event(encode(ack_envelope(id="x", conv="dm:a:b", seq=3, mid="M", ts=5)))
    assert ack == Ack(id="x", conv="dm:a:b", seq=3, mid="M", ts=5)
    err = parse_event(encode(error_envelope(ErrorCode.TOO_LARGE, "big", id="x")))
    assert err == ErrorReply(code="too_large", message="big", id="x", conv=None)
    typing = parse_event(b'{"type":"typing","conv":"dm:a:b","user":"a","state":true}')
    assert isinstance(typing, OtherEvent)
    assert typing.type == "typing"
    assert typing.envelope()["state"] is True
    garbage = [
        b"",
        b"\xff",
        b"[]",
        b"{}",
        b'{"type":1}',
        b'{"type":"ack","id":"x"}',
        b'{"type":"msg","seq":true}',
        b'{"type":"error","code":"x","message":"m","id":3}',
    ]
    for payload in garbage:
        assert parse_event(payload) is None
    assert msg == parse_event(encode(msg)).envelope()  # type: ignore[union-attr]


def test_memory_outbox_keeps_insertion_order() -> None:
    box = MemoryOutbox()
    for i in range(3):
        box.add(PendingSend(id=f"m{i}", conv="dm:a:b", body=str(i)))
    box.add(PendingSend(id="m0", conv="dm:a:b", body="again"))
    assert [e.id for e in box.pending()] == ["m0", "m1", "m2"]
    assert box.remove("m1")
    assert not box.remove("m1")
    assert [e.body for e in box.pending()] == ["again", "2"]


def test_backoff_is_full_jitter_capped_at_30_seconds() -> None:
    rng = random.Random(7)
    for attempt, cap in [(0, 1.0), (1, 2.0), (3, 8.0), (5, 30.0), (60, 30.0)]:
        delays = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= cap for d in delays)
        assert max(delays) > cap * 0.8


# --- asyncio client against the broker ------------------------------------------------------


async def test_send_and_wait_returns_the_ack_and_members_get_the_message(port: int) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with fake_bridge(port), chat_client(port, alice) as a, chat_client(port, bob) as b:
        ack = await a.send_and_wait(conv, "hello bob", id=unique("m"), timeout=WAIT)
        assert (ack.conv, ack.seq) == (conv, 1)
        assert a.statistics().pending == 0
        got = await next_message(b)
        assert (got.conv, got.seq, got.sender, got.body, got.mid) == (conv, 1, alice, "hello bob", ack.mid)
        echo = await next_message(a)  # the sender's own devices get the message too
        assert echo.id == ack.id
        assert await a.wait_acked(ack.id, timeout=WAIT) == ack  # remembered after the fact


async def test_unacked_send_is_resent_until_the_ack_comes(port: int) -> None:
    alice = unique("alice")
    conv = dm_conv(alice, unique("bob"))
    async with fake_bridge(port, drop_first=2) as bridge, chat_client(port, alice, resend_after=0.2) as a:
        msg_id = await a.send(conv, "are you there", id=unique("m"))
        ack = await a.wait_acked(msg_id, timeout=WAIT)
        assert ack.id == msg_id
        assert ack.seq == 1  # three publishes, one stored message
        assert bridge.dropped == 2
        stats = a.statistics()
        assert stats.pending == 0
        assert stats.resends >= 2


async def test_duplicate_msg_yields_one_event(port: int) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with fake_bridge(port, duplicate_msgs=True), chat_client(port, bob) as b:
        async with chat_client(port, alice) as a:
            await a.send_and_wait(conv, "one", timeout=WAIT)
            await a.send_and_wait(conv, "two", timeout=WAIT)
        # and the same msg once more, straight from the broker
        async with aiomqtt.Client(HOST, port, identifier=unique("replay")) as raw:
            again = msg_envelope(
                conv=conv, seq=1, mid="M", sender=alice, device="d", id="x", ts=1, kind="text", body="one"
            )
            await raw.publish(user_in_topic(bob), encode(again), qos=1)
        assert [(await next_message(b)).body for _ in range(2)] == ["one", "two"]
        with pytest.raises(TimeoutError):
            await next_message(b, within=0.5)
        stats = b.statistics()
        assert (stats.received, stats.duplicates) == (2, 3)


async def test_error_reply_raises_send_failed(port: int) -> None:
    alice = unique("alice")
    not_mine = dm_conv(unique("carol"), unique("dave"))
    async with fake_bridge(port), chat_client(port, alice) as a:
        with pytest.raises(SendFailed) as caught:
            await a.send_and_wait(not_mine, "let me in", id=unique("m"), timeout=WAIT)
        assert caught.value.reply.code == "not_member"
        assert a.statistics().pending == 0  # an error reply is final


async def test_send_while_broker_is_down_is_delivered_after_reconnect() -> None:
    port = free_port()
    alice = unique("alice")
    conv = dm_conv(alice, unique("bob"))
    async with running_broker(port, drain=False):  # stops under a connected client
        client = chat_client(port, alice, rng=random.Random(1))
        await client.__aenter__()
    try:
        msg_id = await client.send(conv, "sent while offline", id=unique("m"))
        assert client.statistics().pending == 1
        async with running_broker(port), fake_bridge(port):
            ack = await client.wait_acked(msg_id, timeout=WAIT + 30)  # backoff may reach a few s
            assert ack.id == msg_id
            assert client.statistics().reconnects >= 1
            await client.aclose()
    finally:
        await client.aclose()


async def test_refused_credentials_raise_auth_failed(tmp_path: Path) -> None:
    port = free_port()
    passwords = tmp_path / "passwd"
    passwords.write_text("# nobody may log in\n")
    plugins = {"plugins": {"amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwords)}}}
    async with running_broker(port, config=plugins, drain=False):  # refused sessions stay "connected"
        with pytest.raises(AuthFailed):
            async with chat_client(port, unique("alice")):
                pass
        blocking = BlockingChatClient(host=HOST, port=port, user=unique("bob"), device=unique("d"), token="t")
        with pytest.raises(AuthFailed):
            await asyncio.to_thread(blocking.connect)


# --- blocking client ------------------------------------------------------------------------


async def test_blocking_client_sends_and_receives(port: int) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)

    def as_bob() -> tuple[Ack, list[Message]]:
        with BlockingChatClient(host=HOST, port=port, user=bob, device=unique("d"), token="t") as c:
            ack = c.send(conv, "from a script", id=unique("m"), timeout=WAIT)
            messages: list[Message] = []
            deadline = time.monotonic() + WAIT
            while len(messages) < 2 and time.monotonic() < deadline:
                event = c.receive(timeout=0.2)
                if isinstance(event, Message):
                    messages.append(event)
            return ack, messages

    async with fake_bridge(port, duplicate_msgs=True), chat_client(port, alice) as a:
        bob_task = asyncio.create_task(asyncio.to_thread(as_bob))
        got = await next_message(a)  # bob's message reaches alice; then alice answers
        assert got.body == "from a script"
        await a.send_and_wait(conv, "hi script", timeout=WAIT)
        async with asyncio.timeout(WAIT * 2):
            ack, messages = await bob_task
    assert ack.seq == 1
    assert [(m.seq, m.body) for m in messages] == [(1, "from a script"), (2, "hi script")]


# --- command line ---------------------------------------------------------------------------


async def test_cli_send_and_listen(port: int, capsys: pytest.CaptureFixture[str]) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with fake_bridge(port):
        listener = asyncio.create_task(
            cli.listen(host=HOST, port=port, user=bob, device=unique("d"), token="t", count=1, timeout=WAIT)
        )
        # The broker keeps nothing for a device that has not subscribed yet: send until it hears one.
        for attempt in range(10):
            code = await cli.send(
                host=HOST,
                port=port,
                user=alice,
                device=unique("d"),
                token="t",
                conv=conv,
                body=f"via cli {attempt}",
                timeout=WAIT,
            )
            assert code == 0
            done, _ = await asyncio.wait([listener], timeout=0.5)
            if done:
                break
        async with asyncio.timeout(WAIT):
            assert await listener == 0
        not_member = dm_conv(bob, unique("x"))
        code = await cli.send(
            host=HOST,
            port=port,
            user=alice,
            device=unique("d"),
            token="t",
            conv=not_member,
            body="no",
            timeout=WAIT,
        )
        assert code == 1
        code = await cli.listen(host=HOST, port=port, user=bob, device=unique("d"), token="t", count=None, timeout=0.2)
        assert code == 0
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    acks = {line["mid"]: line for line in lines if line["type"] == "ack"}
    [msg] = [line for line in lines if line["type"] == "msg"]
    assert (msg["conv"], msg["from"]) == (conv, alice)
    assert msg["seq"] == acks[msg["mid"]]["seq"]
    assert json.loads(err.strip().splitlines()[-1])["code"] == "not_member"


async def test_cli_chat_sends_stdin_lines_and_exits_on_eof(
    port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    alice, bob = unique("alice"), unique("bob")
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n\nsecond line\n"))
    async with fake_bridge(port), chat_client(port, bob) as b:
        code = await cli.chat(host=HOST, port=port, user=alice, device=unique("d"), token="t", peer=bob)
        assert code == 0
        assert [(await next_message(b)).body for _ in range(2)] == ["hello", "second line"]
    out, _ = capsys.readouterr()
    assert "✓ seq 1" in out
    assert "✓ seq 2" in out
