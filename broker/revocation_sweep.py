"""Revocation sweep: every device connection is checked against the revocation list now and
then, so that a logout whose event never reached this broker (lost between processes, or raced by
the device's CONNECT) still ends the connection, within ``interval_s``.

::

    every interval_s ─▶ broker.device_connections() ─▶ broker.recheck(identity, connection)
                                                       (the list is cached per user: a store read
                                                        per user at most every few seconds)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from mqchat.service import Service
from mqchat.tokens import Identity

logger = logging.getLogger(__name__)


class Checked(Protocol):
    def device_connections(self) -> list[tuple[Identity, str]]: ...

    async def recheck(self, identity: Identity, connection: str) -> None: ...


class RevocationSweep(Service):
    name = "revocation sweep"

    def __init__(self, *, broker: Checked, interval_s: float = 60.0) -> None:
        super().__init__()
        self._broker = broker
        self._interval_s = interval_s

    async def _start(self) -> None:
        if self._interval_s > 0:  # 0: no sweep (as for MembershipSync's revalidation)
            self.start_worker(self._sweep(), name="revocation-sweep")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            for identity, connection in self._broker.device_connections():
                try:
                    await self._broker.recheck(identity, connection)
                except Exception:  # one connection's check fails alone
                    logger.exception("revocation check of %s/%s failed", identity.user, identity.device)
