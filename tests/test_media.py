"""Attachments end to end, on the real server: resumable uploads (tus) cut and resumed, the
checks that make an upload a file (limits, type, sha256), thumbnails carried in `msg` events and
history, who may download (Range, caching), sends with media refused unless they are the
sender's finished uploads, the collector, an account's files erased with it, kill -9 mid-upload,
and any Unicode in the upload headers answered with a clear error."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import secrets
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from bridge.media.inspect import shows_type
from bridge.media.service import media_key
from mqchat.config import MediaConfig
from mqchat.ids import dm_conv
from mqchat.tokens import admin_credential
from storage.objects import LocalObjectStore
from tests.conftest import Stack, both_stores, make_config, open_stack, start_served, stop_served, storage_for
from tests.helpers import connect_device, send_env, unique
from tests.s3_server import S3Bucket, s3_bucket, s3_server  # noqa: F401

TUS = {"Tus-Resumable": "1.0.0"}


def jpeg(width: int = 640, height: int = 480) -> bytes:
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 7) % 256, (y * 3) % 256, 90) for y in range(height) for x in range(width)])
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


def metadata(**values: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in values.items())


async def create(http: httpx.AsyncClient, data: bytes, content_type: str, **extra: str) -> httpx.Response:
    meta = metadata(filetype=content_type, sha256=hashlib.sha256(data).hexdigest(), **extra)
    return await http.post("/v1/media", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta})


async def patch(http: httpx.AsyncClient, url: str, data: bytes, offset: int) -> httpx.Response:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
    return await http.patch(url, content=data[offset:], headers=headers)


async def upload(http: httpx.AsyncClient, data: bytes, content_type: str, **extra: str) -> str:
    created = await create(http, data, content_type, **extra)
    assert created.status_code == 201, created.text
    done = await patch(http, created.headers["location"], data, 0)
    assert done.status_code == 204, done.text
    assert done.headers["upload-offset"] == str(len(data))
    media_id: str = created.json()["id"]
    return media_id


async def offset_of(http: httpx.AsyncClient, url: str) -> int:
    head = await http.head(url, headers=TUS)
    assert head.status_code == 200
    assert head.headers["cache-control"] == "no-store"
    return int(head.headers["upload-offset"])


@pytest.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    config = make_config(tmp_path, storage=storage_for(request, tmp_path), media=getattr(request, "param", None))
    async with open_stack(config, "inbroker") as stack:
        yield stack


@both_stores
async def test_an_upload_cut_mid_body_resumes_and_its_message_carries_dimensions_and_a_thumbnail(
    stack: Stack,
) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    photo = jpeg(1200, 900)  # a few hundred KB
    async with stack.http(alice) as http:
        options = await http.options("/v1/media")
        assert options.status_code == 204
        assert options.headers["tus-version"] == "1.0.0"
        assert "creation" in options.headers["tus-extension"]
        created = await create(http, photo, "image/jpeg", filename="IMG_0042.jpg")
        assert created.status_code == 201
        url = created.headers["location"]
        assert created.headers["tus-resumable"] == "1.0.0"

        async def cut_after(n: int) -> AsyncIterator[bytes]:
            for i in range(0, n, 16 * 1024):
                yield photo[i : min(i + 16 * 1024, n)]
            raise ConnectionResetError("the network dropped the request")

        headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        with pytest.raises(ConnectionResetError):  # the request dies mid-body; the connection with it
            await http.patch(url, content=cut_after(len(photo) // 2), headers=headers)
        resumed_at = 0
        for _ in range(50):  # the server notices the cut, then keeps what arrived
            resumed_at = await offset_of(http, url)
            if resumed_at > 0:
                break
            await asyncio.sleep(0.1)
        assert 0 < resumed_at <= len(photo) // 2
        stale = await patch(http, url, photo, 0)
        assert stale.status_code == 409
        assert stale.json()["error"] == "offset_mismatch"
        done = await patch(http, url, photo, resumed_at)
        assert done.status_code == 204, done.text
        media_id = created.json()["id"]
        info = (await http.get(f"/v1/media/{media_id}/info")).json()
    assert (info["state"], info["size"], info["sha256"]) == ("ready", len(photo), hashlib.sha256(photo).hexdigest())
    assert (info["width"], info["height"], info["type"], info["name"]) == (1200, 900, "image/jpeg", "IMG_0042.jpg")
    thumbnail = Image.open(io.BytesIO(base64.b64decode(info["thumbnail"])))
    assert thumbnail.format == "JPEG"
    assert max(thumbnail.size) == 64
    assert len(info["thumbnail"]) < 8000

    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
    ):
        envelope = {**send_env(conv, "the view"), "kind": "media", "media": [media_id]}
        await a1.send(envelope)
        await a1.wait_for(lambda e: e["type"] == "ack")
        [event] = await b1.wait_for(lambda e: e["type"] == "msg")
    assert (event["kind"], event["body"], event["media"]) == ("media", "the view", [media_id])
    [attached] = event["attachments"]
    assert attached == {k: info[k] for k in ("id", "type", "size", "name", "width", "height", "thumbnail")}
    async with stack.http(bob) as http:
        page = (await http.get(f"/v1/conversations/{conv}/messages", params={"after": 0})).json()
        got = await http.get(f"/v1/media/{media_id}")
    assert page["messages"][0]["attachments"] == [attached]
    assert got.status_code == 200
    assert got.content == photo
    assert got.headers["content-type"] == "image/jpeg"


@both_stores
async def test_only_members_download_with_range_and_caching(stack: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    data = b"%PDF-1.7\n" + secrets.token_bytes(100_000)
    async with stack.http(alice) as http:
        media_id = await upload(http, data, "application/pdf", filename="report 📄.pdf")
        group = (await http.post("/v1/groups", json={"name": "g", "members": [bob]})).json()["conv"]
    async with stack.http(bob) as http:
        before = await http.get(f"/v1/media/{media_id}")
    assert before.status_code == 404  # not sent anywhere yet: only alice may read it
    async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
        await a1.send({**send_env(group, ""), "kind": "media", "media": [media_id]})
        [ack] = await a1.wait_for(lambda e: e["type"] in ("ack", "error"))
    assert ack["type"] == "ack"
    async with stack.http(carol) as http:
        refused = await http.get(f"/v1/media/{media_id}")
        info = await http.get(f"/v1/media/{media_id}/info")
    assert (refused.status_code, refused.json()["error"]) == (404, "not_found")
    assert info.status_code == 404
    async with stack.http(bob) as http:
        whole = await http.get(f"/v1/media/{media_id}")
        assert whole.content == data
        assert whole.headers["accept-ranges"] == "bytes"
        assert whole.headers["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
        assert "immutable" in whole.headers["cache-control"]
        assert whole.headers["content-disposition"] == (
            "attachment; filename=\"report _.pdf\"; filename*=UTF-8''report%20%F0%9F%93%84.pdf"
        )
        middle = await http.get(f"/v1/media/{media_id}", headers={"Range": "bytes=1000-1999"})
        assert (middle.status_code, middle.content) == (206, data[1000:2000])
        assert middle.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        resumed = await http.get(f"/v1/media/{media_id}", headers={"Range": "bytes=99000-"})
        assert (resumed.status_code, resumed.content) == (206, data[99000:])
        tail = await http.get(f"/v1/media/{media_id}", headers={"Range": "bytes=-10"})
        assert tail.content == data[-10:]
        past = await http.get(f"/v1/media/{media_id}", headers={"Range": f"bytes={len(data)}-"})
        assert (past.status_code, past.json()["error"]) == (416, "bad_range")
        cached = await http.get(f"/v1/media/{media_id}", headers={"If-None-Match": whole.headers["etag"]})
        assert (cached.status_code, cached.content) == (304, b"")


@both_stores
async def test_a_send_with_media_that_is_not_the_senders_finished_upload_is_refused(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    photo = jpeg(64, 64)
    async with stack.http(alice) as http:
        alices = await upload(http, photo, "image/jpeg")
        unfinished = (await create(http, photo, "image/jpeg")).json()["id"]
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
    ):
        await b1.send({**send_env(conv, "", id="b-takes"), "kind": "media", "media": [alices]})
        await a1.send({**send_env(conv, "", id="a-unfinished"), "kind": "media", "media": [unfinished]})
        await a1.send({**send_env(conv, "", id="a-unknown"), "kind": "media", "media": ["nosuchmedia"]})
        await a1.send({**send_env(conv, "", id="a-mixed"), "kind": "media", "media": [alices, unfinished]})
        await a1.send(send_env(conv, "after them", id="a-text"))  # a device's order is kept
        replies = await a1.wait_for(lambda e: e["type"] in ("ack", "error"), count=4)
        [refused] = await b1.wait_for(lambda e: e["type"] == "error")
    assert [(r["type"], r["id"], r.get("code")) for r in replies] == [
        ("error", "a-unfinished", "bad_media"),
        ("error", "a-unknown", "bad_media"),
        ("error", "a-mixed", "bad_media"),
        ("ack", "a-text", None),
    ]
    assert (refused["code"], refused["id"]) == ("bad_media", "b-takes")
    assert await stack.store.last_seq(conv) == 1
    async with stack.http(bob) as http:
        assert (await http.get(f"/v1/media/{alices}")).status_code == 404  # nothing was granted


@pytest.mark.parametrize("stack", [MediaConfig(max_bytes=200_000, user_bytes=300_000, user_uploads=2)], indirect=True)
async def test_limits_types_and_checksums(stack: Stack) -> None:
    alice = unique("alice")
    photo = jpeg(32, 32)
    async with stack.http(alice) as http:
        big = await create(http, b"x" * 200_001, "image/jpeg")
        assert (big.status_code, big.json()["error"]) == (413, "too_large")
        html = await create(http, b"<html></html>", "text/html")
        assert (html.status_code, html.json()["error"]) == (415, "unsupported_type")
        no_sha = await http.post(
            "/v1/media", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": metadata(filetype="image/png")}
        )
        assert (no_sha.status_code, no_sha.json()["error"]) == (400, "bad_request")
        no_length = await http.post("/v1/media", headers={**TUS, "Upload-Metadata": metadata(filetype="image/png")})
        assert no_length.status_code == 400
        # the bytes of a JPEG declared as PNG: refused when it finishes, and gone
        liar = await create(http, photo, "image/png")
        answer = await patch(http, liar.headers["location"], photo, 0)
        assert (answer.status_code, answer.json()["error"]) == (415, "unsupported_type")
        assert (await http.head(liar.headers["location"])).status_code == 404
        # bytes that are not the declared sha256
        meta = metadata(filetype="image/jpeg", sha256=hashlib.sha256(b"other").hexdigest())
        wrong = await http.post("/v1/media", headers={**TUS, "Upload-Length": str(len(photo)), "Upload-Metadata": meta})
        answer = await patch(http, wrong.headers["location"], photo, 0)
        assert (answer.status_code, answer.json()["error"]) == (460, "checksum_mismatch")
        assert (await http.head(wrong.headers["location"])).status_code == 404
        # a PATCH that is not tus, or past the length
        first = await create(http, photo, "image/jpeg")
        url = first.headers["location"]
        plain = await http.patch(url, content=photo, headers={**TUS, "Upload-Offset": "0"})
        assert (plain.status_code, plain.json()["error"]) == (415, "unsupported_type")
        headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        longer = await http.patch(url, content=photo + b"more", headers=headers)
        assert (longer.status_code, longer.json()["error"]) == (413, "too_large")
        # two uploads in progress at most, and the quota counts them
        second = await create(http, b"%PDF" + b"p" * 150_000, "application/pdf")
        assert second.status_code == 201
        third = await create(http, jpeg(33, 33), "image/jpeg")
        assert (third.status_code, third.json()["error"]) == (413, "quota_exceeded")
        assert (await http.delete(second.headers["location"], headers=TUS)).status_code == 204
        assert (await create(http, b"%PDF" + b"q" * 150_000, "application/pdf")).status_code == 201
        over = await create(http, b"%PDF" + b"r" * 150_000, "application/pdf")  # 2 in progress again
        assert over.json()["error"] == "quota_exceeded"
        # an encrypted blob: any type, never read, no thumbnail
        assert (await http.delete(url, headers=TUS)).status_code == 204
        blob = secrets.token_bytes(5000)
        meta = metadata(filetype="image/jpeg", sha256=hashlib.sha256(blob).hexdigest(), encrypted="1", filename="x.jpg")
        sealed = await http.post("/v1/media", headers={**TUS, "Upload-Length": str(len(blob)), "Upload-Metadata": meta})
        assert (await patch(http, sealed.headers["location"], blob, 0)).status_code == 204
        info = (await http.get(f"/v1/media/{sealed.json()['id']}/info")).json()
    assert {k: info.get(k) for k in ("type", "encrypted", "name", "thumbnail", "state")} == {
        "type": "application/octet-stream",
        "encrypted": True,
        "name": None,
        "thumbnail": None,
        "state": "ready",
    }


@pytest.mark.parametrize("stack", [MediaConfig(max_bytes=200_000, user_bytes=300_000, user_uploads=2)], indirect=True)
@both_stores
async def test_a_retried_post_gets_the_upload_it_made_not_a_second_one(stack: Stack) -> None:
    """A phone whose POST's answer was lost posts again: it gets the same upload, so retries never
    fill the uploads in progress with orphans. An upload some bytes have reached is someone's
    transfer in progress: the same POST then makes another."""
    alice = unique("alice")
    photo = jpeg(48, 48)
    half = len(photo) // 2
    async with stack.http(alice) as http:
        first = await create(http, photo, "image/jpeg", filename="a.jpg")
        url = first.headers["location"]
        again = await create(http, photo, "image/jpeg", filename="a.jpg")
        assert (again.status_code, again.headers["location"], again.headers["upload-offset"]) == (201, url, "0")
        assert again.json()["id"] == first.json()["id"]
        # another name is another upload; at the limit of 2 in progress a retried POST still gets its own
        renamed = await create(http, photo, "image/jpeg", filename="b.jpg")
        assert renamed.status_code == 201
        assert renamed.headers["location"] != url
        assert (await create(http, photo, "image/jpeg", filename="a.jpg")).headers["location"] == url
        other = await create(http, jpeg(40, 40), "image/jpeg", filename="a.jpg")
        assert (other.status_code, other.json()["error"]) == (413, "quota_exceeded")
        # once bytes have reached it, the same POST is another transfer of the file: not given this one
        assert (await patch(http, url, photo[:half], 0)).status_code == 204
        assert (await http.delete(renamed.headers["location"], headers=TUS)).status_code == 204
        second = await create(http, photo, "image/jpeg", filename="a.jpg")
        assert second.status_code == 201
        assert second.headers["location"] not in (url, renamed.headers["location"])
        assert (await patch(http, url, photo, half)).status_code == 204
    bob = unique("bob")
    async with stack.http(bob) as http:
        # two POSTs of one file at once (a retry while the first is still being answered): one upload
        answers = await asyncio.gather(*(create(http, photo, "image/jpeg") for _ in range(4)))
        assert {(a.status_code, a.headers["location"]) for a in answers} == {(201, answers[0].headers["location"])}


@pytest.mark.parametrize("stack", [MediaConfig(upload_expiry_s=0.5, unsent_expiry_s=0.5, sweep_s=0.2)], indirect=True)
async def test_the_collector_deletes_expired_uploads_and_unsent_files_but_not_sent_ones(
    stack: Stack, tmp_path: Path
) -> None:
    alice, bob = unique("alice"), unique("bob")
    photo = jpeg(40, 40)
    async with stack.http(alice) as http:
        abandoned = (await create(http, photo, "image/jpeg")).json()["id"]
        unsent = await upload(http, photo, "image/jpeg")
        sent = await upload(http, photo, "image/jpeg")
        async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
            await a1.send({**send_env(dm_conv(alice, bob), ""), "kind": "media", "media": [sent]})
            await a1.wait_for(lambda e: e["type"] == "ack")
        files = tmp_path / "media"
        gone = {abandoned: False, unsent: False}
        for _ in range(100):  # bounded: the sweep runs every 0.2 s
            for media_id in gone:
                gone[media_id] = (await http.get(f"/v1/media/{media_id}/info")).status_code == 404
            if all(gone.values()):
                break
            await asyncio.sleep(0.1)
        assert gone == {abandoned: True, unsent: True}
        assert (await http.get(f"/v1/media/{sent}")).content == photo
    kept = sorted(p.name for p in files.rglob("*") if p.is_file())
    assert kept == [sent]
    assert files.stat().st_mode & 0o777 == 0o700
    assert (files / "media" / sent).stat().st_mode & 0o777 == 0o600


async def test_an_erased_account_takes_its_files_with_it(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    photo = jpeg(40, 40)
    async with stack.http(alice) as http:
        sent = await upload(http, photo, "image/jpeg")
        pending = (await create(http, photo, "image/jpeg")).json()["id"]
    async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
        await a1.send({**send_env(dm_conv(alice, bob), ""), "kind": "media", "media": [sent]})
        await a1.wait_for(lambda e: e["type"] == "ack")
    async with stack.http(bob) as http:
        assert (await http.get(f"/v1/media/{sent}")).status_code == 200
    admin = {"Authorization": f"Bearer {admin_credential(stack.config.auth.jwt_secret)}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.http_port}", headers=admin, timeout=30) as http:
        answer = await http.delete(f"/admin/v1/users/{alice}")
        assert answer.status_code == 200, answer.text
    async with stack.http(bob) as http:
        assert (await http.get(f"/v1/media/{sent}")).status_code == 404
        page = (await http.get(f"/v1/conversations/{dm_conv(alice, bob)}/messages", params={"after": 0})).json()
    assert [(m["kind"], m.get("media")) for m in page["messages"]] == [("deleted", None)]
    assert await stack.store.owner_media(alice) == []
    assert not [p for p in (stack.config.storage.data_dir / "media").rglob("*") if p.is_file()], pending


async def test_a_finished_file_is_deleted_and_a_cut_short_finish_completes_on_the_next_patch(
    stack: Stack, tmp_path: Path
) -> None:
    alice = unique("alice")
    photo = jpeg(50, 50)
    async with stack.http(alice) as http:
        done = await upload(http, photo, "image/jpeg")
        assert (await http.delete(f"/v1/media/uploads/{done}", headers=TUS)).status_code == 204
        assert (await http.get(f"/v1/media/{done}")).status_code == 404
        assert not (tmp_path / "media" / "media" / done).exists()
        # the node died after the bytes became the file and before the file was checked
        created = await create(http, photo, "image/jpeg")
        media_id, url = created.json()["id"], created.headers["location"]
        headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        record = (await stack.store.media_records([media_id]))[media_id]
        objects = LocalObjectStore(tmp_path / "media")
        async with stack.http(alice) as other:
            # only the bytes, through the object store and the index, as the dead request left them
            async def record_it(offset: int, staging: str) -> None:
                assert await stack.store.advance_upload(media_id, expected=0, offset=offset, staging=staging)

            async def chunks() -> AsyncIterator[bytes]:
                yield photo

            await objects.append(media_key(media_id), record.staging, 0, chunks(), record_it)
            await objects.finish(media_key(media_id), record.staging, len(photo))
            assert await offset_of(other, url) == len(photo)
            again = await other.patch(url, content=b"", headers={**headers, "Upload-Offset": str(len(photo))})
        assert again.status_code == 204, again.text
        info = (await http.get(f"/v1/media/{media_id}/info")).json()
        assert (info["state"], info["width"]) == ("ready", 50)
        # a lost answer to the last PATCH: asked again, the same answer
        repeat = await http.patch(url, content=b"", headers={**headers, "Upload-Offset": str(len(photo))})
        assert (repeat.status_code, repeat.headers["upload-offset"]) == (204, str(len(photo)))


@both_stores
async def test_two_patches_of_one_upload_at_once_make_one_right_file(stack: Stack) -> None:
    """A phone retried while its first request still ran: the two never write at once."""
    alice = unique("alice")
    data = b"%PDF-1.3\n" + secrets.token_bytes(6 * 1024 * 1024)
    async with stack.http(alice) as one, stack.http(alice) as two:
        created = await create(one, data, "application/pdf")
        url = created.headers["location"]
        answers = await asyncio.gather(patch(one, url, data, 0), patch(two, url, data, 0), return_exceptions=True)
        # the one that waited is refused (409), maybe before the server reads its body: then its
        # connection is closed under it, and a client asks where the upload stands (HEAD)
        statuses = sorted(str(a.status_code) if isinstance(a, httpx.Response) else type(a).__name__ for a in answers)
        assert statuses[0] == "204", answers
        assert statuses[1] in ("204", "409", "ReadError", "WriteError", "RemoteProtocolError"), answers
        assert await offset_of(one, url) == len(data)
        got = await one.get(f"/v1/media/{created.json()['id']}")
    assert hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()


def test_an_iphone_photo_shows_its_declared_type() -> None:
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    assert shows_type(heic, "image/heic")
    assert shows_type(heic, "image/heif")
    assert not shows_type(heic, "image/jpeg")


def s3_media(bucket: S3Bucket, **more: Any) -> MediaConfig:
    return MediaConfig(
        backend="s3",
        s3_endpoint=bucket.endpoint,
        s3_region=bucket.region,
        s3_bucket=bucket.bucket,
        s3_access_key=bucket.access_key,
        s3_secret_key=bucket.secret_key,
        **more,
    )


async def test_the_s3_backend_resumes_uploads_serves_ranges_and_presigns(
    tmp_path: Path,
    s3_bucket: S3Bucket,  # noqa: F811
) -> None:
    """Against a real S3-API server: an upload of several parts cut and resumed (through another
    node's worth of state: only what the store and S3 hold), a download with Range, a presigned
    redirect and a direct upload, each file checked like any other."""
    config = make_config(tmp_path, media=s3_media(s3_bucket, presigned=True, unsent_expiry_s=3600.0))
    alice, bob = unique("alice"), unique("bob")
    data = b"%PDF-1.4\n" + secrets.token_bytes(19 * 1024 * 1024)  # three 8 MiB parts, the last short
    async with open_stack(config, "inbroker") as stack, stack.http(alice) as http:
        created = await create(http, data, "application/pdf", filename="big.pdf")
        url = created.headers["location"]
        half = 11 * 1024 * 1024

        async def cut() -> AsyncIterator[bytes]:
            for i in range(0, half, 1024 * 1024):
                yield data[i : i + 1024 * 1024]
            raise ConnectionResetError("cut")

        headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
        with pytest.raises(ConnectionResetError):
            await http.patch(url, content=cut(), headers=headers, timeout=60)
        offset = 0
        for _ in range(100):
            offset = await offset_of(http, url)
            if offset:
                break
            await asyncio.sleep(0.1)
        assert 0 < offset <= half
        done = await patch(http, url, data, offset)
        assert done.status_code == 204, done.text
        media_id = created.json()["id"]
        async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
            await a1.send({**send_env(dm_conv(alice, bob), ""), "kind": "media", "media": [media_id]})
            await a1.wait_for(lambda e: e["type"] == "ack")
        # a direct upload: a presigned PUT straight to S3, then completed through the API
        photo = jpeg(300, 200)
        direct = await http.post(
            "/v1/media/direct",
            json={"size": len(photo), "type": "image/jpeg", "sha256": hashlib.sha256(photo).hexdigest()},
        )
        assert direct.status_code == 200, direct.text
        plan = direct.json()
        async with httpx.AsyncClient(trust_env=False) as bare:  # no bearer token goes to S3
            put = await bare.put(plan["url"], content=photo, headers=plan["headers"])
            assert put.status_code == 200, put.text
        completed = await http.post(f"/v1/media/{plan['id']}/complete")
        assert completed.status_code == 200, completed.text
        async with httpx.AsyncClient(trust_env=False) as bare:  # the URL is still valid: it changes nothing
            other = jpeg(300, 200)[::-1][: len(photo)]
            await bare.put(plan["url"], content=other, headers=plan["headers"])
        kept = await http.get(f"/v1/media/{plan['id']}", follow_redirects=True)
        assert kept.content == photo
        assert (completed.json()["state"], completed.json()["width"], completed.json()["height"]) == ("ready", 300, 200)
        async with stack.http(bob) as http:
            redirect = await http.get(f"/v1/media/{media_id}")
            assert redirect.status_code == 307
            assert redirect.headers["cache-control"] == "no-store"
            async with httpx.AsyncClient(trust_env=False, timeout=60) as bare:
                fetched = await bare.get(redirect.headers["location"])
                assert hashlib.sha256(fetched.content).digest() == hashlib.sha256(data).digest()
                ranged = await bare.get(redirect.headers["location"], headers={"Range": "bytes=8388600-8388615"})
                assert (ranged.status_code, ranged.content) == (206, data[8388600:8388616])


async def test_kill9_mid_upload_then_resume_from_what_was_made_durable(tmp_path: Path) -> None:
    """The node is killed while a PATCH streams; restarted by its supervisor, it reports the
    offset it made durable, and the upload resumes from there to a file with the right sha256."""
    secret = secrets.token_urlsafe(32)
    data = b"%PDF-1.5\n" + secrets.token_bytes(12 * 1024 * 1024)
    served = start_served(tmp_path / "data", secret, tmp_path / "serve.log", adapter="inbroker")
    try:
        await served.wait_healthy()
        alice = unique("alice")
        async with served.http(alice) as http:
            created = await create(http, data, "application/pdf")
            url = created.headers["location"]
            sent = 0

            async def slow() -> AsyncIterator[bytes]:
                nonlocal sent
                for i in range(0, len(data), 256 * 1024):
                    if sent >= 9 * 1024 * 1024:
                        await asyncio.sleep(60)  # killed before it goes on
                    sent += 256 * 1024
                    yield data[i : i + 256 * 1024]
                    await asyncio.sleep(0.005)

            headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
            streaming = asyncio.create_task(http.patch(url, content=slow(), headers=headers, timeout=120))
            for _ in range(600):
                if sent >= 9 * 1024 * 1024:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the last bytes reach the server
            os.kill(served.pid("node"), signal.SIGKILL)  # the supervisor starts it again
            streaming.cancel()  # the phone gives up on the dead connection
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await streaming
        await served.wait_healthy()
        async with served.http(alice) as http:
            offset = await offset_of(http, url)
            assert 4 * 1024 * 1024 <= offset <= 9 * 1024 * 1024  # made durable as it arrived, not at the end
            done = await patch(http, url, data, offset)
            assert done.status_code == 204, done.text
            got = await http.get(f"/v1/media/{created.json()['id']}", timeout=60)
        assert hashlib.sha256(got.content).digest() == hashlib.sha256(data).digest()
    finally:
        stop_served(served)


# A header value may hold any character but the controls HTTP forbids in one (CR, LF, NUL, …):
# a request carrying those is refused by the HTTP parser itself before it reaches mqchat.
header_text = st.text(
    alphabet=st.characters(codec=None, exclude_categories=("Cc",)) | st.sampled_from(["\t", " ", ","]),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    length=st.one_of(header_text, st.integers(-5, 10**20).map(str)),
    meta=st.one_of(
        header_text,
        st.dictionaries(header_text, st.text(max_size=40), max_size=5).map(
            lambda d: ",".join(
                f"{k} {base64.b64encode(v.encode('utf-8', 'surrogatepass')).decode()}" for k, v in d.items()
            )
        ),
    ),
    offset=header_text,
)
@example(length="²", meta="", offset="")  # a digit to str.isdigit, not to int()
@example(length="1", meta=metadata(filetype="image/png", sha256="a" * 64), offset="²")
async def test_any_unicode_in_the_upload_headers_gets_a_clear_answer(
    stack: Stack, length: str, meta: str, offset: str
) -> None:
    alice = unique("alice")

    def raw(value: str) -> bytes:  # a header value has no surrounding whitespace (HTTP trims it)
        return value.strip(" \t").encode("utf-8", "surrogatepass")

    async with stack.http(alice) as http:
        created = await http.post(
            "/v1/media",
            headers=[(b"Tus-Resumable", b"1.0.0"), (b"Upload-Length", raw(length)), (b"Upload-Metadata", raw(meta))],
        )
        assert created.status_code in (201, 400, 413, 415), created.text
        assert created.headers["content-type"].startswith("application/json")
        if created.status_code != 201:
            assert created.json()["error"] in ("bad_request", "too_large", "unsupported_type", "quota_exceeded")
            return
        answer = await http.patch(
            created.headers["location"],
            content=b"x",
            headers=[(b"Upload-Offset", raw(offset)), (b"Content-Type", b"application/offset+octet-stream")],
        )
        assert answer.status_code in (204, 400, 409, 413, 415, 460), answer.text
        await http.delete(created.headers["location"])
