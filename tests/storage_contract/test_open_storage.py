"""open_storage: the backend named by config, or a ConfigError saying what to install."""

from __future__ import annotations

import importlib.util
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from mqchat.config import STORAGE_BACKENDS, StorageConfig, load_config
from mqchat.errors import ConfigError, StorageUnavailable
from mqchat.ports import free_port
from storage import BACKENDS, Backend, open_storage
from storage.base import MessageStorage, MessageStore, PushStore, Storage

SECRET = {"MQCHAT_JWT_SECRET": "s" * 40}


async def test_the_storage_bundle_holds_both_stores_and_closes_them(storage_config: StorageConfig) -> None:
    async with open_storage(storage_config) as storage:
        assert isinstance(storage, Storage)
        assert isinstance(storage.messages, MessageStore)
        assert isinstance(storage.push, PushStore)
        assert storage.dead_workers() == []
        assert storage.statistics().appended == 0


async def test_a_process_without_push_opens_the_message_store_alone(storage_config: StorageConfig) -> None:
    """The broker keeps no push state: it opens (and creates) no push store."""
    async with open_storage(storage_config, push=False) as storage:
        assert isinstance(storage, MessageStorage)
        assert not isinstance(storage, Storage)
        assert not hasattr(storage, "push")
        assert isinstance(storage.messages, MessageStore)
        assert storage.dead_workers() == []
    if storage_config.backend == "sqlite":
        assert (storage_config.data_dir / "mqchat.sqlite3").exists()
        assert not (storage_config.data_dir / "push.sqlite3").exists()


def test_every_configurable_backend_is_registered() -> None:
    assert set(BACKENDS) == set(STORAGE_BACKENDS)


def test_the_backend_comes_from_file_env_or_flag(tmp_path: Path) -> None:
    assert load_config({}, SECRET)[0].storage.backend == "sqlite"
    assert load_config({}, {**SECRET, "MQCHAT_STORAGE_BACKEND": "cassandra"})[0].storage.backend == "cassandra"
    assert load_config({"storage_backend": "cassandra"}, SECRET)[0].storage.backend == "cassandra"
    config_file = tmp_path / "mqchat.toml"
    config_file.write_text('storage_backend = "cassandra"\n')
    assert load_config({"config": config_file}, SECRET)[0].storage.backend == "cassandra"


def test_an_unknown_backend_is_refused_naming_the_key_and_the_choices() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config({"storage_backend": "mongodb"}, SECRET)
    assert str(refused.value) == "bad value for storage_backend: 'mongodb' is not one of sqlite, cassandra"


async def test_a_backend_without_its_driver_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def without_the_driver(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "cassandra" else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_the_driver)
    with pytest.raises(ConfigError) as refused:
        async with open_storage(StorageConfig(data_dir=tmp_path, backend="cassandra")):
            pass
    assert str(refused.value) == (
        "storage backend 'cassandra' needs the cassandra-driver package: pip install 'mqchat[cassandra]'"
    )


async def test_a_backend_this_version_does_not_ship_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "cassandra", Backend(module="storage.not_shipped"))
    with pytest.raises(ConfigError) as refused:
        async with open_storage(StorageConfig(data_dir=tmp_path, backend="cassandra")):
            pass
    assert str(refused.value) == "storage backend 'cassandra' is not available in this version of mqchat"


async def test_an_unreachable_cluster_is_one_clear_error(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    config = StorageConfig(data_dir=tmp_path, backend="cassandra", cassandra_port=port, cassandra_timeout_s=2.0)
    with pytest.raises(StorageUnavailable) as refused:
        async with open_storage(config):
            pass
    assert str(refused.value) == f"cannot reach the Cassandra cluster at 127.0.0.1:{port}: NoHostAvailable"
