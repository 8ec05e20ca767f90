"""What every scenario shares: options, CPU placement, forked children, progress lines.

A scenario runs in the orchestrator process (pinned to the load CPU by ``mqchat bench``) and
forks its children through ``spawn``: brokers pin themselves to ``BROKER_CPU``, load generators
and the lossy proxy to ``LOAD_CPU``. A child reports on a one-way pipe; ``stop_process`` and
``stop_popen`` end a child within a bound whatever state it is in.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import resource
import subprocess
import sys
import warnings
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from clients.testing.loadgen import Creds
from mqchat.errors import MqchatError
from mqchat.tokens import issue_token

SYSTEMS = ("ours", "stock", "mosquitto")
LABELS = {
    "ours": "ours (mqchat broker)",
    "ours-open": "ours (broker only, no ACL)",
    "stock": "stock amqtt",
    "mosquitto": "Mosquitto",
}
MOSQUITTO = "/usr/sbin/mosquitto"
BROKER_CPU = 0
LOAD_CPU = 1
HOST = "127.0.0.1"
PAYLOAD_BYTES = 100

CTX = multiprocessing.get_context("fork")


class BenchError(MqchatError):
    """A benchmark step failed (a broker did not start, a load process failed or timed out)."""


@dataclass(frozen=True, slots=True)
class Options:
    scenario: str
    quick: bool
    out: Path
    systems: tuple[str, ...]
    duration: float | None = None
    messages: int | None = None
    rates: tuple[float, ...] | None = None
    connections: int | None = None
    netem: str | None = None  # chat: a lossy-network preset between the phones and the server
    store: str | None = None  # chat: "cassandra" compares the stores (in-broker adapter) instead of the adapters


# --- placement -----------------------------------------------------------------------------------


_CAN_PIN = hasattr(os, "sched_setaffinity") and {BROKER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)
"""Decided at import, before the orchestrator pins itself to the load CPU."""


def pinning() -> bool:
    return _CAN_PIN


def pin(cpu: int) -> None:
    if pinning():
        os.sched_setaffinity(0, {cpu})


def raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        import asyncio

        return asyncio.run(coro)
    return uvloop.run(coro)


def _quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def child_setup(cpu: int) -> None:
    """In a forked broker or load process: pin, raise the file limit, quiet logs and warnings
    (a parent under pytest turns warnings into errors; amqtt emits deprecation warnings)."""
    pin(cpu)
    raise_nofile()
    _quiet_logging()
    warnings.resetwarnings()
    warnings.simplefilter("ignore", DeprecationWarning)


# --- children ------------------------------------------------------------------------------------


def spawn(target: Callable[..., None], args: tuple[Any, ...], *, name: str) -> tuple[BaseProcess, Connection]:
    """Fork ``target(*args, conn)``; return the process and the read end of its report pipe."""
    parent, child = CTX.Pipe(duplex=False)
    p = CTX.Process(target=target, args=(*args, child), name=name)
    p.start()
    child.close()
    return p, parent


def stop_process(p: BaseProcess, *, grace_s: float = 5.0, terminate: bool = False) -> None:
    """Wait ``grace_s`` for a forked child to end (after SIGTERM if ``terminate``), then kill it."""
    if terminate:
        p.terminate()
    p.join(grace_s)
    if p.is_alive():
        p.kill()
        p.join(5)


def stop_popen(proc: subprocess.Popen[bytes], *, grace_s: float) -> None:
    """Terminate a subprocess; kill it if it has not exited after ``grace_s``."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- results -------------------------------------------------------------------------------------


def device_creds(secret: str, user: str, device: str, *, ttl_s: int = 3600) -> Creds:
    """A device's MQTT credentials on a server that trusts ``secret``."""
    return Creds(device, user, issue_token(secret=secret, user=user, device=device, ttl_s=ttl_s))


def available_systems(opts: Options) -> tuple[list[str], dict[str, str]]:
    chosen, skipped = [], {}
    for s in opts.systems:
        if s == "mosquitto" and not Path(MOSQUITTO).exists():
            skipped[s] = f"{MOSQUITTO} not found (apt-get install mosquitto)"
            continue
        chosen.append(s)
    return chosen, skipped


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


@contextlib.contextmanager
def recorded(results: dict[str, Any], system: str) -> Iterator[None]:
    """Record a system that fails as ``{"label", "error"}`` and go on with the next one."""
    try:
        yield
    except BenchError as exc:
        label = LABELS.get(system, system)
        progress(f"{label}: failed: {exc}")
        results[system] = {"label": label, "error": str(exc)}


def progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def heading(line: str) -> None:
    print(f"== {line}", file=sys.stderr, flush=True)
