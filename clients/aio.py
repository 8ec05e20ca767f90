"""The asyncio client: one device's connection, outbox and event stream.

``ChatClient`` is an async context manager owning a ``TaskGroup`` with two tasks::

    connection  connect → subscribe u/{user}/in + u/{user}/{device}/in (QoS 1) → re-publish the
                outbox → read until the connection drops → back off (1 s doubling to 30 s, full
                jitter) → connect again; a CONNACK refused for credentials ends it (AuthFailed)
    resend      every resend_after / 2 s: re-publish outbox entries unacked for resend_after s

``send`` puts an entry in the outbox before publishing it, so nothing is lost while offline; the
``ack`` removes it. Waiters of ``send_and_wait`` / ``wait_acked`` are resolved from the reader.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

import aiomqtt

from clients._mqtt import is_auth_refusal_code
from clients.errors import AuthFailed, ClientClosed, ConnectionFailed, SendFailed
from clients.events import Ack, ErrorReply, Event, Message, OtherEvent, SeenMessages, parse_event
from clients.outbox import MemoryOutbox, Outbox, PendingSend
from mqchat.ids import is_valid_id, parse_conv
from mqchat.protocol import device_in_topic, encode, out_topic, user_in_topic

logger = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_CAP = 30.0
_REMEMBERED_RESULTS = 4096


class Clock:
    """Monotonic time and sleeping, injected so that timing is testable without waiting."""

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def backoff_delay(attempt: int, *, rng: random.Random, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> float:
    """Delay before reconnect ``attempt`` (0-based): full jitter over ``min(cap, first * 2**attempt)``."""
    return rng.uniform(0.0, min(cap, first * 2.0 ** min(attempt, 32)))


def is_auth_refusal(exc: BaseException) -> bool:
    """True when an MQTT error is a CONNACK refused for bad credentials or authorisation."""
    if not isinstance(exc, aiomqtt.MqttCodeError):
        return False
    return is_auth_refusal_code(exc.rc)


@dataclass(frozen=True, slots=True)
class ClientStatistics:
    """A snapshot of a client's counters."""

    connected: bool
    pending: int  # outbox entries awaiting an ack
    received: int  # msg events delivered to the app
    duplicates: int  # msg events (and repeated acks) dropped as already seen
    reconnects: int  # successful connections after the first
    resends: int  # outbox entries re-published
    events_dropped: int  # events discarded because the app did not read them


class _EventStream:
    def __init__(self, client: ChatClient) -> None:
        self._client = client

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Event:
        event = await self._client._queue.get()
        if event is None:  # the end: leave the marker for other readers
            self._client._queue.put_nowait(None)
            if self._client._fatal is not None:
                raise self._client._fatal
            raise StopAsyncIteration
        return event


class ChatClient:
    """One device of one user, connected over MQTT 3.1.1. Use as ``async with ChatClient(...)``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        device: str,
        token: str,
        keepalive: int = 30,
        resend_after: float = 5.0,
        outbox: Outbox | None = None,
        reconnect: bool = True,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        max_buffered_events: int = 10_000,
        connect_timeout: float = 10.0,
    ) -> None:
        if not (is_valid_id(user) and is_valid_id(device)):
            raise ValueError("user and device ids must be 1-64 characters of [A-Za-z0-9_.@-]")
        if resend_after <= 0:
            raise ValueError("resend_after must be positive")
        self._host = host
        self._port = port
        self._user = user
        self._device = device
        self._token = token
        self._keepalive = keepalive
        self._resend_after = resend_after
        self._outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self._reconnect = reconnect
        self._clock = clock if clock is not None else Clock()
        self._rng = rng if rng is not None else random.Random()
        self._max_buffered = max_buffered_events
        self._connect_timeout = connect_timeout
        self._out_topic = out_topic(user, device)

        self._mqtt: aiomqtt.Client | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._first_connect: asyncio.Future[None] | None = None
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._seen = SeenMessages()
        self._waiters: dict[str, list[asyncio.Future[Ack]]] = {}
        self._results: OrderedDict[str, Ack | ErrorReply] = OrderedDict()
        self._last_sent: dict[str, float] = {}
        self._fatal: BaseException | None = None
        self._started = False
        self._closed = False

        self._received = 0
        self._duplicates = 0
        self._reconnects = 0
        self._resends = 0
        self._events_dropped = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._started:
            raise RuntimeError("a ChatClient can be entered only once")
        self._started = True
        self._first_connect = asyncio.get_running_loop().create_future()
        tg = asyncio.TaskGroup()
        await tg.__aenter__()
        self._tg = tg
        name = f"mqchat-client:{self._user}/{self._device}"
        self._tasks.append(tg.create_task(self._run_connection(), name=f"{name}:connection"))
        self._tasks.append(tg.create_task(self._run_resends(), name=f"{name}:resend"))
        try:
            await self._first_connect
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Disconnect and stop. Unacked outbox entries stay in the outbox; waiters get ClientClosed."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                # The tasks catch their own errors, so this only waits for them to finish; an
                # exception of the caller's body is not handed in, so it is never wrapped in a group.
                await tg.__aexit__(None, None, None)
        finally:
            self._mqtt = None
            self._end(None)

    def _end(self, fatal: BaseException | None) -> None:
        """Wake everyone waiting: waiters fail (with the fatal error, if any) and the stream ends."""
        if fatal is not None and self._fatal is None:
            self._fatal = fatal
        failure = self._fatal if self._fatal is not None else ClientClosed("the client is closed")
        if self._first_connect is not None and not self._first_connect.done():
            self._first_connect.set_exception(failure)
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(failure)
        self._queue.put_nowait(None)

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed or not self._started:
            raise ClientClosed("the client is not open; use it as `async with ChatClient(...)`")

    # --- sending ------------------------------------------------------------------------------

    async def send(
        self,
        conv: str,
        body: str,
        *,
        id: str | None = None,
        kind: Literal["text", "media"] = "text",
        media: tuple[str, ...] = (),
    ) -> str:
        """Queue a message in the outbox and publish it; return its client message id.

        Returns once the broker has the publish (or at once while offline: the outbox re-publishes
        it after reconnecting). The ``ack`` arrives later; see :meth:`wait_acked`.
        """
        self._check_open()
        msg_id = id if id is not None else uuid.uuid4().hex
        if not is_valid_id(msg_id):
            raise ValueError("id must be 1-64 characters of [A-Za-z0-9_.@-]")
        if parse_conv(conv) is None:
            raise ValueError("conv must be a conversation id: dm:{a}:{b} (sorted) or g:{ulid}")
        entry = PendingSend(id=msg_id, conv=conv, body=body, kind=kind, media=tuple(media))
        self._results.pop(msg_id, None)
        self._outbox.add(entry)
        await self._publish(entry)
        return msg_id

    async def send_and_wait(
        self,
        conv: str,
        body: str,
        *,
        id: str | None = None,
        kind: Literal["text", "media"] = "text",
        media: tuple[str, ...] = (),
        timeout: float | None = 10.0,  # noqa: ASYNC109 - the SDK's documented call shape
    ) -> Ack:
        """Send and wait for the ack; raise SendFailed on an error reply, TimeoutError on timeout."""
        msg_id = id if id is not None else uuid.uuid4().hex
        fut = self._add_waiter(msg_id)
        try:
            async with asyncio.timeout(timeout):
                await self.send(conv, body, id=msg_id, kind=kind, media=media)
                return await fut
        finally:
            self._remove_waiter(msg_id, fut)

    async def wait_acked(self, id: str, timeout: float | None = None) -> Ack:  # noqa: ASYNC109
        """Wait for the ack of a send (returns at once if it came lately); SendFailed on error."""
        result = self._results.get(id)
        if isinstance(result, Ack):
            return result
        if isinstance(result, ErrorReply):
            raise SendFailed(result)
        self._check_open()
        fut = self._add_waiter(id)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._remove_waiter(id, fut)

    def _add_waiter(self, id: str) -> asyncio.Future[Ack]:
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(id, []).append(fut)
        return fut

    def _remove_waiter(self, id: str, fut: asyncio.Future[Ack]) -> None:
        futures = self._waiters.get(id, [])
        if fut in futures:
            futures.remove(fut)
        if not futures:
            self._waiters.pop(id, None)

    async def _publish(self, entry: PendingSend) -> None:
        self._last_sent[entry.id] = self._clock.monotonic()
        mqtt = self._mqtt
        if mqtt is None:
            return
        try:
            await mqtt.publish(self._out_topic, encode(entry.envelope()), qos=1)
        except aiomqtt.MqttError as exc:
            logger.debug("publish of send %s deferred to a resend: %s", entry.id, exc)

    async def _publish_all(self) -> None:
        for entry in self._outbox.pending():
            await self._publish(entry)

    # --- receiving ----------------------------------------------------------------------------

    def events(self) -> _EventStream:
        """Async iterator of incoming events: Message (deduplicated on (conv, seq)), Ack,
        ErrorReply, OtherEvent. Ends when the client closes; raises AuthFailed / ConnectionFailed
        when the connection ends for good. Each event goes to one reader."""
        return _EventStream(self)

    def _dispatch(self, payload: bytes) -> None:
        event = parse_event(payload)
        if event is None:
            logger.debug("dropped an unreadable envelope of %d bytes", len(payload))
            return
        if isinstance(event, Message):
            if not self._seen.first_time(event.conv, event.seq):
                self._duplicates += 1
                return
            self._received += 1
        elif isinstance(event, Ack):
            if isinstance(self._results.get(event.id), Ack):  # a resend answered twice
                self._duplicates += 1
                return
            self._settle(event.id, event)
            for fut in self._waiters.get(event.id, []):
                if not fut.done():
                    fut.set_result(event)
        elif isinstance(event, ErrorReply) and event.id is not None:
            self._settle(event.id, event)
            for fut in self._waiters.get(event.id, []):
                if not fut.done():
                    fut.set_exception(SendFailed(event))
        self._enqueue(event)

    def _settle(self, id: str, result: Ack | ErrorReply) -> None:
        self._outbox.remove(id)
        self._last_sent.pop(id, None)
        self._results[id] = result
        self._results.move_to_end(id)
        while len(self._results) > _REMEMBERED_RESULTS:
            self._results.popitem(last=False)

    def _enqueue(self, event: Message | Ack | ErrorReply | OtherEvent) -> None:
        if self._queue.qsize() >= self._max_buffered:
            self._queue.get_nowait()
            self._events_dropped += 1
            if self._events_dropped == 1 or self._events_dropped % 1000 == 0:
                logger.warning("events() is not read: %d events dropped so far", self._events_dropped)
        self._queue.put_nowait(event)

    # --- background tasks ---------------------------------------------------------------------

    def _new_mqtt(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self._host,
            self._port,
            username=self._user,
            password=self._token,
            identifier=self._device,
            clean_session=False,
            keepalive=self._keepalive,
            timeout=self._connect_timeout,
        )

    async def _run_connection(self) -> None:
        assert self._first_connect is not None
        attempt = 0
        connected_once = False
        while True:
            try:
                async with self._new_mqtt() as mqtt:
                    await mqtt.subscribe(
                        [(user_in_topic(self._user), 1), (device_in_topic(self._user, self._device), 1)]
                    )
                    self._mqtt = mqtt
                    attempt = 0
                    if connected_once:
                        self._reconnects += 1
                        logger.info("reconnected to %s:%d as %s", self._host, self._port, self._device)
                    else:
                        connected_once = True
                        self._first_connect.set_result(None)
                        logger.info("connected to %s:%d as %s", self._host, self._port, self._device)
                    await self._publish_all()
                    async for message in mqtt.messages:
                        if isinstance(message.payload, bytes | bytearray):
                            self._dispatch(bytes(message.payload))
            except aiomqtt.MqttError as exc:
                self._mqtt = None
                if is_auth_refusal(exc):
                    logger.error("the broker refused the credentials of %s/%s", self._user, self._device)
                    self._end(AuthFailed(f"the broker refused the credentials of user {self._user!r}"))
                    return
                if not connected_once:
                    self._end(ConnectionFailed(f"cannot connect to {self._host}:{self._port}: {exc}"))
                    return
                if not self._reconnect:
                    logger.warning("connection to %s:%d lost: %s", self._host, self._port, exc)
                    self._end(ConnectionFailed(f"connection to {self._host}:{self._port} lost: {exc}"))
                    return
                delay = backoff_delay(attempt, rng=self._rng)
                attempt += 1
                logger.warning(
                    "connection to %s:%d lost (%s); reconnecting in %.1f s",
                    self._host,
                    self._port,
                    exc,
                    delay,
                )
                await self._clock.sleep(delay)
            finally:
                self._mqtt = None

    async def _run_resends(self) -> None:
        interval = self._resend_after / 2
        while True:
            await self._clock.sleep(interval)
            if self._mqtt is None:
                continue
            now = self._clock.monotonic()
            for entry in self._outbox.pending():
                if now - self._last_sent.get(entry.id, -math.inf) >= self._resend_after:
                    self._resends += 1
                    logger.debug("re-publishing unacked send %s", entry.id)
                    await self._publish(entry)

    # --- introspection ------------------------------------------------------------------------

    @property
    def user(self) -> str:
        return self._user

    @property
    def device(self) -> str:
        return self._device

    def statistics(self) -> ClientStatistics:
        return ClientStatistics(
            connected=self._mqtt is not None,
            pending=len(self._outbox.pending()),
            received=self._received,
            duplicates=self._duplicates,
            reconnects=self._reconnects,
            resends=self._resends,
            events_dropped=self._events_dropped,
        )
