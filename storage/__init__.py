"""Storage backends behind domain-level interfaces (``base.py``), opened by one factory.

::

    config.storage.backend ──▶ open_storage(config) ──▶ BACKENDS[name].module.open_backend(config)
                                                        └─▶ Storage(messages: MessageStore, push: PushStore)

    bridge pipeline ──append(NewMessage)──▶ MessageStore ──▶ SQLite file (WAL, group commit)
    bridge HTTP API ──fetch_after/before──▶ MessageStore      (later: Cassandra / ScyllaDB)
    push dispatcher ──enqueue/claim_due───▶ PushStore ─────▶ its own SQLite file
    broker ACL ──membership/settings──────▶ MessageStore

``sqlite`` (``storage.sqlite``) is the embedded default and needs nothing installed. A backend
whose driver is not installed, or that this version does not ship, is refused with a
``ConfigError`` that says what to install. Presence has its own registries
(``presence.py``, ``redis_presence.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass

from mqchat.config import StorageConfig
from mqchat.errors import ConfigError
from storage.base import (
    AppendResult,
    MessageStore,
    NewMessage,
    Page,
    PushStore,
    Storage,
    StoredMessage,
    StoreStatistics,
)

__all__ = [
    "BACKENDS",
    "AppendResult",
    "Backend",
    "MessageStore",
    "NewMessage",
    "Page",
    "PushStore",
    "Storage",
    "StoreStatistics",
    "StoredMessage",
    "open_storage",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    """Where a backend lives and what it needs installed."""

    module: str  # has ``open_backend(config: StorageConfig) -> AbstractAsyncContextManager[Storage]``
    driver: str = ""  # the import name of its driver package; "" for the standard library
    package: str = ""  # the driver's distribution name, for the hint
    extra: str = ""  # the mqchat extra that installs it


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend(module="storage.sqlite"),
    "cassandra": Backend(module="storage.cassandra", driver="cassandra", package="cassandra-driver", extra="cassandra"),
}
"""Every backend name ``StorageConfig.backend`` accepts (``mqchat.config.STORAGE_BACKENDS``)."""

_Opener = Callable[[StorageConfig], AbstractAsyncContextManager[Storage]]


def _opener(name: str) -> _Opener:
    backend = BACKENDS.get(name)
    if backend is None:
        raise ConfigError(f"unknown storage backend {name!r} (storage_backend: {', '.join(BACKENDS)})")
    if backend.driver and importlib.util.find_spec(backend.driver) is None:
        raise ConfigError(
            f"storage backend {name!r} needs the {backend.package} package: pip install 'mqchat[{backend.extra}]'"
        )
    try:
        module = importlib.import_module(backend.module)
    except ModuleNotFoundError as exc:
        if exc.name != backend.module:
            raise
        raise ConfigError(f"storage backend {name!r} is not available in this version of mqchat") from None
    opener: _Opener = module.open_backend
    return opener


@asynccontextmanager
async def open_storage(config: StorageConfig) -> AsyncIterator[Storage]:
    """The stores of the backend config names, open until the block ends (then closed, queued
    writes finished first)."""
    async with _opener(config.backend)(config) as storage:
        yield storage
