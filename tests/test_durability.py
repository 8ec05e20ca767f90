"""An acked message survives kill -9 of any mqchat process; seq continues without reuse."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from mqchat.ids import dm_conv
from tests.conftest import Served, both_stores, start_served, stop_served
from tests.helpers import send_env, send_until_acked, unique


async def _history(served: Served, user: str, conv: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    async with served.http(user) as http:
        after = 0
        while True:
            page = (await http.get(f"/v1/conversations/{conv}/messages", params={"after": after, "limit": 500})).json()
            messages.extend(page["messages"])
            if not page["more"]:
                return messages
            after = messages[-1]["seq"]


def _assert_exactly_once(history: list[dict[str, Any]], sent: list[dict[str, Any]], acks: dict[str, Any]) -> None:
    assert [m["seq"] for m in history] == list(range(1, len(history) + 1)), "seq is gapless"
    ids = [m["id"] for m in history]
    assert len(ids) == len(set(ids)), "no duplicates stored"
    assert sorted(ids) == sorted(e["id"] for e in sent), "every acked message is stored"
    for m in history:
        assert acks[m["id"]]["seq"] == m["seq"]
        assert acks[m["id"]]["mid"] == m["mid"]


async def _kill_while_sending(served: Served, which: str, count: int = 300) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    sent = [send_env(conv, f"{which}-{i}") for i in range(count)]
    killed = asyncio.Event()

    def progress(acked: int) -> None:
        if acked >= count // 3 and not killed.is_set():
            killed.set()

    sender = asyncio.create_task(
        send_until_acked(served.mqtt_port, alice, "a1", served.token(alice, "a1"), sent, on_progress=progress)
    )
    async with asyncio.timeout(60):
        await killed.wait()
    await served.kill9(which)
    async with asyncio.timeout(120):
        acks = await sender
    history = await _history(served, bob, conv)
    _assert_exactly_once(history, sent, acks)
    # seq continues after the restart, never reused
    more = [send_env(conv, "after")]
    again = await send_until_acked(served.mqtt_port, alice, "a1", served.token(alice, "a1"), more)
    assert again[more[0]["id"]]["seq"] == count + 1


@both_stores
async def test_kill9_bridge_mid_stream_loses_no_acked_message(served: Served) -> None:
    await _kill_while_sending(served, "bridge")


@both_stores
async def test_kill9_broker_mid_stream_loses_no_acked_message(served: Served) -> None:
    await _kill_while_sending(served, "broker")


@both_stores
@pytest.mark.parametrize("served", ["inbroker"], indirect=True)
async def test_kill9_of_the_single_node_mid_stream_loses_no_acked_message(served: Served) -> None:
    await _kill_while_sending(served, "node")


async def test_kill9_of_every_process_then_restart(tmp_path: Path) -> None:
    data, secret = tmp_path / "data", "restart-secret-" + "x" * 20
    first = start_served(data, secret, tmp_path / "first.log")
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    sent = [send_env(conv, f"m{i}") for i in range(50)]
    try:
        await first.wait_healthy()
        acks = await send_until_acked(first.mqtt_port, alice, "a1", first.token(alice, "a1"), sent)
        for pid in (first.proc.pid, first.pid("bridge"), first.pid("broker")):
            os.kill(pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    await asyncio.sleep(0.5)  # the orphaned children get their parent-death signal
    second = start_served(data, secret, tmp_path / "second.log")
    try:
        await second.wait_healthy()
        history = await _history(second, alice, conv)
        _assert_exactly_once(history, sent, acks)
        more = [send_env(conv, "after")]
        again = await send_until_acked(second.mqtt_port, alice, "a1", second.token(alice, "a1"), more)
        assert again[more[0]["id"]]["seq"] == 51
    finally:
        assert stop_served(second) == 0
