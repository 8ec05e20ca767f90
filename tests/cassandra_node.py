"""A real Cassandra 5 node for tests: one per test session, started when a test first asks for it.

Test modules take the fixture with ``from tests.cassandra_node import cassandra_node  # noqa: F401``
(or through ``tests.cassandra_store``). It is a ``CassandraEndpoint``: ``.host``/``.hosts`` and
``.port`` to connect to, and ``.node``, the ``storage.cassandra.devnode.CassandraNode`` itself
(to ``kill()`` and ``restart()`` it), or None when the cluster is external.

The node runs from Maven Central's jars (``make cassandra-jars`` fetches them once; otherwise
the first test that asks fetches them) on free ports in the session's temporary directory, with
``commitlog_sync: batch`` so that a write the node acknowledged survives ``kill()``. It starts
in about 6 s on a 2-core machine; the session ends with SIGKILL (its data is thrown away).

``MQCHAT_TEST_CASSANDRA=host:port`` (or ``host1,host2:port``) runs the tests against an existing
cluster instead; nothing is started, and tests that kill the node skip.

No Java 17 or Maven: the tests that need the node fail and say what to install (they never skip).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from storage.cassandra.devnode import CassandraNode, DevNodeError

ENV = "MQCHAT_TEST_CASSANDRA"
DEFAULT_PORT = 9042


@dataclass(frozen=True, slots=True)
class CassandraEndpoint:
    hosts: tuple[str, ...]
    port: int
    node: CassandraNode | None  # None: an external cluster, not the tests' to stop or kill

    @property
    def host(self) -> str:
        return self.hosts[0]


def external_endpoint(value: str) -> CassandraEndpoint:
    """``host``, ``host:port``, ``h1,h2:port`` or ``h1:port,h2:port`` (one port for all)."""
    hosts: list[str] = []
    ports: set[int] = set()
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        host, colon, port = item.rpartition(":")
        if not colon:
            host, port = item, ""
        if port:
            if not port.isdigit():
                pytest.fail(f"{ENV}={value!r}: {port!r} is not a port", pytrace=False)
            ports.add(int(port))
        hosts.append(host)
    if not hosts or len(ports) > 1:
        pytest.fail(f"{ENV}={value!r}: expected host[,host…][:port] with one port for all", pytrace=False)
    return CassandraEndpoint(hosts=tuple(hosts), port=ports.pop() if ports else DEFAULT_PORT, node=None)


@contextlib.contextmanager
def _test_timeout_paused() -> Iterator[None]:
    """pytest-timeout's alarm (its signal method) bounds the test that first asks for the node;
    the node's start is the session's and has its own bound (START_TIMEOUT_S), so the alarm is
    paused meanwhile and re-armed with the time the test had left."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    remaining, _interval = signal.setitimer(signal.ITIMER_REAL, 0)
    try:
        yield
    finally:
        if remaining:
            signal.setitimer(signal.ITIMER_REAL, remaining)


@pytest.fixture(scope="session")
def cassandra_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CassandraEndpoint]:
    """The session's Cassandra: started on first use, stopped when the session ends."""
    if external := os.environ.get(ENV, "").strip():
        yield external_endpoint(external)
        return
    node = CassandraNode(directory=tmp_path_factory.mktemp("cassandra"), commitlog_sync="batch")
    failure = ""
    try:
        with _test_timeout_paused():
            node.start()
    except DevNodeError as error:
        failure = str(error)  # failed outside the handler: the report shows the reason, not a chain
    if failure:
        pytest.fail(
            f"the Cassandra tests run against a real node, which could not start: {failure}\n"
            f"(or point them at a running cluster: {ENV}=host:port)",
            pytrace=False,
        )
    try:
        yield CassandraEndpoint(hosts=(node.contact_point,), port=node.port, node=node)
    finally:
        node.kill()  # throwaway data: no drain; the log stays in the session's temporary directory
