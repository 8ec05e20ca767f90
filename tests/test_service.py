"""The service base: named tasks, a dead worker reported, failing jobs alone, bounded close."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from mqchat.service import Service


class Sample(Service):
    name = "sample"
    job_grace_s = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.ticks = 0
        self.log: list[str] = []

    async def _start(self) -> None:
        self.start_worker(self._tick(), name="sample-tick")

    async def _stopping(self) -> None:
        self.log.append("stopping")

    async def _stopped(self) -> None:
        self.log.append("stopped")

    async def _tick(self) -> None:
        while True:
            self.ticks += 1
            await asyncio.sleep(0.01)


async def test_workers_run_until_close_and_hooks_run_in_order() -> None:
    async with Sample() as service:
        await asyncio.sleep(0.05)
        assert service.ticks > 0
        stats = service.statistics()
        assert stats.workers == 1
        assert stats.dead_workers == ()
    assert service.log == ["stopping", "stopped"]
    assert not service.running


async def test_a_worker_that_fails_is_reported_dead_and_the_caller_lives() -> None:
    async def boom() -> None:
        raise RuntimeError("worker failure")

    async with Sample() as service:
        service.start_worker(boom(), name="sample-boom")
        await asyncio.sleep(0.02)
        assert service.dead_workers() == ["sample-boom"]
        assert service.statistics().dead_workers == ("sample-boom",)
        assert service.ticks > 0  # the other worker goes on


async def test_a_failing_job_fails_alone_and_a_slow_one_is_cancelled_at_close() -> None:
    finished: list[str] = []

    async def fails() -> None:
        raise ValueError("job failure")

    async def quick() -> None:
        await asyncio.sleep(0.01)
        finished.append("quick")

    async def forever() -> None:
        await asyncio.Event().wait()

    service = Sample()
    async with service:
        service.start_job(fails(), name="fails")
        service.start_job(quick(), name="quick")
        slow = service.start_job(forever(), name="forever")
        await asyncio.sleep(0)
    assert finished == ["quick"]
    assert slow.cancelled()
    assert service.dead_workers() == []


async def test_no_task_can_start_outside_the_context() -> None:
    service = Sample()

    async def nothing() -> None:
        return None

    with pytest.raises(RuntimeError, match="outside its context"):
        service.start_job(nothing(), name="early")
    async with service:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        service.start_job(nothing(), name="late")
    await service.aclose()  # idempotent


class Stubborn(Sample):
    stop_bound_s = 0.3


async def test_close_is_bounded_even_when_a_task_swallows_its_cancellation() -> None:
    """The 3.11 ``wait_for`` defect (see mqchat.tasks) in miniature: a task that catches every
    cancellation and goes on. aclose() gives up on it after the bound instead of hanging."""
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await release.wait()

    service = Stubborn()
    await service.__aenter__()
    task = service.start_worker(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await service.aclose()
    assert loop.time() - started < 5
    assert not task.done()
    assert service.log == ["stopping"]  # what the stuck task uses is not closed under it
    release.set()
    await task
