"""The distributed backend: Apache Cassandra 5 or ScyllaDB through ``cassandra-driver``.

::

    CassandraMessageStore = CassandraMessageLog + CassandraConversationStates + CassandraGroups
                            + CassandraPrivacySettings + CassandraAccounts + CassandraMediaIndex,
                            each a CassandraPart (core.py)
    CassandraPushStore    = tokens, push settings, the push queue, forget_user (push.py)
          └── both over one Cql (session.py): one driver Session per process and cluster,
              prepared statements, execute_async bridged onto the event loop

Every node of a deployment opens the same keyspace; nothing of a node's state lives on its
disk. The schema, the sequencer and the sizing are explained in docs/design/cassandra.md;
``schema.py`` creates and migrates the keyspace; ``devnode.py`` runs a local node from Maven
Central's jars for development and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

from mqchat.config import StorageConfig
from storage.cassandra import push, store
from storage.cassandra.push import CassandraPushStore, owner_of
from storage.cassandra.schema import ensure_schema
from storage.cassandra.session import Cql, connect
from storage.cassandra.store import CassandraMessageStore

__all__ = ["CassandraMessageStore", "CassandraPushStore", "open_message_store", "open_push_store"]


class _Shared:
    """One connection per event loop and configuration (its sockets are that loop's), handed to
    both stores and closed by the last."""

    def __init__(self) -> None:
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
        self._open: dict[tuple[asyncio.AbstractEventLoop, StorageConfig], tuple[Cql, int]] = {}

    def _lock(self, loop: asyncio.AbstractEventLoop) -> asyncio.Lock:
        return self._locks.setdefault(loop, asyncio.Lock())

    async def acquire(self, config: StorageConfig) -> tuple[Cql, Callable[[], Awaitable[None]]]:
        """The connection for config on this loop, and what gives it back."""
        key = (asyncio.get_running_loop(), config)
        release = functools.partial(self._release, key)
        async with self._lock(key[0]):
            held = self._open.get(key)
            if held is not None:
                self._open[key] = (held[0], held[1] + 1)
                return held[0], release
            cql = await connect(config)
            try:
                await ensure_schema(cql, config)
                await cql.prepare({**store.STATEMENTS, **push.STATEMENTS}, page_rows=store.PAGE_ROWS)
            except BaseException:
                await cql.aclose()
                raise
            self._open[key] = (cql, 1)
            return cql, release

    async def _release(self, key: tuple[asyncio.AbstractEventLoop, StorageConfig]) -> None:
        async with self._lock(key[0]):
            cql, count = self._open[key]
            if count > 1:
                self._open[key] = (cql, count - 1)
                return
            del self._open[key]
        await cql.aclose()


_shared = _Shared()


@contextlib.asynccontextmanager
async def open_message_store(config: StorageConfig) -> AsyncIterator[CassandraMessageStore]:
    cql, release = await _shared.acquire(config)
    s = CassandraMessageStore(cql, release=release)
    try:
        yield s
    finally:
        await s.aclose()


@contextlib.asynccontextmanager
async def open_push_store(config: StorageConfig) -> AsyncIterator[CassandraPushStore]:
    cql, release = await _shared.acquire(config)
    s = CassandraPushStore(cql, owner=owner_of(config), release=release)
    try:
        yield s
    finally:
        await s.aclose()
