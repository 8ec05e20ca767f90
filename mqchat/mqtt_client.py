"""``aiomqtt.Client`` whose waits never lose a cancellation.

aiomqtt 2 waits for CONNACK, SUBACK, PUBACK and the disconnect with ``asyncio.wait_for``, which
on Python 3.11 drops a cancellation that arrives just as the awaited acknowledgement lands (see
``mqchat.tasks``). A task cancelled at that moment carried on; a client closing while acks
were landing then waited forever for it. This subclass keeps aiomqtt's behaviour (the same
timeouts, ``MqttError("Operation timed out")``) but waits with ``asyncio.timeout``, which
re-raises the cancellation. A leaf module: the SDK and the bridge both use it.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

import aiomqtt

T = TypeVar("T")


class MqttClient(aiomqtt.Client):
    async def _wait_for(self, fut: Awaitable[T], timeout: float | None) -> T:  # noqa: ASYNC109  (aiomqtt's signature)
        if timeout is None:
            timeout = self.timeout
        try:
            async with asyncio.timeout(None if timeout == math.inf else timeout):
                return await fut
        except TimeoutError:
            raise aiomqtt.MqttError("Operation timed out") from None
