"""The in-broker adapter: requests come straight from the broker, results go straight back.

::

    broker: device PUBLISH on its own out topic ──submit(user, device, payload)──▶ bounded queue
        (awaited: while the device has per_device requests unanswered, or the queue      │
         is full, the device's connection stops being read)                             │
                                                                                       ▼
    dispatcher ──task per request, in arrival order──▶ Pipeline.handle ──▶ publish(topic, payload, qos)
                                                                           (the broker's own routing)

No MQTT hop between broker and bridge: they share one process and one event loop.

Fairness: each device may have at most ``per_device`` requests queued or in process. A device
that floods is slowed by TCP on its own connection (its reader waits), and everybody else's
requests wait behind at most ``per_device`` of its requests in the queue, not behind its whole
backlog: a rate-limited request is cheap, but thousands of them ahead in one queue are not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType

from bridge.outgoing import Outgoing
from bridge.pipeline import Pipeline
from mqchat.tasks import cancel_and_wait, ended

logger = logging.getLogger(__name__)

Publish = Callable[[str, bytes, int], Awaitable[None]]
PER_DEVICE = 16  # requests of one device queued or in process at once


class InBrokerAdapter:
    """Feeds the pipeline from the broker's inbound hook; an async context manager."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        publish: Publish,
        max_queue: int = 4096,
        max_inflight: int = 2048,
        per_device: int = PER_DEVICE,
    ) -> None:
        self._pipeline = pipeline
        self._publish = publish
        self._queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue(maxsize=max_queue)
        self._per_device = per_device
        self._device_load: dict[tuple[str, str], int] = {}  # requests queued or in process, per device
        self._device_waiters: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._slots = asyncio.Semaphore(max_inflight)
        self._task_group: asyncio.TaskGroup | None = None
        self._dispatcher: asyncio.Task[None] | None = None

    async def submit(self, user: str, device: str, payload: bytes) -> None:
        """The broker's inbound hook: waits while this device has ``per_device`` requests
        unanswered, or the queue is full (backpressure on that device's connection)."""
        key = (user, device)
        while self._device_load.get(key, 0) >= self._per_device:
            waiter = self._device_waiters.get(key)
            if waiter is None:
                waiter = self._device_waiters[key] = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)
        self._device_load[key] = self._device_load.get(key, 0) + 1
        try:
            await self._queue.put((user, device, payload))
        except BaseException:
            self._done(key)
            raise

    def _done(self, key: tuple[str, str]) -> None:
        load = self._device_load.pop(key, 1) - 1
        if load > 0:
            self._device_load[key] = load
        waiter = self._device_waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def is_connected(self) -> bool:
        return self._dispatcher is not None and not self._dispatcher.done()

    def dead_workers(self) -> list[str]:
        return ended([self._dispatcher]) if self._dispatcher is not None else []

    def queued(self) -> int:
        return self._queue.qsize()

    async def __aenter__(self) -> InBrokerAdapter:
        self._task_group = asyncio.TaskGroup()
        await self._task_group.__aenter__()
        self._dispatcher = self._task_group.create_task(self._dispatch(), name="inbroker-dispatcher")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task_group is not None
        assert self._dispatcher is not None
        await cancel_and_wait([self._dispatcher], what="in-broker adapter")
        await self._task_group.__aexit__(exc_type, exc, tb)  # requests being processed finish

    async def _dispatch(self) -> None:
        assert self._task_group is not None
        while True:
            user, device, payload = await self._queue.get()
            await self._slots.acquire()
            self._task_group.create_task(self._process(user, device, payload))

    async def publish(self, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            await self._publish(out.topic, out.payload, out.qos)

    async def _process(self, user: str, device: str, payload: bytes) -> None:
        try:
            await self.publish(await self._pipeline.handle(user, device, payload))
        except Exception:
            logger.exception("publishing results for %s/%s failed", user, device)
        finally:
            self._slots.release()
            self._done((user, device))
