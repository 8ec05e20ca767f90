"""Media routes: resumable uploads (the tus 1.0 core protocol, with its creation, termination
and expiration extensions), downloads with Range and caching, and direct (presigned) uploads
where the object store has them.

::

    OPTIONS /v1/media                 what the server speaks (Tus-Version, Tus-Extension, Tus-Max-Size)
    POST    /v1/media                 create: Upload-Length, Upload-Metadata (filetype, sha256,
                                      filename, encrypted) ─▶ 201, Location /v1/media/uploads/{id}
    HEAD    /v1/media/uploads/{id}    Upload-Offset: where to resume
    PATCH   /v1/media/uploads/{id}    bytes at Upload-Offset (application/offset+octet-stream)
                                      ─▶ 204 with the new Upload-Offset; the last one checks the file
    DELETE  /v1/media/uploads/{id}    terminate
    GET     /v1/media/{id}            the file (Range, ETag, immutable caching), or a redirect to
                                      a presigned URL
    GET     /v1/media/{id}/info       what a msg event says of it, and its state
    POST    /v1/media/direct          a presigned PUT to the object store ─▶ POST …/{id}/complete

A PATCH body is streamed to the object store as it arrives (never held whole); a cut or a stall
keeps what arrived, and the client resumes from the offset a HEAD reports.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from bridge.http.context import ERROR_RESPONSES, Api, Caller
from bridge.http.schemas import DirectUploadIn, DirectUploadOut, MediaInfo
from bridge.media.service import BODY_IDLE_S, MediaService, Upload, attachment
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import ID_PATTERN
from storage.objects.base import content_disposition
from storage.records import MediaRecord

router = APIRouter(tags=["media"], responses={**ERROR_RESPONSES, 409: ERROR_RESPONSES[400], 415: ERROR_RESPONSES[400]})

TUS_VERSION = "1.0.0"
TUS = {"Tus-Resumable": TUS_VERSION}
UPLOAD_PATH = "/v1/media/uploads/"

MediaId = Annotated[str, Path(description="a media id", json_schema_extra={"pattern": f"^{ID_PATTERN}$"})]
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _media(api: Api) -> MediaService:
    if api.media is None:
        raise RequestError(ErrorCode.UNAVAILABLE, "media is not served by this node")
    return api.media


def _check_id(id: str) -> None:
    if not re.fullmatch(ID_PATTERN, id):
        raise RequestError(ErrorCode.BAD_REQUEST, "not a media id")


def _is_number(value: str) -> bool:
    """A header's decimal number: ASCII digits only (str.isdigit takes "²" too), at most 15."""
    return 0 < len(value) <= 15 and value.isascii() and value.isdigit()


def _metadata(value: str) -> dict[str, str]:
    """tus Upload-Metadata: comma-separated "key base64value" pairs (a value may be absent)."""
    found: dict[str, str] = {}
    for pair in filter(None, (p.strip() for p in value.split(","))):
        key, _, encoded = pair.partition(" ")
        if not _METADATA_KEY_RE.fullmatch(key) or key in found:
            raise RequestError(ErrorCode.BAD_REQUEST, "Upload-Metadata: keys are [A-Za-z0-9_.-], each once")
        try:
            found[key] = base64.b64decode(encoded.strip(), validate=True).decode("utf-8") if encoded else ""
        except (binascii.Error, UnicodeDecodeError):
            raise RequestError(ErrorCode.BAD_REQUEST, f"Upload-Metadata: {key} is not base64 of UTF-8") from None
    return found


def _upload_from(length: str | None, metadata: str) -> Upload:
    if length is None or not _is_number(length):
        raise RequestError(ErrorCode.BAD_REQUEST, "Upload-Length (the file's size in bytes) is required")
    meta = _metadata(metadata)
    encrypted = meta.get("encrypted", "").lower() in ("1", "true", "yes")
    content_type = meta.get("filetype") or meta.get("content_type") or ""
    if not content_type and not encrypted:
        raise RequestError(ErrorCode.BAD_REQUEST, "Upload-Metadata: filetype (the file's content type) is required")
    if "sha256" not in meta:
        raise RequestError(ErrorCode.BAD_REQUEST, "Upload-Metadata: sha256 (hex digest of the file) is required")
    name = meta.get("filename", "")
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in name):
        raise RequestError(ErrorCode.BAD_REQUEST, "Upload-Metadata: filename has control characters")
    return Upload(size=int(length), content_type=content_type, sha256=meta["sha256"], filename=name, opaque=encrypted)


def _expires(media: MediaService, record: MediaRecord) -> str:
    return formatdate((record.created_ms / 1000) + media.config.upload_expiry_s, usegmt=True)


@router.options("/v1/media", status_code=204, summary="The upload protocol this server speaks (tus 1.0)")
async def discover(api: Api) -> Response:
    media = _media(api)
    return Response(
        status_code=204,
        headers={
            **TUS,
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": "creation,termination,expiration",
            "Tus-Max-Size": str(media.config.max_bytes),
        },
    )


@router.post(
    "/v1/media",
    status_code=201,
    response_model=MediaInfo,
    summary="Create a resumable upload (tus creation): Upload-Length, Upload-Metadata filetype, sha256, filename",
)
async def create_upload(
    who: Caller,
    api: Api,
    upload_length: Annotated[str | None, Header()] = None,
    upload_metadata: Annotated[str, Header()] = "",
) -> JSONResponse:
    media = _media(api)
    record = await media.create(who.user, _upload_from(upload_length, upload_metadata))
    location = f"{UPLOAD_PATH}{record.id}"
    return JSONResponse(
        _info(record),
        status_code=201,
        headers={
            **TUS,
            "Location": location,
            "Upload-Offset": str(record.offset),  # 0: a retried POST gets only an upload no byte reached
            "Upload-Expires": _expires(media, record),
        },
    )


@router.head("/v1/media/uploads/{id}", summary="Where an upload stands (Upload-Offset: resume from there)")
async def upload_offset(id: MediaId, who: Caller, api: Api) -> Response:
    _check_id(id)
    media = _media(api)
    record = await media.settled(who.user, id)
    headers = {
        **TUS,
        "Upload-Offset": str(record.offset),
        "Upload-Length": str(record.size),
        "Cache-Control": "no-store",
    }
    if record.state != "ready":
        headers["Upload-Expires"] = _expires(media, record)
    return Response(status_code=200, headers=headers)


@router.patch(
    "/v1/media/uploads/{id}",
    status_code=204,
    summary="Send bytes of an upload at Upload-Offset (application/offset+octet-stream)",
)
async def upload_bytes(
    id: MediaId,
    request: Request,
    who: Caller,
    api: Api,
    upload_offset: Annotated[str | None, Header()] = None,
    content_type: Annotated[str, Header()] = "",
) -> Response:
    _check_id(id)
    media = _media(api)
    if content_type.split(";")[0].strip().lower() != "application/offset+octet-stream":
        raise RequestError(ErrorCode.UNSUPPORTED_TYPE, "a PATCH body is application/offset+octet-stream")
    if upload_offset is None or not _is_number(upload_offset):
        raise RequestError(ErrorCode.BAD_REQUEST, "Upload-Offset (where these bytes go) is required")
    record = await media.receive(who.user, id, int(upload_offset), _body(request))
    headers = {**TUS, "Upload-Offset": str(record.offset)}
    if record.state != "ready":
        headers["Upload-Expires"] = _expires(media, record)
    return Response(status_code=204, headers=headers)


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; ends (quietly) when the client goes away or stalls."""
    stream = request.stream().__aiter__()
    while True:
        try:
            async with asyncio.timeout(BODY_IDLE_S):
                chunk = await anext(stream)
        except (StopAsyncIteration, ClientDisconnect, TimeoutError):
            return
        if chunk:
            yield chunk


@router.delete("/v1/media/uploads/{id}", status_code=204, summary="Delete an upload, or a file of one's own")
async def terminate_upload(id: MediaId, who: Caller, api: Api) -> Response:
    _check_id(id)
    await _media(api).terminate(who.user, id)
    return Response(status_code=204, headers=TUS)


@router.get(
    "/v1/media/{id}",
    summary="Download a file (Range supported): its owner and the members of conversations it was sent to",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "a range"}, 304: {}},
)
async def download(id: MediaId, request: Request, who: Caller, api: Api) -> Response:
    _check_id(id)
    media = _media(api)
    record = await media.readable(who.user, id)
    url = await media.presigned_get(record)
    if url is not None:
        return RedirectResponse(url, status_code=307, headers={"Cache-Control": "no-store"})
    etag = f'"{record.sha256}"'
    headers = {
        "ETag": etag,
        "Cache-Control": "private, max-age=31536000, immutable",
        "Accept-Ranges": "bytes",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "sandbox",
        "Content-Disposition": _disposition(record),
    }
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    start, end = 0, record.size
    status = 200
    wanted = request.headers.get("range")
    # One range is served; several may be answered with the whole file (RFC 9110, 14.2).
    if wanted is not None and "," not in wanted and request.headers.get("if-range", etag) == etag:
        start, end = _range(wanted, record.size)
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{record.size}"
    headers["Content-Length"] = str(end - start)
    return StreamingResponse(
        media.stream(record, start, end), status_code=status, media_type=record.content_type, headers=headers
    )


def _range(value: str, size: int) -> tuple[int, int]:
    """[start, end) of a single-range header; 416 when the file cannot satisfy it."""
    match = _RANGE_RE.fullmatch(value.strip())
    if match is None or (not match.group(1) and not match.group(2)):
        raise RequestError(ErrorCode.BAD_RANGE, f"Range must be one bytes=START-END of a {size}-byte file")
    first, last = match.group(1), match.group(2)
    if not first:  # the last N bytes
        start, end = max(0, size - int(last[:15])), size
    else:
        start = int(first[:15]) if len(first) <= 15 else size
        end = min(size, int(last[:15]) + 1) if last else size
    if start >= size or start >= end:
        raise RequestError(ErrorCode.BAD_RANGE, f"the file has {size} bytes")
    return start, end


def _disposition(record: MediaRecord) -> str:
    """Never in the API's origin: a browser saves the file (an encrypted file's name is not told)."""
    return content_disposition("" if record.opaque else record.filename)


@router.get("/v1/media/{id}/info", response_model=MediaInfo, summary="A file's type, size, dimensions and thumbnail")
async def media_info(id: MediaId, who: Caller, api: Api) -> dict[str, Any]:
    _check_id(id)
    media = _media(api)
    with contextlib.suppress(RequestError):
        return _info(await media.upload_of(who.user, id))  # one's own: uploads in progress too
    return _info(await media.readable(who.user, id))


def _info(record: MediaRecord) -> dict[str, Any]:
    return {
        **attachment(record),
        "state": record.state,
        "offset": record.offset,
        "sha256": record.sha256,
        "upload_url": f"{UPLOAD_PATH}{record.id}",
    }


@router.post(
    "/v1/media/direct",
    response_model=DirectUploadOut,
    summary="An upload straight to the object store (a presigned PUT), then POST /v1/media/{id}/complete",
)
async def create_direct_upload(body: DirectUploadIn, who: Caller, api: Api) -> dict[str, Any]:
    media = _media(api)
    upload = Upload(
        size=body.size, content_type=body.type or "", sha256=body.sha256, filename=body.name, opaque=body.encrypted
    )
    record, put = await media.create_direct(who.user, upload)
    return {"id": record.id, "url": put.url, "headers": put.headers, "expires_in": media.config.url_expiry_s}


@router.post("/v1/media/{id}/complete", response_model=MediaInfo, summary="Finish a direct upload: checked, a file")
async def complete_direct_upload(id: MediaId, who: Caller, api: Api) -> dict[str, Any]:
    _check_id(id)
    return _info(await _media(api).complete_direct(who.user, id))
