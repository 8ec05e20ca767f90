"""Free TCP ports on 127.0.0.1 for servers started as child processes (the benchmarks' servers,
a development Cassandra node, the test suite's servers).

A port found by binding port 0 comes from the kernel's ephemeral range, where every outgoing
connection takes its local port too. Between the moment such a port is found and the moment the
child binds it, an outgoing connection, or another process looking for a port the same way, may
take it. With ``MQCHAT_PORT_RANGE=LOW-HIGH`` set, ports come from that range instead: in turn,
from a random start, each one checked bindable. A range outside the ephemeral range is never
taken by an outgoing connection, and processes given disjoint ranges (the test suite gives each
of its workers its own) never pick the same port. A process reuses a port of its range only after
going round the whole range.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import socket
import threading

HOST = "127.0.0.1"
RANGE_ENV = "MQCHAT_PORT_RANGE"

_lock = threading.Lock()
_cursor: dict[tuple[int, int], itertools.cycle[int]] = {}


def _forked() -> None:
    """A forked child starts its own round (from its own random start) with a lock of its own:
    it must not repeat its parent's next picks, nor inherit a lock held at the fork."""
    global _lock
    _lock = threading.Lock()
    _cursor.clear()


os.register_at_fork(after_in_child=_forked)


class PortRangeError(RuntimeError):
    """MQCHAT_PORT_RANGE is malformed, or no port of it can be bound."""


def configured_range(value: str | None = None) -> tuple[int, int] | None:
    """The (low, high) of ``MQCHAT_PORT_RANGE`` (both included), or None when it is not set."""
    text = (os.environ.get(RANGE_ENV, "") if value is None else value).strip()
    if not text:
        return None
    parsed = re.fullmatch(r"(\d{1,5})\s*-\s*(\d{1,5})", text, re.ASCII)
    if parsed is None:
        raise PortRangeError(f"{RANGE_ENV}={text!r}: expected LOW-HIGH, e.g. 20000-23999")
    bounds = (int(parsed[1]), int(parsed[2]))
    if not 1024 <= bounds[0] <= bounds[1] <= 65535:
        raise PortRangeError(f"{RANGE_ENV}={text!r}: expected 1024 <= LOW <= HIGH <= 65535")
    return bounds


def bindable(port: int) -> bool:
    """Whether a listener could bind port now. Without SO_REUSEADDR, so a port that a recent
    connection still holds in TIME_WAIT is passed over too."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port on 127.0.0.1 that nothing is bound to now: from ``MQCHAT_PORT_RANGE`` if set, else
    from the kernel."""
    bounds = configured_range()
    if bounds is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            port: int = probe.getsockname()[1]
            return port
    low, high = bounds
    with _lock:
        cursor = _cursor.get(bounds)
        if cursor is None:
            start = random.randrange(low, high + 1)
            cursor = _cursor[bounds] = itertools.cycle([*range(start, high + 1), *range(low, start)])
        for _ in range(high - low + 1):
            candidate = next(cursor)
            if bindable(candidate):
                return candidate
    raise PortRangeError(f"{RANGE_ENV}={low}-{high}: no port of the range can be bound")
