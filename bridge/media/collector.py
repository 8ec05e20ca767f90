"""The media collector: uploads never completed and files never sent are deleted once they are
older than their expiry (``media_upload_expiry``, ``media_unsent_expiry``).

::

    every sweep_s: MediaIndex.stale_media ─▶ each one: its bytes deleted, then its record
                   (a page at a time until none is left; one that fails is retried next sweep)

Deleting the bytes before the record makes it safe to kill at any moment: the record is what the
next sweep finds them by. An account erasure deletes the user's files itself
(``MediaService.erase_user``)."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter

from bridge.media.service import MediaService
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.service import Service
from storage.base import MediaIndex
from storage.records import UPLOADING

logger = logging.getLogger(__name__)

COLLECTED = Counter("mqchat_media_collected_total", "Uploads and files the collector deleted", ["what"])

PAGE = 100
"""Records per stale_media read."""


class MediaCollector(Service):
    name = "media collector"

    def __init__(self, *, media: MediaService, index: MediaIndex, clock: Clock = SYSTEM_CLOCK) -> None:
        super().__init__()
        self._media = media
        self._index = index
        self._clock = clock

    async def _start(self) -> None:
        self.start_worker(self._sweeps(), name="media-collector")

    async def _sweeps(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception as exc:  # the store or the object store is away: the next sweep retries
                logger.warning("media collection failed: %s", type(exc).__name__)
            await asyncio.sleep(self._media.config.sweep_s)

    async def sweep(self) -> int:
        """Delete what has expired now; returns how many were deleted."""
        cfg = self._media.config
        now = self._clock.time_ms()
        deleted = 0
        failed: set[str] = set()
        while True:
            stale = [
                r
                for r in await self._index.stale_media(
                    uploading_before_ms=now - int(cfg.upload_expiry_s * 1000),
                    unsent_before_ms=now - int(cfg.unsent_expiry_s * 1000),
                    limit=PAGE + len(failed),
                )
                if r.id not in failed
            ]
            if not stale:
                return deleted
            for record in stale:
                try:
                    await self._media.collect(record)
                except Exception as exc:  # one that fails fails alone
                    failed.add(record.id)
                    logger.warning("could not delete media %s: %s", record.id, type(exc).__name__)
                    continue
                deleted += 1
                COLLECTED.labels(what="upload" if record.state == UPLOADING else "unsent").inc()
