"""Users' privacy settings on Cassandra: one ``user_settings`` row per user who saved any."""

from __future__ import annotations

from collections.abc import Sequence

from storage.base import PrivacySettings
from storage.cassandra.core import CassandraPart, bounded
from storage.records import UserSettings

__all__ = ["STATEMENTS", "CassandraPrivacySettings"]

STATEMENTS = {
    "settings_in": "SELECT user, who_may_add, presence FROM {ks}.user_settings WHERE user IN ?",
    "settings_put": "INSERT INTO {ks}.user_settings (user, who_may_add, presence) VALUES (?, ?, ?)",
}

_USERS_PER_READ = 8
"""Users read in one request (a partition each): adding a thousand members to a channel read them
one request each, which cost the node twice the CPU."""


class CassandraPrivacySettings(CassandraPart, PrivacySettings):
    async def user_settings(self, users: Sequence[str]) -> dict[str, UserSettings]:
        wanted = list(dict.fromkeys(users))
        pages = await bounded(
            [
                self._cql.rows("settings_in", (wanted[i : i + _USERS_PER_READ],))
                for i in range(0, len(wanted), _USERS_PER_READ)
            ]
        )
        return {
            str(user): UserSettings(who_may_add=str(who), presence=str(presence))
            for rows in pages
            for user, who, presence in rows
        }

    async def set_user_settings(self, user: str, settings: UserSettings) -> None:
        await self._cql.run("settings_put", (user, settings.who_may_add, settings.presence))
