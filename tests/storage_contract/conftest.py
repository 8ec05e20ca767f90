"""Fixtures of the storage contract: every test runs on each backend of BACKENDS (SQLite files
in the test's directory; Cassandra on the session's real node, its tables emptied first)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqchat.config import StorageConfig
from storage import open_storage
from storage.base import MessageStore, PushStore, Storage
from tests.cassandra_store import cassandra_node, cassandra_session, cassandra_storage_config  # noqa: F401

BACKENDS = ["sqlite", "cassandra"]


@pytest.fixture(params=BACKENDS)
def storage_config(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
    if request.param == "cassandra":
        config: StorageConfig = request.getfixturevalue("cassandra_storage_config")
        return config
    return StorageConfig(data_dir=tmp_path / "data", backend=request.param)


@pytest.fixture
async def storage(storage_config: StorageConfig) -> AsyncIterator[Storage]:
    async with open_storage(storage_config) as opened:
        yield opened


@pytest.fixture
def store(storage: Storage) -> MessageStore:
    return storage.messages


@pytest.fixture
def push(storage: Storage) -> PushStore:
    return storage.push
