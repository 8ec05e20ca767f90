"""``mqchat bench media``: attachments through a real ``mqchat serve``, on the local store and on
S3 (an S3-API server on 127.0.0.1), side by side in one run.

- upload throughput: files uploaded one after another with the resumable upload (tus PATCH of
  the whole file), MB/s from the first byte to the file being checked and ready;
- memory: 20 files (50 MB each; 10 MB with ``--quick``) uploaded at once while the server's
  resident memory is sampled every 0.2 s: it must stay flat, not grow with the bytes in flight;
- thumbnails: what reading an image's size and making its thumbnail costs per image (in this
  process, the code the server runs), by image size.

Every upload is checked against its sha256 by the server, as in production.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from mqchat.bench.harness import HOST, LOAD_CPU, BenchError, Options, pin, progress, stop_popen
from mqchat.bench.processes import ServeProc, run_serve
from mqchat.bench.report import dress, figure, print_notes, print_ratios, print_table, save
from mqchat.ports import free_port
from mqchat.tokens import issue_token

CHUNK = 1024 * 1024
BLOCKS = 50  # MiB per file (10 with --quick)
SEQUENTIAL = 5  # files uploaded one after another
CONCURRENT = 20  # files uploaded at once
BUCKET = "bench-media"


def _block(seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(CHUNK)


class _File:
    """A file of n MiB generated as it is sent (the load never holds it whole), with its digest."""

    def __init__(self, mib: int) -> None:
        self.mib = mib
        self.size = mib * CHUNK
        self.head = b"%PDF-1.7\n"  # a type the server accepts and recognizes
        digest = hashlib.sha256()
        for chunk in self._chunks():
            digest.update(chunk)
        self.sha256 = digest.hexdigest()

    def _chunks(self) -> Iterator[bytes]:
        for i in range(self.mib):
            block = _block(i % 8)
            yield self.head + block[len(self.head) :] if i == 0 else block

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self._chunks():
            yield chunk


def _metadata(file: _File) -> str:
    pairs = {"filetype": "application/pdf", "sha256": file.sha256, "filename": "bench.pdf"}
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in pairs.items())


async def _upload(http: httpx.AsyncClient, file: _File) -> float:
    """One upload, created then sent whole; seconds until it is ready."""
    started = time.perf_counter()
    created = await http.post(
        "/v1/media",
        headers={"Tus-Resumable": "1.0.0", "Upload-Length": str(file.size), "Upload-Metadata": _metadata(file)},
    )
    if created.status_code != 201:
        raise BenchError(f"creating an upload: {created.status_code} {created.text[:200]}")
    headers = {"Tus-Resumable": "1.0.0", "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    done = await http.patch(created.headers["location"], content=file.stream(), headers=headers)
    if done.status_code != 204:
        raise BenchError(f"uploading: {done.status_code} {done.text[:200]}")
    return time.perf_counter() - started


def _rss(serve: ServeProc) -> int:
    import psutil  # type: ignore[import-untyped]

    total = 0
    for pid in serve.pids():
        with contextlib.suppress(psutil.Error):
            total += psutil.Process(pid).memory_info().rss
    return total


async def _measure_backend(label: str, serve: ServeProc, *, mib: int) -> dict[str, Any]:
    if not serve.wait_healthy(60):
        raise BenchError(f"mqchat serve ({label}) did not start: {serve.log_tail()}")
    file = _File(mib)
    out: dict[str, Any] = {"label": label, "file_mib": mib}
    timeout = httpx.Timeout(300, connect=10)
    limits = httpx.Limits(max_connections=CONCURRENT + 2)
    users = [f"bench{i}" for i in range(CONCURRENT)]
    clients = [
        httpx.AsyncClient(
            base_url=f"http://{HOST}:{serve.http_port}",
            headers={"Authorization": f"Bearer {issue_token(secret=serve.secret, user=u, device='d', ttl_s=7200)}"},
            timeout=timeout,
            limits=limits,
        )
        for u in users
    ]
    try:
        await _upload(clients[0], _File(1))  # warm up
        seconds = []
        for k in range(SEQUENTIAL):
            seconds.append(await _upload(clients[k % len(clients)], file))
            progress(f"{label}: sequential upload {k + 1}/{SEQUENTIAL}: {file.size / seconds[-1] / 1e6:.0f} MB/s")
        out["sequential_mb_per_s"] = round(file.size * SEQUENTIAL / sum(seconds) / 1e6, 1)
        baseline = _rss(serve)
        samples: list[tuple[float, int]] = []
        started = time.perf_counter()
        running = [asyncio.create_task(_upload(c, file)) for c in clients]
        while not all(t.done() for t in running):
            samples.append((round(time.perf_counter() - started, 2), _rss(serve)))
            await asyncio.sleep(0.2)
        wall = time.perf_counter() - started
        for task in running:
            task.result()
        progress(f"{label}: {CONCURRENT} concurrent uploads of {mib} MiB in {wall:.1f} s")
        peak = max(rss for _, rss in samples)
        out.update(
            concurrent_files=CONCURRENT,
            concurrent_mb_per_s=round(file.size * CONCURRENT / wall / 1e6, 1),
            rss_baseline_mib=round(baseline / 2**20, 1),
            rss_peak_mib=round(peak / 2**20, 1),
            rss_growth_mib=round((peak - baseline) / 2**20, 1),
            bytes_in_flight_mib=CONCURRENT * mib,
            rss_samples=[(t, round(rss / 2**20, 1)) for t, rss in samples],
        )
    finally:
        for client in clients:
            await client.aclose()
    return out


@contextlib.contextmanager
def _s3_server(workdir: Path) -> Iterator[str]:
    """An S3-API server (moto's, S3 only) on a free port, pinned beside the load; yields its URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    with (workdir / "s3.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: pin(LOAD_CPU))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://{HOST}:{port}/", timeout=1).status_code < 500:
                    break
            if proc.poll() is not None:
                raise BenchError(f"the S3-API server exited: {(workdir / 's3.log').read_text()[-400:]}")
            time.sleep(0.2)
        else:
            raise BenchError("the S3-API server did not answer within 30 s")
        endpoint = f"http://{HOST}:{port}"
        httpx.put(f"{endpoint}/{BUCKET}", timeout=10).raise_for_status()  # this server takes it unsigned
        yield endpoint
    finally:
        stop_popen(proc, grace_s=5)


def _thumbnails(quick: bool) -> dict[str, Any]:
    """ms per image of describe_image (size, orientation, thumbnail), by image size."""
    from PIL import Image

    from bridge.media.inspect import describe_image

    sizes = [("phone photo 12 MP JPEG", 4000, 3000, "JPEG"), ("1080p PNG", 1920, 1080, "PNG"),
             ("small JPEG 0.3 MP", 640, 480, "JPEG")]  # fmt: skip
    rounds = 3 if quick else 10
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for label, width, height, fmt in sizes:
            noise = Image.frombytes("RGB", (width, height), _noise(width * height * 3))
            path = Path(scratch) / f"{width}x{height}.{fmt.lower()}"
            noise.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            content_type = f"image/{fmt.lower()}"
            times = []
            thumbnail = b""
            for _ in range(rounds):
                started = time.perf_counter()
                facts = describe_image(path, content_type, thumbnail_px=64, max_pixels=50_000_000)
                times.append((time.perf_counter() - started) * 1000)
                if facts is None:
                    raise BenchError(f"no thumbnail for {label}")
                thumbnail = facts.thumbnail
            times.sort()
            out[label] = {
                "file_kib": round(path.stat().st_size / 1024),
                "ms_median": round(times[len(times) // 2], 1),
                "thumbnail_bytes": len(thumbnail),
            }
            progress(f"thumbnail of a {label}: {out[label]['ms_median']} ms")
    return out


def _noise(n: int) -> bytes:
    out = io.BytesIO()
    seed = 0
    while out.tell() < n:
        out.write(hashlib.shake_256(seed.to_bytes(8, "big")).digest(min(CHUNK, n - out.tell())))
        seed += 1
    return out.getvalue()


def run(opts: Options, workdir: Path) -> dict[str, Any]:
    mib = 10 if opts.quick else BLOCKS
    systems: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    secret = secrets.token_urlsafe(32)
    media_env = {"MQCHAT_MEDIA_MAX_BYTES": "200MiB", "MQCHAT_MEDIA_USER_BYTES": "100GiB", "MQCHAT_HTTP_RATE": "1000"}
    progress("media: local directory")
    with run_serve("inbroker", workdir, name="-local", secret=secret, env=media_env) as serve:
        systems["local"] = asyncio.run(_measure_backend("local directory", serve, mib=mib))
    try:
        with _s3_server(workdir) as endpoint:
            progress(f"media: S3 at {endpoint}")
            env = {
                **media_env,
                "MQCHAT_MEDIA_BACKEND": "s3",
                "MQCHAT_MEDIA_S3_ENDPOINT": endpoint,
                "MQCHAT_MEDIA_S3_BUCKET": BUCKET,
                "MQCHAT_MEDIA_S3_ACCESS_KEY": "bench",
                "MQCHAT_MEDIA_S3_SECRET_KEY": "bench-secret",
            }
            with run_serve("inbroker", workdir, name="-s3", secret=secret, env=env) as serve:
                systems["s3"] = asyncio.run(_measure_backend("S3 (moto server)", serve, mib=mib))
    except (BenchError, ModuleNotFoundError) as exc:
        skipped["s3"] = str(exc)
    thumbnails = _thumbnails(opts.quick)
    ratios: dict[str, Any] = {}
    local = systems["local"]
    if "s3" in systems:
        ratios["sequential_local_vs_s3"] = round(local["sequential_mb_per_s"] / systems["s3"]["sequential_mb_per_s"], 2)
    for key, s in systems.items():
        ratios[f"{key}_rss_growth_vs_bytes_in_flight"] = round(s["rss_growth_mib"] / s["bytes_in_flight_mib"], 3)
    notes = [
        "client and server on one 2-core machine: the client generates, hashes and sends every byte.",
        "each upload is one tus PATCH of the whole file; the server streams it to the store, then reads it "
        "back once to check its sha256 and type.",
        "S3 here is moto's server (Python): its speed, not S3's, bounds the S3 figures.",
        f"memory: RSS of the server's processes (supervisor and node), sampled every 0.2 s while {CONCURRENT} "
        f"uploads of {mib} MiB run at once.",
    ]
    params = {"file_mib": mib, "sequential": SEQUENTIAL, "concurrent": CONCURRENT, "cpus": os.cpu_count()}
    return {
        "parameters": params,
        "systems": systems,
        "skipped": skipped,
        "thumbnails": thumbnails,
        "ratios": ratios,
        "notes": notes,
    }


def table(data: dict[str, Any]) -> None:
    rows = [
        [s["label"], s["sequential_mb_per_s"], s["concurrent_mb_per_s"], s["rss_baseline_mib"], s["rss_peak_mib"],
         s["bytes_in_flight_mib"]]
        for s in data["systems"].values()
    ]  # fmt: skip
    print_table(
        "media: upload throughput and the server's memory",
        ["store", "one at a time MB/s", f"{data['parameters']['concurrent']} at once MB/s", "RSS before MiB",
         "RSS peak MiB", "bytes in flight MiB"],
        rows,
    )  # fmt: skip
    print_table(
        "media: image size and thumbnail per image",
        ["image", "file KiB", "ms (median)", "thumbnail bytes"],
        [[k, v["file_kib"], v["ms_median"], v["thumbnail_bytes"]] for k, v in data["thumbnails"].items()],
    )
    print_ratios(data)
    print_notes(data)


def plot(data: dict[str, Any], path: Path) -> None:
    fig, (left, middle, right) = figure(3, size=(15, 4.5))
    systems = list(data["systems"].values())
    labels = [s["label"] for s in systems]
    x = range(len(systems))
    left.bar([i - 0.2 for i in x], [s["sequential_mb_per_s"] for s in systems], width=0.4, label="one at a time")
    left.bar([i + 0.2 for i in x], [s["concurrent_mb_per_s"] for s in systems], width=0.4, label="20 at once")
    dress(left, title="Upload throughput", ylabel="MB/s (until checked and ready)", xticks=labels)
    for s in systems:
        ts = [t for t, _ in s["rss_samples"]]
        middle.plot(ts, [m for _, m in s["rss_samples"]], label=s["label"])
    dress(
        middle,
        title=f"Server memory, {data['parameters']['concurrent']} uploads of {data['parameters']['file_mib']} MiB",
        ylabel="RSS MiB",
        xlabel="seconds",
    )
    thumbs = data["thumbnails"]
    bars = right.bar(list(thumbs), [v["ms_median"] for v in thumbs.values()])
    right.bar_label(bars, labels=[f"{v['ms_median']} ms" for v in thumbs.values()], fontsize=8)
    dress(right, title="Size and thumbnail of one image", ylabel="ms per image", legend=False)
    save(fig, path, data)
