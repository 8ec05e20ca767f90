"""PrivacySettings: saved per user, absent until saved, replaced as a whole."""

from __future__ import annotations

from storage.base import MessageStore
from storage.records import UserSettings


async def test_settings_are_absent_until_saved_and_replaced_when_saved_again(store: MessageStore) -> None:
    assert await store.user_settings(["alice", "bob"]) == {}
    await store.set_user_settings("alice", UserSettings(who_may_add="contacts", presence="nobody"))
    await store.set_user_settings("alice", UserSettings(who_may_add="nobody", presence="contacts"))
    assert await store.user_settings(["alice", "bob", "alice"]) == {
        "alice": UserSettings(who_may_add="nobody", presence="contacts")
    }


async def test_settings_of_many_users_at_once(store: MessageStore) -> None:
    users = [f"u{i:04d}" for i in range(1200)]  # more than one query's worth of parameters
    for user in users[::100]:
        await store.set_user_settings(user, UserSettings(who_may_add="nobody"))
    assert set(await store.user_settings(users)) == set(users[::100])
