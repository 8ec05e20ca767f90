"""The push dispatcher: wake devices that are not connected, once per burst, never twice.

::

    pipeline: message stored ─▶ notify(stored, recipients) ─▶ awaited before the ack goes out
        ─▶ intake (batched like a group commit): recipients' devices with a token, not connected
               ─▶ push store: one pending row per (user, device, conv), due when the window closes
    loop: claim_due ─▶ per job, again: device connected now? read up to this seq? → suppressed
                   ─▶ compose: 1 message → its preview; n → "n new messages"; e2e → content-free;
                      muted → badge only; badge = total unread; collapse id = conv;
                      1:1 high priority, groups normal
                   ─▶ provider (retries with backoff, bounded; a timeout per send)
                   ─▶ invalid token → deleted; misconfiguration → reported once
                   ─▶ finish: remembered as pushed up to seq (a retry or restart never re-sends it)

At most once per window: a job is marked 'sending' durably before the provider is called, and a
restart drops jobs left in that state instead of sending them again. One exception is beyond
any sender's control: a send whose answer is lost (timeout, cut connection) is retried, with
the same notification id and collapse id, so if the first did arrive the second replaces it on
the device rather than adding a second notification. Channels are not pushed (fan-out
on read: members catch up when they open the app). The sender's own devices are not pushed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Container, Mapping, Sequence

from prometheus_client import Counter, Gauge, Histogram

from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.service import Service
from push.base import (
    Outcome,
    PushMessage,
    PushProvider,
    PushResult,
    derive_notification_id,
    send_with_retries,
    token_fingerprint,
)
from storage.base import ConversationStates, Groups, PushStore
from storage.records import Pending, PushJob, StoredMessage

logger = logging.getLogger(__name__)

SEND_FINISH_S = 5.0  # at shutdown, how long a push already handed to a provider may still take

PUSH_SENT = Counter("mqchat_push_sent_total", "Push notifications by final outcome", ["platform", "outcome"])
PUSH_SUPPRESSED = Counter("mqchat_push_suppressed_total", "Notifications not sent, by reason", ["reason"])
PUSH_QUEUE_DEPTH = Gauge("mqchat_push_queue_depth", "Pending push notifications", multiprocess_mode="livesum")
PUSH_LATENCY = Histogram(
    "mqchat_push_send_seconds",
    "Time to a provider's final answer for one notification (retries included)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

ConnectedDevices = Callable[[str], Awaitable[Container[str]]]
"""A user's devices connected now (from the presence registry)."""

PREVIEW_CHARS = 120


_Intake = tuple[StoredMessage, tuple[str, ...], asyncio.Future[None], str | None]
"""A stored message, its recipients, the future of its pushes being queued, its preview."""


def media_preview(body: str, types: Sequence[str]) -> str:
    """What a notification says of a media message: "Photo" or "File" (never a file name), then
    the caption. An end-to-end encrypted conversation's notification carries no content at all."""
    what = "📷 Photo" if types and all(t.startswith("image/") for t in types) else "📎 File"
    if len(types) > 1:
        what = f"{what}s ({len(types)})" if what.endswith("Photo") else f"📎 {len(types)} files"
    return f"{what}: {body}"[:PREVIEW_CHARS] if body else what


class PushDispatcher(Service):
    """A service (async context manager) running two workers, the intake and the delivery loop;
    each send is a job. At ``aclose()`` a send in flight may finish within ``SEND_FINISH_S`` (or
    its job stays 'sending' and is dropped at the next start)."""

    name = "push dispatcher"
    job_grace_s = SEND_FINISH_S

    def __init__(
        self,
        *,
        states: ConversationStates,
        groups: Groups,
        push_store: PushStore,
        connected_devices: ConnectedDevices,
        providers: Mapping[str, PushProvider],
        window_s: float = 2.0,
        max_per_s: float = 100.0,
        attempts: int = 4,
        base_delay_s: float = 0.5,
        send_timeout_s: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self._states = states
        self._groups = groups
        self._push = push_store
        self._connected = connected_devices
        self._providers = dict(providers)
        self._window_ms = int(window_s * 1000)
        self._interval_s = 1.0 / max_per_s
        self._attempts = attempts
        self._base_delay_s = base_delay_s
        self._send_timeout_s = send_timeout_s
        self._clock = clock
        self._intake: asyncio.Queue[_Intake] = asyncio.Queue(maxsize=100_000)
        self._wake = asyncio.Event()
        self._reported: set[str] = set()  # platforms whose misconfiguration was reported
        self._names: dict[str, str] = {}  # group names for titles

    async def _start(self) -> None:
        dropped = await self._push.drop_interrupted()
        if dropped:
            logger.warning("dropped %d push notifications interrupted by a restart (never sent twice)", dropped)
            PUSH_SUPPRESSED.labels(reason="interrupted").inc(dropped)
        self.start_worker(self._run_intake(), name="push-intake")
        self.start_worker(self._run_delivery(), name="push-delivery")

    # --- intake -------------------------------------------------------------------------------------

    def notify(
        self, stored: StoredMessage, recipients: tuple[str, ...], preview: str | None = None
    ) -> asyncio.Future[None] | None:
        """A message was stored for recipients (the sender is skipped). The future completes
        once its pushes are queued durably (never with an error): await it before acking, and
        an acked message's push survives a crash too. preview: what the notification says of
        it (default: a text's beginning; for media, see ``media_preview``)."""
        targets = tuple(u for u in recipients if u != stored.sender)
        if not targets:
            return None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            self._intake.put_nowait((stored, targets, done, preview))
        except asyncio.QueueFull:
            PUSH_SUPPRESSED.labels(reason="intake_full").inc(len(targets))
            return None
        return done

    async def _run_intake(self) -> None:
        while True:
            batch = [await self._intake.get()]
            while not self._intake.empty() and len(batch) < 500:
                batch.append(self._intake.get_nowait())
            try:
                await self._admit([(stored, targets, preview) for stored, targets, _, preview in batch])
            except Exception:
                logger.exception("push intake failed for %d messages", len(batch))
            finally:
                for _, _, done, _ in batch:
                    if not done.done():
                        done.set_result(None)

    async def _admit(self, batch: list[tuple[StoredMessage, tuple[str, ...], str | None]]) -> None:
        users = {u for _, targets, _ in batch for u in targets}
        tokens = await self._push.tokens(users)
        if not tokens:
            return
        by_user: dict[str, list[str]] = {}
        for t in tokens:
            by_user.setdefault(t.user, []).append(t.device)
        users_with_tokens = list(by_user)
        answers = await asyncio.gather(*(self._connected(u) for u in users_with_tokens))
        connected = dict(zip(users_with_tokens, answers, strict=True))
        pending: list[Pending] = []
        for stored, targets, given in batch:
            for user in targets:
                for device in by_user.get(user, ()):
                    if device in connected[user]:
                        PUSH_SUPPRESSED.labels(reason="online").inc()
                        continue
                    preview = given if given is not None else stored.body[:PREVIEW_CHARS]
                    pending.append(Pending(user, device, stored.conv, stored.seq, stored.sender, preview))
        if pending:
            await self._push.enqueue(pending, due_at=self._clock.time_ms() + self._window_ms)
            self._wake.set()

    # --- delivery -----------------------------------------------------------------------------------

    async def _run_delivery(self) -> None:
        last_depth = 0.0
        while True:
            try:
                jobs = await self._push.claim_due(self._clock.time_ms(), limit=50)
                for job in jobs:
                    self.start_job(self._deliver(job), name="push-send")
                    await self._clock.sleep(self._interval_s)  # a backlog drains at a bounded rate
                if time.monotonic() - last_depth > 1.0:
                    PUSH_QUEUE_DEPTH.set(await self._push.depth())
                    last_depth = time.monotonic()
                if jobs:
                    continue
                due = await self._push.next_due()
                wait_s = 1.0 if due is None else max(0.0, min(1.0, (due - self._clock.time_ms()) / 1000))
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
            except Exception:
                logger.exception("push delivery loop failed; retrying")
                await self._clock.sleep(1.0)

    async def _deliver(self, job: PushJob) -> None:
        sent = False
        try:
            sent = await self._deliver_one(job)
        except Exception:
            logger.exception("push for %s/%s in %s failed", job.user, job.device, job.conv)
        finally:
            await self._push.finish(job, sent=sent, next_due_at=self._clock.time_ms() + self._window_ms)
            self._wake.set()

    async def _deliver_one(self, job: PushJob) -> bool:
        token = await self._push.token_of(job.user, job.device)
        if token is None:
            PUSH_SUPPRESSED.labels(reason="no_token").inc()
            return False
        if job.device in await self._connected(job.user):
            PUSH_SUPPRESSED.labels(reason="online").inc()
            return False
        state = await self._states.conversation_state(conv=job.conv, user=job.user)
        if state is not None and state.read >= job.last_seq:
            PUSH_SUPPRESSED.labels(reason="read").inc()
            return False
        provider = self._providers.get(token.platform)
        if provider is None:
            self._report_once(token.platform, f"no {token.platform} provider is configured; pushes are dropped")
            PUSH_SUPPRESSED.labels(reason="no_provider").inc()
            return False
        muted, e2e = await self._push.settings(job.user, job.conv)
        dm = job.conv.startswith("dm:")
        title: str | None = job.sender if dm else await self._group_name(job.conv)
        body: str | None = job.preview if job.count == 1 else f"{job.count} new messages"
        if not dm and job.count == 1:
            body = f"{job.sender}: {job.preview}"
        if muted or e2e:
            title = body = None
        message = PushMessage(
            platform=token.platform,  # type: ignore[arg-type]
            token=token.token,
            notification_id=derive_notification_id(f"{job.user}/{job.device}/{job.conv}/{job.last_seq}"),
            collapse_id=job.conv,
            title=title,
            body=body,
            badge=await self._states.total_unread(job.user),
            priority="high" if dm and not muted else "normal",
            content_free=e2e and not muted,
            data={"conv": job.conv, "seq": str(job.last_seq), "count": str(job.count)},
            topic=token.topic,
            sandbox=token.sandbox,
        )
        started = time.perf_counter()
        result = await send_with_retries(
            provider, message, attempts=self._attempts, base_delay_s=self._base_delay_s, timeout_s=self._send_timeout_s
        )
        PUSH_LATENCY.observe(time.perf_counter() - started)
        PUSH_SENT.labels(platform=token.platform, outcome=str(result.outcome)).inc()
        await self._after(result, token.token, token.platform, token.registered_at)
        return result.outcome is Outcome.DELIVERED

    async def _after(self, result: PushResult, token: str, platform: str, registered_at: int) -> None:
        if result.outcome is Outcome.INVALID_TOKEN:
            since = result.token_invalid_since
            deleted = await self._push.delete_token(
                token, registered_before=int(since * 1000) if since is not None else None
            )
            logger.info(
                "push token %s %s: %s %s",
                token_fingerprint(token),
                "deleted" if deleted else "kept (re-registered)",
                result.status,
                result.reason,
            )
        elif result.outcome is Outcome.AUTH_ERROR:
            self._report_once(
                platform,
                f"{platform} refused our credentials ({result.status} {result.reason}); "
                "no token was deleted; check the push configuration",
            )
        elif result.outcome is Outcome.RETRY:
            logger.warning(
                "push %s gave up after retries: %s %s", token_fingerprint(token), result.status, result.reason
            )
        elif result.outcome is Outcome.REJECTED:
            logger.warning("push %s rejected: %s %s", token_fingerprint(token), result.status, result.reason)

    def _report_once(self, platform: str, what: str) -> None:
        if platform not in self._reported:
            self._reported.add(platform)
            logger.error("PUSH MISCONFIGURED: %s", what)

    async def _group_name(self, conv: str) -> str:
        if conv not in self._names:
            group = await self._groups.group(conv)
            self._names[conv] = group.name if group is not None else "New message"
        return self._names[conv]
