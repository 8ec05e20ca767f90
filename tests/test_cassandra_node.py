"""The dev/test Cassandra node is a real Cassandra 5: it answers CQL, and a write it acknowledged
survives kill -9 and a restart on the same ports and data."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from cassandra import ConsistencyLevel
from cassandra.cluster import Cluster
from cassandra.query import SimpleStatement

from tests.cassandra_node import CassandraEndpoint, cassandra_node  # noqa: F401


@contextmanager
def connected(endpoint: CassandraEndpoint) -> Iterator[Any]:
    cluster = Cluster(list(endpoint.hosts), port=endpoint.port, protocol_version=5)
    try:
        yield cluster.connect()
    finally:
        cluster.shutdown()


def test_the_node_speaks_cql_as_cassandra_5(cassandra_node: CassandraEndpoint) -> None:  # noqa: F811
    with connected(cassandra_node) as session:
        local = session.execute("SELECT release_version, data_center FROM system.local").one()
    if cassandra_node.node is not None:
        assert local.release_version.startswith("5.0"), local.release_version
        assert local.data_center == "datacenter1", "the datacenter NetworkTopologyStrategy names"
    else:
        assert local.release_version


def test_an_acknowledged_write_survives_kill_and_restart(cassandra_node: CassandraEndpoint) -> None:  # noqa: F811
    node = cassandra_node.node
    if node is None:
        pytest.skip("an external cluster (MQCHAT_TEST_CASSANDRA) is not ours to kill")
    keyspace = f"devnode_{uuid.uuid4().hex[:8]}"
    value = uuid.uuid4().hex
    with connected(cassandra_node) as session:
        session.execute(
            f"CREATE KEYSPACE {keyspace} WITH replication = {{'class': 'NetworkTopologyStrategy', 'datacenter1': 1}}"
        )
        session.execute(f"CREATE TABLE {keyspace}.kv (k text PRIMARY KEY, v text)")
        write = SimpleStatement(
            f"INSERT INTO {keyspace}.kv (k, v) VALUES ('k', %s)", consistency_level=ConsistencyLevel.ONE
        )
        session.execute(write, (value,))
    port = node.port
    node.kill()
    node.restart()
    assert node.port == port, "a restart keeps the node's port"
    with connected(cassandra_node) as session:
        read = SimpleStatement(f"SELECT v FROM {keyspace}.kv WHERE k = 'k'", consistency_level=ConsistencyLevel.ONE)
        row = session.execute(read).one()
        session.execute(f"DROP KEYSPACE {keyspace}")
    assert row is not None, "the acknowledged write is gone after kill -9"
    assert row.v == value
