"""Shutdown always finishes: no task swallows its own cancellation.

On Python 3.11 ``asyncio.wait_for`` drops a cancellation that lands in the same loop iteration
as the completion it waits for. aiomqtt waits for every PUBACK that way, so a ``ChatClient``
closed while acks were landing could keep one task alive and ``aclose()`` never returned. The
SDK and the bridge now use ``mqchat.mqtt_client.MqttClient`` (waits with ``asyncio.timeout``)
and every service stops its tasks with ``mqchat.tasks.cancel_and_wait`` (cancels again until
they end). The stress tests close clients and nodes hundreds of times with acks in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from pathlib import Path

import aiomqtt
import pytest

from clients import ChatClient, Message
from mqchat.app import run_node
from mqchat.ids import dm_conv
from mqchat.mqtt_client import MqttClient
from mqchat.tasks import cancel_and_wait
from mqchat.tokens import issue_token
from tests.conftest import Stack, make_config, open_stack
from tests.helpers import Device, connect_device, send_env, unique

HOST = "127.0.0.1"
CLOSE_BOUND_S = 5.0  # far above a normal close (milliseconds); a swallowed cancellation never ends


async def _ack_lands_as_the_waiter_is_cancelled(client: aiomqtt.Client) -> str:
    """Cancel a task in the very loop iteration in which the acknowledgement it awaits arrives."""
    ack: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    waiter = asyncio.create_task(client._wait_for(ack, timeout=5))
    await asyncio.sleep(0)  # the waiter is now parked on the ack
    ack.set_result("puback")
    waiter.cancel()
    try:
        await waiter
    except asyncio.CancelledError:
        return "cancelled"
    return "carried on"


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for keeps the cancellation from 3.12 on")
async def test_stock_aiomqtt_loses_a_cancellation_that_races_an_ack() -> None:
    """Why the subclass exists: the failure, reproduced deterministically on stock aiomqtt."""
    assert await _ack_lands_as_the_waiter_is_cancelled(aiomqtt.Client(HOST, 1)) == "carried on"


async def test_our_mqtt_client_keeps_a_cancellation_that_races_an_ack() -> None:
    assert await _ack_lands_as_the_waiter_is_cancelled(MqttClient(HOST, 1)) == "cancelled"


async def test_our_mqtt_client_still_times_out_like_aiomqtt() -> None:
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    with pytest.raises(aiomqtt.MqttError, match="timed out"):
        await MqttClient(HOST, 1)._wait_for(never, timeout=0.05)


async def test_cancel_and_wait_cancels_again_a_task_that_swallowed_its_cancellation() -> None:
    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 3:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait([task], bound_s=5) == []
    assert task.cancelled()
    assert swallowed == 3


async def test_cancel_and_wait_gives_up_after_its_bound_instead_of_hanging() -> None:
    stop = asyncio.Event()

    async def deaf() -> None:
        while not stop.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(deaf(), name="deaf")
    await asyncio.sleep(0)
    started = time.monotonic()
    assert await cancel_and_wait([task], bound_s=0.3) == [task]
    assert time.monotonic() - started < 3
    stop.set()
    task.cancel()
    await asyncio.wait([task])


async def test_cancel_and_wait_does_not_swallow_the_callers_cancellation() -> None:
    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # cleanup that takes a while
            raise

    task = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    closer = asyncio.create_task(cancel_and_wait([task]))
    await asyncio.sleep(0.05)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    await asyncio.wait([task])


CLIENT_CLOSES = 200
PEERS = 20


async def test_a_client_closes_within_a_bound_hundreds_of_times_while_acks_land(tmp_path: Path) -> None:
    """Each round a fresh client catches up PEERS conversations over HTTP, takes a random share of
    the messages (so ``recv`` watermarks are being published and their PUBACKs land), also
    publishes ``read``s and a send, and is closed at a random moment. Every close must finish."""
    rng = random.Random(20261205)
    async with open_stack(make_config(tmp_path), "inbroker") as stack:
        reader = unique("reader")
        for _ in range(PEERS):
            peer = unique("peer")
            async with connect_device(stack.mqtt_port, peer, "p", stack.token(peer, "p")) as dev:
                await dev.send(send_env(dm_conv(peer, reader)))
                await dev.wait_for(lambda e: e["type"] == "ack")
        slowest = 0.0
        started = time.monotonic()
        for round_ in range(CLIENT_CLOSES):
            assert time.monotonic() - started < 240, f"only {round_} rounds in 240 s"
            client = _client(stack, reader, f"r{round_ % 7}")
            await client.__aenter__()
            try:
                taken = await _take(client, rng.randint(0, PEERS))
                if taken:
                    last = taken[-1]
                    for _ in range(rng.randint(0, 3)):
                        asyncio.create_task(client.mark_read(last.conv, last.seq))  # noqa: RUF006
                    if rng.random() < 0.3:
                        asyncio.create_task(client.send(last.conv, "bye"))  # noqa: RUF006
                await asyncio.sleep(rng.random() * 0.03)
            finally:
                t0 = time.monotonic()
                try:
                    async with asyncio.timeout(CLOSE_BOUND_S):
                        await client.aclose()
                except TimeoutError:
                    pending = [t.get_name() for t in asyncio.all_tasks() if not t.done()]
                    raise AssertionError(f"round {round_}: aclose() did not finish; tasks: {pending}") from None
                slowest = max(slowest, time.monotonic() - t0)
        print(f"{CLIENT_CLOSES} closes with acks in flight; slowest close {slowest * 1000:.1f} ms")


async def _flood(dev: Device, conv: str) -> None:
    with contextlib.suppress(aiomqtt.MqttError):
        for _ in range(500):
            await dev.send(send_env(conv))


def _client(stack: Stack, user: str, device: str) -> ChatClient:
    return ChatClient(
        host=HOST,
        port=stack.mqtt_port,
        user=user,
        device=device,
        token=stack.token(user, device),
        http_url=f"http://{HOST}:{stack.http_port}",
    )


async def _take(client: ChatClient, count: int) -> list[Message]:
    taken: list[Message] = []
    if count == 0:
        return taken
    async with asyncio.timeout(10):
        async for event in client.events():
            if isinstance(event, Message):
                taken.append(event)
                if len(taken) == count:
                    break
    return taken


NODE_CLOSES = 25


async def test_a_node_closes_within_a_bound_while_a_device_sends(tmp_path: Path) -> None:
    """The whole node (broker, pipeline, receipts, presence, push, HTTP) stops within a bound
    while a device is still sending and acks are landing."""
    slowest = 0.0
    for round_ in range(NODE_CLOSES):
        config = make_config(tmp_path / f"n{round_}")
        node_cm = run_node(config)
        node = await node_cm.__aenter__()
        alice, bob = unique("alice"), unique("bob")
        token = issue_token(secret=config.auth.jwt_secret, user=alice, device="a", ttl_s=600)
        with contextlib.suppress(aiomqtt.MqttError):
            async with connect_device(node.mqtt_port, alice, "a", token) as dev:
                sender = asyncio.create_task(_flood(dev, dm_conv(alice, bob)))
                await dev.wait_for(lambda e: e["type"] == "ack", count=5)
                t0 = time.monotonic()
                async with asyncio.timeout(CLOSE_BOUND_S):
                    await node_cm.__aexit__(None, None, None)
                slowest = max(slowest, time.monotonic() - t0)
                sender.cancel()
                await asyncio.wait([sender])
    print(f"{NODE_CLOSES} node closes with a device sending; slowest {slowest * 1000:.0f} ms")
