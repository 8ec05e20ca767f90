"""The object stores' conformance suite, run on every backend: a local directory, and S3 (moto's
server in its own process, ``tests.s3_server``).

An upload is sent in several appends, one of them cut by a ``ConnectionResetError`` mid-way,
carried on from the offset recorded last and read back byte for byte; a crash between a write
and its record (a ``record`` that raises) leaves bytes past the recorded offset, which the next
append overwrites. Sizes cross several S3 parts (8 MiB) where that matters.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from mqchat.config import MediaConfig
from storage.objects import LocalObjectStore, ObjectStore, ObjectStoreError, open_object_store
from storage.objects.s3 import PART_SIZE, S3ObjectStore
from storage.objects.transfer import READ_CHUNK
from tests.s3_server import S3Bucket, S3Server, s3_bucket, s3_server  # noqa: F401

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024
KEY = "media/01HZXK3M4Q5R6S7T8V9W0XYZAB"


def payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


async def chunks_of(data: bytes, *, size: int = 256 * 1024, cut_after: int | None = None) -> AsyncIterator[bytes]:
    """data in chunks of size; with cut_after, the connection is cut (ConnectionResetError) once
    that many bytes are sent."""
    view = memoryview(data)
    sent = 0
    while sent < len(data):
        piece = view[sent : sent + size]
        if cut_after is not None and sent + len(piece) >= cut_after:
            yield bytes(piece[: cut_after - sent])
            raise ConnectionResetError("the client went away")
        yield bytes(piece)
        sent += len(piece)


class Crash(Exception):
    """The process died before a record was kept."""


class Recorder:
    """The media index's side: the (offset, staging) record() last kept; from the first offset
    past crash_past on, it raises Crash instead (a crash between the write and its record)."""

    def __init__(self, offset: int, staging: str, *, crash_past: int | None = None) -> None:
        self.offset = offset
        self.staging = staging
        self.crash_past = crash_past
        self.offsets: list[int] = []

    async def __call__(self, offset: int, staging: str) -> None:
        assert offset > self.offset, f"record({offset}) after record({self.offset}): offsets only grow"
        if self.crash_past is not None and offset > self.crash_past:
            raise Crash(offset)
        self.offset, self.staging = offset, staging
        self.offsets.append(offset)


async def read_all(store: ObjectStore, key: str, start: int = 0, end: int | None = None) -> bytes:
    parts = []
    async for chunk in store.read(key, start, end):
        assert 0 < len(chunk) <= READ_CHUNK
        parts.append(chunk)
    return b"".join(parts)


async def sha256_of(store: ObjectStore, key: str) -> str:
    digest = hashlib.sha256()
    async for chunk in store.read(key):
        assert 0 < len(chunk) <= READ_CHUNK
        digest.update(chunk)
    return digest.hexdigest()


def open_s3(bucket: S3Bucket, spool: Path, *, create_bucket: bool = False) -> S3ObjectStore:
    return S3ObjectStore(
        endpoint=bucket.endpoint,
        region=bucket.region,
        bucket=bucket.bucket,
        access_key=bucket.access_key,
        secret_key=bucket.secret_key,
        create_bucket=create_bucket,
        spool_dir=spool,
    )


@pytest.fixture(params=["local", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "media")
        return
    bucket: S3Bucket = request.getfixturevalue("s3_bucket")
    async with open_s3(bucket, tmp_path / "spool") as s3:
        yield s3


@pytest.fixture
async def s3_store(s3_bucket: S3Bucket, tmp_path: Path) -> AsyncIterator[S3ObjectStore]:  # noqa: F811
    async with open_s3(s3_bucket, tmp_path / "spool") as s3:
        yield s3


# --- uploads ---------------------------------------------------------------------------------------


async def test_upload_cut_and_carried_on_reads_back_identical(store: ObjectStore) -> None:
    data = payload(20 * MiB + 12_345)
    staging = await store.begin(KEY, len(data), "image/png")
    recorder = Recorder(0, staging)

    # A first request sends 3 MiB and ends (less than a part: S3 keeps them as the tail).
    assert await store.append(KEY, staging, 0, chunks_of(data[: 3 * MiB]), recorder) == (3 * MiB, recorder.staging)
    # The second is cut 9 MiB (and a bit) later: what arrived is durable and recorded, then the cut is raised.
    with pytest.raises(ConnectionResetError):
        await store.append(
            KEY, recorder.staging, recorder.offset, chunks_of(data[3 * MiB :], cut_after=9 * MiB + 1234), recorder
        )
    assert recorder.offset == 12 * MiB + 1234
    assert await store.size(KEY) is None  # not an object before finish

    # A third carries on from the recorded offset (any process could: the staging is all it needs).
    offset, staging = await store.append(
        KEY, recorder.staging, recorder.offset, chunks_of(data[recorder.offset :], size=100_000), recorder
    )
    assert (offset, staging) == (len(data), recorder.staging) == (recorder.offset, recorder.staging)
    assert recorder.offsets == sorted(set(recorder.offsets))
    await store.finish(KEY, staging, len(data))

    assert await store.size(KEY) == len(data)
    assert await sha256_of(store, KEY) == hashlib.sha256(data).hexdigest()
    await store.finish(KEY, staging, len(data))  # again (a retry): nothing changes
    assert await store.size(KEY) == len(data)


@pytest.mark.parametrize(
    ("first", "good", "until"),
    [(0, 5 * MiB, 12 * MiB), (0, 9 * MiB, 12 * MiB), (3 * MiB, 5 * MiB, 7 * MiB)],
    ids=["crash-at-the-first-part", "crash-after-a-part", "crash-at-a-longer-tail"],
)
async def test_bytes_past_the_recorded_offset_are_overwritten(
    store: ObjectStore, first: int, good: int, until: int
) -> None:
    """A crash between writing and recording: the next append starts from the recorded offset
    and the bytes the crash left past it (here wrong ones, up to until) are replaced."""
    data = payload(13 * MiB + 99, seed=2)
    staging = await store.begin(KEY, len(data), "video/mp4")
    recorder = Recorder(0, staging)
    if first:
        await store.append(KEY, staging, 0, chunks_of(data[:first]), recorder)
    wrong = data[first:good] + payload(until - good, seed=3)
    crashing = Recorder(recorder.offset, recorder.staging, crash_past=good)
    with pytest.raises(Crash):
        await store.append(KEY, recorder.staging, recorder.offset, chunks_of(wrong), crashing)
    assert first <= crashing.offset <= good

    resumed = Recorder(crashing.offset, crashing.staging)
    offset, staging = await store.append(
        KEY, crashing.staging, crashing.offset, chunks_of(data[crashing.offset :]), resumed
    )
    assert offset == len(data)
    await store.finish(KEY, staging, len(data))
    assert await sha256_of(store, KEY) == hashlib.sha256(data).hexdigest()


async def test_never_writes_past_the_declared_size(store: ObjectStore) -> None:
    data = payload(1000, seed=4)
    staging = await store.begin(KEY, 1000, "image/jpeg")
    recorder = Recorder(0, staging)
    with pytest.raises(ValueError, match="declared size"):
        await store.append(KEY, staging, 0, chunks_of(data + b"x" * 500, size=300), recorder)
    assert recorder.offset == 900  # the chunk that would go past 1000 was refused whole
    with pytest.raises(ValueError, match="offset"):
        await store.append(KEY, recorder.staging, 1001, chunks_of(b"x"), recorder)

    offset, staging = await store.append(KEY, recorder.staging, 900, chunks_of(data[900:]), recorder)
    assert offset == 1000
    await store.finish(KEY, staging, 1000)
    assert await read_all(store, KEY) == data


async def test_an_empty_upload_is_an_empty_object(store: ObjectStore) -> None:
    staging = await store.begin(KEY, 0, "text/plain")
    recorder = Recorder(-1, staging)
    assert await store.append(KEY, staging, 0, chunks_of(b""), recorder) == (0, staging)
    assert recorder.offsets == []  # nothing arrived: nothing to record
    await store.finish(KEY, staging, 0)
    assert await store.size(KEY) == 0
    assert await read_all(store, KEY) == b""


async def test_abort_and_delete_are_idempotent(store: ObjectStore) -> None:
    data = payload(PART_SIZE + MiB, seed=5)  # a part and a tail on S3
    staging = await store.begin(KEY, len(data), "image/png")
    recorder = Recorder(0, staging)
    await store.append(KEY, staging, 0, chunks_of(data), recorder)
    await store.abort(KEY, recorder.staging)
    await store.abort(KEY, recorder.staging)
    with pytest.raises(ObjectStoreError):
        await store.append(KEY, recorder.staging, recorder.offset, chunks_of(b""), recorder)
    with pytest.raises(ObjectStoreError):
        await store.finish(KEY, recorder.staging, len(data))
    assert await store.size(KEY) is None

    staging = await store.begin(KEY, 10, "image/png")
    offset, staging = await store.append(KEY, staging, 0, chunks_of(b"0123456789"), Recorder(0, staging))
    await store.finish(KEY, staging, offset)
    assert await store.size(KEY) == 10
    await store.delete(KEY)
    assert await store.size(KEY) is None
    await store.delete(KEY)
    with pytest.raises(ObjectStoreError, match="no object"):
        await read_all(store, KEY)


# --- objects ---------------------------------------------------------------------------------------


async def test_range_reads(store: ObjectStore) -> None:
    data = payload(MiB + 17, seed=6)
    staging = await store.begin(KEY, len(data), "application/pdf")
    offset, staging = await store.append(KEY, staging, 0, chunks_of(data), Recorder(0, staging))
    await store.finish(KEY, staging, offset)

    size = len(data)
    for start, end in [(0, None), (0, 1), (100, 200), (1000, 700_000), (size - 10, None), (size - 10, size + 100)]:
        assert await read_all(store, KEY, start, end) == data[start:end], (start, end)
    assert await read_all(store, KEY, size, None) == b""
    assert await read_all(store, KEY, size + 5, None) == b""
    assert await read_all(store, KEY, 5, 5) == b""
    with pytest.raises(ValueError, match="range"):
        await read_all(store, KEY, 10, 5)
    with pytest.raises(ObjectStoreError, match="no object"):
        await read_all(store, "media/none", 0, 10)
    with pytest.raises(ObjectStoreError, match="no object"):
        await read_all(store, "media/none", 5, 5)
    with pytest.raises(ValueError, match="key"):
        await store.size("../outside")


# --- per backend -----------------------------------------------------------------------------------


async def test_s3_presigned_urls_work_without_credentials(s3_store: S3ObjectStore) -> None:
    data = payload(300_000, seed=7)
    put = await s3_store.presigned_put(KEY, size=len(data), content_type="image/jpeg", expires_s=60)
    assert put is not None
    assert put.headers == {"Content-Type": "image/jpeg", "Content-Length": str(len(data))}
    assert "content-length%3Bcontent-type%3Bhost" in put.url  # both signed: S3 refuses another size or type
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        answer = await client.put(put.url, content=data, headers=put.headers)
        assert answer.status_code == 200, answer.text
        assert await s3_store.size(KEY) == len(data)

        url = await s3_store.presigned_get(KEY, expires_s=60, filename="été 2024.jpg", content_type="image/jpeg")
        assert url is not None
        answer = await client.get(url)
        assert answer.status_code == 200
        assert answer.content == data
        assert answer.headers["content-type"] == "image/jpeg"
        assert answer.headers["content-disposition"] == (
            "attachment; filename=\"_t_ 2024.jpg\"; filename*=UTF-8''%C3%A9t%C3%A9%202024.jpg"
        )


async def test_local_has_no_presigned_urls(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "media")
    assert await store.presigned_get(KEY, expires_s=60, filename="a.png", content_type="image/png") is None
    assert await store.presigned_put(KEY, size=1, content_type="image/png", expires_s=60) is None


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.usefixtures("open_umask")
async def test_local_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "media")
    staging = await store.begin(KEY, 4, "image/png")
    (partial,) = (tmp_path / "media" / "uploads").iterdir()
    assert stat.S_IMODE(partial.stat().st_mode) == 0o600
    offset, staging = await store.append(KEY, staging, 0, chunks_of(b"abcd"), Recorder(0, staging))
    await store.finish(KEY, staging, offset)
    for path in (tmp_path / "media", tmp_path / "media" / "uploads", tmp_path / "media" / "media"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    assert stat.S_IMODE((tmp_path / "media" / KEY).stat().st_mode) == 0o600
    assert list((tmp_path / "media" / "uploads").iterdir()) == []


async def test_s3_bucket_must_exist_unless_created(s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    fresh = s3_server.new_bucket()
    absent = S3Bucket(fresh.endpoint, fresh.region, fresh.access_key, fresh.secret_key, f"{fresh.bucket}-new")
    with pytest.raises(ObjectStoreError, match="does not exist"):
        async with open_s3(absent, tmp_path / "spool"):
            pass
    async with open_s3(absent, tmp_path / "spool", create_bucket=True) as s3:
        assert await s3.size(KEY) is None


async def test_open_object_store_picks_the_backend(s3_server: S3Server, tmp_path: Path) -> None:  # noqa: F811
    async with open_object_store(MediaConfig(), tmp_path) as local:
        assert isinstance(local, LocalObjectStore)
        assert local.directory == tmp_path / "media"
    bucket = s3_server.new_bucket()
    config = MediaConfig(
        backend="s3",
        s3_endpoint=bucket.endpoint,
        s3_region=bucket.region,
        s3_bucket=bucket.bucket,
        s3_access_key=bucket.access_key,
        s3_secret_key=bucket.secret_key,
    )
    async with open_object_store(config, tmp_path) as s3:
        assert isinstance(s3, S3ObjectStore)
        assert await s3.size(KEY) is None
        assert "test" not in repr(s3)
    with pytest.raises(ObjectStoreError, match="not open"):
        await s3.size(KEY)
