"""The SDK's media client: tus metadata, the lenient reading of attachments, and uploads and
downloads against the real server, through a lossy proxy that cuts them, and from the command line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from bridge.http.media import _metadata as server_metadata
from clients import ChatClient, Message
from clients.errors import MediaFailed
from clients.events import Attachment, parse_envelope
from clients.media import MediaClient, encode_metadata
from clients.state import SqliteUploads, UploadKey, UploadLedger
from clients.testing.netem import LossyProxy, NetemProfile
from mqchat.config import MediaConfig
from mqchat.ids import dm_conv
from tests.conftest import Stack, make_config, open_stack
from tests.helpers import repo_env, unique
from tests.s3_server import S3Bucket, s3_bucket, s3_server  # noqa: F401

MIB = 1024 * 1024
WAIT = 60.0  # upper bound of any single wait here

# Short-lived, slow connections: a 3 MB body takes ~2 s, no connection outlives 0.8 s, and a
# chunk is now and then cut in the middle. A transfer cannot finish on one connection.
CUTTING = NetemProfile(
    latency_ms=5,
    jitter_ms=5,
    bandwidth_bytes_per_s=1_500_000,
    max_connection_s=0.8,
    reset_mid_packet_rate=0.5,
)


def noise_png(path: Path, side: int = 1000) -> bytes:
    """A PNG of random pixels (it does not compress: about 3 bytes a pixel)."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(out, "PNG", compress_level=1)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def fast_backoff(attempt: int) -> float:
    return min(0.5, 0.02 * 2.0**attempt)


@pytest.fixture
async def http_of(stack: Stack) -> AsyncIterator[dict[int, httpx.AsyncClient]]:
    """httpx clients by port, closed at the end."""
    clients: dict[int, httpx.AsyncClient] = {}
    yield clients
    for client in clients.values():
        await client.aclose()


def media_client(
    stack: Stack,
    http_of: dict[int, httpx.AsyncClient],
    user: str,
    *,
    port: int | None = None,
    uploads: UploadLedger | None = None,
) -> MediaClient:
    port = port or stack.http_port
    if port not in http_of:
        http_of[port] = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}")
    return MediaClient(
        http=http_of[port],
        token=stack.token(user, "d1"),
        timeout=5.0,
        sleep=asyncio.sleep,
        backoff=fast_backoff,
        uploads=uploads,
    )


async def server_info(stack: Stack, user: str, media_id: str) -> dict[str, object]:
    """What the server itself says of a file (not through the client under test)."""
    async with stack.http(user, "d1") as http:
        response = await http.get(f"/v1/media/{media_id}/info")
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


# --- no server --------------------------------------------------------------------------------


def test_upload_metadata_is_what_the_server_reads() -> None:
    pairs = {"filetype": "image/png", "sha256": "ab" * 32, "filename": "résumé, final.png", "encrypted": "1"}
    header = encode_metadata(pairs)
    assert header.count(",") == 3  # a comma in a value is inside its base64
    assert header.startswith("filetype aW1hZ2UvcG5n,")
    assert server_metadata(header) == pairs
    assert encode_metadata({"empty": "", "x": "y"}) == "empty,x eQ=="
    assert server_metadata("empty,x eQ==") == {"empty": "", "x": "y"}
    for bad in ("", "has space", "a,b", "ü", "k" * 65):
        with pytest.raises(ValueError, match="tus metadata key"):
            encode_metadata({bad: "v"})


def test_attachments_are_read_leniently() -> None:
    msg = {
        "type": "msg",
        "conv": "dm:a:b",
        "seq": 1,
        "mid": "m",
        "from": "a",
        "dev": "d",
        "id": "i",
        "ts": 1,
        "kind": "media",
        "body": "",
        "media": ["f1", "f2", "f3"],
        "attachments": [
            {"id": "f1", "type": "image/png", "size": 10, "width": 4, "height": 3, "thumbnail": "/9j/", "name": "a"},
            {"id": "f2", "type": "application/octet-stream", "size": 5, "encrypted": True, "thumbnail": "!!"},
            {"id": "f3", "type": "image/png"},  # no size: left out
            "not an object",
            {"id": "f4", "type": "video/mp4", "size": 7, "width": "wide", "height": 2, "name": 3},
        ],
    }
    parsed = parse_envelope(msg)
    assert isinstance(parsed, Message)
    assert parsed.media == ("f1", "f2", "f3")
    assert parsed.attachments == (
        Attachment(id="f1", type="image/png", size=10, name="a", width=4, height=3, thumbnail=b"\xff\xd8\xff"),
        Attachment(id="f2", type="application/octet-stream", size=5, encrypted=True),
        Attachment(id="f4", type="video/mp4", size=7),
    )
    assert parsed.envelope()["attachments"][0] == {
        "id": "f1", "type": "image/png", "size": 10, "width": 4, "height": 3, "thumbnail": "/9j/", "name": "a"
    }  # fmt: skip
    for junk in ("none", None, 3, {"id": "f1"}):
        again = parse_envelope({**msg, "attachments": junk})
        assert isinstance(again, Message)
        assert again.attachments == ()
        assert "attachments" not in again.envelope()


def test_the_upload_ledger_keeps_the_newest_per_user(tmp_path: Path) -> None:
    key = UploadKey(origin="http://h", path="/f", size=3, mtime_ns=1, sha256="ab")
    mine = SqliteUploads(tmp_path / "state.sqlite3", user="u1")
    theirs = SqliteUploads(tmp_path / "state.sqlite3", user="u2")
    try:
        mine.remember(key, "/v1/media/uploads/A")
        assert mine.find(key) == "/v1/media/uploads/A"
        assert theirs.find(key) is None
        assert mine.find(UploadKey(origin="http://h", path="/f", size=3, mtime_ns=2, sha256="ab")) is None
        for n in range(SqliteUploads.KEPT + 5):
            mine.remember(UploadKey(origin="http://h", path=f"/g{n}", size=1, mtime_ns=1, sha256="cd"), f"/u/{n}")
        assert mine.find(key) is None  # the oldest went
        assert mine.find(UploadKey(origin="http://h", path="/g104", size=1, mtime_ns=1, sha256="cd")) == "/u/104"
        mine.forget(UploadKey(origin="http://h", path="/g104", size=1, mtime_ns=1, sha256="cd"))
        assert mine.find(UploadKey(origin="http://h", path="/g104", size=1, mtime_ns=1, sha256="cd")) is None
    finally:
        mine.close()
        theirs.close()


# --- the real server --------------------------------------------------------------------------


async def test_an_upload_cut_again_and_again_by_the_network_completes(
    stack: Stack, http_of: dict[int, httpx.AsyncClient], tmp_path: Path
) -> None:
    alice = unique("alice")
    data = noise_png(tmp_path / "noise.png")
    assert len(data) > 2_900_000
    seen: list[tuple[int, int]] = []
    async with LossyProxy(target_port=stack.http_port, profile=CUTTING, seed=7) as proxy:
        media = media_client(stack, http_of, alice, port=proxy.port)
        started = time.monotonic()
        uploaded = await media.upload(tmp_path / "noise.png", progress=lambda done, total: seen.append((done, total)))
        elapsed = time.monotonic() - started
        cut = proxy.statistics()
    assert cut.cuts >= 1, cut  # max_connection_s: each connection is reset after 0.8 s
    assert uploaded.resumes >= 1
    stats = media.statistics()
    assert stats.resumes >= 1
    assert stats.failures >= 1
    assert stats.bytes_sent >= len(data)  # some of it sent twice, after a cut
    assert uploaded.sha256 == hashlib.sha256(data).hexdigest()
    assert (uploaded.type, uploaded.size, uploaded.name) == ("image/png", len(data), "noise.png")
    assert (uploaded.width, uploaded.height) == (1000, 1000)
    assert uploaded.thumbnail is not None
    assert uploaded.thumbnail.startswith(b"\xff\xd8")
    assert seen[-1] == (len(data), len(data))
    info = await server_info(stack, alice, uploaded.id)
    assert (info["state"], info["offset"], info["sha256"]) == ("ready", len(data), uploaded.sha256)
    print(f"3 MB upload: {cut.cuts} cuts, {cut.mid_packet_resets} mid-packet resets, {uploaded.resumes} resumes, "
          f"{elapsed:.1f} s")  # fmt: skip


async def test_a_download_cut_by_the_network_resumes_byte_identical(
    stack: Stack, http_of: dict[int, httpx.AsyncClient], tmp_path: Path
) -> None:
    alice = unique("alice")
    data = noise_png(tmp_path / "noise.png")
    uploaded = await media_client(stack, http_of, alice).upload(tmp_path / "noise.png")
    async with LossyProxy(target_port=stack.http_port, profile=CUTTING, seed=11) as proxy:
        media = media_client(stack, http_of, alice, port=proxy.port)
        dest = tmp_path / "out" / "copy.png"
        dest.parent.mkdir()
        assert await media.download(uploaded.id, dest) == dest
        cut = proxy.statistics()
    assert cut.cuts >= 1, cut
    assert media.statistics().resumes >= 1
    assert media.statistics().bytes_received == len(data)  # each byte once: every GET went on from the .part
    assert dest.read_bytes() == data
    assert not (tmp_path / "out" / "copy.png.part").exists()


async def test_a_download_goes_on_from_what_the_part_file_holds(
    stack: Stack, http_of: dict[int, httpx.AsyncClient], tmp_path: Path
) -> None:
    alice = unique("alice")
    data = noise_png(tmp_path / "noise.png")
    uploaded = await media_client(stack, http_of, alice).upload(tmp_path / "noise.png")
    dest = tmp_path / "copy.png"
    (tmp_path / "copy.png.part").write_bytes(data[:MIB])  # what an earlier run got
    media = media_client(stack, http_of, alice)
    await media.download(uploaded.id, dest)
    assert media.statistics().bytes_received == len(data) - MIB
    assert dest.read_bytes() == data
    # A .part that is not the file's beginning is found out, and removed.
    other = tmp_path / "other.png"
    (tmp_path / "other.png.part").write_bytes(b"x" * MIB)
    with pytest.raises(MediaFailed) as failed:
        await media.download(uploaded.id, other)
    assert failed.value.code == "checksum_mismatch"
    assert not other.exists()
    assert not (tmp_path / "other.png.part").exists()
    with pytest.raises(MediaFailed) as missing:
        await media.download("01NOSUCHFILE", other)
    assert (missing.value.code, missing.value.status) == ("not_found", 404)


async def test_a_download_follows_a_redirect_to_the_object_store_without_the_token(
    tmp_path: Path,
    s3_bucket: S3Bucket,  # noqa: F811
) -> None:
    media_config = MediaConfig(
        backend="s3",
        s3_endpoint=s3_bucket.endpoint,
        s3_region=s3_bucket.region,
        s3_bucket=s3_bucket.bucket,
        s3_access_key=s3_bucket.access_key,
        s3_secret_key=s3_bucket.secret_key,
        presigned=True,
    )
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    alice = unique("alice")
    data = noise_png(tmp_path / "noise.png")
    async with (
        open_stack(dataclasses.replace(make_config(tmp_path), media=media_config), "inbroker") as stack,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.http_port}", event_hooks={"request": [record]}) as http,
    ):
        token = stack.token(alice, "d1")
        media = MediaClient(http=http, token=token, timeout=5.0, sleep=asyncio.sleep, backoff=fast_backoff)
        uploaded = await media.upload(tmp_path / "noise.png")
        (tmp_path / "copy.png.part").write_bytes(data[:MIB])
        await media.download(uploaded.id, tmp_path / "copy.png")
    assert (tmp_path / "copy.png").read_bytes() == data
    assert media.statistics().bytes_received == len(data) - MIB
    ours, store = sent[-2], sent[-1]
    assert (ours.url.port, ours.url.path) == (stack.http_port, f"/v1/media/{uploaded.id}")
    assert ours.headers["authorization"] == f"Bearer {token}"
    assert str(store.url).startswith(s3_bucket.endpoint)
    assert "authorization" not in store.headers  # the presigned URL is the credential
    assert store.headers["range"] == ours.headers["range"] == f"bytes={MIB}-"


class _Stop(Exception):
    """The app went away in the middle of an upload."""


async def test_a_new_process_carries_on_an_unfinished_upload(
    stack: Stack, http_of: dict[int, httpx.AsyncClient], tmp_path: Path
) -> None:
    alice = unique("alice")
    data = noise_png(tmp_path / "noise.png")
    state = tmp_path / "device.sqlite3"

    def stop_after_a_mib(done: int, total: int) -> None:
        if done >= MIB:
            raise _Stop

    first = SqliteUploads(state, user=alice)
    try:
        with pytest.raises(_Stop):
            await media_client(stack, http_of, alice, uploads=first).upload(
                tmp_path / "noise.png", progress=stop_after_a_mib
            )
    finally:
        first.close()
    second = SqliteUploads(state, user=alice)
    try:
        media = media_client(stack, http_of, alice, uploads=second)
        uploaded = await media.upload(tmp_path / "noise.png")
    finally:
        second.close()
    assert uploaded.continued
    assert media.statistics().bytes_sent < len(data)  # not from the start
    assert uploaded.sha256 == hashlib.sha256(data).hexdigest()
    info = await server_info(stack, alice, uploaded.id)
    assert info["state"] == "ready"


async def test_refusals_are_media_failed_with_the_servers_code(
    stack: Stack, http_of: dict[int, httpx.AsyncClient], tmp_path: Path
) -> None:
    media = media_client(stack, http_of, unique("alice"))
    (tmp_path / "notes.txt").write_text("plain text is not an accepted type")
    with pytest.raises(MediaFailed) as refused:
        await media.upload(tmp_path / "notes.txt")
    assert (refused.value.code, refused.value.status) == ("unsupported_type", 415)
    (tmp_path / "fake.png").write_bytes(b"not a png at all" * 100)
    with pytest.raises(MediaFailed) as sniffed:
        await media.upload(tmp_path / "fake.png")
    assert sniffed.value.code == "unsupported_type"
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        await media.upload(tmp_path / "empty.png")
    # An encrypted upload is neither sniffed nor named.
    uploaded = await media.upload(tmp_path / "fake.png", encrypted=True)
    assert (uploaded.type, uploaded.name, uploaded.encrypted) == ("application/octet-stream", None, True)


async def test_send_file_arrives_with_attachments(stack: Stack, tmp_path: Path) -> None:
    alice, bob = unique("alice"), unique("bob")
    data = noise_png(tmp_path / "photo.png", side=300)
    async with device(stack, alice, "a1") as sender, device(stack, bob, "b1") as receiver:
        msg_id = await sender.send_file(dm_conv(alice, bob), tmp_path / "photo.png", caption="look")
        ack = await sender.wait_acked(msg_id, timeout=WAIT)
        async with asyncio.timeout(WAIT):
            async for event in receiver.events():
                if isinstance(event, Message):
                    break
        assert isinstance(event, Message)
        assert (event.kind, event.body, event.seq) == ("media", "look", ack.seq)
        [attachment] = event.attachments
        assert event.media == (attachment.id,)
        assert (attachment.type, attachment.size, attachment.name) == ("image/png", len(data), "photo.png")
        assert (attachment.width, attachment.height) == (300, 300)
        dest = tmp_path / "got.png"
        await receiver.media.download(attachment.id, dest)
        assert dest.read_bytes() == data
    async with device(stack, alice, "a2", http=False) as plain:
        with pytest.raises(RuntimeError, match="http_url"):
            _ = plain.media


def device(stack: Stack, user: str, name: str, *, http: bool = True) -> ChatClient:
    url = f"http://127.0.0.1:{stack.http_port}" if http else None
    return ChatClient(
        host="127.0.0.1", port=stack.mqtt_port, user=user, device=name, token=stack.token(user, name), http_url=url
    )


async def mqchat(*args: str, cwd: Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mqchat", *args,
        cwd=cwd, env=repo_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_cli_send_file_and_download(stack: Stack, tmp_path: Path) -> None:
    alice, bob = unique("alice"), unique("bob")
    data = noise_png(tmp_path / "photo.png")
    ports = ["--mqtt-port", str(stack.mqtt_port), "--http-port", str(stack.http_port)]
    async with device(stack, bob, "b1") as receiver:
        started = time.monotonic()
        code, out, err = await mqchat(
            "send", "--user", alice, "--device", "a1", "--token", stack.token(alice, "a1"), "--to", bob,
            "--file", str(tmp_path / "photo.png"), "--body", "a caption", "--state", str(tmp_path / "a1.sqlite3"),
            *ports, cwd=tmp_path,
        )  # fmt: skip
        sent_s = time.monotonic() - started
        assert code == 0, err
        ack = json.loads(out)
        assert (ack["type"], ack["conv"]) == ("ack", dm_conv(alice, bob))
        progress = [line for line in err.splitlines() if line.startswith("mqchat: upload ")]
        assert progress[-1].startswith("mqchat: upload 100% ("), err
        assert 3 <= len(progress) <= 21, err  # a line every 5 %, not one per chunk
        async with asyncio.timeout(WAIT):
            async for event in receiver.events():
                if isinstance(event, Message):
                    break
        assert isinstance(event, Message)
        assert (event.mid, event.body, event.kind) == (ack["mid"], "a caption", "media")
        [attachment] = event.attachments
        assert (attachment.type, attachment.size, attachment.width) == ("image/png", len(data), 1000)
    code, out, err = await mqchat(
        "download", "--user", bob, "--device", "b1", "--token", stack.token(bob, "b1"),
        "--id", attachment.id, "--out", str(tmp_path / "got.png"), *ports, cwd=tmp_path,
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out) == {"id": attachment.id, "path": str(tmp_path / "got.png"), "size": len(data)}
    assert (tmp_path / "got.png").read_bytes() == data
    assert "mqchat: download 100% (" in err
    eve = unique("eve")
    code, out, err = await mqchat(
        "download", "--user", eve, "--device", "e1", "--token", stack.token(eve, "e1"),
        "--id", attachment.id, "--out", str(tmp_path / "no.png"), *ports, cwd=tmp_path,
    )  # fmt: skip
    assert (code, out) == (1, "")
    assert "not_found" in err
    print(f"mqchat send --file of 3 MB: {sent_s:.1f} s")
