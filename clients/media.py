"""Attachments over the HTTP API: resumable uploads (the tus 1.0 core protocol) and downloads.

::

    upload(path)      sha256 of the file (read in a thread) ─► an upload of this file remembered?
                      HEAD it : POST /v1/media (Upload-Length, Upload-Metadata) ─► 201, Location
                      ─► PATCH Location, Upload-Offset: N, the file from N streamed in 256 KiB chunks
                         ─► 204, Upload-Offset ─► … until every byte is there (the last PATCH makes
                            the server check the sha256 and the type)
                         ─► a cut, a timeout, 5xx or 409: HEAD (after a backoff) ─► PATCH from its
                            Upload-Offset
                      ─► GET /v1/media/{id}/info ─► UploadedMedia
    download(id, to)  GET …/info (size, sha256) ─► GET /v1/media/{id} with Range: bytes=N- where N is
                      what to.part holds (a 307 is followed without the token) ─► appended to to.part
                      ─► size and sha256 checked ─► renamed to ``to``
    info(id)          GET /v1/media/{id}/info ─► MediaInfo
    delete(id)        DELETE /v1/media/uploads/{id}

Transport failures, timeouts and 408/429/5xx answers (and 409 to a PATCH) are retried with the
client's backoff, at most ``retries`` times in a row without progress: any byte that reaches the
server, or the ``.part`` file, starts the count again; a transfer makes at most MAX_ATTEMPTS
requests whatever its progress (``clients._transfer`` holds this policy and the file work done
in worker threads). A 460 ``checksum_mismatch`` (the file changed while it was sent), or an
upload gone from the server midway, starts the upload over from a new digest, once. Any other
answer raises :class:`clients.errors.MediaFailed` with the server's stable ``error`` code.

The URL of an unfinished upload is kept in an :class:`clients.state.UploadLedger` under the file's
(server, path, size, mtime, sha256), so that with :class:`clients.state.SqliteUploads` a new
process resumes it. An encrypted upload (``encrypted=True``: an end-to-end encrypted file) tells
the server neither its type nor its name. The bearer token is the device's MQTT token.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import mimetypes
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from clients._transfer import (
    GONE_STATUS,
    RETRYABLE_STATUS,
    Gone,
    Requests,
    Transient,
    append,
    digest,
    error_of,
    failure,
    finish_part,
    read_at,
    size_of,
    transport_problem,
    truncate,
)
from clients.errors import MediaFailed
from clients.state import MemoryUploads, UploadKey, UploadLedger

__all__ = [
    "CHUNK_BYTES",
    "MAX_ATTEMPTS",
    "MediaClient",
    "MediaInfo",
    "MediaStatistics",
    "Progress",
    "UploadedMedia",
    "encode_metadata",
]

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""progress(done, total): bytes of a transfer sent or written so far, of its total."""

CHUNK_BYTES = 256 * 1024
"""The chunks a file is read and sent in (and a download written in)."""
MAX_ATTEMPTS = 10_000
"""Requests of one transfer at most, whatever its progress."""
_RESTARTS = 1  # uploads begun again after a checksum_mismatch, or when gone midway
_REDIRECTS = 3
TUS = {"Tus-Resumable": "1.0.0"}
_DROPPED = frozenset({"checksum_mismatch", "unsupported_type"})  # the server deleted the upload
_METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True, slots=True)
class MediaInfo:
    """What ``GET /v1/media/{id}/info`` says of an upload or a file."""

    id: str
    type: str
    size: int
    state: str  # "uploading" | "ready"
    offset: int  # bytes the server holds (the size once ready)
    sha256: str
    name: str | None = None
    width: int | None = None
    height: int | None = None
    thumbnail: bytes | None = None  # images: a small JPEG
    encrypted: bool = False

    @property
    def ready(self) -> bool:
        return self.state == "ready"


@dataclass(frozen=True, slots=True)
class UploadedMedia:
    """A finished upload: a file the user may now send (``send(..., kind="media", media=(id,))``)."""

    id: str
    type: str  # as the server confirmed it from the bytes ("application/octet-stream" when encrypted)
    size: int
    sha256: str
    name: str | None = None
    width: int | None = None
    height: int | None = None
    thumbnail: bytes | None = None
    encrypted: bool = False
    resumes: int = 0  # times the bytes were sent again from the server's offset after a failure
    continued: bool = False  # an upload an earlier run (or call) began was carried on


@dataclass(frozen=True, slots=True)
class MediaStatistics:
    """A snapshot of a media client's counters."""

    uploads: int  # finished
    downloads: int  # finished
    resumes: int  # PATCH or GET requests that carried on from an offset after a failure
    failures: int  # failed attempts: transport errors, timeouts, retryable answers
    bytes_sent: int  # file bytes handed to the transport (bytes sent again included)
    bytes_received: int  # file bytes written to .part files


@dataclass(frozen=True, slots=True)
class _LocalFile:
    path: Path
    absolute: str
    size: int
    mtime_ns: int
    sha256: str
    content_type: str
    encrypted: bool


def encode_metadata(pairs: Mapping[str, str]) -> str:
    """tus ``Upload-Metadata``: ``key base64(value)`` pairs joined by commas (an empty value is
    sent as the key alone). Keys are 1-64 characters of ``[A-Za-z0-9_.-]``."""
    parts = []
    for key, value in pairs.items():
        if not _METADATA_KEY_RE.fullmatch(key):
            raise ValueError(f"not a tus metadata key: {key!r}")
        encoded = base64.b64encode(value.encode("utf-8")).decode("ascii")
        parts.append(f"{key} {encoded}" if encoded else key)
    return ",".join(parts)


def _offset_header(response: httpx.Response) -> int:
    value = response.headers.get("upload-offset", "")
    if not value.isdigit():
        raise MediaFailed("bad_response", f"{response.request.method} answered without an Upload-Offset")
    return int(value)


def _opt_int(obj: dict[str, Any], key: str) -> int | None:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _parse_info(body: object) -> MediaInfo:
    if not isinstance(body, dict):
        raise MediaFailed("bad_response", "media info is not a JSON object")
    id_, type_, state, sha256 = body.get("id"), body.get("type"), body.get("state"), body.get("sha256")
    size, offset = body.get("size"), body.get("offset")
    if not (isinstance(id_, str) and isinstance(type_, str) and isinstance(state, str) and isinstance(sha256, str)):
        raise MediaFailed("bad_response", "media info without id, type, state or sha256")
    if not (isinstance(size, int) and isinstance(offset, int)) or isinstance(size, bool) or isinstance(offset, bool):
        raise MediaFailed("bad_response", "media info without an integer size or offset")
    thumbnail = None
    if isinstance(body.get("thumbnail"), str):
        try:
            thumbnail = base64.b64decode(body["thumbnail"], validate=True)
        except ValueError:  # binascii.Error included
            thumbnail = None
    name = body.get("name")
    return MediaInfo(
        id=id_,
        type=type_,
        size=size,
        state=state,
        offset=offset,
        sha256=sha256,
        name=name if isinstance(name, str) else None,
        width=_opt_int(body, "width"),
        height=_opt_int(body, "height"),
        thumbnail=thumbnail,
        encrypted=body.get("encrypted") is True,
    )


class MediaClient:
    """Uploads, downloads and media calls of one user over an ``httpx.AsyncClient`` the caller owns
    (its ``base_url`` is the server's HTTP API)."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        token: str,
        timeout: float,  # each request, and each chunk of a transfer, is bounded by this
        sleep: Callable[[float], Awaitable[None]],  # the client's injected clock
        backoff: Callable[[int], float],  # retry attempt (0-based) -> seconds
        uploads: UploadLedger | None = None,
        retries: int = 8,  # failed attempts in a row without progress before MediaFailed("gave_up")
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        if retries < 0 or chunk_bytes <= 0:
            raise ValueError("retries must be >= 0 and chunk_bytes > 0")
        self._requests = Requests(
            http=http, token=token, timeout=timeout, sleep=sleep, backoff=backoff, retries=retries
        )
        self._uploads: UploadLedger = uploads if uploads is not None else MemoryUploads()
        self._chunk = chunk_bytes
        self._origin = str(http.base_url).rstrip("/")
        self._uploaded = 0
        self._downloaded = 0
        self._resumes = 0
        self._bytes_sent = 0
        self._bytes_received = 0

    def statistics(self) -> MediaStatistics:
        return MediaStatistics(
            uploads=self._uploaded,
            downloads=self._downloaded,
            resumes=self._resumes,
            failures=self._requests.failures,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
        )

    # --- calls ------------------------------------------------------------------------------------

    async def info(self, media_id: str) -> MediaInfo:
        """What the server says of an upload of one's own or a file one may read."""
        path = f"/v1/media/{quote(media_id, safe='')}/info"
        response = await self._requests.retrying(f"GET {path}", lambda: self._requests.call("GET", path))
        if response.status_code != 200:
            raise failure(f"GET {path}", response)
        try:
            return _parse_info(response.json())
        except ValueError:
            raise MediaFailed("bad_response", f"GET {path}: the answer is not JSON") from None

    async def delete(self, media_id: str) -> None:
        """Delete an upload (finished or not) of one's own."""
        path = f"/v1/media/uploads/{quote(media_id, safe='')}"
        response = await self._requests.retrying(
            f"DELETE {path}", lambda: self._requests.call("DELETE", path, headers=TUS)
        )
        if response.status_code not in (200, 204):
            raise failure(f"DELETE {path}", response)

    # --- uploading --------------------------------------------------------------------------------

    async def upload(
        self,
        path: Path,
        *,
        content_type: str | None = None,
        encrypted: bool = False,
        progress: Progress | None = None,
    ) -> UploadedMedia:
        """Upload a file (resuming an upload of the same file begun earlier); return it as the
        server describes it once it checked it. ``content_type`` defaults to what ``mimetypes``
        guesses from the name. MediaFailed when the server refuses it (``unsupported_type``,
        ``too_large``, ``quota_exceeded``, ``checksum_mismatch`` …) or the retries run out;
        OSError when the file cannot be read; ValueError when it is empty. An upload that is
        gone from the server midway (expired; or its last answer, a 460, was lost) starts over
        once. Cancelled (or failed for the app's own reasons), an upload stays remembered, and
        the next call for the same file carries it on."""
        path = Path(path)
        for restart in range(_RESTARTS + 1):
            local = await self._describe(path, content_type=content_type, encrypted=encrypted)
            try:
                return await self._upload(local, progress)
            except Gone:
                if restart == _RESTARTS:
                    raise MediaFailed("not_found", "the upload is gone from the server (expired or deleted)") from None
                logger.warning("the upload is gone from the server (expired, or its check failed); starting over")
            except MediaFailed as exc:
                if exc.code != "checksum_mismatch" or restart == _RESTARTS:
                    raise
                logger.warning("the server found the upload's sha256 wrong (did the file change?); starting over")
        raise AssertionError("unreachable")

    async def _describe(self, path: Path, *, content_type: str | None, encrypted: bool) -> _LocalFile:
        stat = await asyncio.to_thread(path.stat)
        absolute = await asyncio.to_thread(path.resolve)
        if stat.st_size <= 0:
            raise ValueError("an empty file cannot be uploaded")
        sha256 = await asyncio.to_thread(digest, path)
        if content_type is None:
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return _LocalFile(
            path=path,
            absolute=str(absolute),
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            sha256=sha256,
            content_type=content_type,
            encrypted=encrypted,
        )

    async def _upload(self, local: _LocalFile, progress: Progress | None) -> UploadedMedia:
        key = UploadKey(
            origin=self._origin,
            path=local.absolute,
            size=local.size,
            mtime_ns=local.mtime_ns,
            sha256=local.sha256,
        )
        url = self._uploads.find(key)
        offset: int | None = None
        if url is not None:
            offset = await self._head_retrying(url)
            if offset is None:
                logger.info("a remembered upload is gone from the server; beginning a new one")
                self._uploads.forget(key)
        continued = offset is not None
        if url is None or offset is None:
            url = await self._create(local)
            offset = 0
            self._uploads.remember(key, url)
        try:
            resumes = await self._send_from(url, local, offset, progress)
        except Gone:
            self._uploads.forget(key)
            raise
        except MediaFailed as exc:
            if exc.code in _DROPPED:
                self._uploads.forget(key)
            raise  # otherwise (gave_up, unauthorized …) the next call for this file carries it on
        self._uploads.forget(key)
        info = await self.info(url.rstrip("/").rsplit("/", 1)[-1])
        if not info.ready:
            raise MediaFailed("bad_response", f"every byte of {info.id} is there, yet it is not ready")
        self._uploaded += 1
        return UploadedMedia(
            id=info.id,
            type=info.type,
            size=info.size,
            sha256=info.sha256,
            name=info.name,
            width=info.width,
            height=info.height,
            thumbnail=info.thumbnail,
            encrypted=info.encrypted,
            resumes=resumes,
            continued=continued,
        )

    async def _create(self, local: _LocalFile) -> str:
        """POST /v1/media; the new upload's URL."""
        meta = {"sha256": local.sha256}
        if local.encrypted:
            meta["encrypted"] = "1"
        else:
            meta["filetype"] = local.content_type
            meta["filename"] = local.path.name
        headers = {**TUS, "Upload-Length": str(local.size), "Upload-Metadata": encode_metadata(meta)}
        response = await self._requests.retrying(
            "POST /v1/media", lambda: self._requests.call("POST", "/v1/media", headers=headers)
        )
        if response.status_code != 201:
            raise failure("POST /v1/media", response)
        location = response.headers.get("location")
        if not location:
            try:
                body = response.json()
            except ValueError:
                body = None
            location = body.get("upload_url") if isinstance(body, dict) else None
        if not isinstance(location, str) or not location:
            raise MediaFailed("bad_response", "POST /v1/media answered without a Location")
        return location

    async def _send_from(self, url: str, local: _LocalFile, offset: int, progress: Progress | None) -> int:
        """PATCH the file from offset until the server holds all of it; returns the resumes."""
        failures = 0  # attempts in a row that moved nothing
        resumes = 0
        error: Transient | None = None  # why the last attempt failed: ask where to resume
        for _ in range(MAX_ATTEMPTS):
            if error is not None:
                await self._requests.pause(failures, error, f"upload {url}")
                try:
                    reported = await self._head(url)
                except Transient as exc:
                    error, failures = exc, self._requests.count(failures, exc, f"HEAD {url}")
                    continue
                if reported is None:
                    raise Gone(url)
                if reported > offset:
                    failures = 0  # the failed PATCH delivered bytes
                elif failures > self._requests.retries:
                    raise MediaFailed("gave_up", f"upload {url}: {error} ({failures} attempts without progress)")
                offset, error = reported, None
                resumes += 1
                self._resumes += 1
            if offset >= local.size and await self._is_ready(url):
                return resumes
            if progress is not None:
                progress(offset, local.size)
            try:
                reached = await self._patch(url, local, offset, progress)
            except Transient as exc:
                self._requests.failures += 1
                error, failures = exc, failures + 1
                continue
            if reached >= local.size:
                return resumes
            if reached > offset:
                failures = 0  # the server ended the body early (a stall): carry on from there
                offset = reached
                continue
            self._requests.failures += 1
            error, failures = Transient(f"PATCH at {offset} moved nothing"), failures + 1
        raise MediaFailed("gave_up", f"upload {url}: no end after {MAX_ATTEMPTS} requests")

    async def _is_ready(self, url: str) -> bool:
        """Every byte is there: has the server made it a file (or must a PATCH finish it)?"""
        try:
            return (await self.info(url.rstrip("/").rsplit("/", 1)[-1])).ready
        except MediaFailed as exc:
            if exc.code == "not_found":
                raise Gone(url) from None
            raise

    async def _head(self, url: str) -> int | None:
        """The upload's offset; None when it is gone (404/410)."""
        response = await self._requests.call("HEAD", url, headers=TUS)
        if response.status_code in GONE_STATUS:
            return None
        if response.status_code != 200:
            raise failure(f"HEAD {url}", response)
        return _offset_header(response)

    async def _head_retrying(self, url: str) -> int | None:
        return await self._requests.retrying(f"HEAD {url}", lambda: self._head(url))

    async def _patch(self, url: str, local: _LocalFile, offset: int, progress: Progress | None) -> int:
        """One PATCH of the file from offset to its end; the server's new offset."""
        headers = {
            **self._requests.headers,
            **TUS,
            "Content-Type": "application/offset+octet-stream",
            "Upload-Offset": str(offset),
            "Content-Length": str(local.size - offset),
        }
        chunks = self._chunks(local, offset, progress)
        try:
            response = await self._requests.http.request(
                "PATCH", url, headers=headers, content=chunks, timeout=self._requests.timeout
            )
        except (httpx.TransportError, TimeoutError) as exc:  # every httpx timeout is a TransportError
            raise transport_problem(exc) from exc
        finally:
            await chunks.aclose()
        if response.status_code == 204:
            return _offset_header(response)
        if response.status_code == 409:
            raise Transient("409 offset_mismatch")
        if response.status_code in GONE_STATUS:
            raise Gone(url)
        if response.status_code in RETRYABLE_STATUS:
            raise Transient(f"{response.status_code} {error_of(response)[0]}")
        raise failure(f"PATCH {url}", response)

    async def _chunks(self, local: _LocalFile, offset: int, progress: Progress | None) -> AsyncGenerator[bytes, None]:
        """The file from offset, a chunk at a time, each read in a worker thread."""
        position = offset
        while position < local.size:
            chunk = await asyncio.to_thread(read_at, local.path, position, min(self._chunk, local.size - position))
            if not chunk:
                raise MediaFailed("size_mismatch", f"the file became shorter than {local.size} bytes while sent")
            yield chunk
            position += len(chunk)
            self._bytes_sent += len(chunk)
            if progress is not None:
                progress(position, local.size)

    # --- downloading ------------------------------------------------------------------------------

    async def download(self, media_id: str, dest: Path, *, progress: Progress | None = None) -> Path:
        """Download a file to ``dest`` through ``dest.part``, carrying on from what the ``.part``
        file holds (a cut, or an earlier run); the size and sha256 are checked before the rename.
        Returns ``dest``."""
        dest = Path(dest)
        info = await self.info(media_id)
        if not info.ready:
            raise MediaFailed("not_found", f"{media_id} is an upload in progress, not a file yet")
        part = dest.with_name(dest.name + ".part")
        have = await asyncio.to_thread(size_of, part)
        if have > info.size:
            await asyncio.to_thread(truncate, part)
            have = 0
        failures = 0  # attempts in a row that wrote nothing
        error: Transient | None = None
        for _ in range(MAX_ATTEMPTS):
            if have >= info.size:
                break
            if error is not None:
                await self._requests.pause(failures, error, f"download {media_id}")
                self._resumes += 1
            if progress is not None:
                progress(have, info.size)
            try:
                await self._get_into(media_id, part, have, info.size, progress)
                error = None
            except Transient as exc:
                self._requests.failures += 1
                error = exc
            got = await asyncio.to_thread(size_of, part)
            if got > have:
                failures = 0
            else:
                if error is None:
                    self._requests.failures += 1
                    error = Transient(f"GET from {have} wrote nothing")
                failures += 1
                if failures > self._requests.retries:
                    raise MediaFailed("gave_up", f"download {media_id}: {error} ({failures} attempts in a row failed)")
            if error is None and got < info.size:
                error = Transient(f"the body ended at {got} of {info.size} bytes")
            have = got
        else:
            raise MediaFailed("gave_up", f"download {media_id}: no end after {MAX_ATTEMPTS} requests")
        if have != info.size or await asyncio.to_thread(digest, part) != info.sha256:
            await asyncio.to_thread(truncate, part)
            code = "size_mismatch" if have != info.size else "checksum_mismatch"
            raise MediaFailed(code, f"{media_id}: the bytes received are not the file the server described")
        await asyncio.to_thread(finish_part, part, dest)
        self._downloaded += 1
        return dest

    async def _get_into(self, media_id: str, part: Path, have: int, size: int, progress: Progress | None) -> None:
        """One GET from ``have`` on (following a redirect to a presigned URL without the token),
        appended to part as it arrives."""
        url = f"/v1/media/{quote(media_id, safe='')}"
        headers = {"Range": f"bytes={have}-"} if have else {}
        authorized = True
        for _ in range(_REDIRECTS + 1):
            request = self._requests.http.build_request(
                "GET",
                url,
                headers={**self._requests.headers, **headers} if authorized else headers,
                timeout=self._requests.timeout,
            )
            if not authorized:
                request.headers.pop("authorization", None)  # the client's own defaults too
            try:
                response = await self._requests.http.send(request, stream=True)
                try:
                    location = response.headers.get("location")
                    if response.status_code in (301, 302, 303, 307, 308) and location:
                        url = str(response.url.join(location))
                        if not url.startswith(("https://", "http://")):
                            raise MediaFailed("bad_response", "a download redirected to a URL that is not http(s)")
                        authorized = False
                        continue
                    await self._receive(media_id, response, part, have, size, progress)
                    return
                finally:
                    await response.aclose()
            except (httpx.TransportError, TimeoutError) as exc:
                raise transport_problem(exc) from exc
        raise MediaFailed("bad_response", f"GET /v1/media/{media_id}: more than {_REDIRECTS} redirects")

    async def _receive(
        self, media_id: str, response: httpx.Response, part: Path, have: int, size: int, progress: Progress | None
    ) -> None:
        status = response.status_code
        if status in RETRYABLE_STATUS:
            await response.aread()
            raise Transient(f"{status} {error_of(response)[0]}")
        if status == 416:  # the .part file is not a prefix of this file: start again
            await asyncio.to_thread(truncate, part)
            raise Transient("416: the range asked for is not in the file")
        if status == 206:
            match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("content-range", ""))
            if match is None or int(match.group(1)) != have:
                raise MediaFailed("bad_response", f"GET /v1/media/{media_id}: a range that does not start at {have}")
        elif status == 200:
            if have:
                await asyncio.to_thread(truncate, part)  # the whole file came: write it from the start
                have = 0
        else:
            await response.aread()
            raise failure(f"GET /v1/media/{media_id}", response)
        async for chunk in response.aiter_bytes(self._chunk):
            if have + len(chunk) > size:
                await asyncio.to_thread(truncate, part)
                raise MediaFailed("size_mismatch", f"{media_id}: more bytes than the file's {size}")
            await asyncio.to_thread(append, part, chunk)
            have += len(chunk)
            self._bytes_received += len(chunk)
            if progress is not None:
                progress(have, size)
