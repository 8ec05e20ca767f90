"""Attachments: resumable uploads, the checks that make an upload a file, who may read it, and
what a ``msg`` event says of it.

::

    create(user, size, type, sha256, …) ─▶ the user's untouched upload of the same file, if any
                                         (a retried POST), else: limits (size, type, quota)
                                         ─▶ ObjectStore.begin ─▶ MediaIndex.create_media
    receive(user, id, offset, chunks)    ─▶ ObjectStore.append ─ record ─▶ MediaIndex.advance_upload
                                            (compare-and-set on the durable offset: a stale or
                                            concurrent writer is refused, 409)
        all bytes there ─▶ finish: ObjectStore.finish, then read the file once:
                           sha256 (460 and the upload is gone when it differs),
                           the type its first bytes show (415), an image's size and thumbnail
                         ─▶ MediaIndex.complete_media
    send with media   ─▶ check_send (the sender's own finished uploads) ─▶ append ─▶ grant_media
    download          ─▶ the owner, or a member of a conversation it was sent to

An opaque upload (``encrypted``: an end-to-end encrypted conversation's file) is never sniffed
and gets no thumbnail; its size and sha256 are still checked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import logging
import re
import tempfile
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

from bridge.history import require_member
from bridge.media.inspect import SNIFF_BYTES, canonical_type, describe_image, shows_type
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.config import MediaConfig
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import new_mid, parse_conv
from storage.base import Groups, MediaIndex
from storage.files import private_dir
from storage.objects.base import ObjectStore, PresignedPut, UploadLost
from storage.records import READY, UPLOADING, MediaRecord

__all__ = ["MediaService", "Upload", "media_key"]

logger = logging.getLogger(__name__)

UPLOADS = Counter("mqchat_media_uploads_total", "Uploads by how they ended", ["outcome"])
UPLOAD_BYTES = Counter("mqchat_media_upload_bytes_total", "Upload bytes made durable")
DOWNLOAD_BYTES = Counter("mqchat_media_download_bytes_total", "Media bytes served by this node")
INSPECT_SECONDS = Histogram(
    "mqchat_media_inspect_seconds",
    "Checking a finished upload: its sha256, its type and (images) its thumbnail",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)

BODY_IDLE_S = 30.0
"""An upload's body that sends nothing for this long is ended (what arrived is kept)."""

SETTLE_S = BODY_IDLE_S + 5.0
"""How long a HEAD waits for a PATCH of the same upload in this process to end (a stalled one
ends within BODY_IDLE_S)."""

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
OPAQUE_TYPE = "application/octet-stream"


def media_key(id: str) -> str:
    return f"media/{id}"


def direct_key(id: str) -> str:
    """Where a direct upload's presigned PUT lands: moved to media_key once checked, so a URL
    still valid after that cannot replace the checked file."""
    return f"direct/{id}"


def _refuse(code: ErrorCode, message: str) -> RequestError:
    return RequestError(code, message)


@dataclass(slots=True)
class _Held:
    lock: asyncio.Lock
    users: int = 0  # requests holding or waiting for the lock


@dataclass(frozen=True, slots=True)
class Upload:
    """What a client declares when it creates an upload."""

    size: int
    content_type: str
    sha256: str  # hex
    filename: str = ""
    opaque: bool = False


class MediaService:
    """Uploads, downloads and the media checks of a send, over the store's MediaIndex, the
    object store and Groups (membership)."""

    def __init__(
        self,
        *,
        index: MediaIndex,
        objects: ObjectStore,
        groups: Groups,
        config: MediaConfig | None = None,
        clock: Clock = SYSTEM_CLOCK,
        cached: int = 20_000,
        scratch: Path | None = None,
    ) -> None:
        self._scratch = scratch  # where a finished image is copied to be read (default: the system's)
        self._index = index
        self._objects = objects
        self._groups = groups
        self._config = config = config or MediaConfig()
        self._clock = clock
        self._allowed = frozenset(canonical_type(t) for t in config.types)
        # Finished files never change: their records are kept here (a history page's attachments).
        self._ready: OrderedDict[str, MediaRecord] = OrderedDict()
        self._granted: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._cached = cached
        self._uploading: dict[str, _Held] = {}  # one request at a time per upload in this process
        self._creating: dict[str, _Held] = {}  # one create at a time per user in this process

    @property
    def config(self) -> MediaConfig:
        return self._config

    @property
    def objects(self) -> ObjectStore:
        return self._objects

    # --- uploads ----------------------------------------------------------------------------------

    async def create(self, user: str, upload: Upload) -> MediaRecord:
        """A new upload of user's, after the limits; its id names it from now on. A POST retried
        because its answer was lost gets the upload the first one made, not a second one that
        would sit among the user's uploads in progress until it expired: an upload of the same
        file (size, sha256, type, name) that no byte has reached yet (so no client is sending
        it) and that is young (half its life left)."""
        return await self._create(user, upload, same_file_resumes=True)

    async def _create(self, user: str, upload: Upload, *, same_file_resumes: bool) -> MediaRecord:
        cfg = self._config
        if not 0 < upload.size <= cfg.max_bytes:
            raise _refuse(ErrorCode.TOO_LARGE, f"a file is 1 to {cfg.max_bytes} bytes")
        sha256 = upload.sha256.lower()
        if not _SHA256_RE.fullmatch(sha256):
            raise _refuse(ErrorCode.BAD_REQUEST, "sha256 must be the file's SHA-256 digest, 64 hex digits")
        content_type = OPAQUE_TYPE if upload.opaque else canonical_type(upload.content_type)
        if not upload.opaque and content_type not in self._allowed:
            raise _refuse(ErrorCode.UNSUPPORTED_TYPE, f"files of type {content_type[:80]!r} are not accepted here")
        filename = "" if upload.opaque else upload.filename[:255]  # an encrypted file's name is not ours
        # One create at a time per user in this server process: two cannot both pass the limits,
        # nor both miss the other's upload of the same file (through two processes at one
        # instant, both can).
        async with self._held(self._creating, user):
            mine = await self._index.owner_media(user)
            if same_file_resumes:
                young = self._clock.time_ms() - cfg.upload_expiry_s * 1000 / 2  # half its life left
                wanted = (upload.size, sha256, content_type, upload.opaque, filename)
                for r in mine:
                    same = (r.size, r.sha256, r.content_type, r.opaque, r.filename) == wanted
                    sending = r.id in self._uploading  # a PATCH here, before its first bytes are durable
                    if same and r.state == UPLOADING and r.offset == 0 and not sending and r.created_ms >= young:
                        UPLOADS.labels(outcome="created_again").inc()
                        return r
            if sum(1 for r in mine if r.state == UPLOADING) >= cfg.user_uploads:
                raise _refuse(ErrorCode.QUOTA_EXCEEDED, f"at most {cfg.user_uploads} uploads in progress; finish one")
            if sum(r.size for r in mine) + upload.size > cfg.user_bytes:
                raise _refuse(ErrorCode.QUOTA_EXCEEDED, f"your files would pass {cfg.user_bytes} bytes")
            id = new_mid()
            staging = await self._objects.begin(media_key(id), upload.size, content_type)
            record = MediaRecord(
                id=id,
                owner=user,
                size=upload.size,
                content_type=content_type,
                sha256=sha256,
                opaque=upload.opaque,
                created_ms=self._clock.time_ms(),
                staging=staging,
                filename=filename,
            )
            await self._index.create_media(record)
        UPLOADS.labels(outcome="created").inc()
        return record

    async def upload_of(self, user: str, id: str) -> MediaRecord:
        """user's upload or file id (404 for anyone else's: its existence is not told)."""
        record = (await self._index.media_records([id])).get(id)
        if record is None or record.owner != user:
            raise _refuse(ErrorCode.NOT_FOUND, "no such upload")
        return record

    @contextlib.asynccontextmanager
    async def _held(self, held: dict[str, _Held], key: str) -> AsyncIterator[None]:
        """One request at a time per key of held in this process (a count keeps the lock while
        anyone waits for it)."""
        entry = held.get(key)
        if entry is None:
            entry = held[key] = _Held(asyncio.Lock())
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if not entry.users and held.get(key) is entry:
                del held[key]

    async def settled(self, user: str, id: str) -> MediaRecord:
        """user's upload id once no request of this process is writing it (at most SETTLE_S):
        a phone that lost its connection mid-PATCH asks where to resume while the server is
        still taking in what arrived; it is told the offset that request ends at."""
        if id in self._uploading:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SETTLE_S), self._held(self._uploading, id):
                    pass
        return await self.upload_of(user, id)

    async def receive(self, user: str, id: str, offset: int, chunks: AsyncIterator[bytes]) -> MediaRecord:
        """Bytes of user's upload id from offset on. What arrives is kept even when the stream is
        cut (the client resumes from the offset a HEAD reports); once every byte is there the
        upload is checked and becomes a file. Returns the record as it stands."""
        async with self._held(self._uploading, id):
            record = await self.upload_of(user, id)
            if record.state != UPLOADING and offset == record.size:
                return record  # the answer to the last PATCH was lost: it is done
            key = media_key(id)
            async with self._objects.exclusive(key, record.staging):
                record = await self.upload_of(user, id)  # as it stands now that no one else writes it
                if record.state != UPLOADING:
                    if offset == record.size:  # the answer to the last PATCH was lost: it is done
                        return record
                    raise RequestError(ErrorCode.OFFSET_MISMATCH, "this upload is complete")
                if offset != record.offset:
                    raise RequestError(
                        ErrorCode.OFFSET_MISMATCH, f"the upload is at offset {record.offset}, not {offset}"
                    )
                if record.offset < record.size:
                    durable = record.offset

                    async def keep(new_offset: int, staging: str) -> None:
                        nonlocal durable
                        if not await self._index.advance_upload(
                            id, expected=durable, offset=new_offset, staging=staging
                        ):
                            raise RequestError(ErrorCode.OFFSET_MISMATCH, "another request moved this upload; resume")
                        UPLOAD_BYTES.inc(new_offset - durable)
                        durable = new_offset

                    try:
                        await self._objects.append(key, record.staging, offset, chunks, keep)
                    except ValueError as exc:
                        raise RequestError(ErrorCode.TOO_LARGE, "more bytes than the upload's length") from exc
                    except UploadLost:
                        await self._discard(record, outcome="lost")
                        raise RequestError(
                            ErrorCode.UPLOAD_LOST, "this upload's bytes are gone; create it again"
                        ) from None
                    record = await self.upload_of(user, id)
                if record.offset == record.size:  # (also: a finish that a crash or an error cut short)
                    try:
                        record = await self._finish(record)
                    except UploadLost:
                        await self._discard(record, outcome="lost")
                        raise RequestError(
                            ErrorCode.UPLOAD_LOST, "this upload's bytes are gone; create it again"
                        ) from None
                return record

    async def _finish(self, record: MediaRecord) -> MediaRecord:
        key = media_key(record.id)
        await self._objects.finish(key, record.staging, record.size)
        return await self._check_and_complete(record)

    async def _check_and_complete(self, record: MediaRecord) -> MediaRecord:
        """Read the file once: its digest, its type, an image's facts. A file that fails is gone."""
        key = media_key(record.id)
        if self._scratch is not None:
            await asyncio.to_thread(private_dir, self._scratch)
        with INSPECT_SECONDS.time(), tempfile.TemporaryDirectory(prefix="inspect-", dir=self._scratch) as scratch:
            thumbnailing = not record.opaque and record.content_type.startswith("image/")
            copy = Path(scratch) / "file"
            digest = hashlib.sha256()
            head = b""
            seen = 0
            with contextlib.ExitStack() as stack:
                out = stack.enter_context(copy.open("wb")) if thumbnailing else None
                async for chunk in self._objects.read(key):
                    digest.update(chunk)
                    seen += len(chunk)
                    if len(head) < SNIFF_BYTES:
                        head += chunk[: SNIFF_BYTES - len(head)]
                    if out is not None:
                        await asyncio.to_thread(out.write, chunk)
            if seen != record.size or digest.hexdigest() != record.sha256:
                await self._discard(record, outcome="checksum_mismatch")
                raise RequestError(
                    ErrorCode.CHECKSUM_MISMATCH, "the file's sha256 is not the one declared; upload it again"
                )
            if not record.opaque and not shows_type(head, record.content_type):
                await self._discard(record, outcome="type_mismatch")
                raise RequestError(ErrorCode.UNSUPPORTED_TYPE, f"the file is not of type {record.content_type}")
            facts = None
            if thumbnailing:
                facts = await asyncio.to_thread(
                    describe_image,
                    copy,
                    record.content_type,
                    thumbnail_px=self._config.thumbnail_px,
                    max_pixels=self._config.max_pixels,
                )
        width, height, thumbnail = (facts.width, facts.height, facts.thumbnail) if facts else (0, 0, b"")
        now = self._clock.time_ms()
        if not await self._index.complete_media(
            record.id, content_type=record.content_type, width=width, height=height, thumbnail=thumbnail,
            completed_ms=now,
        ):  # fmt: skip
            # another request completed it meanwhile (the same bytes, checked the same way)
            return await self.upload_of(record.owner, record.id)
        UPLOADS.labels(outcome="completed").inc()
        done = dataclasses.replace(
            record,
            state=READY,
            offset=record.size,
            staging="",
            width=width,
            height=height,
            thumbnail=thumbnail,
            completed_ms=now,
        )
        self._remember(done)
        return done

    async def _discard(self, record: MediaRecord, *, outcome: str) -> None:
        key = media_key(record.id)
        await self._objects.abort(key, record.staging)  # (nothing for a finished file)
        await self._objects.delete(key)
        await self._objects.delete(direct_key(record.id))
        await self._index.delete_media(record.id)
        UPLOADS.labels(outcome=outcome).inc()

    async def terminate(self, user: str, id: str) -> None:
        """Delete user's upload (or file): its bytes first, then its record."""
        record = await self.upload_of(user, id)
        await self._discard(record, outcome="terminated")
        self._ready.pop(id, None)

    # --- direct uploads (presigned) -----------------------------------------------------------------

    async def create_direct(self, user: str, upload: Upload) -> tuple[MediaRecord, PresignedPut]:
        """An upload the client PUTs straight to the object store, then completes with
        ``complete_direct``; unsupported (400) where the store has no presigned URLs."""
        if not self._config.presigned:
            raise _refuse(ErrorCode.UNSUPPORTED, "direct uploads are not offered here; use the resumable upload")
        record = await self._create(user, upload, same_file_resumes=False)
        put = await self._objects.presigned_put(
            direct_key(record.id),
            size=record.size,
            content_type=record.content_type,
            expires_s=self._config.url_expiry_s,
        )
        if put is None:
            raise _refuse(ErrorCode.UNSUPPORTED, "this object store has no presigned uploads")
        return record, put

    async def complete_direct(self, user: str, id: str) -> MediaRecord:
        record = await self.upload_of(user, id)
        if record.state == READY:
            return record
        if record.offset != record.size:  # (else moved before a crash cut this short)
            size = await self._objects.size(direct_key(id))
            if size != record.size:
                raise RequestError(
                    ErrorCode.OFFSET_MISMATCH, f"the object store holds {size or 0} of the file's {record.size} bytes"
                )
            await self._objects.abort(media_key(id), record.staging)  # the resumable upload begun for it
            await self._objects.adopt(direct_key(id), media_key(id))
            if not await self._index.advance_upload(id, expected=record.offset, offset=record.size, staging=""):
                return await self.upload_of(user, id)
        record = dataclasses.replace(record, offset=record.size, staging="")
        return await self._check_and_complete(record)

    # --- reading ------------------------------------------------------------------------------------

    async def readable(self, user: str, id: str) -> MediaRecord:
        """The file id, if user may read it: its owner, or a member of a conversation it was sent
        to. Read from the index (a file deleted by another node is gone here too)."""
        record = (await self._index.media_records([id])).get(id)
        if record is None or record.state != READY:
            raise _refuse(ErrorCode.NOT_FOUND, "no such file")
        if record.owner == user:
            return record
        for conv_id in await self._index.media_conversations(id):
            conv = parse_conv(conv_id)
            if conv is None:
                continue
            with contextlib.suppress(RequestError):
                await require_member(self._groups, user, conv)
                return record
        raise _refuse(ErrorCode.NOT_FOUND, "no such file")  # not told apart from one that does not exist

    def stream(self, record: MediaRecord, start: int, end: int) -> AsyncIterator[bytes]:
        async def counted() -> AsyncIterator[bytes]:
            async for chunk in self._objects.read(media_key(record.id), start, end):
                DOWNLOAD_BYTES.inc(len(chunk))
                yield chunk

        return counted()

    async def presigned_get(self, record: MediaRecord) -> str | None:
        if not self._config.presigned:
            return None
        return await self._objects.presigned_get(
            media_key(record.id),
            expires_s=self._config.url_expiry_s,
            filename=record.filename or record.id,
            content_type=record.content_type,
        )

    # --- sends --------------------------------------------------------------------------------------

    async def check_send(self, user: str, ids: Sequence[str], *, id: str, conv: str) -> list[MediaRecord]:
        """The records of a send's media, each user's own finished upload (bad_media otherwise).
        Read from the index, never from what this process remembers (the owner may have deleted
        the file through another node)."""
        found = await self._index.media_records(ids)
        records = []
        for media_id in ids:
            record = found.get(media_id)
            if record is None or record.owner != user or record.state != READY:
                raise RequestError(
                    ErrorCode.BAD_MEDIA,
                    f"media {media_id!r} is not a finished upload of yours",
                    id=id,
                    conv=conv,
                )
            self._remember(record)
            records.append(record)
        return records

    async def grant(self, ids: Sequence[str], conv: str) -> None:
        """The members of conv may read ids from now on. Before the message is stored: a crash
        between the two leaves a grant without a message (the ids were never shown to anyone),
        never a message whose files its readers cannot fetch."""
        new = [i for i in ids if (i, conv) not in self._granted]
        if not new:
            return
        await self._index.grant_media(new, conv)
        for media_id in new:
            self._granted[(media_id, conv)] = None
        while len(self._granted) > self._cached:
            self._granted.popitem(last=False)

    async def attachments(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """What ``msg`` events and history say of each file of ids (unknown ones left out)."""
        missing = [i for i in dict.fromkeys(ids) if i not in self._ready]
        if missing:
            for record in (await self._index.media_records(missing)).values():
                if record.state == READY:
                    self._remember(record)
        return {i: attachment(self._ready[i]) for i in ids if i in self._ready}

    def _remember(self, record: MediaRecord) -> None:
        self._ready[record.id] = record
        self._ready.move_to_end(record.id)
        while len(self._ready) > self._cached:
            self._ready.popitem(last=False)

    def forget(self, id: str) -> None:
        self._ready.pop(id, None)

    # --- collection ---------------------------------------------------------------------------------

    async def collect(self, record: MediaRecord) -> None:
        """Delete a record the collector or an erasure chose: bytes first, then the record
        (a process killed between the two leaves the record, and the next sweep finishes)."""
        key = media_key(record.id)
        if record.state == UPLOADING:
            await self._objects.abort(key, record.staging)
        await self._objects.delete(key)
        await self._index.delete_media(record.id)
        self.forget(record.id)

    async def erase_user(self, user: str) -> int:
        """Delete every upload and file of user (an account erasure); returns how many."""
        records = await self._index.owner_media(user)
        for record in records:
            await self.collect(record)
        return len(records)


def attachment(record: MediaRecord) -> dict[str, Any]:
    """A file as ``msg`` events and history describe it."""
    out: dict[str, Any] = {"id": record.id, "type": record.content_type, "size": record.size}
    if record.opaque:
        out["encrypted"] = True
        return out
    if record.filename:
        out["name"] = record.filename
    if record.width and record.height:
        out["width"], out["height"] = record.width, record.height
    if record.thumbnail:
        out["thumbnail"] = base64.b64encode(record.thumbnail).decode("ascii")
    return out
