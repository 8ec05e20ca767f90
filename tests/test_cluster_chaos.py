"""The chaos conversation (tests/chaos.py) against three nodes behind HAProxy: while 2,000
messages cross a lossy network, one node is `kill -9`'d twice (its supervisor starts it again, as
a process manager would) and Redis is stopped for two seconds and started again, empty.

What degrades, and what does not:
- A killed node's devices lose their connection; they reconnect through the balancer, to the
  other nodes while it is down, and catch up from the store. Nothing acked is lost: the store
  (Cassandra) holds every acked message before the ack is sent.
- While Redis is away, the nodes do not know where the other nodes' devices are: a message
  reaches in real time only the recipients on the node that sequenced it, and presence reads
  answer what the node knew last. The others get it when a later message shows them the gap,
  or at their next connect's catch-up. When Redis is back (empty), every node registers its
  devices again within a heartbeat and real-time delivery across nodes resumes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mqchat.config import StorageConfig
from tests.cassandra_store import cassandra_storage_config  # noqa: F401
from tests.chaos import Fault, run_chaos
from tests.cluster import running_cluster
from tests.redis_server import RedisServer, redis_server  # noqa: F401

SEND_SECONDS = 26.0
REDIS_AWAY_S = 2.0


@pytest.mark.timeout(420)
async def test_cluster_chaos_conversation(
    cassandra_storage_config: StorageConfig,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with running_cluster(tmp_path, store_url=cassandra_storage_config.url, redis_url=redis_server.url) as cluster:
        victim = "n1"

        async def kill_node() -> None:
            await cluster.nodes[victim].kill9("node")

        async def restart_redis() -> None:
            redis_server.stop()
            await asyncio.sleep(REDIS_AWAY_S)
            redis_server.start()

        faults = [
            Fault(0.2, f"node {victim} kill -9", kill_node),
            Fault(0.45, f"Redis stopped for {REDIS_AWAY_S:.0f} s and started empty", restart_redis),
            Fault(0.7, f"node {victim} kill -9", kill_node),
        ]
        report = await run_chaos(cluster, tmp_path, faults, send_seconds=SEND_SECONDS)
    print("\ncluster chaos: " + report)
