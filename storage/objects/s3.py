"""Media in an S3-compatible bucket (AWS S3, MinIO, Ceph, R2, Garage …), through aiobotocore.

::

    begin ───▶ CreateMultipartUpload  staging {"upload", "size", "type", "parts": [[n, etag, size]…],
                                               "tail", "tail_key"}
    append ──▶ GetObject tail_key (the remainder recorded last) ──▶ spool: an unlinked temporary file
               chunks ──▶ spool ── PART_SIZE spooled ──▶ UploadPart n ──▶ record
               end of the chunks, or a cut ──▶ spool's remainder ──▶ PutObject {key}.tail.{token} ──▶ record
               (then the tail it replaced is deleted)
    finish ──▶ UploadPartCopy tail_key as the last part, CompleteMultipartUpload, delete {key}.tail.*
    adopt ───▶ CopyObject (a direct upload's staging key to its key), delete the staging key
    read ────▶ GetObject with Range, its body streamed 256 KiB at a time

A remainder smaller than a part (S3 wants 5 MiB or more of every part but the last) is kept as an
object of its own, so that an upload cut anywhere is carried on by any process from its staging
state alone; an append's offset is always its staging state's (the parts and the tail). A part
uploaded but not recorded (a crash between the two) is uploaded again under the same number,
which replaces it; a tail PUT but not recorded is read only as far as the recorded length. An
empty file has no multipart upload (S3 wants at least one part): finish PUTs it.

The bytes of an upload are never whole in memory: a part is read from the spool when it is sent,
with its Content-MD5 (which S3 checks), and at most PART_TRANSFERS parts of the whole process are
in memory at once. A bucket should abort incomplete multipart uploads after a few days (a
lifecycle rule): the parts of an upload a crash orphaned are otherwise kept, and billed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, aclosing
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import aiohttp
from aiobotocore.config import AioConfig  # type: ignore[import-untyped]
from aiobotocore.session import get_session  # type: ignore[import-untyped]
from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

from storage.files import private_dir
from storage.objects.base import (
    ObjectStore,
    ObjectStoreError,
    PresignedPut,
    Record,
    UploadLost,
    content_disposition,
)
from storage.objects.transfer import READ_CHUNK, Incoming, ThreadFile, check_key, open_in_thread, read_at, write_all

__all__ = ["PART_SIZE", "PART_TRANSFERS", "S3ObjectStore"]

logger = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024
"""Bytes of every part but the last."""

MAX_PARTS = 10_000
"""S3's limit on the parts of one upload (so an upload is at most 80 GiB here)."""

PART_TRANSFERS = 4
"""Parts (or tails) in memory at once in the process, whatever the number of uploads."""

MAX_PRESIGNED_S = 7 * 24 * 3600
"""The longest a SigV4 presigned URL may be valid."""

_MISSING = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})
"""Error codes of an object or upload that is not there (a HEAD's error has only the status)."""


class _LoopSemaphore:
    """One semaphore for the whole process; made anew when the event loop changes (an asyncio
    semaphore belongs to the loop it first waited on)."""

    def __init__(self, value: int) -> None:
        self._value = value
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore = asyncio.Semaphore(value)

    def get(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self._value)
        return self._semaphore


_PART_SLOTS = _LoopSemaphore(PART_TRANSFERS)


@dataclass(frozen=True, slots=True)
class _Upload:
    """An upload's staging state: everything a process needs to carry it on."""

    upload: str  # the multipart upload's id; "" for an empty file (it is PUT whole by finish)
    size: int  # the declared size
    type: str  # the content type, for an empty file
    parts: tuple[tuple[int, str, int], ...]  # (number, ETag, size) of each part uploaded and recorded
    tail: int  # bytes of the tail object (tail_key) that follow the parts
    tail_key: str = ""  # each append keeps its remainder under a key of its own: {key}.tail.{token}

    @property
    def offset(self) -> int:
        return sum(part[2] for part in self.parts) + self.tail

    def dump(self) -> str:
        fields = {
            "upload": self.upload,
            "size": self.size,
            "type": self.type,
            "parts": self.parts,
            "tail": self.tail,
            "tail_key": self.tail_key,
        }
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def load(cls, staging: str) -> _Upload:
        try:
            fields = json.loads(staging)
            upload = cls(
                upload=fields["upload"],
                size=fields["size"],
                type=fields["type"],
                parts=tuple((number, etag, size) for number, etag, size in fields["parts"]),
                tail=fields["tail"],
                tail_key=fields.get("tail_key", ""),
            )
        except (ValueError, TypeError, KeyError):
            raise ObjectStoreError("not a staging state of the S3 object store") from None
        numbers = [part[0] for part in upload.parts]
        if not (
            isinstance(upload.upload, str)
            and isinstance(upload.type, str)
            and isinstance(upload.tail_key, str)
            and bool(upload.tail_key) == bool(upload.tail)
            and all(type(n) is int for n in (upload.size, upload.tail, *numbers))
            and all(isinstance(etag, str) and type(size) is int and size > 0 for _, etag, size in upload.parts)
            and numbers == list(range(1, len(numbers) + 1))
            and 0 <= upload.tail < PART_SIZE
            and upload.offset <= upload.size
        ):
            raise ObjectStoreError("not a staging state of the S3 object store")
        return upload


def _code(exc: Any) -> str:
    """The S3 error code of a ClientError."""
    error = cast(dict[str, Any], exc.response).get("Error", {})
    return str(error.get("Code", ""))


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """The driver's failures to action as ObjectStoreError."""
    try:
        yield
    except ClientError as exc:
        message = cast(dict[str, Any], exc.response).get("Error", {}).get("Message", "")
        raise ObjectStoreError(f"S3 refused to {action}: {_code(exc)} {message}".rstrip()) from exc
    except (BotoCoreError, aiohttp.ClientError) as exc:
        raise ObjectStoreError(f"S3 could not {action}: {type(exc).__name__}: {exc}") from exc


class _Spool:
    """The bytes of the part being gathered, in an unlinked temporary file."""

    def __init__(self, file: ThreadFile) -> None:
        self._file = file
        self.length = 0

    @classmethod
    async def create(cls, directory: Path | None) -> _Spool:
        def opener() -> int:
            fd, name = tempfile.mkstemp(prefix="upload-", suffix=".spool", dir=directory)  # 0600
            os.unlink(name)
            return fd

        return cls(await open_in_thread(opener))

    async def write(self, data: bytes | memoryview) -> None:
        await self._file.run(partial(write_all, data=data, at=self.length))
        self.length += len(data)

    async def contents(self) -> tuple[bytes, str]:
        """The spooled bytes and their Content-MD5 (which S3 checks)."""

        def work(fd: int) -> tuple[bytes, str]:
            data = read_at(fd, self.length, 0)
            return data, base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()

        return await self._file.run(work)

    def clear(self) -> None:
        self.length = 0

    def close(self) -> None:
        self._file.close()


class S3ObjectStore(ObjectStore):
    """Objects in one bucket, uploads as multipart uploads. Opened by ``open()`` (or ``async
    with``), which checks the bucket (and creates it when create_bucket says so)."""

    name = "s3"

    def __init__(
        self,
        *,
        endpoint: str,
        region: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        create_bucket: bool = False,
        spool_dir: Path | None = None,
    ) -> None:
        self.endpoint = endpoint  # "": AWS's, for the region
        self.region = region
        self.bucket = bucket
        self._access_key = access_key  # "" (both): the environment's credentials (an instance role …)
        self._secret_key = secret_key
        self._create_bucket = create_bucket
        self._spool_dir = spool_dir  # None: the system's temporary directory
        self._stack: AsyncExitStack | None = None
        self._s3: Any = None

    def __repr__(self) -> str:
        return f"S3ObjectStore(endpoint={self.endpoint or 'aws'!r}, region={self.region!r}, bucket={self.bucket!r})"

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Create the client and check the bucket."""
        if self._stack is not None:
            raise RuntimeError("the S3 object store is already open")
        if self._spool_dir is not None:
            await asyncio.to_thread(private_dir, self._spool_dir)
        config = AioConfig(
            signature_version="s3v4",
            s3={
                # A server of one's own has no bucket subdomains.
                **({"addressing_style": "path"} if self.endpoint else {}),
                # Bodies are not hashed into the signature (on the event loop, over plain HTTP):
                # the signed Content-MD5 of each part and tail vouches for their bytes.
                "payload_signing_enabled": False,
            },
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=10,
            read_timeout=60,
            # Checksums only where S3 requires them: many S3-compatible servers refuse the newer
            # ones. Parts carry a Content-MD5 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            warm_up_loader_caches=True,  # the service model is read in a thread, not on the loop
        )
        stack = AsyncExitStack()
        try:
            with _translated(f"connect to {self.endpoint or 'AWS'}"):
                self._s3 = await stack.enter_async_context(
                    get_session().create_client(
                        "s3",
                        region_name=self.region,
                        endpoint_url=self.endpoint or None,
                        aws_access_key_id=self._access_key or None,
                        aws_secret_access_key=self._secret_key or None,
                        config=config,
                    )
                )
            await self._check_bucket()
        except BaseException:
            self._s3 = None
            await stack.aclose()
            raise
        self._stack = stack
        logger.info("media in S3 bucket %s at %s", self.bucket, self.endpoint or f"AWS {self.region}")

    async def _check_bucket(self) -> None:
        with _translated(f"find the bucket {self.bucket}"):
            try:
                await self._s3.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _code(exc) in ("403", "AccessDenied"):
                    raise ObjectStoreError(
                        f"S3 refused access to the bucket {self.bucket}: check the access key and its permissions"
                    ) from exc
                if _code(exc) not in ("404", "NoSuchBucket"):
                    raise
            if not self._create_bucket:
                raise ObjectStoreError(f"the S3 bucket {self.bucket} does not exist")
            where = (
                {} if self.region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": self.region}}
            )
            await self._s3.create_bucket(Bucket=self.bucket, **where)

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()

    @property
    def _client(self) -> Any:
        if self._stack is None:
            raise ObjectStoreError("the S3 object store is not open")
        return self._s3

    # --- uploads ---------------------------------------------------------------------------------

    async def begin(self, key: str, size: int, content_type: str) -> str:
        check_key(key)
        if not 0 <= size <= PART_SIZE * MAX_PARTS:
            raise ValueError(f"an upload is of 0 to {PART_SIZE * MAX_PARTS} bytes, not {size}")
        upload = ""
        if size:
            with _translated(f"begin an upload to {key}"):
                response = await self._client.create_multipart_upload(
                    Bucket=self.bucket, Key=key, ContentType=content_type
                )
            upload = str(response["UploadId"])
        return _Upload(upload=upload, size=size, type=content_type, parts=(), tail=0).dump()

    async def append(
        self, key: str, staging: str, offset: int, chunks: AsyncIterator[bytes], record: Record
    ) -> tuple[int, str]:
        check_key(key)
        upload = _Upload.load(staging)
        if offset != upload.offset:
            raise ValueError(f"offset {offset} is not the offset {upload.offset} of the staging state")
        incoming = Incoming(chunks, room=upload.size - offset)
        spool = await _Spool.create(self._spool_dir)
        try:
            if upload.tail:
                await self._load_tail(key, upload, spool)
            upload = await self._send_parts(key, upload, incoming, spool, record)
            if spool.length != upload.tail:  # bytes came after the last part (the tail was 0 since)
                before = upload.tail_key
                upload = replace(upload, tail=spool.length, tail_key=await self._keep_tail(key, spool))
                await record(upload.offset, upload.dump())
                await self._forget_tail(before)
        finally:
            spool.close()
        incoming.raise_error()
        return upload.offset, upload.dump()

    async def _send_parts(
        self, key: str, upload: _Upload, incoming: Incoming, spool: _Spool, record: Record
    ) -> _Upload:
        """Spool incoming; upload and record a part each time PART_SIZE bytes are spooled."""
        async with aclosing(incoming.batches()) as batches:
            async for batch in batches:
                view = memoryview(batch)
                while view:
                    piece = view[: PART_SIZE - spool.length]
                    await spool.write(piece)
                    view = view[len(piece) :]
                    if spool.length == PART_SIZE:
                        before = upload.tail_key
                        upload = await self._send_part(key, upload, spool)
                        spool.clear()
                        await record(upload.offset, upload.dump())
                        await self._forget_tail(before)
        return upload

    async def _send_part(self, key: str, upload: _Upload, spool: _Spool) -> _Upload:
        number = len(upload.parts) + 1
        async with _PART_SLOTS.get():
            data, md5 = await spool.contents()
            with _translated(f"upload part {number} of {key}"):
                response = await self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload.upload, PartNumber=number, Body=data, ContentMD5=md5
                )
        return replace(upload, parts=(*upload.parts, (number, str(response["ETag"]), len(data))), tail=0, tail_key="")

    async def _keep_tail(self, key: str, spool: _Spool) -> str:
        """PUT the spool as a new tail object; its key. A key of its own per append: a second
        request carrying on the same upload (a phone that retried through another node) never
        overwrites the tail the recorded state names."""
        tail_key = f"{key}.tail.{secrets.token_hex(8)}"
        async with _PART_SLOTS.get():
            data, md5 = await spool.contents()
            with _translated(f"keep the last bytes of the upload to {key}"):
                await self._client.put_object(Bucket=self.bucket, Key=tail_key, Body=data, ContentMD5=md5)
        return tail_key

    async def _forget_tail(self, tail_key: str) -> None:
        """Delete a tail object no recorded state names any more (what is left, abort cleans)."""
        if tail_key:
            with contextlib.suppress(ObjectStoreError), _translated(f"delete {tail_key}"):
                await self._client.delete_object(Bucket=self.bucket, Key=tail_key)

    async def _delete_tails(self, key: str) -> None:
        """Every tail object of key: the recorded one, and those of requests that lost the race."""
        with _translated(f"delete the tail objects of {key}"):
            listed = await self._client.list_objects_v2(Bucket=self.bucket, Prefix=f"{key}.tail.", MaxKeys=1000)
            for item in listed.get("Contents", ()):
                await self._client.delete_object(Bucket=self.bucket, Key=str(item["Key"]))

    async def _load_tail(self, key: str, upload: _Upload, spool: _Spool) -> None:
        """Spool the recorded tail's bytes (a crash after its PUT may have left more)."""
        tail = upload.tail
        with _translated(f"read the last bytes of the upload to {key}"):
            try:
                response = await self._client.get_object(
                    Bucket=self.bucket, Key=upload.tail_key, Range=f"bytes=0-{tail - 1}"
                )
            except ClientError as exc:
                if _code(exc) not in _MISSING:
                    raise
                raise UploadLost(f"the upload to {key} lost its last {tail} bytes: it must begin again") from exc
            async with response["Body"] as body:
                while chunk := await body.read(READ_CHUNK):
                    await spool.write(chunk)
        if spool.length != tail:
            raise UploadLost(f"the upload to {key} kept {spool.length} of its last {tail} bytes: it must begin again")

    async def finish(self, key: str, staging: str, size: int) -> None:
        check_key(key)
        upload = _Upload.load(staging)
        if not size == upload.size == upload.offset:
            raise ValueError(f"the upload has {upload.offset} of its {upload.size} bytes, not {size}")
        with _translated(f"finish the upload to {key}"):
            try:
                await self._complete(key, upload)
            except ClientError as exc:
                if _code(exc) not in _MISSING:
                    raise
                # Gone: finished before (a retry), or aborted (then there is no object).
                if await self.size(key) != size:
                    raise UploadLost(
                        f"the upload to {key} is gone ({_code(exc)}), and no object of {size} bytes is there"
                    ) from exc
        await self._delete_tails(key)

    async def _complete(self, key: str, upload: _Upload) -> None:
        if not upload.upload:  # an empty file
            await self._client.put_object(Bucket=self.bucket, Key=key, Body=b"", ContentType=upload.type)
            return
        parts = [{"PartNumber": number, "ETag": etag} for number, etag, _ in upload.parts]
        if upload.tail:  # copied within S3 as the last part (its bytes never come back here)
            number = len(parts) + 1
            response = await self._client.upload_part_copy(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload.upload,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": upload.tail_key},
                CopySourceRange=f"bytes=0-{upload.tail - 1}",
            )
            parts.append({"PartNumber": number, "ETag": str(response["CopyPartResult"]["ETag"])})
        await self._client.complete_multipart_upload(
            Bucket=self.bucket, Key=key, UploadId=upload.upload, MultipartUpload={"Parts": parts}
        )

    async def abort(self, key: str, staging: str) -> None:
        check_key(key)
        if not staging:  # nothing in progress (a finished file's staging is empty)
            return
        upload = _Upload.load(staging)
        with _translated(f"abort the upload to {key}"):
            if upload.upload:
                try:
                    await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload.upload)
                except ClientError as exc:
                    if _code(exc) not in _MISSING:
                        raise
        await self._delete_tails(key)

    # --- objects ---------------------------------------------------------------------------------

    async def read(self, key: str, start: int = 0, end: int | None = None) -> AsyncIterator[bytes]:
        check_key(key)
        if start < 0 or (end is not None and end < start):
            raise ValueError(f"not a byte range: [{start}, {end})")
        if end == start:  # no bytes: S3 has no empty range
            if await self.size(key) is None:
                raise ObjectStoreError(f"no object at {key}")
            return
        body = await self._open_range(key, start, end)
        if body is None:
            return
        try:
            while True:
                with _translated(f"read {key}"):
                    chunk = await body.read(READ_CHUNK)
                if not chunk:
                    break
                yield chunk
        finally:
            body.close()

    async def _open_range(self, key: str, start: int, end: int | None) -> Any:
        """The body of GetObject [start, end); None when start is at or past the end."""
        ranged = {} if start == 0 and end is None else {"Range": f"bytes={start}-{'' if end is None else end - 1}"}
        with _translated(f"read {key}"):
            try:
                response = await self._client.get_object(Bucket=self.bucket, Key=key, **ranged)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    raise ObjectStoreError(f"no object at {key}") from exc
                if _code(exc) == "InvalidRange":  # the object is there, and shorter than start
                    return None
                raise
        return response["Body"]

    async def size(self, key: str) -> int | None:
        check_key(key)
        with _translated(f"read the size of {key}"):
            try:
                response = await self._client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                raise
        return int(response["ContentLength"])

    async def delete(self, key: str) -> None:
        check_key(key)
        with _translated(f"delete {key}"):
            await self._client.delete_object(Bucket=self.bucket, Key=key)

    async def adopt(self, source: str, key: str) -> None:
        check_key(source)
        check_key(key)
        with _translated(f"move {source} to {key}"):
            try:
                await self._client.copy_object(
                    Bucket=self.bucket, Key=key, CopySource={"Bucket": self.bucket, "Key": source}
                )
            except ClientError as exc:
                if _code(exc) not in _MISSING:
                    raise
                if await self.size(key) is None:  # not moved before (a retry) either
                    raise ObjectStoreError(f"there is no object at {source}") from exc
                return
            await self._client.delete_object(Bucket=self.bucket, Key=source)

    async def presigned_get(self, key: str, *, expires_s: float, filename: str, content_type: str) -> str | None:
        check_key(key)
        params = {
            "Bucket": self.bucket,
            "Key": key,
            "ResponseContentDisposition": content_disposition(filename),
            "ResponseContentType": content_type,
        }
        with _translated(f"sign a download of {key}"):
            url = await self._client.generate_presigned_url("get_object", Params=params, ExpiresIn=_expires(expires_s))
        return str(url)

    async def presigned_put(self, key: str, *, size: int, content_type: str, expires_s: float) -> PresignedPut | None:
        check_key(key)
        if size < 0:
            raise ValueError(f"an upload's size cannot be negative: {size}")
        # Content-Type and Content-Length are signed: S3 refuses a PUT of another type or size.
        params = {"Bucket": self.bucket, "Key": key, "ContentType": content_type, "ContentLength": size}
        with _translated(f"sign an upload to {key}"):
            url = await self._client.generate_presigned_url("put_object", Params=params, ExpiresIn=_expires(expires_s))
        return PresignedPut(url=str(url), headers={"Content-Type": content_type, "Content-Length": str(size)})


def _expires(expires_s: float) -> int:
    """A presigned URL's lifetime in whole seconds, within what SigV4 allows."""
    return max(1, min(round(expires_s), MAX_PRESIGNED_S))
