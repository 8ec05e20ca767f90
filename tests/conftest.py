"""Fixtures: a real amqtt broker and a real bridge on ephemeral ports, real SQLite files."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mqchat.app import run_bridge, run_broker
from mqchat.config import AuthConfig, BridgeConfig, Config, NetworkConfig, StorageConfig
from mqchat.tokens import issue_token
from storage.base import MessageStore


def make_config(data_dir: Path, *, secret: str | None = None, **bridge: int) -> Config:
    return Config(
        network=NetworkConfig(host="127.0.0.1", mqtt_port=0, http_port=0),
        auth=AuthConfig(jwt_secret=secret or secrets.token_urlsafe(32)),
        storage=StorageConfig(data_dir=data_dir),
        bridge=BridgeConfig(**bridge),
    )


@dataclass
class Stack:
    """An in-process mqchat: the same wiring as `mqchat serve`, in one event loop."""

    config: Config
    mqtt_port: int
    http_port: int
    store: MessageStore

    def token(self, user: str, device: str, ttl_s: int = 3600) -> str:
        return issue_token(secret=self.config.auth.jwt_secret, user=user, device=device, ttl_s=ttl_s)

    def http(self, user: str | None = None, device: str = "http") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.token(user, device)}"} if user else {}
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.http_port}", headers=headers, timeout=10)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    config = make_config(tmp_path)
    async with run_broker(config) as broker:
        async with run_bridge(config, mqtt_host="127.0.0.1", mqtt_port=broker.bound_port) as bridge:
            await bridge.adapter.wait_connected()
            yield Stack(config=config, mqtt_port=broker.bound_port, http_port=bridge.http_port, store=bridge.store)
