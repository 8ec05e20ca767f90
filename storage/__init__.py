"""Storage backends behind domain-level interfaces (``base.py``), opened by one factory.

::

    config.storage.backend ──▶ open_storage(config.storage) ──▶ BACKENDS[name].module
                                  ├─ open_message_store(config) ──▶ messages: MessageStore
                                  └─ open_push_store(config) ─────▶ push: PushStore  (not with push=False)

    bridge pipeline ──append(NewMessage)──▶ MessageStore ──▶ SQLite file (WAL, group commit)
    bridge HTTP API ──fetch_after/before──▶ MessageStore
    push dispatcher ──enqueue/claim_due───▶ PushStore ─────▶ its own SQLite file
    broker ACL ──membership/settings──────▶ MessageStore    (the broker opens no push store)
    logout, account deletion ──revoke, begin/finish_deletion, redact_messages──▶ MessageStore
                             └─forget_user──▶ PushStore

``sqlite`` (``storage.sqlite``) is the embedded default and needs nothing installed. A backend
whose driver is not installed, or that this version does not ship, is refused with a
``ConfigError`` that says what to install. Beside them: ``records.py`` (the dataclasses the
interfaces take and return), ``privacy.py`` (who may add whom, who sees whose presence, decided
from the groups and privacy parts), ``files.py`` (data files readable by the server only), and
the presence registries (``presence.py``, ``redis_presence.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import ModuleType
from typing import Literal, overload

from mqchat.config import StorageConfig
from mqchat.errors import ConfigError
from storage.base import MessageStorage, MessageStore, PushStore, Storage

__all__ = ["BACKENDS", "Backend", "open_storage"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Backend:
    """Where a backend lives and what it needs installed."""

    module: str  # has ``open_message_store`` and ``open_push_store`` (see ``_MessageOpener``, ``_PushOpener``)
    driver: str = ""  # the import name of its driver package; "" for the standard library
    package: str = ""  # the driver's distribution name, for the hint
    extra: str = ""  # the mqchat extra that installs it


BACKENDS: dict[str, Backend] = {
    "sqlite": Backend(module="storage.sqlite"),
    "cassandra": Backend(module="storage.cassandra", driver="cassandra", package="cassandra-driver", extra="cassandra"),
}
"""Every backend name ``StorageConfig.backend`` accepts (``mqchat.config.STORAGE_BACKENDS``)."""

_MessageOpener = Callable[[StorageConfig], AbstractAsyncContextManager[MessageStore]]
_PushOpener = Callable[[StorageConfig], AbstractAsyncContextManager[PushStore]]


def _backend_module(name: str) -> ModuleType:
    backend = BACKENDS.get(name)
    if backend is None:
        raise ConfigError(f"unknown storage backend {name!r} (storage_backend: {', '.join(BACKENDS)})")
    if backend.driver and importlib.util.find_spec(backend.driver) is None:
        raise ConfigError(
            f"storage backend {name!r} needs the {backend.package} package: pip install 'mqchat[{backend.extra}]'"
        )
    try:
        return importlib.import_module(backend.module)
    except ModuleNotFoundError as exc:
        if exc.name != backend.module:
            raise
        raise ConfigError(f"storage backend {name!r} is not available in this version of mqchat") from None


@overload
def open_storage(config: StorageConfig, *, push: Literal[True] = True) -> AbstractAsyncContextManager[Storage]: ...


@overload
def open_storage(config: StorageConfig, *, push: Literal[False]) -> AbstractAsyncContextManager[MessageStorage]: ...


def open_storage(config: StorageConfig, *, push: bool = True) -> AbstractAsyncContextManager[MessageStorage]:
    """The stores of the backend config names, open until the block ends (then closed, queued
    writes finished first): the message store and the push store, or (push=False) the message
    store alone, for a process that keeps no push state."""
    return _open(config, push=push)


@asynccontextmanager
async def _open(config: StorageConfig, *, push: bool) -> AsyncIterator[MessageStorage]:
    module = _backend_module(config.backend)
    open_messages: _MessageOpener = module.open_message_store
    async with open_messages(config) as messages:
        if not push:
            yield MessageStorage(messages=messages)
            return
        open_push: _PushOpener = module.open_push_store
        async with open_push(config) as push_store:
            yield Storage(messages=messages, push=push_store)
