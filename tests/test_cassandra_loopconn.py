"""The driver's connections on the application's event loop (storage/cassandra/loopconn.py),
against the real node: answers decoded on the loop's own thread, a request larger than the
socket's buffer written in pieces, the driver's blocking calls still served from a thread, and a
connection refused where it would deadlock."""

from __future__ import annotations

import asyncio
import secrets
import threading
from typing import Any

import pytest
from cassandra.connection import DefaultEndPoint

from mqchat.config import StorageConfig
from storage.cassandra.loopconn import LoopConnection
from storage.cassandra.session import connect


async def test_answers_are_decoded_on_the_loop_and_no_reactor_thread_runs(
    cassandra_storage_config: StorageConfig,
) -> None:
    cql = await connect(cassandra_storage_config)
    try:
        assert issubclass(cql.cluster.connection_class, LoopConnection)
        loop = asyncio.get_running_loop()
        called_on: list[int] = []
        done = loop.create_future()

        def answered(_rows: object) -> None:
            called_on.append(threading.get_ident())
            loop.call_soon_threadsafe(done.set_result, None)

        response = cql.session.execute_async("SELECT release_version FROM system.local")
        response.add_callback(answered)
        await asyncio.wait_for(done, 10)
        assert called_on == [threading.get_ident()]
        # And the bridge used by every store part answers the same way, many at once.
        await cql.prepare({"local": "SELECT key FROM system.local"})
        rows = await asyncio.gather(*(cql.rows("local", ()) for _ in range(50)))
        assert all(r == [("local",)] for r in rows)
    finally:
        await cql.aclose()


async def test_a_request_larger_than_the_socket_buffer_is_written_whole(
    cassandra_storage_config: StorageConfig, cassandra_session: Any
) -> None:
    table = f"{cassandra_storage_config.cassandra_keyspace}.loopconn_big"
    await asyncio.to_thread(
        cassandra_session.execute, f"CREATE TABLE IF NOT EXISTS {table} (k text PRIMARY KEY, v text)"
    )
    cql = await connect(cassandra_storage_config)
    try:
        await cql.prepare(
            {"put": f"INSERT INTO {table} (k, v) VALUES (?, ?)", "get": f"SELECT v FROM {table} WHERE k = ?"}
        )
        values = {secrets.token_hex(4): secrets.token_hex(1024 * 1024) for _ in range(3)}  # 2 MiB each
        await asyncio.gather(*(cql.run("put", (k, v)) for k, v in values.items()))
        for k, v in values.items():
            assert await cql.one("get", (k,)) == (v,)
    finally:
        await cql.aclose()


async def test_blocking_driver_calls_work_from_a_thread_while_the_loop_runs(
    cassandra_storage_config: StorageConfig,
) -> None:
    cql = await connect(cassandra_storage_config)
    try:
        rows = await asyncio.to_thread(lambda: cql.session.execute("SELECT key FROM system.local").current_rows)
        assert rows == [("local",)]
    finally:
        await cql.aclose()


async def test_a_connection_opened_on_its_own_loop_is_refused(cassandra_storage_config: StorageConfig) -> None:
    bound = LoopConnection.on(asyncio.get_running_loop())
    endpoint = DefaultEndPoint(cassandra_storage_config.cassandra_hosts[0], cassandra_storage_config.cassandra_port)
    with pytest.raises(RuntimeError, match="its own event loop"):
        bound(endpoint, protocol_version=5)
