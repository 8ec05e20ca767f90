"""``CassandraMessageStore``: the message store's Cassandra parts composed into one class over
one connection (``session.Cql``), with the statements of every part prepared at open."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from storage.base import MessageStore
from storage.cassandra import accounts, conversations, core, groups, media, messages, settings
from storage.cassandra.accounts import CassandraAccounts
from storage.cassandra.conversations import CassandraConversationStates
from storage.cassandra.groups import CassandraGroups
from storage.cassandra.media import CassandraMediaIndex
from storage.cassandra.messages import CassandraMessageLog
from storage.cassandra.session import Cql
from storage.cassandra.settings import CassandraPrivacySettings

__all__ = ["PAGE_ROWS", "STATEMENTS", "CassandraMessageStore"]

STATEMENTS = {
    **core.STATEMENTS,
    **messages.STATEMENTS,
    **conversations.STATEMENTS,
    **groups.STATEMENTS,
    **settings.STATEMENTS,
    **accounts.STATEMENTS,
    **media.STATEMENTS,
}


PAGE_ROWS = {
    "changes_after": conversations.CHANGES_PAGE_ROWS,
    "msg_scan": accounts.MSG_SCAN_ROWS,
    "sender_convs_of": accounts.SENDER_CONVS_ROWS,
    "forget_dm_states": accounts.FORGET_ROWS,
    "forget_changes_scan": accounts.FORGET_ROWS,
}
"""Reads whose pages are smaller than the driver's default (each row read costs more reads or
writes)."""


class CassandraMessageStore(
    CassandraMessageLog,
    CassandraConversationStates,
    CassandraGroups,
    CassandraPrivacySettings,
    CassandraAccounts,
    CassandraMediaIndex,
    MessageStore,
):
    """Cassandra-backed MessageStore; ``storage.cassandra.open_message_store`` opens it."""

    def __init__(self, cql: Cql, *, release: Callable[[], Awaitable[None]]) -> None:
        self._init_part(cql)
        self._init_log()
        self._release = release

    async def aclose(self) -> None:
        """Finish the queued appends, then give the connection back."""
        await self._drain()
        await self._release()
