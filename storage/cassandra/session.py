"""One connection to the cluster, shared by every part of the Cassandra backend.

::

    part ──await cql.rows(name, params)──▶ session.execute_async(prepared)  (token-aware routing)
                                              │  written at once by this loop (loopconn.py)
            ◀── answer decoded on this loop ──┘  result or error, onto an asyncio future

The event loop never blocks on the cluster: ``connect`` and ``prepare`` (blocking in the
driver) run once at start-up in a thread; every query is a prepared statement executed with
``execute_async``; a read that may span pages is read one page per call with the driver's
``paging_state`` (``page``), never by iterating a ``ResultSet`` (which would fetch the next
page synchronously). Driver failures become ``StorageUnavailable`` (the cluster cannot answer
now: the client is told ``unavailable`` and retries) or ``StorageError``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cassandra import (
    ConsistencyLevel,
    CoordinationFailure,
    DriverException,
    OperationTimedOut,
    RequestExecutionException,
    Timeout,
    Unavailable,
)
from cassandra.auth import PlainTextAuthProvider
from cassandra.cluster import EXEC_PROFILE_DEFAULT, Cluster, ExecutionProfile, NoHostAvailable, ResponseFuture, Session
from cassandra.policies import DCAwareRoundRobinPolicy, ExponentialReconnectionPolicy, TokenAwarePolicy
from cassandra.query import BatchStatement, BatchType, PreparedStatement, dict_factory, tuple_factory
from prometheus_client import Counter

from mqchat.config import StorageConfig
from mqchat.errors import ConfigError, StorageClosed, StorageError, StorageUnavailable
from storage.cassandra.loopconn import LoopConnection

__all__ = ["Cql", "Page", "connect"]

logger = logging.getLogger(__name__)

LWT_PROFILE = "lwt"
"""Execution profile of conditional writes: rows as dicts (``[applied]`` and the current values)."""

UNAVAILABLE = Counter(
    "mqchat_cassandra_unavailable_total", "Requests the Cassandra cluster could not answer (unreachable, timed out)"
)

RECONNECT_MAX_S = 5.0

MAX_IN_FLIGHT = 4096
"""Requests of one process in flight at once, the rest waiting their turn on the loop: far below
a connection's ~32,000 stream ids, past which the driver would wait for one on the loop itself."""
"""The longest wait between attempts to reach a node that is down."""

_UNAVAILABLE = (NoHostAvailable, OperationTimedOut, Unavailable, Timeout, CoordinationFailure, ConnectionError)


@dataclass(frozen=True, slots=True)
class Page:
    rows: list[tuple[Any, ...]]
    paging_state: bytes | None  # None: this was the last page


def _level(name: str) -> int:
    level: int | None = getattr(ConsistencyLevel, name, None)
    if level is None:
        raise ConfigError(f"unknown consistency level {name!r}")
    return level


def translate(exc: BaseException) -> StorageError:
    """The storage error a driver failure stands for."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, _UNAVAILABLE):
        UNAVAILABLE.inc()
        return StorageUnavailable(f"the Cassandra cluster did not answer: {type(exc).__name__}")
    if isinstance(exc, (RequestExecutionException, DriverException)):
        return StorageError(f"Cassandra refused a request: {type(exc).__name__}: {exc}")
    return StorageError(f"Cassandra request failed: {type(exc).__name__}")


class Cql:
    """Prepared statements and asyncio-friendly execution over one driver ``Session``."""

    def __init__(self, cluster: Cluster, session: Session, keyspace: str) -> None:
        self.cluster = cluster
        self.session = session
        self.keyspace = keyspace
        self._prepared: dict[str, PreparedStatement] = {}
        self._closed = False
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    # --- set-up (blocking in the driver: called in a thread at start-up) --------------------------

    async def prepare(self, statements: Mapping[str, str], *, page_rows: Mapping[str, int] | None = None) -> None:
        """Prepare every statement by name (``{ks}`` in the text is the keyspace); page_rows sets
        the page size of the reads that may span pages (default: the driver's 5,000 rows)."""

        def work() -> dict[str, PreparedStatement]:
            return {name: self.session.prepare(cql.format(ks=self.keyspace)) for name, cql in statements.items()}

        try:
            self._prepared.update(await asyncio.to_thread(work))
        except Exception as exc:
            raise translate(exc) from exc
        for name, rows in (page_rows or {}).items():
            self._prepared[name].fetch_size = rows

    def statement(self, name: str) -> PreparedStatement:
        return self._prepared[name]

    # --- execution ------------------------------------------------------------------------------

    async def _execute(
        self, query: Any, params: Sequence[Any] | None, *, profile: object, paging_state: bytes | None = None
    ) -> Any:
        async with self._in_flight:
            return await self._submit(query, params, profile=profile, paging_state=paging_state)

    def _submit(
        self, query: Any, params: Sequence[Any] | None, *, profile: object, paging_state: bytes | None = None
    ) -> asyncio.Future[Any]:
        if self._closed:
            raise StorageClosed("the Cassandra store is closed")
        loop = asyncio.get_running_loop()
        thread = threading.get_ident()
        waiter: asyncio.Future[Any] = loop.create_future()
        try:
            response: ResponseFuture = self.session.execute_async(
                query, params, execution_profile=profile, paging_state=paging_state
            )
        except Exception as exc:
            waiter.set_exception(translate(exc))
            return waiter

        def settle(outcome: object, failed: bool) -> None:
            if waiter.done():
                return
            if failed:
                waiter.set_exception(translate(outcome if isinstance(outcome, BaseException) else Exception(outcome)))
            else:
                result = response.result()  # done already: returns the first page without waiting
                waiter.set_result(Page(list(result.current_rows), result.paging_state))

        def answered(outcome: object, failed: bool) -> None:
            if threading.get_ident() == thread:
                settle(outcome, failed)
            else:  # settled on one of the driver's threads (a retry given up, a defunct connection)
                loop.call_soon_threadsafe(settle, outcome, failed)

        def on_rows(_rows: object) -> None:
            answered(None, False)

        def on_error(exc: object) -> None:
            answered(exc, True)

        response.add_callbacks(on_rows, on_error)
        return waiter

    async def page(
        self, name: str, params: Sequence[Any], *, paging_state: bytes | None = None, profile: object = None
    ) -> Page:
        """One page of a prepared read (its fetch size is the statement's)."""
        result: Page = await self._execute(
            self.statement(name), params, profile=profile or EXEC_PROFILE_DEFAULT, paging_state=paging_state
        )
        return result

    async def rows(self, name: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """The rows of a prepared statement known to fit one page (a LIMIT or a point read)."""
        return (await self.page(name, params)).rows

    async def one(self, name: str, params: Sequence[Any]) -> tuple[Any, ...] | None:
        rows = await self.rows(name, params)
        return rows[0] if rows else None

    async def run(self, name: str, params: Sequence[Any]) -> None:
        await self.page(name, params)

    async def pages(self, name: str, params: Sequence[Any]) -> AsyncIterator[list[tuple[Any, ...]]]:
        """The rows of a read that may span pages, a page at a time (the next is read when asked for)."""
        state: bytes | None = None
        while True:
            page = await self.page(name, params, paging_state=state)
            yield page.rows
            state = page.paging_state
            if state is None:
                return

    async def all_pages(self, name: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Every row of a read that may span pages, fetched page by page on the loop's terms."""
        return [row async for rows in self.pages(name, params) for row in rows]

    async def conditional(self, name: str, params: Sequence[Any]) -> dict[str, Any]:
        """A lightweight transaction; its row (``[applied]`` and, when not applied, the values now)."""
        page: Page = await self._execute(self.statement(name), params, profile=LWT_PROFILE)
        return dict(page.rows[0]) if page.rows else {"[applied]": True}

    async def conditional_batch(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> dict[str, Any]:
        """A single-partition conditional batch: applied (every statement) or not (none)."""
        batch = BatchStatement(batch_type=BatchType.UNLOGGED)
        for name, params in statements:
            batch.add(self.statement(name), params)
        page: Page = await self._execute(batch, None, profile=LWT_PROFILE)
        return dict(page.rows[0]) if page.rows else {"[applied]": True}

    async def batch(self, statements: Sequence[tuple[str, Sequence[Any]]], *, logged: bool = False) -> None:
        """Writes sent in one request: unlogged (independent writes, one round trip), or logged
        (written all or, after a coordinator failure, eventually all: the batch log replays it)."""
        if not statements:
            return
        if len(statements) == 1:
            await self.run(*statements[0])
            return
        batch = BatchStatement(batch_type=BatchType.LOGGED if logged else BatchType.UNLOGGED)
        for name, params in statements:
            batch.add(self.statement(name), params)
        await self._execute(batch, None, profile=EXEC_PROFILE_DEFAULT)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self.cluster.shutdown)


def _profile(config: StorageConfig, row_factory: Any) -> ExecutionProfile:
    return ExecutionProfile(
        load_balancing_policy=TokenAwarePolicy(DCAwareRoundRobinPolicy(local_dc=config.cassandra_dc or None)),
        consistency_level=_level(config.cassandra_consistency),
        serial_consistency_level=_level(config.cassandra_serial_consistency),
        request_timeout=config.cassandra_timeout_s,
        row_factory=row_factory,
    )


async def connect(config: StorageConfig) -> Cql:
    """Connect to the cluster config names (protocol v5, token-aware, DC-aware) and make sure the
    keyspace exists; one clear error when the cluster cannot be reached."""
    profile, lwt = _profile(config, tuple_factory), _profile(config, dict_factory)
    auth = (
        PlainTextAuthProvider(username=config.cassandra_username, password=config.cassandra_password)
        if config.cassandra_username
        else None
    )
    cluster = Cluster(
        contact_points=list(config.cassandra_hosts),
        port=config.cassandra_port,
        protocol_version=5,
        execution_profiles={EXEC_PROFILE_DEFAULT: profile, LWT_PROFILE: lwt},
        auth_provider=auth,
        connect_timeout=config.cassandra_timeout_s,
        control_connection_timeout=config.cassandra_timeout_s,
        # A node that comes back is used again within seconds (the default waits up to 10 min).
        reconnection_policy=ExponentialReconnectionPolicy(base_delay=0.5, max_delay=RECONNECT_MAX_S),
        # Sockets read and written by this loop, not by a reactor thread of the driver's.
        connection_class=LoopConnection.on(asyncio.get_running_loop()),
    )
    quiet = _DropConnectFailure()
    driver_log = logging.getLogger("cassandra.cluster")
    driver_log.addFilter(quiet)  # the failure is told once, below, without the driver's traceback
    try:
        session = await asyncio.to_thread(cluster.connect)
    except Exception as exc:
        await asyncio.to_thread(cluster.shutdown)
        where = ", ".join(f"{h}:{config.cassandra_port}" for h in config.cassandra_hosts)
        raise StorageUnavailable(f"cannot reach the Cassandra cluster at {where}: {type(exc).__name__}") from None
    finally:
        driver_log.removeFilter(quiet)
    return Cql(cluster, session, config.cassandra_keyspace)


class _DropConnectFailure(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(("Control connection failed to connect", "[control connection] Error connecting"))
