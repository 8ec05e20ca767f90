"""The message pipeline: request envelope + authenticated (user, device) → what to publish.

Who may read or write a conversation is asked of ``bridge.history`` (the same checks the HTTP
API makes); a refusal, from there or from the store, becomes the request's ``error`` reply in
one place (``Pipeline._refused``, worded by ``bridge.refusals``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bridge import metrics
from bridge.history import members_of, message_event, require_member
from bridge.media.service import MediaService, attachment
from bridge.outgoing import Outgoing
from bridge.ratelimit import UNLIMITED, RateLimit, RateLimiter
from bridge.receipts import ReceiptCoalescer, receipt_outgoing
from bridge.refusals import not_member, refusal_error
from bridge.watermarks import MergedWatermarks
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.errors import ErrorCode, RequestError, StorageError, StorageUnavailable
from mqchat.protocol import (
    DEFAULT_MAX_ENVELOPE_BYTES,
    Request,
    SendRequest,
    TypingRequest,
    WatermarkRequest,
    ack_envelope,
    channel_topic,
    device_in_topic,
    encode,
    error_envelope,
    parse_request,
    user_in_topic,
)
from push.dispatcher import media_preview
from storage.base import ConversationStates, Groups, MessageLog, StoreRefusal
from storage.records import MediaRecord, NewMessage, StoredMessage

__all__ = ["Outgoing", "Pipeline", "RequestLimits"]

logger = logging.getLogger(__name__)


SEND_HOLD_S = 1.0  # a rate-limited device's later sends are refused this long at least (see _check_rate)
SEND_HOLD_RETRY_S = 0.5  # then its other sends are refused with this retry_after until the refused one returns
SEND_HOLD_CAP_S = 60.0  # a device that never sends the refused one again is not held longer than this


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Per-device and per-user budgets for sends and receipts (token buckets, see bridge.ratelimit;
    the defaults are set in ``mqchat.config.BridgeConfig``)."""

    device_sends: RateLimit = UNLIMITED
    user_sends: RateLimit = UNLIMITED
    device_receipts: RateLimit = UNLIMITED


class Pipeline:
    """Validate → dedup → sequence → persist → ack → fan out.

    ``handle`` reaches the store's ``append`` without awaiting anything before it, so requests
    handed to it in order (each in its own task, created in arrival order) are sequenced in
    that order: one device's sends keep their order.
    """

    def __init__(
        self,
        *,
        log: MessageLog,
        states: ConversationStates,
        groups: Groups,
        receipts: ReceiptCoalescer | None = None,
        max_envelope_bytes: int = DEFAULT_MAX_ENVELOPE_BYTES,
        typing_interval_s: float = 1.0,
        typing_per_minute: int = 120,
        clock: Clock = SYSTEM_CLOCK,
        on_stored: Callable[[StoredMessage, tuple[str, ...], str | None], Awaitable[None] | None] | None = None,
        limits: RequestLimits | None = None,
        media: MediaService | None = None,
    ) -> None:
        self._log = log
        self._watermarks = MergedWatermarks(states)
        self._groups = groups
        limits = limits or RequestLimits()
        self._sends_per_device = RateLimiter(limits.device_sends, clock=clock)
        self._sends_per_user = RateLimiter(limits.user_sends, clock=clock)
        self._receipts_per_device = RateLimiter(limits.device_receipts, clock=clock)
        self._send_holds: dict[tuple[str, str], tuple[float, str]] = {}  # device -> (hold's end, refused id)
        # New (not duplicate) group and 1:1 messages with their members, for push; what it returns
        # is awaited before the ack (the push is then queued durably).
        self._on_stored = on_stored
        self._receipts = receipts  # None: receipt events go out at once, uncoalesced
        self._typing_interval_s = typing_interval_s
        self._typing_last: dict[tuple[str, str, str], tuple[float, bool]] = {}  # (user, device, conv)
        self._typing_per_device = RateLimiter(
            RateLimit(rate=typing_per_minute / 60.0, burst=float(typing_per_minute)), clock=clock
        )
        self._max_envelope_bytes = max_envelope_bytes
        self._clock = clock
        self._media = media  # None: sends with media are refused (bad_media)
        # A media send's checks await the store before its append: the device's later sends
        # wait for it to be queued (its gate), so the device's order is kept.
        self._media_gates: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def handle(self, user: str, device: str, payload: bytes) -> list[Outgoing]:
        """Process one request from (user, device); never raises for bad input."""
        started = time.perf_counter()
        reply_topic = device_in_topic(user, device)
        request: Request | None = None
        try:
            request = parse_request(payload, max_bytes=self._max_envelope_bytes)
            self._check_rate(user, device, request)
            if isinstance(request, SendRequest):
                out = await self._send(user, device, request)
            elif isinstance(request, WatermarkRequest):
                out = await self._watermark(user, request)
            else:
                out = await self._typing(user, device, request)
        except (RequestError, StoreRefusal) as exc:
            return [self._refused(reply_topic, exc, request)]
        except StorageUnavailable as exc:
            logger.warning("storage unavailable while handling a request from %s/%s: %s", user, device, exc)
            return [self._error(reply_topic, ErrorCode.UNAVAILABLE, "storage unavailable; retry", request=request)]
        except StorageError:
            logger.exception("storage failed while handling a request from %s/%s", user, device)
            return [self._error(reply_topic, ErrorCode.INTERNAL, "storage unavailable; retry", request=request)]
        except Exception:
            logger.exception("unexpected failure handling a request from %s/%s", user, device)
            return [self._error(reply_topic, ErrorCode.INTERNAL, "internal error; retry", request=request)]
        metrics.PIPELINE_LATENCY.observe(time.perf_counter() - started)
        return out

    @classmethod
    def _refused(cls, topic: str, exc: RequestError | StoreRefusal, request: Request | None) -> Outgoing:
        """The one translation of a refused request into its ``error`` reply."""
        if isinstance(exc, StoreRefusal):
            id = request.id if isinstance(request, SendRequest) else None
            exc = refusal_error(exc, id=id, conv=request.conv.id if request is not None else None)
        return cls._error(topic, exc.code, exc.message, id=exc.id, conv=exc.conv, retry_after_s=exc.retry_after_s)

    @staticmethod
    def _error(
        topic: str,
        code: ErrorCode,
        message: str,
        *,
        id: str | None = None,
        conv: str | None = None,
        request: Request | None = None,
        retry_after_s: float | None = None,
    ) -> Outgoing:
        if request is not None:
            conv = request.conv.id
            id = request.id if isinstance(request, SendRequest) else None
        metrics.REQUESTS_REJECTED.labels(code=str(code)).inc()
        return Outgoing(topic, encode(error_envelope(code, message, id=id, conv=conv, retry_after_s=retry_after_s)))

    def _check_rate(self, user: str, device: str, request: Request) -> None:
        """Refuse (rate_limited, nothing processed) a send or receipt over its device's or its
        user's budget. Never awaits: requests still reach the store in arrival order.

        A refused send holds the device's other sends: every send of that device is refused
        until the ``retry_after_ms`` it was told (at least SEND_HOLD_S), and after that every
        send but the refused one, until the refused one comes back (at most SEND_HOLD_CAP_S).
        So sends it had already published behind the refused one, however late they arrive,
        are never stored ahead of it; the device sends them all again, in order."""
        if isinstance(request, SendRequest):
            key = (user, device)
            now = self._clock.monotonic()
            wait = 0.0
            hold = self._send_holds.get(key)
            if hold is not None:
                until, refused = hold
                if now < until:
                    wait = until - now
                elif request.id != refused and now < until + SEND_HOLD_CAP_S:
                    wait = SEND_HOLD_RETRY_S  # the refused send goes first
                else:
                    del self._send_holds[key]  # it came back (or the device gave it up)
            if not wait:
                wait = self._sends_per_device.take(key) or self._sends_per_user.take(user)
                if wait:
                    wait = max(wait, SEND_HOLD_S)
                    if len(self._send_holds) > 100_000:
                        self._send_holds = {k: h for k, h in self._send_holds.items() if h[0] + SEND_HOLD_CAP_S > now}
                    self._send_holds[key] = (now + wait, request.id)
            what = "sends"
        elif isinstance(request, WatermarkRequest):
            wait = self._receipts_per_device.take((user, device))
            what = "receipts"
        else:
            return  # typing has its own budget
        if wait:
            id = request.id if isinstance(request, SendRequest) else None
            raise RequestError(
                ErrorCode.RATE_LIMITED, f"too many {what}; retry later", id=id, conv=request.conv.id, retry_after_s=wait
            )

    async def _typing(self, user: str, device: str, req: TypingRequest) -> list[Outgoing]:
        """Relay to the other members, QoS 0, never stored. A repeat of the same state within the
        interval is dropped quietly; a device over its per-minute budget gets rate_limited."""
        audience = await require_member(self._groups, user, req.conv)
        if audience.kind == "channel":
            raise RequestError(ErrorCode.UNSUPPORTED, "typing is not relayed in channels", conv=req.conv.id)
        now = self._clock.monotonic()
        key = (user, device, req.conv.id)
        last = self._typing_last.get(key)
        if last is not None and last[1] == req.state and now - last[0] < self._typing_interval_s:
            return []
        wait = self._typing_per_device.take((user, device))
        if wait:
            raise RequestError(
                ErrorCode.RATE_LIMITED, "too many typing notifications", conv=req.conv.id, retry_after_s=wait
            )
        if len(self._typing_last) > 100_000:  # forget stale entries
            self._typing_last = {k: v for k, v in self._typing_last.items() if now - v[0] < 60}
        self._typing_last[key] = (now, req.state)
        event = encode({"type": "typing", "conv": req.conv.id, "user": user, "state": req.state})
        return [Outgoing(user_in_topic(m), event, qos=0) for m in audience.members if m != user]

    async def _watermark(self, user: str, req: WatermarkRequest) -> list[Outgoing]:
        members = (await require_member(self._groups, user, req.conv)).members
        is_read = req.type == "read"
        result = await self._watermarks.set_watermark(
            conv=req.conv.id, user=user, delivered=None if is_read else req.seq, read=req.seq if is_read else None
        )
        if not result.changed:
            return []  # monotonic: a lower or repeated watermark changes nothing
        state = result.state
        if self._receipts is None:
            return receipt_outgoing(state.conv, user, state.delivered, state.read, members)
        self._receipts.note(conv=state.conv, user=user, delivered=state.delivered, read=state.read, members=members)
        return []

    async def _send(self, user: str, device: str, req: SendRequest) -> list[Outgoing]:
        # No await before append (ordering): 1:1 membership is in the id, a group's is checked
        # by the store inside the transaction that sequences the message. A send with media
        # awaits its checks, and holds the device's later sends until it is queued.
        if req.conv.kind == "dm" and user not in members_of(req.conv):
            raise not_member(req.conv.id, req.id)
        key = (user, device)
        ahead = self._media_gates.get(key)
        gate: asyncio.Future[None] | None = None
        if req.media:
            gate = self._media_gates[key] = asyncio.get_running_loop().create_future()
        try:
            if ahead is not None and not ahead.done():
                await asyncio.wait([ahead])
            files: list[MediaRecord] = []
            if req.media:
                if self._media is None:
                    raise RequestError(ErrorCode.BAD_MEDIA, "media is not served here", id=req.id, conv=req.conv.id)
                files = await self._media.check_send(user, req.media, id=req.id, conv=req.conv.id)
                await self._media.grant(req.media, req.conv.id)
            appending = self._log.append(
                NewMessage(
                    conv=req.conv.id,
                    members=members_of(req.conv),
                    sender=user,
                    device=device,
                    client_id=req.id,
                    kind=req.kind,
                    body=req.body,
                    media=req.media,
                    ts=self._clock.time_ms(),
                )
            )
        finally:
            if gate is not None:
                gate.set_result(None)  # its waiters run after the append below has been queued
                if self._media_gates.get(key) is gate:
                    del self._media_gates[key]
        result = await appending
        stored = result.message
        if result.duplicate and stored.conv != req.conv.id:
            raise RequestError(
                ErrorCode.ID_REUSED,
                "this id already names a message in another conversation; use a fresh id per message",
                id=req.id,
                conv=req.conv.id,
            )
        if result.duplicate:
            metrics.MESSAGES_DUPLICATE.inc()
        else:
            metrics.MESSAGES_ACCEPTED.inc()
            if self._on_stored is not None and result.kind != "channel":
                preview = media_preview(stored.body, [f.content_type for f in files]) if files else None
                queued = self._on_stored(stored, result.members, preview)
                if queued is not None:
                    await queued
        ack = encode(ack_envelope(id=stored.client_id, conv=stored.conv, seq=stored.seq, mid=stored.mid, ts=stored.ts))
        out = [Outgoing(device_in_topic(user, device), ack)]
        # A duplicate is fanned out again: the first attempt may have been cut between commit
        # and publish, and clients dedup msg events on (conv, seq).
        known = {f.id: attachment(f) for f in files} if files else None
        event = encode(message_event(stored, known))
        if result.kind == "channel":
            metrics.CHANNEL_PUBLISHES.inc()
            out.append(Outgoing(channel_topic(stored.conv), event))
        else:
            out.extend(Outgoing(user_in_topic(member), event) for member in result.members)
        return out
