"""The in-broker adapter: requests come straight from the broker, results go straight back.

::

    broker's reader: device PUBLISH on its own out topic
        ──RequestQueue.submit(user, device, payload)──▶ bounded queue
          (awaited: while the device has per_device requests unanswered, or the queue
           is full, the device's connection stops being read)                   │
                                                                                ▼
    InBrokerAdapter._dispatch ──job per request, in arrival order──▶ _process: Pipeline.handle
        ──▶ BrokerPublisher.publish ──▶ the broker's own routing (topic, payload, qos)

No MQTT hop between broker and bridge: they share one process and one event loop. The pieces
are built in the order the data flows back: the queue first (the broker's inbound hook), then
the broker, then its ``BrokerPublisher`` (which the receipt coalescer also uses), then the
pipeline, then the adapter that joins queue, pipeline and publisher.

Fairness: each device may have at most ``per_device`` requests queued or in process. A device
that floods is slowed by TCP on its own connection (its reader waits), and everybody else's
requests wait behind at most ``per_device`` of its requests in the queue, not behind its whole
backlog: a rate-limited request is cheap, but thousands of them ahead in one queue are not.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bridge.outgoing import Outgoing
from bridge.pipeline import Pipeline
from mqchat.service import Service

logger = logging.getLogger(__name__)

Route = Callable[[str, bytes, int], Awaitable[None]]
"""The broker's own routing of one publish: (topic, payload, qos)."""

PER_DEVICE = 16  # requests of one device queued or in process at once

Request = tuple[str, str, bytes]  # user, device, payload


class BrokerPublisher:
    """Publishes the pipeline's results through the broker's own routing, and (in a cluster)
    hands them to ``relay`` for the other nodes' devices (which must not wait)."""

    def __init__(self, *, route: Route, relay: Callable[[list[Outgoing]], None] | None = None) -> None:
        self._route = route
        self._relay = relay

    async def publish(self, outgoing: list[Outgoing]) -> None:
        for out in outgoing:
            await self._route(out.topic, out.payload, out.qos)
        if self._relay is not None:
            self._relay(outgoing)


class RequestQueue:
    """The bounded queue between the broker's reader and the adapter, fair per device."""

    def __init__(self, *, max_queue: int = 4096, per_device: int = PER_DEVICE) -> None:
        self._queue: asyncio.Queue[Request] = asyncio.Queue(maxsize=max_queue)
        self._per_device = per_device
        self._device_load: dict[tuple[str, str], int] = {}  # requests queued or in process, per device
        self._device_waiters: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._closed = False

    async def submit(self, user: str, device: str, payload: bytes) -> None:
        """The broker's inbound hook: waits while this device has ``per_device`` requests
        unanswered, or the queue is full (backpressure on that device's connection). Once the
        queue is closed a request is dropped (never acked: the device sends it again)."""
        key = (user, device)
        while self._device_load.get(key, 0) >= self._per_device and not self._closed:
            waiter = self._device_waiters.get(key)
            if waiter is None:
                waiter = self._device_waiters[key] = asyncio.get_running_loop().create_future()
            await asyncio.shield(waiter)
        if self._closed:
            return
        self._device_load[key] = self._device_load.get(key, 0) + 1
        try:
            await self._queue.put((user, device, payload))
        except BaseException:
            self.done(user, device)
            raise

    async def get(self) -> Request:
        """The next request, in arrival order."""
        return await self._queue.get()

    def done(self, user: str, device: str) -> None:
        """A request of (user, device) has been answered: the device may submit another."""
        key = (user, device)
        load = self._device_load.pop(key, 1) - 1
        if load > 0:
            self._device_load[key] = load
        waiter = self._device_waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def close(self) -> None:
        """Nobody takes requests any more: waiting and later submits return at once, dropped."""
        self._closed = True
        for waiter in self._device_waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._device_waiters.clear()
        while not self._queue.empty():  # wakes a submit waiting for room
            self._queue.get_nowait()

    def qsize(self) -> int:
        return self._queue.qsize()


class InBrokerAdapter(Service):
    """Runs the requests of a ``RequestQueue`` through the pipeline and publishes the results;
    a service (async context manager) with one worker, the dispatcher, and a job per request.
    At ``aclose()`` the queue is closed (queued requests are dropped, never acked) and requests
    being processed finish (within ``job_grace_s``)."""

    name = "in-broker adapter"

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        requests: RequestQueue,
        publisher: BrokerPublisher,
        max_inflight: int = 2048,
    ) -> None:
        super().__init__()
        self._pipeline = pipeline
        self._requests = requests
        self._publisher = publisher
        self._slots = asyncio.Semaphore(max_inflight)
        self._dispatcher: asyncio.Task[None] | None = None

    def is_connected(self) -> bool:
        return self.running and self._dispatcher is not None and not self._dispatcher.done()

    def queued(self) -> int:
        return self._requests.qsize()

    async def publish(self, outgoing: list[Outgoing]) -> None:
        """Publish events made outside a request (coalesced receipts, HTTP-made events)."""
        await self._publisher.publish(outgoing)

    async def _start(self) -> None:
        self._dispatcher = self.start_worker(self._dispatch(), name="inbroker-dispatcher")

    async def _stopping(self) -> None:
        self._requests.close()

    async def _dispatch(self) -> None:
        while True:
            user, device, payload = await self._requests.get()
            await self._slots.acquire()
            self.start_job(self._process(user, device, payload), name="inbroker-request")

    async def _process(self, user: str, device: str, payload: bytes) -> None:
        try:
            await self._publisher.publish(await self._pipeline.handle(user, device, payload))
        except Exception:
            logger.exception("publishing results for %s/%s failed", user, device)
        finally:
            self._slots.release()
            self._requests.done(user, device)
