"""Users' privacy settings on Cassandra: one ``user_settings`` row per user who saved any."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from storage.base import PrivacySettings
from storage.cassandra.core import CassandraPart
from storage.records import UserSettings

__all__ = ["STATEMENTS", "CassandraPrivacySettings"]

STATEMENTS = {
    "settings_get": "SELECT who_may_add, presence FROM {ks}.user_settings WHERE user = ?",
    "settings_put": "INSERT INTO {ks}.user_settings (user, who_may_add, presence) VALUES (?, ?, ?)",
}


class CassandraPrivacySettings(CassandraPart, PrivacySettings):
    async def user_settings(self, users: Sequence[str]) -> dict[str, UserSettings]:
        wanted = list(dict.fromkeys(users))
        rows = await asyncio.gather(*(self._cql.one("settings_get", (u,)) for u in wanted))
        return {
            user: UserSettings(who_may_add=str(row[0]), presence=str(row[1]))
            for user, row in zip(wanted, rows, strict=True)
            if row is not None
        }

    async def set_user_settings(self, user: str, settings: UserSettings) -> None:
        await self._cql.run("settings_put", (user, settings.who_may_add, settings.presence))
