"""What every object store does alike: take an upload's chunks, work files in threads, check keys.

::

    chunks (a client's body) ──▶ Incoming.batches() ──▶ ~1 MiB batches, never past the declared size
                                        └── a cut (the source raised) or too many bytes ends them
                                            early: Incoming.error keeps why, for after the record
    store ──await ThreadFile.run(fn)──▶ fn(fd) in a worker thread: pwrite, pread, fsync …

The event loop never waits on a disk: every read, write and sync runs in a worker thread, one
batch at a time. A task cancelled while its thread works leaves the thread to finish, and the
descriptor is closed after it (not under it: its number could be reused by another file).
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, TypeVar

__all__ = ["READ_CHUNK", "WRITE_BATCH", "Incoming", "ThreadFile", "check_key", "open_in_thread", "read_at", "write_all"]

T = TypeVar("T")

WRITE_BATCH = 1024 * 1024
"""Bytes gathered from the chunks before one write (one thread hop)."""

READ_CHUNK = 256 * 1024
"""The largest chunk ``read`` yields."""

_KEY_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}(/[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}){0,3}")


def check_key(key: str) -> None:
    """Refuse a key that is not a short relative path of plain names (``media/{id}``): no ``..``,
    no leading dot or slash, nothing a file system or a URL would read differently."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError(f"not an object key: {key!r}")


class Incoming:
    """The chunks of one append, as batches of about ``WRITE_BATCH`` bytes.

    A source that raises (the client's connection was cut) ends the batches quietly after those
    that arrived; so does a chunk that would go past ``room`` bytes (it is dropped whole). The
    store makes what it got durable, records it, then calls ``raise_error``."""

    def __init__(self, chunks: AsyncIterator[bytes], *, room: int, batch: int = WRITE_BATCH) -> None:
        self._chunks = chunks
        self._room = room
        self._batch = batch
        self.received = 0
        self.error: Exception | None = None

    async def batches(self) -> AsyncGenerator[bytes, None]:
        pending = bytearray()
        while True:
            try:
                chunk = await anext(self._chunks)
            except StopAsyncIteration:
                break
            except Exception as exc:  # a cut: what arrived before it is kept
                self.error = exc
                break
            if len(chunk) > self._room - self.received:
                self.error = ValueError(
                    f"more bytes than the upload's declared size: {self._room - self.received} more were expected, "
                    f"a chunk of {len(chunk)} came"
                )
                break
            self.received += len(chunk)
            pending += chunk
            if len(pending) >= self._batch:
                yield bytes(pending)
                pending.clear()
        if pending:
            yield bytes(pending)

    def raise_error(self) -> None:
        """Raise what ended the chunks early, if anything did."""
        if self.error is not None:
            raise self.error


class ThreadFile:
    """A file descriptor worked on in worker threads, one call at a time, closed once no call
    runs on it any more."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._running: asyncio.Future[Any] | None = None
        self._closed = False

    async def run(self, fn: Callable[[int], T]) -> T:
        """fn(fd) in a worker thread. Cancelling the caller does not stop the thread: close()
        then waits for it."""
        if self._closed:
            raise RuntimeError("the file is closed")
        running: asyncio.Future[T] = asyncio.get_running_loop().run_in_executor(None, fn, self.fd)
        self._running = running
        return await asyncio.shield(running)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        running, self._running = self._running, None
        if running is not None and not running.done():
            running.add_done_callback(lambda _: os.close(self.fd))
        else:
            os.close(self.fd)


async def open_in_thread(opener: Callable[[], int]) -> ThreadFile:
    """The descriptor opener() returns (it runs in a worker thread), as a ThreadFile. Cancelled
    meanwhile, the descriptor it still opens is closed."""
    opening = asyncio.get_running_loop().run_in_executor(None, opener)
    try:
        fd = await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise
    return ThreadFile(fd)


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


def write_all(fd: int, data: bytes | memoryview, at: int, *, sync: bool = False) -> None:
    """Write data at offset at (all of it), then fsync when asked."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, at)
        view = view[written:]
        at += written
    if sync:
        os.fsync(fd)


def read_at(fd: int, size: int, at: int) -> bytes:
    """Up to size bytes from offset at (fewer only at the end of the file)."""
    parts: list[bytes] = []
    while size > 0:
        data = os.pread(fd, size, at)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        at += len(data)
    return b"".join(parts)
