"""Receipt coalescing: at most one ``receipt`` event per (conversation, user) per window.

::

    recv/read ─▶ store watermark (monotonic) ─changed─▶ note(conv, user, state)
                                                          │ first note opens a window
                                                          ▼ (later notes replace the state)
                                       window closes ─▶ one receipt to u/{m}/in for every member
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bridge.outgoing import Outgoing
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.protocol import encode, user_in_topic
from mqchat.service import Service, ServiceStatistics

logger = logging.getLogger(__name__)

Publish = Callable[[list[Outgoing]], Awaitable[None]]


def receipt_envelope(*, conv: str, user: str, delivered: int, read: int) -> dict[str, object]:
    return {"type": "receipt", "conv": conv, "user": user, "delivered": delivered, "read": read}


def receipt_outgoing(conv: str, user: str, delivered: int, read: int, members: tuple[str, ...]) -> list[Outgoing]:
    payload = encode(receipt_envelope(conv=conv, user=user, delivered=delivered, read=read))
    return [Outgoing(user_in_topic(m), payload) for m in dict.fromkeys(members)]


@dataclass(frozen=True, kw_only=True)
class ReceiptStatistics(ServiceStatistics):
    noted: int  # watermark changes seen
    emitted: int  # receipt events published (one per window per conversation and user)
    pending: int  # windows open now


class ReceiptCoalescer(Service):
    """A service (async context manager): each open window is a job. At ``aclose()`` open
    windows run to their end and flush (within the service's ``job_grace_s``)."""

    name = "receipt coalescer"

    def __init__(self, *, publish: Publish, window_s: float = 0.5, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__()
        self._publish = publish
        self._window_s = window_s
        self._clock = clock
        self._latest: dict[tuple[str, str], tuple[int, int, tuple[str, ...]]] = {}
        self._noted = 0
        self._emitted = 0

    def note(self, *, conv: str, user: str, delivered: int, read: int, members: tuple[str, ...]) -> None:
        """Record user's new watermarks of conv; the event goes out when the window closes.
        Raises RuntimeError outside the service's context."""
        key = (conv, user)
        opened = key not in self._latest
        if opened:
            self.start_job(self._flush_after_window(key), name=f"receipt-{conv}-{user}")
        self._noted += 1
        self._latest[key] = (delivered, read, members)

    async def _flush_after_window(self, key: tuple[str, str]) -> None:
        try:
            await self._clock.sleep(self._window_s)
        finally:
            delivered, read, members = self._latest.pop(key)
            self._emitted += 1
            try:
                await self._publish(receipt_outgoing(key[0], key[1], delivered, read, members))
            except Exception:
                logger.exception("publishing a receipt for %s failed", key[0])

    def statistics(self) -> ReceiptStatistics:
        tasks = self.task_statistics()
        return ReceiptStatistics(
            workers=tasks.workers,
            dead_workers=tasks.dead_workers,
            jobs=tasks.jobs,
            noted=self._noted,
            emitted=self._emitted,
            pending=len(self._latest),
        )
