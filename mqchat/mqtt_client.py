"""``aiomqtt.Client`` whose waits never lose a cancellation, on a socket without Nagle's delay.

aiomqtt 2 waits for CONNACK, SUBACK, PUBACK and the disconnect with ``asyncio.wait_for``, which
on Python 3.11 drops a cancellation that arrives just as the awaited acknowledgement lands (see
``mqchat.tasks``). A task cancelled at that moment carried on; a client closing while acks
were landing then waited forever for it. This subclass keeps aiomqtt's behaviour (the same
timeouts, ``MqttError("Operation timed out")``) but waits with ``asyncio.timeout``, which
re-raises the cancellation.

paho-mqtt leaves Nagle's algorithm on. A small publish written while the previous one is not yet
acknowledged by TCP then waits for that acknowledgement, which the broker's kernel delays by up
to 40 ms: a request-answer exchange (a send and its ack through the bridge) took ~44 ms at any
low rate. The socket gets TCP_NODELAY as soon as it is open, as asyncio does for its own.

A leaf module: the SDK and the bridge both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Awaitable
from typing import Any, TypeVar

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

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:  # paho's objects
        with contextlib.suppress(OSError, AttributeError):  # not TCP (a unix socket, a WebSocket wrapper)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._on_socket_open(client, userdata, sock)
