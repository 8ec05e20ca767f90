"""LeanQueue behaves like the part of asyncio.Queue that amqtt uses."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.queues import LeanQueue


async def test_fifo_sizes_and_errors() -> None:
    q = LeanQueue(maxsize=2)
    assert q.empty()
    assert not q.full()
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()
    q.put_nowait(1)
    await q.put(2)
    assert q.full()
    assert q.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(3)
    assert [q.get_nowait(), await q.get()] == [1, 2]
    assert q.empty()


async def test_get_waits_for_put_and_put_waits_for_room() -> None:
    q = LeanQueue(maxsize=1)
    getter = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait("a")
    assert await asyncio.wait_for(getter, 1) == "a"
    q.put_nowait("b")
    putter = asyncio.create_task(q.put("c"))
    await asyncio.sleep(0.01)
    assert not putter.done()
    assert q.get_nowait() == "b"
    await asyncio.wait_for(putter, 1)
    assert q.get_nowait() == "c"


async def test_a_cancelled_getter_passes_its_turn_on() -> None:
    q = LeanQueue()
    first = asyncio.create_task(q.get())
    second = asyncio.create_task(q.get())
    await asyncio.sleep(0)
    q.put_nowait("x")
    first.cancel()  # woken, but cancelled before it takes the item
    assert await asyncio.wait_for(second, 1) == "x"
    with pytest.raises(asyncio.CancelledError):
        await first


@given(ops=st.lists(st.one_of(st.integers(0, 9), st.none()), max_size=60), maxsize=st.integers(0, 5))
def test_same_results_as_asyncio_queue(ops: list[int | None], maxsize: int) -> None:
    async def run(q: asyncio.Queue[int] | LeanQueue) -> list[object]:
        out: list[object] = []
        for op in ops:
            try:
                if op is None:
                    out.append(q.get_nowait())
                else:
                    q.put_nowait(op)
                    out.append("put")
            except (asyncio.QueueEmpty, asyncio.QueueFull) as exc:
                out.append(type(exc).__name__)
            out.append((q.qsize(), q.empty(), q.full()))
        return out

    async def both() -> None:
        assert await run(LeanQueue(maxsize)) == await run(asyncio.Queue(maxsize))

    asyncio.run(both())
