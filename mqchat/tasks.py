"""Stopping background tasks so that shutdown always finishes.

On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives in the same loop
iteration as the completion of the operation it guards (bpo-42130, fixed in 3.12): the task
goes on as if nothing happened, and whoever awaits it after ``cancel()`` waits forever. Our
own code uses ``asyncio.timeout`` instead, but client libraries (aiomqtt, amqtt, redis-py) still
call ``wait_for``. So a service never stops its tasks with one ``cancel()`` and a bare
``await``: it calls :func:`cancel_and_wait`, which cancels again until every task has ended, and
gives up loudly after a bound rather than hanging. A leaf module: everyone may import it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

RECANCEL_EVERY_S = 0.1
STOP_BOUND_S = 10.0


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[Any]],
    *,
    bound_s: float = STOP_BOUND_S,
    what: str = "tasks",
) -> list[asyncio.Task[Any]]:
    """Cancel ``tasks`` and wait until they have all ended, cancelling again every
    RECANCEL_EVERY_S s a task that lost its cancellation. Returns the tasks still running after
    ``bound_s`` (logged as an error; normally none). A task's own failure is logged, not raised;
    a cancellation of the caller is never swallowed here."""
    pending: set[asyncio.Task[Any]] = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + bound_s
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            names = ", ".join(sorted(t.get_name() for t in pending))
            logger.error("%s: %d task(s) did not stop within %.0f s: %s", what, len(pending), bound_s, names)
            return list(pending)
        done, pending = await asyncio.wait(pending, timeout=min(RECANCEL_EVERY_S, remaining))
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                logger.error("%s: task %s failed", what, task.get_name(), exc_info=task.exception())
    return []
