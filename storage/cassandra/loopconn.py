"""cassandra-driver's connections on the application's own asyncio loop.

The driver's connection classes each run a reactor thread (libev, asyncore, or an asyncio loop of
their own): every request wakes that thread to write it, every answer is read there and handed
back to the application's loop with ``call_soon_threadsafe``. On a small machine those two thread
hops per request cost more CPU than the rest of the request, and each waits for the GIL (up to
the interpreter's 5 ms switch interval when the other thread is busy).

``LoopConnection.on(loop)`` is a ``Connection`` subclass whose sockets are read and written by
``loop`` itself: a request made on the loop is written at once (``socket.send``, no thread wakes),
and its answer is decoded and its callbacks run on the loop. The driver's own threads (pool and
control-connection set-up, heartbeats, ``Cluster.shutdown``) still call in from outside; those
calls are handed to the loop with ``call_soon_threadsafe``.

Rules that come with it:

- Never call a blocking driver API (``Cluster.connect``, ``Session.prepare``, ``Session.execute``,
  ``ResultSet`` iteration) on the loop: it waits for an answer that only the loop can read.
  ``session.Cql`` calls them in a thread.
- One cluster object per loop; ``storage.cassandra._Shared`` keys connections by loop.
- A connection's requests wait for stream ids when about 32,000 are in flight, and that wait would
  block the loop: ``session.Cql`` keeps far fewer in flight (``MAX_IN_FLIGHT``). That cap is also
  the write queue's bound (a full socket queues frames, never refuses them).
- A stalled loop stalls the Cassandra I/O and its timeouts with it; the driver's heartbeats (a
  thread) then mark the connections defunct after about 30 s.
- No TLS: ``session.connect`` never configures it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar

from cassandra.connection import Connection, ConnectionShutdown

__all__ = ["LoopConnection"]

log = logging.getLogger(__name__)


class _LoopTimer:
    """A driver timer (request timeouts, speculative executions) as a ``call_later`` on the loop;
    cancellable from any thread."""

    __slots__ = ("_callback", "_handle", "_loop", "cancelled")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float, callback: Callable[[], Any]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self.cancelled = False
        if _on_loop(loop):
            self._handle = loop.call_later(timeout, self._fire)
        else:
            with contextlib.suppress(RuntimeError):  # a closed loop: its connections are gone too
                loop.call_soon_threadsafe(self._arm, timeout)

    def _arm(self, timeout: float) -> None:
        if not self.cancelled:
            self._handle = self._loop.call_later(timeout, self._fire)

    def _fire(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._callback()

    def cancel(self) -> None:
        self.cancelled = True
        handle = self._handle
        if handle is not None and _on_loop(self._loop):
            handle.cancel()  # off the loop, _fire finds the flag when the handle comes due


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class LoopConnection(Connection):  # type: ignore[misc]  # the driver is untyped
    """A driver connection read and written by one asyncio loop (see the module docstring)."""

    _loop: ClassVar[asyncio.AbstractEventLoop]
    in_buffer_size = 64 * 1024  # bytes per recv (the driver's default, 4 KiB, reads big answers in crumbs)
    is_closed: bool  # the driver's own state, set by Connection.__init__
    is_defunct: bool

    @classmethod
    def on(cls, loop: asyncio.AbstractEventLoop) -> type[LoopConnection]:
        """This class bound to loop: what ``Cluster(connection_class=...)`` takes."""
        return type("LoopConnection", (cls,), {"_loop": loop, "__module__": cls.__module__})

    @classmethod
    def initialize_reactor(cls) -> None:  # no reactor: the application's loop is it
        pass

    @classmethod
    def handle_fork(cls) -> None:
        pass

    @classmethod
    def create_timer(cls, timeout: float, callback: Callable[[], Any]) -> _LoopTimer:
        return _LoopTimer(cls._loop, timeout, callback)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if _on_loop(self._loop):
            # Connection.factory waits for the handshake that only this loop can read.
            raise RuntimeError("a Cassandra connection cannot be opened on its own event loop")
        Connection.__init__(self, *args, **kwargs)
        self._out: deque[bytes | memoryview] = deque()
        self._out_lock = threading.Lock()
        self._writer_on = False
        self._watching = False
        self._connect_socket()
        try:
            self._socket.setblocking(False)
            self._fd: int = self._socket.fileno()
            self._loop.call_soon_threadsafe(self._watch)
        except BaseException:
            self._socket.close()
            raise
        self._send_options_message()

    # --- the loop's side --------------------------------------------------------------------------

    def _watch(self) -> None:
        if self.is_closed or self.is_defunct:
            return
        self._loop.add_reader(self._fd, self._on_readable)
        self._watching = True

    def _on_readable(self) -> None:
        closed = False
        try:
            while True:
                chunk = self._socket.recv(self.in_buffer_size)
                if not chunk:  # the server closed the connection
                    closed = True
                    break
                self._iobuf.write(chunk)
                if len(chunk) < self.in_buffer_size:
                    break
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except OSError as exc:
            self.defunct(exc)
            return
        if self._iobuf.tell():
            try:
                self.process_io_buffer()
            except Exception as exc:  # a frame that does not decode (or fails its checksum)
                self.defunct(exc)
                return
        if closed:
            # Defunct, not just closed: a handshake in progress hears why at once.
            self.defunct(ConnectionShutdown(f"Connection to {self.endpoint} was closed by the server"))

    def _flush(self) -> None:
        """Write what is queued; when the socket is full, wait until it can take more."""
        if self.is_closed or self.is_defunct:
            return
        error: OSError | None = None
        with self._out_lock:
            while self._out:
                data = self._out[0]
                try:
                    sent = self._socket.send(data)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                    sent = 0
                except OSError as exc:
                    error = exc
                    self._out.clear()
                    break
                if sent < len(data):
                    self._out[0] = memoryview(data)[sent:]
                    if not self._writer_on:
                        self._loop.add_writer(self._fd, self._flush)
                        self._writer_on = True
                    return
                self._out.popleft()
            if self._writer_on:
                self._loop.remove_writer(self._fd)
                self._writer_on = False
        if error is not None:
            self.defunct(error)

    def _release(self) -> None:
        """Stop watching the socket, then close it (on the loop: a closed fd may be reused)."""
        if self._watching:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            self._watching = False
        if self._writer_on:
            with contextlib.suppress(Exception):
                self._loop.remove_writer(self._fd)
            self._writer_on = False
        self._socket.close()

    # --- called by the driver, from the loop or from its threads ------------------------------------

    def push(self, data: bytes) -> None:
        with self._out_lock:
            self._out.append(data)
        if _on_loop(self._loop):
            self._flush()
        elif not self._call_on_loop(self._flush):
            self.defunct(ConnectionShutdown(f"Connection to {self.endpoint}: its event loop is closed"))

    def close(self) -> None:
        with self.lock:
            if self.is_closed:
                return
            self.is_closed = True
        log.debug("Closing Cassandra connection %s", self.endpoint)
        if _on_loop(self._loop):
            self._release()
        elif not self._call_on_loop(self._release):
            self._socket.close()  # the loop is gone, and with it every watcher
        if not self.is_defunct:
            self.error_all_requests(ConnectionShutdown(f"Connection to {self.endpoint} was closed"))

    def _call_on_loop(self, callback: Callable[[], None]) -> bool:
        try:
            self._loop.call_soon_threadsafe(callback)
        except RuntimeError:  # the loop is closed
            return False
        return True
