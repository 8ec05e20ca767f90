"""Where attachments' bytes live: the interface the media service writes and reads through.

::

    begin(key, size, content_type) ─▶ staging          a resumable upload of size bytes at key
    append(key, staging, offset, chunks, record) ─▶ (offset, staging)
        the bytes from offset on; record(offset, staging) is awaited each time more of them are
        durable (so a cut or a crash loses at most what arrived since), and once at the end
    finish(key, staging, size)                          the upload becomes the object at key
    abort(key, staging)                                 the upload's bytes are gone
    read(key, start, end) ─▶ chunks                     bytes [start, end) of an object
    size(key), delete(key)
    presigned_get / presigned_put                       direct transfers, where the backend has them

The staging state is a string the backend alone reads (a multipart upload's id and parts, say);
the caller keeps it with the upload's durable offset in the media index, so any process can
carry on an upload that another began. A backend never holds an object whole in memory.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from urllib.parse import quote

from mqchat.errors import StorageError

__all__ = ["ObjectStore", "ObjectStoreError", "PresignedPut", "Record", "UploadLost", "content_disposition"]

Record = Callable[[int, str], Awaitable[None]]
"""record(offset, staging): the upload's bytes up to offset are durable, in that staging state."""


class ObjectStoreError(StorageError):
    """The object store failed (unreachable, refused, or an object is missing): like any
    storage failure, an HTTP call that meets it answers 503 and may be retried."""


def content_disposition(filename: str) -> str:
    """``attachment`` (a browser saves the file, never renders it) with filename as an ASCII
    fallback and in full (RFC 6266); plain ``attachment`` without a name. Served by the node and
    by a presigned URL alike."""
    if not filename:
        return "attachment"
    fallback = "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in filename)
    return (
        f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename.encode('utf-8', 'replace'), safe='')}"
    )


class UploadLost(ObjectStoreError):
    """An upload's bytes are gone (its partial file, its multipart upload or its tail): it cannot
    go on, and must begin again. Retrying does not help."""


@dataclass(frozen=True, slots=True)
class PresignedPut:
    url: str
    headers: dict[str, str]  # what the client must send with its PUT


class ObjectStore(ABC):
    """One backend of media bytes. Keys are ``media/{id}``; an upload's partial bytes are the
    backend's business until ``finish``."""

    name: str  # "local" or "s3", for metrics and logs

    @abstractmethod
    async def begin(self, key: str, size: int, content_type: str) -> str:
        """Start a resumable upload of size bytes; returns its staging state."""

    @abstractmethod
    async def append(
        self, key: str, staging: str, offset: int, chunks: AsyncIterator[bytes], record: Record
    ) -> tuple[int, str]:
        """Write chunks at offset (the upload's durable offset: bytes past it that a cut or a
        crash left behind are overwritten). Returns the new (offset, staging), also when chunks
        ends early (a cut connection): what arrived is made durable and recorded first. Never
        writes past the size given to begin (ValueError)."""

    @abstractmethod
    async def finish(self, key: str, staging: str, size: int) -> None:
        """All size bytes are durable: make them the object at key (idempotent)."""

    @abstractmethod
    async def abort(self, key: str, staging: str) -> None:
        """Delete an unfinished upload's bytes (idempotent; an empty staging: nothing to do)."""

    def exclusive(self, key: str, staging: str) -> AbstractAsyncContextManager[None]:
        """Held while one request writes an upload: no other request, of any process, writes it
        meanwhile where the backend can promise that (a local directory: a lock on the partial
        file). Elsewhere nothing (S3: requests that race are told apart by the compare-and-set of
        the recorded offset, and each keeps its remainder under a key of its own)."""
        return contextlib.nullcontext()

    async def adopt(self, source: str, key: str) -> None:
        """Make the object at source (a direct upload's, PUT with a presigned URL) the object at
        key, and delete source. ObjectStoreError where there is no such object."""
        raise ObjectStoreError("this object store takes no direct uploads")

    @abstractmethod
    def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        """Bytes [start, end) of the object at key (end None: to its end), in chunks of at most
        a few hundred KiB. ObjectStoreError when it is missing."""

    @abstractmethod
    async def size(self, key: str) -> int | None:
        """The object's size in bytes; None when there is none at key."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete the object at key (idempotent)."""

    async def presigned_get(self, key: str, *, expires_s: float, filename: str, content_type: str) -> str | None:
        """A URL that downloads key without credentials until it expires; None when the backend
        has none (then the node serves the bytes itself). Signing needs no request, but may
        refresh the backend's credentials: hence async."""
        return None

    async def presigned_put(self, key: str, *, size: int, content_type: str, expires_s: float) -> PresignedPut | None:
        """A URL (and headers) with which a client PUTs exactly size bytes to key directly; None
        when the backend has none."""
        return None

    async def aclose(self) -> None:
        """Release connections."""
        return None
