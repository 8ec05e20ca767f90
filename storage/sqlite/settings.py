"""Users' privacy settings on SQLite: one ``user_settings`` row per user who saved any."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from storage.base import PrivacySettings
from storage.records import UserSettings
from storage.sqlite.connection import chunks, placeholders
from storage.sqlite.database import SqliteDatabase


class SqlitePrivacySettings(SqliteDatabase, PrivacySettings):
    async def user_settings(self, users: Sequence[str]) -> dict[str, UserSettings]:
        found: dict[str, UserSettings] = {}
        for part in chunks(list(dict.fromkeys(users))):
            rows = await self._read(
                f"SELECT user, who_may_add, presence FROM user_settings WHERE user IN ({placeholders(len(part))})",
                tuple(part),
            )
            found.update({user: UserSettings(who_may_add=w, presence=p) for user, w, p in rows})
        return found

    async def set_user_settings(self, user: str, settings: UserSettings) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO user_settings (user, who_may_add, presence) VALUES (?, ?, ?) "
                "ON CONFLICT (user) DO UPDATE SET who_may_add = excluded.who_may_add, presence = excluded.presence",
                (user, settings.who_may_add, settings.presence),
            )

        await self._write(job)
