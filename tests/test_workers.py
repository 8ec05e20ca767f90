"""A failing job fails alone; a worker that dies anyway turns /healthz red and ends the process
(the supervisor then restarts it, as after any crash)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from mqchat.app import run_bridge, run_broker, run_node
from mqchat.child import WorkerDied, watch_workers
from mqchat.ids import dm_conv
from mqchat.tokens import issue_token
from tests.conftest import make_config
from tests.helpers import connect_device, send_env, unique


async def test_a_dead_store_writer_turns_healthz_red_fails_sends_fast_and_ends_the_process(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with run_node(config) as node:
        async with _http(node.http_port) as http:
            assert (await http.get("/healthz")).status_code == 200
            store = node.store
            store._jobs.put(None)  # type: ignore[attr-defined]  # the writer thread ends, as if it had crashed
            for _ in range(100):
                if node.dead_workers():
                    break
                await asyncio.sleep(0.02)
            answer = await http.get("/healthz")
            assert answer.status_code == 503
            assert answer.json()["dead_workers"] == ["sqlite-writer"]
        alice = unique("alice")
        token = issue_token(secret=config.auth.jwt_secret, user=alice, device="a", ttl_s=60)
        async with connect_device(node.mqtt_port, alice, "a", token) as dev:
            await dev.send(send_env(dm_conv(alice, "bob"), id="after-death"))
            error = (await dev.wait_for(lambda e: e["type"] == "error", timeout=5))[0]
        assert error["id"] == "after-death", "an answer at once, not a wait forever"
        with pytest.raises(WorkerDied, match="sqlite-writer"):
            async with asyncio.timeout(10):
                await watch_workers(node.dead_workers, every_s=0.05, grace_s=0.1)


@pytest.mark.parametrize("worker", ["push-intake", "push-delivery", "presence-sweep", "presence-reports"])
async def test_a_dead_task_worker_turns_healthz_red(tmp_path: Path, worker: str) -> None:
    async with run_node(make_config(tmp_path)) as node, _http(node.http_port) as http:
        assert (await http.get("/healthz")).status_code == 200
        task = next(t for t in asyncio.all_tasks() if t.get_name() == worker)
        task.cancel()
        await asyncio.wait([task])
        answer = await http.get("/healthz")
        assert answer.status_code == 503
        assert worker in answer.json()["dead_workers"]


def _http(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10)


@pytest.mark.parametrize("worker", ["http-server", "bridge-mqtt-adapter"])
async def test_the_bridge_process_watchdog_sees_its_http_server_and_adapter(tmp_path: Path, worker: str) -> None:
    """The HTTP server cannot report its own death on /healthz: the watchdog (which restarts
    the process) must see it."""
    config = make_config(tmp_path)
    async with run_broker(config) as broker, run_bridge(config, mqtt_host="127.0.0.1", mqtt_port=broker.mqtt_port) as b:
        assert b.dead_workers() == []
        task = next(t for t in asyncio.all_tasks() if t.get_name() == worker)
        task.cancel()
        await asyncio.wait([task])
        with pytest.raises(WorkerDied, match=worker):
            async with asyncio.timeout(10):
                await watch_workers(b.dead_workers, every_s=0.05, grace_s=0.1)


async def test_the_broker_process_watchdog_sees_its_store_writer(tmp_path: Path) -> None:
    async with run_broker(make_config(tmp_path)) as broker:
        assert broker.dead_workers() == []
        broker.store._jobs.put(None)  # type: ignore[attr-defined]  # the writer thread ends, as if it had crashed
        with pytest.raises(WorkerDied, match="sqlite-writer"):
            async with asyncio.timeout(10):
                await watch_workers(broker.dead_workers, every_s=0.05, grace_s=0.1)
