"""The server's TLS: one certificate (and key) for MQTT over TLS, WSS and HTTPS, reloaded without
a restart.

::

    ServerTls(cert, key, client_ca)  ──context──▶  every TLS listener of the process
        ▲      (TLS 1.2 and later only; client_ca set: a client certificate signed by it is required)
        │
    reload_if_changed(): the files' (inode, size, mtime) changed ─▶ their bytes, read once, are
        first loaded into a scratch context (a half-written or mismatched pair is refused and the
        old one kept), then the same bytes into the live context: new handshakes present the new
        certificate, connections already open keep theirs. ``TlsWatcher`` polls; SIGHUP calls
        ``reload_if_changed(force=True)``. A client CA added to the bundle is trusted at once; one
        removed from it stays trusted until the process restarts (OpenSSL only adds to a store).

Key material is never logged; errors name the files only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Counter

from mqchat.errors import ConfigError
from mqchat.service import Service

logger = logging.getLogger(__name__)

RELOADS = Counter("mqchat_tls_reloads_total", "TLS certificate reloads", ["outcome"])

WATCH_INTERVAL_S = 2.0
"""How often the certificate files are looked at for a change."""


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ServerTls:
    """The TLS context every TLS listener of a process shares, and its reloading."""

    def __init__(self, *, cert: str, key: str, client_ca: str = "") -> None:
        if not cert or not key:
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        self.cert = Path(cert)
        self.key = Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self._stamps = self._current_stamps()
        self.context = self._new_context()
        self.reloads = 0

    def _current_stamps(self) -> tuple[tuple[int, int, int], ...]:
        files = (self.cert, self.key, *((self.client_ca,) if self.client_ca else ()))
        try:
            return tuple(_stamp(f) for f in files)
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None

    def _new_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_COMPRESSION
        self._load_into(context, self._read())
        if self.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def _read(self) -> tuple[bytes, bytes, bytes]:
        """The files' bytes, read once: what is checked is what is loaded."""
        try:
            ca = self.client_ca.read_bytes() if self.client_ca is not None else b""
            return self.cert.read_bytes(), self.key.read_bytes(), ca
        except OSError as exc:
            raise ConfigError(f"cannot read {exc.filename}: {exc.strerror}") from None

    def _load_into(self, context: ssl.SSLContext, files: tuple[bytes, bytes, bytes]) -> None:
        cert, key, ca = files
        try:
            # The ssl module loads from files only: the bytes read once, as files of this process.
            with _in_memory_files(cert, key, ca) as (chain, secret, authorities):
                context.load_cert_chain(chain, secret)
                if self.client_ca is not None:
                    context.load_verify_locations(cafile=authorities)
        except (OSError, ssl.SSLError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"cannot load the TLS certificate {self.cert} and key {self.key}"
                f"{f' or client CA {self.client_ca}' if self.client_ca else ''}: {type(exc).__name__}"
            ) from None

    @staticmethod
    def _scratch() -> ssl.SSLContext:
        return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

    def reload_if_changed(self, *, force: bool = False) -> bool:
        """Load the files again if they changed (or force): True when the live context now holds
        them. A pair that does not load is refused (logged, counted) and the old one kept."""
        try:
            stamps = self._current_stamps()
        except ConfigError as exc:
            logger.warning("TLS certificate not reloaded: %s", exc)
            RELOADS.labels(outcome="failed").inc()
            return False
        if stamps == self._stamps and not force:
            return False
        try:
            files = self._read()
            self._load_into(self._scratch(), files)  # checked first: the live context never holds a bad pair
            self._load_into(self.context, files)
        except ConfigError as exc:
            logger.warning("TLS certificate not reloaded (the previous one stays): %s", exc)
            RELOADS.labels(outcome="failed").inc()
            self._stamps = stamps  # tried; wait for the next change (or SIGHUP)
            return False
        self._stamps = stamps
        self.reloads += 1
        RELOADS.labels(outcome="reloaded").inc()
        logger.info("TLS certificate reloaded from %s", self.cert)
        return True


@contextlib.contextmanager
def _in_memory_files(*contents: bytes) -> Iterator[list[str]]:
    """Paths that read as contents: anonymous in-memory files of this process (Linux), else
    files in a private temporary directory, removed on exit."""
    if hasattr(os, "memfd_create"):
        fds = [os.memfd_create("mqchat-tls", 0) for _ in contents]
        try:
            for fd, data in zip(fds, contents, strict=True):
                os.write(fd, data)
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="mqchat-tls-") as scratch:
        paths = [Path(scratch) / f"{n}.pem" for n in range(len(contents))]
        for path, data in zip(paths, contents, strict=True):
            path.touch(mode=0o600)
            path.write_bytes(data)
        yield [str(p) for p in paths]


class TlsWatcher(Service):
    """Reloads a ``ServerTls`` whenever its files change (a worker polling every
    ``interval_s``); SIGHUP reaches ``ServerTls.reload_if_changed(force=True)`` through the
    process that owns signals (``mqchat.child``)."""

    name = "TLS certificate watcher"

    def __init__(self, tls: ServerTls, *, interval_s: float = WATCH_INTERVAL_S) -> None:
        super().__init__()
        self.tls = tls
        self._interval_s = interval_s

    async def _start(self) -> None:
        self.start_worker(self._watch(), name="tls-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            self.tls.reload_if_changed()


def server_tls(cert: str, key: str, client_ca: str = "") -> ServerTls | None:
    """The configured TLS, or None when no certificate is configured."""
    if not cert and not key:
        if client_ca:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    return ServerTls(cert=cert, key=key, client_ca=client_ca)
