"""Fixtures of the storage contract. A new backend runs the whole suite by joining BACKENDS."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mqchat.config import StorageConfig
from storage import open_storage
from storage.base import MessageStore, PushStore, Storage

BACKENDS = ["sqlite"]


@pytest.fixture(params=BACKENDS)
def storage_config(request: pytest.FixtureRequest, tmp_path: Path) -> StorageConfig:
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
