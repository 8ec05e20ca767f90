"""The driver's connections on the application's event loop (storage/cassandra/loopconn.py),
against the real node (on asyncio's loop and on uvloop): answers decoded on the loop's own
thread, a request larger than the socket's buffer written in pieces, the driver's blocking calls
still served from a thread, a server hanging up mid-handshake reported at once, and a connection
refused where it would deadlock."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
from typing import Any

import pytest
from cassandra.connection import ConnectionShutdown, DefaultEndPoint

from mqchat.config import StorageConfig
from storage.cassandra.loopconn import LoopConnection
from storage.cassandra.session import connect


async def test_answers_are_decoded_and_settled_on_the_loops_own_thread(
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
        async with asyncio.timeout(10):
            await done
        assert called_on == [threading.get_ident()]
        # And the bridge used by every store part answers the same way, many at once.
        await cql.prepare({"local": "SELECT key FROM system.local"})
        rows = await asyncio.gather(*(cql.rows("local", ()) for _ in range(50)))
        assert all(r == [("local",)] for r in rows)
    finally:
        await cql.aclose()


async def test_a_request_larger_than_the_socket_buffer_is_written_in_pieces_and_whole(
    cassandra_storage_config: StorageConfig, cassandra_session: Any
) -> None:
    table = f"{cassandra_storage_config.cassandra_keyspace}.loopconn_big"
    create = f"CREATE TABLE IF NOT EXISTS {table} (k text PRIMARY KEY, v text)"
    await asyncio.to_thread(cassandra_session.execute, create)
    cql = await connect(cassandra_storage_config)
    try:
        await cql.prepare(
            {"put": f"INSERT INTO {table} (k, v) VALUES (?, ?)", "get": f"SELECT v FROM {table} WHERE k = ?"}
        )
        (pool,) = cql.session.get_pools()
        (connection,) = pool.get_connections()
        # A small send buffer, so that the socket cannot take these requests in one go.
        connection._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        values = {secrets.token_hex(4): secrets.token_hex(512 * 1024) for _ in range(2)}  # 1 MiB each
        puts = [asyncio.ensure_future(cql.run("put", (k, v))) for k, v in values.items()]
        await asyncio.sleep(0)  # the requests are written now, as far as the socket takes them
        # The socket took what fits; the rest waits for it to drain.
        assert connection._writer_on
        assert connection._out
        await asyncio.gather(*puts)
        assert not connection._out
        assert not connection._writer_on
        for k, v in values.items():
            assert await cql.one("get", (k,)) == (v,)
    finally:
        await cql.aclose()


def test_the_same_round_trip_on_uvloop(cassandra_storage_config: StorageConfig) -> None:
    """The server runs on uvloop: its add_reader/add_writer serve the driver's sockets too."""
    import uvloop

    async def round_trip() -> list[tuple[Any, ...]]:
        cql = await connect(cassandra_storage_config)
        try:
            await cql.prepare({"local": "SELECT key FROM system.local"})
            results = await asyncio.gather(*(cql.rows("local", ()) for _ in range(20)))
            return [row for rows in results for row in rows]
        finally:
            await cql.aclose()

    assert uvloop.run(round_trip()) == [("local",)] * 20


async def test_blocking_driver_calls_work_from_a_thread_while_the_loop_runs(
    cassandra_storage_config: StorageConfig,
) -> None:
    cql = await connect(cassandra_storage_config)
    try:
        rows = await asyncio.to_thread(lambda: cql.session.execute("SELECT key FROM system.local").current_rows)
        assert rows == [("local",)]
    finally:
        await cql.aclose()


async def test_a_server_that_hangs_up_mid_handshake_is_reported_at_once_not_after_the_timeout() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)  # the driver's first frame (OPTIONS), so that closing sends FIN, not RST
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    bound = LoopConnection.on(asyncio.get_running_loop())
    try:
        with pytest.raises(ConnectionShutdown, match="closed by the server"):
            # OperationTimedOut would mean the handshake waited out its 30 s
            await asyncio.to_thread(bound.factory, DefaultEndPoint("127.0.0.1", port), 30, protocol_version=5)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_connection_opened_on_its_own_loop_is_refused() -> None:
    bound = LoopConnection.on(asyncio.get_running_loop())
    with pytest.raises(RuntimeError, match="its own event loop"):
        bound(DefaultEndPoint("127.0.0.1", 9), protocol_version=5)
