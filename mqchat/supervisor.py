"""The supervisor of `mqchat serve`: runs the child processes, restarts one that dies.

::

    mqchat serve ──▶ Supervisor.run ──spawn──▶ python -m mqchat _child broker|bridge|node
                         │                       (settings as MQCHAT_* variables; own process
                         │                        group; SIGTERM when the supervisor dies)
                         ├── _watch (one per child): exit code ──▶ restart with backoff, or
                         │       EXIT_CANNOT_START on a first start ──▶ stop serve (exit 1)
                         ├── SIGHUP ──▶ every child (each reloads its TLS certificate)
                         └── SIGTERM / SIGINT ──▶ _stop_children: bridge first, then broker

A child's entry point is ``mqchat.child.run_child``; the exit codes below are the contract
between the two. Children write Prometheus samples to a shared directory, so ``/metrics``
covers every process. This module imports no server code: the supervisor process stays small.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from mqchat.config import Config, config_to_env

logger = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 10.0
STOP_GRACE_S = 10.0
# A child that cannot start for a reason a restart would not mend (bad settings, a port in use)
# exits with this code (sysexits' EX_CONFIG), and the supervisor stops instead of restarting it.
EXIT_CANNOT_START = 78
EXIT_WORKER_DIED = 70  # sysexits' EX_SOFTWARE: restarted like any crash
STABLE_RUN_S = 30.0  # a child that ran this long before dying starts its backoff afresh


WORKER_PREFIX = "worker-"


def children_for(config: Config) -> tuple[str, ...]:
    """The processes `serve` runs: broker and bridge apart (MQTT-client adapter) or one node;
    beside an external broker (`mqchat bridge`), the bridge workers."""
    if config.bridge.broker:
        return tuple(f"{WORKER_PREFIX}{i}" for i in range(config.bridge.workers))
    return ("node",) if config.bridge.adapter == "inbroker" else ("broker", "bridge")


def child_env(config: Config, metrics_dir: Path | None) -> dict[str, str]:
    """Settings for a child; with metrics_dir, Prometheus samples are shared across children."""
    env = {k: v for k, v in os.environ.items() if k not in ("MQCHAT_CONFIG", "PROMETHEUS_MULTIPROC_DIR")}
    env.update(config_to_env(config))
    if metrics_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    return env


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to send SIGTERM when the supervisor dies."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class Supervisor:
    """Runs the broker and bridge processes; restarts either when it dies."""

    def __init__(self, *, config: Config) -> None:
        self._config = config
        self._run_dir = config.storage.data_dir / "run"
        self._metrics_dir = self._run_dir / "metrics"
        self._procs: dict[str, asyncio.subprocess.Process] = {}
        self._children = children_for(config)
        self._stopping = False
        self._failed = False

    async def _spawn(self, which: str) -> asyncio.subprocess.Process:
        # Own process group: a terminal's Ctrl-C reaches only the supervisor, which stops the
        # children in order; the parent-death signal stops them if the supervisor is killed.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mqchat",
            "_child",
            which,
            # One child serves its own metrics; several share them through files (which costs a
            # pid check on every sample update).
            env=child_env(self._config, self._metrics_dir if len(self._children) > 1 else None),
            process_group=0,
            preexec_fn=_die_with_parent,
        )
        (self._run_dir / f"{which}.pid").write_text(f"{proc.pid}\n")
        self._procs[which] = proc
        logger.info("started %s (pid %d)", which, proc.pid)
        return proc

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (0), or until a child cannot start (1)."""
        shutil.rmtree(self._metrics_dir, ignore_errors=True)
        self._metrics_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._forward_hangup)
        try:
            # The bridge retries until the broker listens; no need to wait here.
            for which in self._children:
                await self._spawn(which)
            async with asyncio.TaskGroup() as tg:
                watchers = [tg.create_task(self._watch(name, stop), name=f"watch-{name}") for name in self._children]
                await stop.wait()
                self._stopping = True
                if not self._failed:
                    logger.info("stopping")
                await self._stop_children()
                for w in watchers:
                    w.cancel()
        finally:
            await self._stop_children()
            for which in self._children:
                with contextlib.suppress(FileNotFoundError):
                    (self._run_dir / f"{which}.pid").unlink()
        return 1 if self._failed else 0

    def _forward_hangup(self) -> None:
        """SIGHUP reaches every child (each reloads its TLS certificate)."""
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGHUP)

    async def _watch(self, which: str, stop: asyncio.Event) -> None:
        failures = 0
        first_start = True
        while not self._stopping:
            proc = self._procs[which]
            started = time.monotonic()
            code = await proc.wait()
            self._mark_dead(proc.pid)
            if self._stopping:
                return
            if code == EXIT_CANNOT_START and first_start:
                # It said why on stderr; restarting would not mend it. After a crash, though, a
                # restart that cannot bind yet (the dead process's sockets are still closing) is
                # retried with backoff like any other failure.
                self._failed = True
                stop.set()
                return
            first_start = False
            failures = 1 if time.monotonic() - started > STABLE_RUN_S else failures + 1
            delay = min(RESTART_BACKOFF_MAX_S, 0.25 * 2 ** (failures - 1))
            logger.error("%s (pid %d) exited with code %s; restarting in %.2fs", which, proc.pid, code, delay)
            await asyncio.sleep(delay)
            if not self._stopping:
                await self._spawn(which)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]

    async def _stop_children(self) -> None:
        # The bridge first, so it finishes in-flight requests while the broker still runs.
        for which in reversed(self._children):
            proc = self._procs.get(which)
            if proc is None or proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE_S):
                    await proc.wait()
            except TimeoutError:
                logger.warning("%s did not stop in %.0fs; killing it", which, STOP_GRACE_S)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
