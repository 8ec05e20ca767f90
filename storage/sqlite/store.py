"""``SqliteMessageStore``: the message store's SQLite parts composed into one class over one
database file. The domain classes share one ``SqliteDatabase`` (one writer thread, group
commit), so an append, a watermark and a membership change are ordered in one queue."""

from __future__ import annotations

from storage.base import MessageStore
from storage.sqlite.accounts import SqliteAccounts
from storage.sqlite.conversations import SqliteConversationStates
from storage.sqlite.groups import SqliteGroups
from storage.sqlite.media import SqliteMediaIndex
from storage.sqlite.messages import SqliteMessageLog
from storage.sqlite.settings import SqlitePrivacySettings


class SqliteMessageStore(
    SqliteMessageLog,
    SqliteConversationStates,
    SqliteGroups,
    SqlitePrivacySettings,
    SqliteAccounts,
    SqliteMediaIndex,
    MessageStore,
):
    """SQLite-backed MessageStore. Use ``await SqliteMessageStore.open(path)``."""
