"""Media in a local directory: each object one file at ``{directory}/{key}``, each upload one
partial file under ``{directory}/uploads``.

::

    begin ───▶ uploads/{random}.part (empty)                 staging {"partial": name, "size": n}
    append ──▶ truncate it to offset, then ~1 MiB writes ──▶ fsync + record(offset) every ~4 MiB,
               and at the end (a cut too: what arrived is kept, then the cut is raised)
    finish ──▶ fsync, rename uploads/{random}.part ─▶ {key}, fsync the directory
    read ────▶ 256 KiB preads                                 (every file call in a worker thread)

Directories are 0700 and files 0600 whatever the umask (``storage.files``). A crash leaves at most
bytes past the recorded offset in a partial file, which the next append truncates away; a rename
is atomic, so an object is whole or absent.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from storage.files import private_dir, private_file
from storage.objects.base import ObjectStore, ObjectStoreError, Record, UploadLost
from storage.objects.transfer import READ_CHUNK, Incoming, ThreadFile, check_key, open_in_thread, read_at, write_all

__all__ = ["LocalObjectStore"]

logger = logging.getLogger(__name__)

RECORD_EVERY = 4 * 1024 * 1024
"""Bytes of an append made durable (fsync) and recorded together."""

LOCK_WAIT_S = 60.0
"""How long a request waits for another (of any process) writing the same upload."""

UPLOADS = "uploads"
"""The subdirectory of partial files (so no key may begin with it)."""

_PARTIAL_RE = re.compile(r"[0-9a-f]{32}\.part")


@dataclass(frozen=True, slots=True)
class _Staging:
    partial: str  # the partial file's name under uploads/
    size: int  # the declared size

    def dump(self) -> str:
        return json.dumps({"partial": self.partial, "size": self.size}, separators=(",", ":"))

    @classmethod
    def load(cls, staging: str) -> _Staging:
        try:
            fields = json.loads(staging)
            partial, size = fields["partial"], fields["size"]
        except (ValueError, TypeError, KeyError):
            raise ObjectStoreError("not a staging state of the local object store") from None
        if not (isinstance(partial, str) and _PARTIAL_RE.fullmatch(partial) and type(size) is int and size >= 0):
            raise ObjectStoreError("not a staging state of the local object store")
        return cls(partial, size)


@contextlib.contextmanager
def _disk_errors(action: str) -> Iterator[None]:
    """An OSError of the disk as the ObjectStoreError of action."""
    try:
        yield
    except OSError as exc:
        raise ObjectStoreError(f"could not {action}: {exc.strerror or type(exc).__name__}") from exc


class LocalObjectStore(ObjectStore):
    """Objects as files in directory, uploads as partial files beside them."""

    name = "local"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._uploads = directory / UPLOADS
        self._prepared: set[Path] = set()  # directories known to exist (private_dir checked them)

    def _object_path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == UPLOADS:
            raise ValueError(f"not an object key: {key!r} (uploads/ holds partial files)")
        return self.directory / key

    def _prepare(self, directory: Path) -> None:
        """directory and those between it and self.directory exist, 0700 (in a worker thread)."""
        if directory in self._prepared:
            return
        relative = directory.relative_to(self.directory)
        for step in [*reversed(relative.parents), relative]:  # ".", then each level down to directory
            private_dir(self.directory / step)
        self._prepared.add(directory)

    # --- uploads ---------------------------------------------------------------------------------

    async def begin(self, key: str, size: int, content_type: str) -> str:
        self._object_path(key)
        if size < 0:
            raise ValueError(f"an upload's size cannot be negative: {size}")
        staging = _Staging(f"{secrets.token_hex(16)}.part", size)

        def create() -> None:
            self._prepare(self._uploads)
            private_file(self._uploads / staging.partial)

        with _disk_errors(f"create an upload for {key}"):
            await asyncio.to_thread(create)
        return staging.dump()

    async def append(
        self, key: str, staging: str, offset: int, chunks: AsyncIterator[bytes], record: Record
    ) -> tuple[int, str]:
        self._object_path(key)
        state = _Staging.load(staging)
        if not 0 <= offset <= state.size:
            raise ValueError(f"offset {offset} is outside the upload's {state.size} bytes")
        incoming = Incoming(chunks, room=state.size - offset)
        with _disk_errors(f"open the upload to {key}"):
            try:
                file = await open_in_thread(partial(os.open, self._uploads / state.partial, os.O_WRONLY))
            except FileNotFoundError:
                raise UploadLost(f"the upload to {key} is gone (aborted or finished)") from None
        try:
            with _disk_errors(f"write the upload to {key}"):
                await file.run(partial(_truncate, at=offset))
            offset = await self._write(key, file, offset, incoming, lambda offset: record(offset, staging))
        finally:
            file.close()
        incoming.raise_error()
        return offset, staging

    async def _write(
        self, key: str, file: ThreadFile, offset: int, incoming: Incoming, record: Callable[[int], Awaitable[None]]
    ) -> int:
        """Write incoming at offset: fsync and record every RECORD_EVERY bytes and at the end."""
        recorded = written = offset
        async with aclosing(incoming.batches()) as batches:
            async for batch in batches:
                sync = written + len(batch) - recorded >= RECORD_EVERY
                with _disk_errors(f"write the upload to {key}"):
                    await file.run(partial(write_all, data=batch, at=written, sync=sync))
                written += len(batch)
                if sync:
                    recorded = written
                    await record(written)
        if written != recorded:
            with _disk_errors(f"write the upload to {key}"):
                await file.run(os.fsync)
            await record(written)
        return written

    async def finish(self, key: str, staging: str, size: int) -> None:
        target = self._object_path(key)
        state = _Staging.load(staging)
        if size != state.size:
            raise ValueError(f"the upload is of {state.size} bytes, not {size}")
        partial_path = self._uploads / state.partial

        def rename() -> None:
            try:
                fd = os.open(partial_path, os.O_RDONLY)
            except FileNotFoundError:  # finished before (or aborted: then there is no object)
                if _size(target) == size:
                    return
                raise UploadLost(f"the upload to {key} is gone, and no object of {size} bytes is there") from None
            try:
                found = os.fstat(fd).st_size
                if found != size:
                    raise ObjectStoreError(f"the upload to {key} has {found} of its {size} bytes")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._prepare(target.parent)
            os.replace(partial_path, target)
            _sync_directory(target.parent)

        with _disk_errors(f"finish the upload to {key}"):
            await asyncio.to_thread(rename)

    @contextlib.asynccontextmanager
    async def exclusive(self, key: str, staging: str) -> AsyncIterator[None]:
        self._object_path(key)
        if not staging:  # a finished file: nothing to write
            yield
            return
        state = _Staging.load(staging)
        try:
            fd = await asyncio.to_thread(os.open, self._uploads / state.partial, os.O_RDONLY)
        except FileNotFoundError:  # gone: the append that follows says so
            yield
            return
        try:
            deadline = time.monotonic() + LOCK_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise ObjectStoreError(f"another request is writing the upload to {key}") from None
                    await asyncio.sleep(0.05)
            yield
        finally:
            os.close(fd)  # and with it the lock

    async def abort(self, key: str, staging: str) -> None:
        self._object_path(key)
        if not staging:  # nothing in progress (a finished file's staging is empty)
            return
        state = _Staging.load(staging)
        with _disk_errors(f"delete the upload to {key}"):
            await asyncio.to_thread((self._uploads / state.partial).unlink, missing_ok=True)

    # --- objects ---------------------------------------------------------------------------------

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        path = self._object_path(key)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"not a byte range: [{start}, {end})")
        with _disk_errors(f"read {key}"):
            try:
                file = await open_in_thread(partial(os.open, path, os.O_RDONLY))
            except FileNotFoundError:
                raise ObjectStoreError(f"no object at {key}") from None
        try:
            position = start
            while end is None or position < end:
                want = READ_CHUNK if end is None else min(READ_CHUNK, end - position)
                with _disk_errors(f"read {key}"):
                    data = await file.run(partial(read_at, size=want, at=position))
                if not data:
                    break
                position += len(data)
                yield data
        finally:
            file.close()

    async def size(self, key: str) -> int | None:
        path = self._object_path(key)
        with _disk_errors(f"read the size of {key}"):
            return await asyncio.to_thread(_size, path)

    async def delete(self, key: str) -> None:
        path = self._object_path(key)
        with _disk_errors(f"delete {key}"):
            await asyncio.to_thread(path.unlink, missing_ok=True)

    async def adopt(self, source: str, key: str) -> None:
        source_path, target = self._object_path(source), self._object_path(key)

        def move() -> None:
            try:
                os.replace(source_path, target)
            except FileNotFoundError:
                if _size(target) is None:
                    raise ObjectStoreError(f"there is no object at {source}") from None
                return
            _sync_directory(target.parent)

        with _disk_errors(f"move {source} to {key}"):
            await asyncio.to_thread(move)


def _truncate(fd: int, at: int) -> None:
    """Drop the bytes past at (a crash may have left some after the last record)."""
    found = os.fstat(fd).st_size
    if found < at:
        raise ObjectStoreError(f"the partial file has {found} bytes, fewer than the upload's durable offset {at}")
    if found > at:
        os.ftruncate(fd, at)


def _size(path: Path) -> int | None:
    """The size of the file at path; None when there is none (a directory is none)."""
    try:
        found = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return found.st_size if stat.S_ISREG(found.st_mode) else None


def _sync_directory(path: Path) -> None:
    """Make a rename into path durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
