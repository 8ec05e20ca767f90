"""What the media client's transfers share: one HTTP request bounded by a timeout, the retry
policy, and the work on local files, each step of which runs in a worker thread.

::

    Requests.call(method, url)   one request, read whole ─► the response
                                 a transport failure, a timeout, 408/429/5xx ─► Transient
    Requests.retrying(what, f)   f() again after a backoff while it raises Transient,
                                 ``retries`` times in a row at most ─► MediaFailed("gave_up")
    failure(what, response)      a final answer ─► MediaFailed(the server's error code, status)
    digest, read_at, append,     blocking file work: run them with ``asyncio.to_thread``
    size_of, truncate, finish_part
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import httpx

from clients.errors import ClientError, MediaFailed

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
GONE_STATUS = frozenset({404, 410})
_HASH_BLOCK = 1024 * 1024


class Transient(ClientError):
    """One attempt failed in a way worth retrying; never leaves the media client."""

    def __init__(self, problem: str, *, retry_after: float | None = None) -> None:
        super().__init__(problem)
        self.retry_after = retry_after  # seconds, when the server said (Retry-After)


class Gone(ClientError):
    """The upload is not on the server any more (expired, deleted, or dropped by its check)."""


def error_of(response: httpx.Response) -> tuple[str, str]:
    """The stable code and the message of an error answer ({"error", "message"})."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return body["error"], str(body.get("message", ""))
    return "http_" + str(response.status_code), ""


def failure(what: str, response: httpx.Response) -> MediaFailed:
    code, message = error_of(response)
    return MediaFailed(code, f"{what}: {response.status_code} {message}".rstrip(), status=response.status_code)


def transport_problem(exc: BaseException) -> Transient:
    return Transient(f"{type(exc).__name__}: {exc}")


class Requests:
    """Requests of one user with a bearer token, each bounded by ``timeout``, and their retries."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        token: str,
        timeout: float,
        sleep: Callable[[float], Awaitable[None]],
        backoff: Callable[[int], float],
        retries: int,
    ) -> None:
        self.http = http
        self.headers = {"Authorization": f"Bearer {token}"}
        self.timeout = timeout
        self.retries = retries
        self._sleep = sleep
        self._backoff = backoff
        self.failures = 0  # failed attempts, all transfers together

    async def call(self, method: str, url: str, *, headers: dict[str, str] | None = None) -> httpx.Response:
        """One request without a body, bounded by the timeout and read whole; a transport failure,
        a timeout or a retryable status raises Transient."""
        try:
            async with asyncio.timeout(self.timeout):
                response = await self.http.request(
                    method, url, headers={**self.headers, **(headers or {})}, timeout=self.timeout
                )
                await response.aread()
        except (httpx.TransportError, TimeoutError) as exc:  # every httpx timeout is a TransportError
            raise transport_problem(exc) from exc
        if response.status_code in RETRYABLE_STATUS:
            header = response.headers.get("retry-after", "")
            raise Transient(
                f"{response.status_code} {error_of(response)[0]}",
                retry_after=float(header) if header.isdigit() else None,
            )
        return response

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """call(), again after a backoff while it raises Transient, ``retries`` times at most."""
        failures = 0
        for _ in range(self.retries + 1):
            try:
                return await call()
            except Transient as exc:
                failures = self.count(failures, exc, what)
                await self.pause(failures, exc, what)
        raise AssertionError("unreachable: count() gives up first")

    def count(self, failures: int, exc: Transient, what: str) -> int:
        """One more failed attempt in a row; MediaFailed("gave_up") past ``retries`` of them."""
        self.failures += 1
        failures += 1
        if failures > self.retries:
            raise MediaFailed("gave_up", f"{what}: {exc} ({failures} attempts in a row failed)")
        return failures

    async def pause(self, failures: int, error: Transient, what: str) -> None:
        """The backoff after ``failures`` failed attempts in a row (at least the first's)."""
        delay = self._backoff(max(failures, 1) - 1)
        if error.retry_after is not None:
            delay = max(delay, error.retry_after)  # the server said when (429/503 Retry-After)
        logger.warning("%s failed (%s); retrying in %.1f s", what, error, delay)
        await self._sleep(delay)


# --- local files (blocking: run each with asyncio.to_thread) -----------------------------------------


def digest(path: Path) -> str:
    """The file's SHA-256, hex, read a block at a time."""
    sha256 = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            sha256.update(block)
    return sha256.hexdigest()


def read_at(path: Path, offset: int, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(size)


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def truncate(path: Path) -> None:
    """Start a .part file again (by removing it)."""
    path.unlink(missing_ok=True)


def finish_part(part: Path, dest: Path) -> None:
    """Make a complete .part file durable and give it its name."""
    with part.open("rb+") as f:
        os.fsync(f.fileno())
    os.replace(part, dest)
