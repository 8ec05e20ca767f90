"""The asyncio client: one device's connection, outbox, catch-up and event stream.

``ChatClient`` is an async context manager owning a ``TaskGroup`` with these tasks::

    connection  connect → subscribe u/{user}/in + u/{user}/{device}/in + c/{conv}/in of each
                followed channel (QoS 1) → re-publish the
                outbox → ask for a sync → read until the connection drops → back off (1 s
                doubling to 30 s, full jitter) → connect again; a CONNACK refused for credentials
                ends it (AuthFailed). The *first* connect is not retried: ``async with`` raises
                ConnectionFailed, so a caller learns at once that the server is unreachable.
    resend      every resend_after / 2 s: re-publish outbox entries unacked for resend_after s; after a
                rate_limited send, nothing is published until the server's retry_after_ms, then
                every pending entry is, in outbox order
    watermarks  publish ``recv`` for what the app took from events() (one per conversation per
                RECV_COALESCE s) and ``read``s of mark_read() made while offline
    sync        (http_url only) after every connect: GET /v1/conversations?since=<cursor> with
                include_messages=50 while ``more``, then …/messages?after=<last> per conversation
                until complete; the cursor is saved once the app has taken everything it covers
    gaps        (http_url only) a gap that outlives gap_grace_s is fetched with …/messages?after=
                (a page that starts above after + 1 starts at the user's join point: the range
                before it is skipped, not waited for)

Messages take one of two paths to ``events()``::

    http_url None   msg ─► dedup on (conv, seq) ─► events()          (arrival order)
    http_url set    msg ─┬─► OrderingBuffer ─► events()              (seq order per conversation,
    HTTP pages ──────────┘   held behind gaps                          each (conv, seq) once)

Channels are followed as the sync lists them (``kind: channel``) and as ``conv`` events add or
remove the user: subscribed at once when connected, and on every connect.

The last seq the app took per conversation, the sync cursor, the followed channels and (as ``SqliteOutbox``) the outbox
live in ``state_path`` when given, so a restarted app neither loses nor repeats messages; so do the
URLs of unfinished uploads (``SqliteUploads``), so that a restarted app resumes them.

``send_file`` uploads a file through :attr:`ChatClient.media` (a :class:`clients.media.MediaClient`
over the same HTTP client: resumable, tus 1.0) and then sends a ``media`` message naming it
through the outbox, like any send::

    send_file(conv, path) ─► media.upload(path) ─► POST/PATCH /v1/media… ─► media id
                          ─► send(conv, caption, kind="media", media=(id,)) ─► outbox ─► MQTT

``send`` puts an entry in the outbox before publishing it, so nothing is lost while offline; the
``ack`` removes it. Waiters of ``send_and_wait`` / ``wait_acked`` are resolved from the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self
from urllib.parse import quote

import aiomqtt
import httpx

from clients._mqtt import is_auth_refusal_code
from clients.errors import AuthFailed, ClientClosed, ConnectionFailed, HistoryFailed, SendFailed
from clients.events import Ack, ErrorReply, Event, Message, OtherEvent, SeenMessages, parse_event
from clients.history import ConversationSummary, HistoryClient, UserPresence
from clients.media import MediaClient, Progress
from clients.ordering import OrderingBuffer
from clients.outbox import MemoryOutbox, Outbox, PendingSend, SqliteOutbox
from clients.state import ClientState, MemoryState, MemoryUploads, SqliteState, SqliteUploads, UploadLedger
from mqchat.ids import is_valid_id, parse_conv
from mqchat.mqtt_client import MqttClient
from mqchat.protocol import channel_topic, device_in_topic, encode, out_topic, user_in_topic
from mqchat.tasks import cancel_and_wait

logger = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_CAP = 30.0
RECV_COALESCE = 0.2  # at most one recv per conversation per this many seconds
SYNC_INCLUDE_MESSAGES = 50
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
    rate_limited: int  # sends refused as rate_limited (kept in the outbox, re-published when allowed)
    events_dropped: int  # events discarded because the app did not read them
    gaps_detected: int = 0  # live msgs that arrived ahead of a missing seq (http_url only)
    gap_fetches: int = 0  # gaps that outlived gap_grace_s and were fetched over HTTP
    sync_requests: int = 0  # GET /v1/conversations requests made (retries included)
    delivered_in_order: int = 0  # messages released by the per-conversation ordering (http_url only)


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
        if isinstance(event, Message):
            self._client._handed_over(event)
        return event


class ChatClient:
    """One device of one user, connected over MQTT 3.1.1. Use as ``async with ChatClient(...)``.

    ``http_url`` (e.g. ``"http://127.0.0.1:8080"``) turns on catch-up over the HTTP API and
    per-conversation ordering; without it messages arrive as MQTT delivers them (deduplicated).
    ``state_path`` keeps the outbox, the sync cursor and the last seq the app took per
    conversation in a local SQLite file (one file per device). ``auto_recv`` publishes ``recv``
    for what the app took from :meth:`events`. ``gap_grace_s`` is how long a message that jumps
    ahead is held before the missing range is fetched. ``http_transport`` replaces httpx's
    network transport (tests use ``httpx.MockTransport``). HTTP calls are bounded by
    ``connect_timeout`` seconds each and retried with backoff when the failure is transient.
    ``one_at_a_time`` publishes a send only once the one before it in the same conversation is
    answered: behind bridge workers that share a broker's requests (``mqchat bridge --workers N``),
    two sends in flight at once may reach two workers and be stored in either order; one at a
    time, a conversation keeps this device's order, at one round trip per message (conversations
    do not wait for each other).
    """

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
        http_url: str | None = None,
        state_path: Path | None = None,
        auto_recv: bool = True,
        gap_grace_s: float = 1.0,
        http_transport: httpx.AsyncBaseTransport | None = None,
        one_at_a_time: bool = False,
    ) -> None:
        if not (is_valid_id(user) and is_valid_id(device)):
            raise ValueError("user and device ids must be 1-64 characters of [A-Za-z0-9_.@-]")
        if resend_after <= 0:
            raise ValueError("resend_after must be positive")
        if gap_grace_s < 0:
            raise ValueError("gap_grace_s must not be negative")
        self._host = host
        self._port = port
        self._user = user
        self._device = device
        self._token = token
        self._keepalive = keepalive
        self._resend_after = resend_after
        self._one_at_a_time = one_at_a_time
        self._owned_outbox: Outbox | None = None
        if outbox is None:
            outbox = self._owned_outbox = SqliteOutbox(state_path) if state_path is not None else MemoryOutbox()
        self._outbox: Outbox = outbox
        self._state: ClientState = SqliteState(state_path, user=user) if state_path is not None else MemoryState()
        self._uploads: UploadLedger = (
            SqliteUploads(state_path, user=user) if state_path is not None and http_url is not None else MemoryUploads()
        )
        self._http_url = http_url
        self._http_transport = http_transport
        self._auto_recv = auto_recv
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
        self._server_failures: dict[str, int] = {}  # pending send -> internal/unavailable answers so far
        self._fatal: BaseException | None = None
        self._started = False
        self._closed = False

        # What the app took from events(), per conversation (persisted in the state).
        self._handed: dict[str, int] = self._state.delivered()
        self._channels: set[str] = self._state.channels()  # followed: c/{conv}/in on every connect
        self._follows: set[asyncio.Task[None]] = set()
        self._ordering = OrderingBuffer(grace=gap_grace_s, start=self._handed) if http_url is not None else None
        self._http: httpx.AsyncClient | None = None
        self._history: HistoryClient | None = None
        self._media: MediaClient | None = None
        self._http_lock = asyncio.Lock()  # one catch-up at a time: sync and gap repairs
        self._sync_wanted = asyncio.Event()
        self._synced = asyncio.Event()
        self._gap_opened = asyncio.Event()
        # Sync cursors waiting for the app to take what they cover: (cursor, {conv: seq}).
        self._pending_cursors: list[tuple[str, dict[str, int]]] = []
        self._recv_due: dict[str, int] = {}
        self._read_due: dict[str, int] = {}  # mark_read() calls made while offline
        self._watermarks_due = asyncio.Event()

        self._received = 0
        self._duplicates = 0
        self._reconnects = 0
        self._resends = 0
        self._rate_limited = 0  # sends the server refused as rate_limited (kept, re-published later)
        self._held = False  # after a rate_limited send: publish nothing until the resend task has
        self._hold_until = 0.0  # re-published every pending send in order (monotonic seconds)
        self._resend_wake = asyncio.Event()
        self._replaying = False  # older sends are being published again: new ones wait their turn
        self._replay_lock = asyncio.Lock()
        self._events_dropped = 0
        self._gaps_detected = 0
        self._gap_fetches = 0
        self._delivered_in_order = 0

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
        if self._http_url is not None:
            self._http = httpx.AsyncClient(
                base_url=self._http_url, transport=self._http_transport, timeout=self._connect_timeout
            )
            self._history = HistoryClient(
                http=self._http,
                token=self._token,
                timeout=self._connect_timeout,
                sleep=self._clock.sleep,
                backoff=lambda attempt: backoff_delay(attempt, rng=self._rng),
            )
            self._media = MediaClient(
                http=self._http,
                token=self._token,
                timeout=self._connect_timeout,
                sleep=self._clock.sleep,
                backoff=lambda attempt: backoff_delay(attempt, rng=self._rng),
                uploads=self._uploads,
            )
            self._tasks.append(tg.create_task(self._run_sync(), name=f"{name}:sync"))
            self._tasks.append(tg.create_task(self._run_gaps(), name=f"{name}:gaps"))
        self._tasks.append(tg.create_task(self._run_connection(), name=f"{name}:connection"))
        self._tasks.append(tg.create_task(self._run_resends(), name=f"{name}:resend"))
        self._tasks.append(tg.create_task(self._run_watermarks(), name=f"{name}:watermarks"))
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
        # Cancelled again until they end: a task must not outlive aclose() (see mqchat.tasks).
        await cancel_and_wait([*self._tasks, *self._follows], what=f"client {self._user}/{self._device}")
        tg, self._tg = self._tg, None
        try:
            if tg is not None:
                # The tasks catch their own errors, so this only waits for them to finish; an
                # exception of the caller's body is not handed in, so it is never wrapped in a group.
                await tg.__aexit__(None, None, None)
        finally:
            self._mqtt = None
            self._end(None)
            http, self._http = self._http, None
            try:
                if http is not None:
                    await http.aclose()
            finally:
                self._state.close()
                self._uploads.close()
                if self._owned_outbox is not None:
                    self._owned_outbox.close()

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

    async def send_file(
        self,
        conv: str,
        path: Path,
        *,
        caption: str = "",
        id: str | None = None,
        encrypted: bool = False,
        content_type: str | None = None,
        progress: Progress | None = None,
    ) -> str:
        """Upload a file (resumably: see :class:`clients.media.MediaClient`) and send it to
        ``conv`` as a ``media`` message with ``caption`` as its body; return the client message id.

        Returns once the message is in the outbox (published, or waiting for a reconnect), like
        :meth:`send`; its ack arrives later (:meth:`wait_acked`). MediaFailed when the upload is
        refused or its retries run out; nothing is sent then."""
        self._check_open()
        msg_id = id if id is not None else uuid.uuid4().hex
        if not is_valid_id(msg_id):
            raise ValueError("id must be 1-64 characters of [A-Za-z0-9_.@-]")
        if parse_conv(conv) is None:
            raise ValueError("conv must be a conversation id: dm:{a}:{b} (sorted) or g:{ulid}")
        uploaded = await self.media.upload(path, content_type=content_type, encrypted=encrypted, progress=progress)
        return await self.send(conv, caption, id=msg_id, kind="media", media=(uploaded.id,))

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
        """Publish a new send now, unless older ones must go first: during a hold (after a
        rate_limited send) or while older ones are being published again, it waits its turn in
        the outbox (the replay in progress, or the one after the hold, takes it in order)."""
        if self._held or self._replaying:
            self._last_sent[entry.id] = max(self._clock.monotonic(), self._hold_until) - self._resend_after
            return
        if self._one_at_a_time and _heads(self._outbox.pending()).get(entry.conv) != entry.id:
            return  # published by the replay that follows the answer to the one before it
        await self._publish_now(entry)

    async def _replay(self, *, everything: bool) -> None:
        """Publish pending sends again in outbox order: all of them (after a connect), or those
        unacked for resend_after. Sends made meanwhile wait, and are taken in a further pass, so
        none overtakes an older one. Stops when a rate_limited reply starts a hold. One at a time."""
        async with self._replay_lock:
            await self._replay_locked(everything=everything)

    async def _replay_locked(self, *, everything: bool) -> None:
        self._replaying = True
        try:
            done: set[str] = set()
            while not self._held:
                now = self._clock.monotonic()
                pending = self._outbox.pending()
                if self._one_at_a_time:  # each conversation's oldest unanswered send; the next once it is answered
                    heads = set(_heads(pending).values())
                    pending = [e for e in pending if e.id in heads]
                batch = [
                    e
                    for e in pending
                    if e.id not in done
                    and (everything or now - self._last_sent.get(e.id, -math.inf) >= self._resend_after)
                ]
                if not batch:
                    return
                for entry in batch:
                    if self._held:
                        return  # the hold set every pending send's time; the next replay takes them
                    done.add(entry.id)
                    if not everything:
                        self._resends += 1
                        logger.debug("re-publishing unacked send %s", entry.id)
                    await self._publish_now(entry)
                everything = False  # further passes: the sends made while this one ran (due now)
        finally:
            self._replaying = False

    async def _publish_now(self, entry: PendingSend) -> None:
        self._last_sent[entry.id] = self._clock.monotonic()
        mqtt = self._mqtt
        if mqtt is None:
            return
        try:
            await mqtt.publish(self._out_topic, encode(entry.envelope()), qos=1)
        except aiomqtt.MqttError as exc:
            logger.debug("publish of send %s deferred to a resend: %s", entry.id, exc)

    async def _publish_all(self) -> None:
        await self._replay(everything=True)

    async def mark_read(self, conv: str, seq: int) -> None:
        """Tell the server (and so the user's other devices and the peers, as a ``receipt``) that
        the user has read ``conv`` up to ``seq``. Made while offline, it is sent after reconnecting."""
        self._check_open()
        if parse_conv(conv) is None:
            raise ValueError("conv must be a conversation id: dm:{a}:{b} (sorted) or g:{ulid}")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError("seq must be a non-negative integer")
        if not await self._publish_watermark("read", conv, seq):
            self._read_due[conv] = max(seq, self._read_due.get(conv, 0))

    async def _publish_watermark(self, kind: Literal["recv", "read"], conv: str, seq: int) -> bool:
        """Publish a recv/read; False when offline or the publish failed."""
        mqtt = self._mqtt
        if mqtt is None:
            return False
        try:
            await mqtt.publish(self._out_topic, encode({"type": kind, "conv": conv, "seq": seq}), qos=1)
        except aiomqtt.MqttError as exc:
            logger.debug("%s for %s deferred: %s", kind, conv, exc)
            return False
        return True

    # --- receiving ----------------------------------------------------------------------------

    def events(self) -> _EventStream:
        """Async iterator of incoming events: Message (deduplicated on (conv, seq); with http_url
        also strictly in seq order per conversation, live and caught-up ones alike), Ack,
        ErrorReply, OtherEvent (``receipt`` …). Ends when the client closes; raises AuthFailed /
        ConnectionFailed when the connection ends for good. Each event goes to one reader. A
        Message counts as delivered (persisted, and acknowledged with ``recv``) when it is taken
        from here; if the app stops reading and events are dropped (``events_dropped``), those
        messages are not repeated."""
        return _EventStream(self)

    def _dispatch(self, payload: bytes) -> None:
        event = parse_event(payload)
        if event is None:
            logger.debug("dropped an unreadable envelope of %d bytes", len(payload))
            return
        if isinstance(event, Message):
            if self._ordering is not None:
                self._offer([event], live=True)
                return
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
        elif isinstance(event, OtherEvent) and event.type == "conv" and event.data.get("kind") == "channel":
            users = event.data.get("users")
            if isinstance(users, list) and self._user in users:
                self._follow(str(event.data.get("conv")), event.data.get("event") != "members_removed")
        elif isinstance(event, ErrorReply) and isinstance(self._results.get(str(event.id)), Ack):
            return  # a resend answered after its ack (e.g. rate_limited): the message is stored
        elif isinstance(event, ErrorReply) and event.id is not None and self._retry_later(event):
            return
        elif isinstance(event, ErrorReply) and event.id is not None:
            self._settle(event.id, event)
            for fut in self._waiters.get(event.id, []):
                if not fut.done():
                    fut.set_exception(SendFailed(event))
        self._enqueue(event)

    def _retry_later(self, error: ErrorReply) -> bool:
        """A send refused as rate_limited stays in the outbox: not a failure of the send. Every
        send is held until the server's retry_after_ms, then the resend task publishes all that
        are pending, in outbox order, so the refused one is not overtaken by a later one.

        A send answered ``internal`` or ``unavailable`` (the server failed, or its store is away)
        stays too, and is published again, unchanged, after a backoff of its own (protocol
        sections 6 and 8)."""
        pending = self._outbox.pending()
        if (
            error.code in ("internal", "unavailable")
            and error.id is not None
            and any(e.id == error.id for e in pending)
        ):
            attempt = self._server_failures.get(error.id, 0)
            self._server_failures[error.id] = attempt + 1
            delay = backoff_delay(attempt, rng=self._rng)
            self._last_sent[error.id] = self._clock.monotonic() + delay - self._resend_after
            self._resend_wake.set()
            logger.debug("send %s answered %s; sending it again in %.2f s", error.id, error.code, delay)
            return True
        if error.code != "rate_limited" or not any(e.id == error.id for e in pending):
            return False
        delay = (error.retry_after_ms if error.retry_after_ms is not None else 1000) / 1000
        self._rate_limited += 1
        self._held = True
        self._hold_until = max(self._hold_until, self._clock.monotonic() + delay)
        for entry in pending:
            self._last_sent[entry.id] = self._hold_until - self._resend_after
        self._resend_wake.set()
        logger.debug("send %s rate-limited; holding sends for %.2f s", error.id, delay)
        return True

    def _follow(self, conv: str, member: bool) -> None:
        """Start or stop following channel conv: remembered, and (un)subscribed now if connected."""
        if (conv in self._channels) == member:
            return
        if member:
            self._channels.add(conv)
        else:
            self._channels.discard(conv)
        self._state.set_channel(conv, member)
        mqtt = self._mqtt
        if mqtt is None:
            return  # the next connect subscribes
        change = mqtt.subscribe(channel_topic(conv), qos=1) if member else mqtt.unsubscribe(channel_topic(conv))
        task = asyncio.get_running_loop().create_task(self._quietly(change))
        self._follows.add(task)
        task.add_done_callback(self._follows.discard)

    @staticmethod
    async def _quietly(change: Awaitable[object]) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            await change

    def _offer(self, messages: Iterable[Message], *, live: bool) -> None:
        """Pass messages (live or fetched) through the ordering buffer to the event queue."""
        assert self._ordering is not None
        now = self._clock.monotonic()
        for msg in messages:
            offered = self._ordering.offer(msg, now=now)
            if offered.duplicate:
                if live:
                    self._duplicates += 1
                continue
            if offered.gap_opened:
                if live:
                    self._gaps_detected += 1
                    logger.debug("%s: seq %d arrived ahead of a gap; holding it", msg.conv, msg.seq)
                self._gap_opened.set()
            self._deliver(offered.ready)

    def _deliver(self, ready: list[Message]) -> None:
        for msg in ready:
            self._received += 1
            self._delivered_in_order += 1
            self._enqueue(msg)

    def _handed_over(self, msg: Message) -> None:
        """The app took ``msg`` from events(): remember it, schedule a recv, maybe save a cursor."""
        if msg.seq > self._handed.get(msg.conv, 0):
            self._handed[msg.conv] = msg.seq
            if not self._closed:  # the state file closes with the client
                self._state.set_delivered(msg.conv, msg.seq)
            if self._auto_recv:
                self._recv_due[msg.conv] = msg.seq
                self._watermarks_due.set()
        if self._pending_cursors:
            self._save_cursors()

    def _save_cursors(self) -> None:
        """Save each sync cursor whose conversations the app has taken up to what the sync saw."""
        while self._pending_cursors:
            cursor, covered = self._pending_cursors[0]
            if any(self._handed.get(conv, 0) < seq for conv, seq in covered.items()):
                return
            self._pending_cursors.pop(0)
            if not self._closed:
                self._state.set_cursor(cursor)

    def _settle(self, id: str, result: Ack | ErrorReply) -> None:
        self._outbox.remove(id)
        self._last_sent.pop(id, None)
        self._server_failures.pop(id, None)
        if self._one_at_a_time:
            self._resend_wake.set()  # the resend task publishes the next send now
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
        return MqttClient(
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
                        + [(channel_topic(conv), 1) for conv in sorted(self._channels)]
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
                    if self._history is not None:
                        self._synced.clear()
                        self._sync_wanted.set()
                    if self._recv_due or self._read_due:
                        self._watermarks_due.set()
                    async for message in mqtt.messages:
                        if isinstance(message.payload, bytes | bytearray):
                            self._dispatch(bytes(message.payload))
            except aiomqtt.MqttError as exc:
                self._mqtt = None
                if is_auth_refusal(exc):
                    # Said once, by the AuthFailed every waiter and events() now raise.
                    logger.info("the broker refused the credentials of %s/%s", self._user, self._device)
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
            wait = interval
            if self._held:
                wait = max(0.0, min(interval, self._hold_until - self._clock.monotonic()))
            self._resend_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._resend_wake.wait()
            now = self._clock.monotonic()
            if self._held and now >= self._hold_until:
                self._held = False  # publish everything pending, in order, from here
            if self._mqtt is None or self._replaying:
                continue  # the next connect (or the replay under way) publishes the outbox in order
            await self._replay(everything=False)

    async def _run_watermarks(self) -> None:
        while True:
            await self._watermarks_due.wait()
            self._watermarks_due.clear()
            if self._mqtt is None:
                continue  # set again after the next connect
            reads, self._read_due = self._read_due, {}
            for conv, seq in reads.items():
                if not await self._publish_watermark("read", conv, seq):
                    self._read_due[conv] = max(seq, self._read_due.get(conv, 0))
            recvs, self._recv_due = self._recv_due, {}
            for conv, seq in recvs.items():
                if not await self._publish_watermark("recv", conv, seq):
                    self._recv_due[conv] = max(seq, self._recv_due.get(conv, 0))
            await self._clock.sleep(RECV_COALESCE)

    async def _run_sync(self) -> None:
        while True:
            await self._sync_wanted.wait()
            self._sync_wanted.clear()
            try:
                await self._sync()
            except HistoryFailed as exc:
                logger.warning("catching up over HTTP failed: %s", exc)
            except Exception:
                logger.exception("catching up over HTTP failed")
            finally:
                if not self._sync_wanted.is_set():
                    self._synced.set()

    async def _sync(self) -> None:
        """Catch up every conversation changed since the saved cursor (section 8 of the protocol)."""
        assert self._history is not None
        assert self._ordering is not None
        async with self._http_lock:
            cursor = self._state.cursor()
            while True:
                try:
                    page = await self._history.sync(cursor, include_messages=SYNC_INCLUDE_MESSAGES)
                except HistoryFailed as exc:
                    if exc.code != "bad_cursor" or cursor is None:
                        raise
                    logger.warning("the server does not know the saved sync cursor; syncing from the start")
                    self._pending_cursors.clear()
                    self._state.set_cursor(None)
                    cursor = None
                    continue
                covered: dict[str, int] = {}
                for summary in page.conversations:
                    if summary.kind == "channel":
                        self._follow(summary.conv, True)
                    await self._catch_up(summary)
                    covered[summary.conv] = self._ordering.last(summary.conv)
                self._pending_cursors.append((page.cursor, covered))
                self._save_cursors()
                cursor = page.cursor
                if not page.more:
                    return

    async def _catch_up(self, summary: ConversationSummary) -> None:
        assert self._ordering is not None
        included = summary.messages
        if included and not summary.messages_more:
            # Nothing older is readable: a first seq above last + 1 is this user's join point.
            self._deliver(self._ordering.skip_to(summary.conv, included[0].seq, now=self._clock.monotonic()))
        if included and included[0].seq <= self._ordering.last(summary.conv) + 1:
            self._offer(included, live=False)
        if self._ordering.last(summary.conv) < summary.last_seq:
            await self._fetch_after(summary.conv)

    async def _fetch_after(self, conv: str) -> None:
        """Fetch ``messages?after=<last released>`` pages until the server has no more."""
        assert self._history is not None
        assert self._ordering is not None
        while True:
            after = self._ordering.last(conv)
            page = await self._history.messages_after(conv, after)
            if page.messages:
                # The page is authoritative: a first seq above after + 1 means the range before it
                # is not readable by this user (they joined the group later), not a gap to wait on.
                self._deliver(self._ordering.skip_to(conv, page.messages[0].seq, now=self._clock.monotonic()))
            self._offer(page.messages, live=False)
            if not page.more or self._ordering.last(conv) <= after:
                return

    async def _run_gaps(self) -> None:
        assert self._ordering is not None
        while True:
            self._gap_opened.clear()
            deadline = self._ordering.next_deadline()
            if deadline is None:
                await self._gap_opened.wait()
                continue
            delay = deadline - self._clock.monotonic()
            if delay > 0:
                await self._clock.sleep(delay)
                continue
            for conv in self._ordering.gaps_due(self._clock.monotonic()):
                self._gap_fetches += 1
                try:
                    await self._repair_gap(conv)
                except Exception:
                    logger.exception("repairing a gap of %s failed", conv)
                    self._ordering.rearm(conv, now=self._clock.monotonic())

    async def _repair_gap(self, conv: str) -> None:
        assert self._ordering is not None
        async with self._http_lock:
            if not self._ordering.has_gap(conv):
                return  # a sync or a late msg filled it meanwhile
            try:
                await self._fetch_after(conv)
            except HistoryFailed as exc:
                logger.warning("cannot fetch the gap of %s (%s); delivering what follows it", conv, exc)
                self._deliver(self._ordering.skip_gap(conv, now=self._clock.monotonic()))
                return
            # Still open: the missing msg was stored after our read and is in flight. Wait again.
            self._ordering.rearm(conv, now=self._clock.monotonic())

    async def wait_synced(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until the catch-up after the latest (re)connect has finished or given up (at once without
        http_url). The caught-up messages are then in events()."""
        self._check_open()
        if self._history is None:
            return
        async with asyncio.timeout(timeout):
            await self._synced.wait()

    # --- introspection ------------------------------------------------------------------------

    # --- HTTP conveniences ------------------------------------------------------------------------

    def _http_calls(self) -> HistoryClient:
        if self._history is None:
            raise RuntimeError("this needs the HTTP API: give the client http_url (and use it inside `async with`)")
        return self._history

    @property
    def media(self) -> MediaClient:
        """Uploads, downloads and media info over the HTTP API (needs ``http_url``), with this
        device's token; unfinished uploads are remembered in ``state_path`` when given."""
        if self._http_url is None:
            raise RuntimeError("media needs the HTTP API: give the client http_url, e.g. http://127.0.0.1:8080")
        self._check_open()
        assert self._media is not None  # made by __aenter__ whenever http_url is set
        return self._media

    async def presence(self, *users: str) -> dict[str, UserPresence]:
        """State and last seen of users: yourself and users you share a conversation with
        (anyone else: HistoryFailed with code ``forbidden``). Live changes: subscribe to ``p/{user}``."""
        return await self._http_calls().presence(users)

    async def register_push_token(self, platform: Literal["apns", "fcm"], token: str, *, sandbox: bool = False) -> None:
        """Register this device's APNs/FCM token, so the server wakes it when it is away."""
        body: dict[str, object] = {"platform": platform, "token": token, "sandbox": sandbox}
        await self._http_calls().put(f"/v1/devices/{quote(self._device, safe='')}/push", body)

    async def set_muted(self, conv: str, muted: bool = True) -> None:
        """Mute (or unmute) a conversation's pushes for this user."""
        await self._http_calls().put(f"/v1/conversations/{quote(conv, safe=':@')}/settings", {"muted": muted})

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
            rate_limited=self._rate_limited,
            events_dropped=self._events_dropped,
            gaps_detected=self._gaps_detected,
            gap_fetches=self._gap_fetches,
            sync_requests=self._history.sync_requests if self._history is not None else 0,
            delivered_in_order=self._delivered_in_order,
        )


def _heads(pending: list[PendingSend]) -> dict[str, str]:
    """The id of each conversation's oldest pending send."""
    heads: dict[str, str] = {}
    for entry in pending:
        heads.setdefault(entry.conv, entry.id)
    return heads
