"""Watermark writes merged per (user, conversation).

::

    recv/read ─▶ key idle?  yes ─▶ write it
                            no  ─▶ join the write waiting behind the one in flight
                                   (its delivered and read are the maxima of its requests)

A phone that comes back online answers what it received with a burst of ``recv`` and ``read``
requests for the same conversation. Written one by one, each costs the store a round trip or
more, and the burst's receipt event waits for the last of them; merged, a burst costs at most
two writes (the one in flight and the one behind it), whatever its length.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Protocol

from storage.base import StoreRefusal
from storage.records import WatermarkResult

__all__ = ["MergedWatermarks"]


class SetsWatermarks(Protocol):
    """The part of ``storage.base.ConversationStates`` written here."""

    async def set_watermark(
        self, *, conv: str, user: str, delivered: int | None, read: int | None
    ) -> WatermarkResult: ...


@dataclass(slots=True)
class _Write:
    delivered: int | None
    read: int | None
    joined: int = 1  # requests merged into this write
    started: bool = False
    # its answer, or None: it failed, and each request that joined it is written alone
    done: asyncio.Future[WatermarkResult | None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def merge(self, delivered: int | None, read: int | None) -> None:
        self.delivered = _higher(self.delivered, delivered)
        self.read = _higher(self.read, read)
        self.joined += 1


def _higher(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


class MergedWatermarks:
    """``set_watermark`` of the store, one write at a time per (user, conv), with the
    requests that arrive meanwhile merged into the next one.

    A merged write answers ``changed`` to one of its requests only, so a burst makes one receipt
    event. When a merged write is refused (one of its requests names a seq past the end, say),
    each of its requests is written alone, so each gets its own answer."""

    def __init__(self, states: SetsWatermarks) -> None:
        self._states = states
        self._tails: dict[tuple[str, str], _Write] = {}  # the newest write of a key, running or waiting

    async def set_watermark(self, *, conv: str, user: str, delivered: int | None, read: int | None) -> WatermarkResult:
        key = (user, conv)
        tail = self._tails.get(key)
        if tail is not None and not tail.started:
            tail.merge(delivered, read)
            merged = await asyncio.shield(tail.done)
            if merged is None:
                return await self._states.set_watermark(conv=conv, user=user, delivered=delivered, read=read)
            return WatermarkResult(merged.state, changed=False)
        write = _Write(delivered, read)
        self._tails[key] = write
        try:
            if tail is not None:
                await asyncio.wait([tail.done])
            write.started = True
            try:
                result = await self._states.set_watermark(
                    conv=conv, user=user, delivered=write.delivered, read=write.read
                )
            except StoreRefusal:
                if write.joined == 1:
                    raise
                write.done.set_result(None)
                return await self._states.set_watermark(conv=conv, user=user, delivered=delivered, read=read)
            write.done.set_result(result)
            return result
        finally:
            if not write.done.done():  # failed or cancelled: the requests that joined write alone
                write.done.set_result(None)
            if self._tails.get(key) is write:
                del self._tails[key]
