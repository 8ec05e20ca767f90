"""The lifecycle every long-lived service shares: a ``TaskGroup``, named tasks, ``aclose()``.

::

    async with SomeService(...) as service:      __aenter__: open the TaskGroup, then _start()
        ...                                          _start() calls start_worker()/start_job()
    # __aexit__ = aclose():                        _stopping()  (e.g. stop taking new work)
    #                                              cancel workers (cancel_and_wait, bounded)
    #                                              jobs in flight finish (bounded), the rest cancelled
    #                                              _stopped()   (close what the service owns)

Two kinds of task:

- a **worker** runs for the service's whole life (a dispatcher loop, a sweep, a heartbeat). If it
  ends, it has died: the failure is logged, ``dead_workers()`` names it and ``/healthz`` turns
  red. It never takes the caller down with it.
- a **job** is short (one request, one send, one receipt window). Its failure is logged and
  dropped: a failing job fails alone. Jobs in flight at ``aclose()`` get ``job_grace_s`` to
  finish, then are cancelled.

No task of a service is fire-and-forget: each one is a child of the service's ``TaskGroup`` and
is waited for before ``aclose()`` returns. ``aclose()`` never waits past its bounds: jobs get
``job_grace_s``, then every cancelled task ``stop_bound_s`` (each stage has its own bound); a task
that loses every cancellation (on 3.11, see :mod:`mqchat.tasks`) is logged and left behind with
the group (``_stopped`` is then not called) rather than waited for. A leaf module: everyone may import it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from mqchat.tasks import STOP_BOUND_S, cancel_and_wait

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServiceStatistics:
    """A snapshot of a service's tasks. Services with more to tell subclass it (``kw_only``)."""

    workers: int  # long-lived tasks running
    dead_workers: tuple[str, ...]  # long-lived tasks that ended (each one is a failure)
    jobs: int  # short tasks in flight


class Service:
    """Base of a long-lived service: an async context manager that owns a ``TaskGroup``.

    Subclasses override the hooks ``_start`` (start workers), ``_stopping`` (before the tasks
    are stopped) and ``_stopped`` (after), and start tasks with :meth:`start_worker` and
    :meth:`start_job`. ``name`` names the service in logs."""

    name = "service"
    job_grace_s = STOP_BOUND_S  # how long jobs in flight may finish at aclose()
    stop_bound_s = STOP_BOUND_S  # how long cancelled tasks may take to end before they are left

    def __init__(self) -> None:
        self.__group: asyncio.TaskGroup | None = None
        self.__workers: list[asyncio.Task[None]] = []
        self.__jobs: set[asyncio.Task[None]] = set()
        self.__died: list[str] = []
        self.__closed = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self.__group is not None or self.__closed:
            raise RuntimeError(f"{self.name} can be entered once")
        group = asyncio.TaskGroup()
        await group.__aenter__()
        self.__group = group
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop: workers are cancelled, jobs in flight may finish within ``job_grace_s``.
        Idempotent; never waits past its bounds."""
        group, self.__group = self.__group, None
        if group is None or self.__closed:
            return
        self.__closed = True
        try:
            await self._stopping()
        finally:
            stuck = await cancel_and_wait(self.__workers, bound_s=self.stop_bound_s, what=self.name)
            if self.__jobs:
                _, late = await asyncio.wait(list(self.__jobs), timeout=self.job_grace_s)
                stuck += await cancel_and_wait(late, bound_s=self.stop_bound_s, what=f"{self.name} jobs")
            if stuck:
                # A task lost every cancellation (logged by cancel_and_wait): the group's exit
                # would wait for it without a bound, and what the task uses must stay open, so
                # the group and the service's resources are left behind with it.
                logger.error("%s: left behind with %d task(s) still running", self.name, len(stuck))
            else:
                # Every task has ended: the group's exit returns at once (none of our tasks raise).
                await group.__aexit__(None, None, None)
                await self._stopped()

    @property
    def running(self) -> bool:
        return self.__group is not None

    async def _start(self) -> None:
        """Start the service's workers (override)."""

    async def _stopping(self) -> None:
        """Called first at aclose(), while tasks still run (override)."""

    async def _stopped(self) -> None:
        """Called last at aclose(), after every task has ended (override); not called when a
        task could not be stopped."""

    # --- tasks ----------------------------------------------------------------------------------

    def start_worker(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run ``coro`` for the service's life. Its end, by failure or return, is a death that
        ``dead_workers()`` reports."""
        task = self._create(coro, name=name, worker=True)
        self.__workers.append(task)
        return task

    def start_job(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        """Run a short ``coro``; its failure is logged and goes no further."""
        task = self._create(coro, name=name, worker=False)
        self.__jobs.add(task)
        return task

    def _create(self, coro: Coroutine[Any, Any, None], *, name: str, worker: bool) -> asyncio.Task[None]:
        try:
            group = self._group()
        except RuntimeError:
            coro.close()  # never started: no "was never awaited" warning
            raise
        task = group.create_task(self._guard(coro, name=name, worker=worker), name=name)
        task.add_done_callback(functools.partial(self._ended, coro))  # one callback per task: jobs are per request
        return task

    def _ended(self, coro: Coroutine[Any, Any, None], task: asyncio.Task[None]) -> None:
        self.__jobs.discard(task)  # a worker was never there
        coro.close()  # a task cancelled before its start: no "was never awaited" warning

    def dead_workers(self) -> list[str]:
        """The workers that ended while the service ran (not those stopped by aclose())."""
        return list(self.__died)

    def task_statistics(self) -> ServiceStatistics:
        dead = tuple(self.dead_workers())
        return ServiceStatistics(workers=len(self.__workers) - len(dead), dead_workers=dead, jobs=len(self.__jobs))

    def statistics(self) -> ServiceStatistics:
        return self.task_statistics()

    def _group(self) -> asyncio.TaskGroup:
        if self.__group is None:
            raise RuntimeError(f"{self.name} is closed" if self.__closed else f"{self.name} used outside its context")
        return self.__group

    async def _guard(self, coro: Coroutine[Any, Any, None], *, name: str, worker: bool) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            if worker and not self.__closed:
                logger.error("%s: worker %s was cancelled while the service runs", self.name, name)
                self.__died.append(name)
            raise
        except Exception:
            if not worker:
                logger.exception("%s: %s failed", self.name, name)
                return
            logger.exception("%s: worker %s died", self.name, name)
            self.__died.append(name)
        else:
            if worker and not self.__closed:
                logger.error("%s: worker %s ended while the service runs", self.name, name)
                self.__died.append(name)
