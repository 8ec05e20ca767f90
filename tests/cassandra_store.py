"""The Cassandra store for tests: a keyspace on the session's node, emptied before each test.

``cassandra_storage_config(tmp_path)`` (a fixture) is a ``StorageConfig`` for the node of
``tests.cassandra_node`` with keyspace ``mqchat_test``: the schema is created once per session,
and each test starts from empty tables (only the tables a test wrote to are truncated, since a
``TRUNCATE`` flushes). Under pytest-xdist each worker has a node of its own; on an external
cluster (``MQCHAT_TEST_CASSANDRA``) the workers share it, each with its keyspace (``mqchat_test_gw0``…).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from mqchat.config import StorageConfig
from storage import open_storage
from tests.cassandra_node import CassandraEndpoint, cassandra_node  # noqa: F401

KEYSPACE = "mqchat_test" + (f"_{worker}" if (worker := os.environ.get("PYTEST_XDIST_WORKER", "")) else "")


def storage_config_for(node: CassandraEndpoint, data_dir: Path) -> StorageConfig:
    return StorageConfig(
        data_dir=data_dir,
        backend="cassandra",
        cassandra_hosts=(node.host,),
        cassandra_port=node.port,
        cassandra_keyspace=KEYSPACE,
        cassandra_rf=1,
        cassandra_timeout_s=10.0,
    )


@pytest.fixture(scope="session")
def cassandra_session(cassandra_node: CassandraEndpoint) -> Iterator[Any]:  # noqa: F811
    """A plain driver session for the fixtures' own housekeeping (not the store's)."""
    from cassandra.cluster import Cluster
    from cassandra.policies import ConstantReconnectionPolicy

    # In a thread of its own: the first test to ask may be running in an event loop already.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, _create_schema(storage_config_for(cassandra_node, Path("unused")))).result()
    # Back within half a second of a node's restart (a test may kill and restart the node).
    cluster = Cluster(
        [cassandra_node.host],
        port=cassandra_node.port,
        protocol_version=5,
        reconnection_policy=ConstantReconnectionPolicy(0.5),
    )
    session = cluster.connect()
    try:
        yield session
    finally:
        cluster.shutdown()


async def _create_schema(config: StorageConfig) -> None:
    async with open_storage(config):
        pass


def wait_serving(session: Any, *, limit_s: float = 60.0) -> None:
    """Until the session reaches the node again: a test may have killed and restarted it (the
    driver reconnects on its own, every half second)."""
    from cassandra.cluster import NoHostAvailable

    deadline = time.monotonic() + limit_s
    while True:
        try:
            session.execute("SELECT release_version FROM system.local")
            return
        except NoHostAvailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def empty_keyspace(session: Any, keyspace: str) -> None:
    """Truncate every table of keyspace that holds a row (schema_version excepted)."""
    rows = session.execute(
        "SELECT table_name FROM system_schema.tables WHERE keyspace_name = %s", (keyspace,)
    ).current_rows
    for (table,) in rows:
        if table == "schema_version":
            continue
        if session.execute(f"SELECT * FROM {keyspace}.{table} LIMIT 1").current_rows:
            session.execute(f"TRUNCATE {keyspace}.{table}", timeout=60)


@pytest.fixture
def cassandra_storage_config(
    cassandra_node: CassandraEndpoint,  # noqa: F811
    cassandra_session: Any,
    tmp_path: Path,
) -> StorageConfig:
    wait_serving(cassandra_session)
    empty_keyspace(cassandra_session, KEYSPACE)
    return storage_config_for(cassandra_node, tmp_path / "data")
