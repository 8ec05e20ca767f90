"""DeviceTokens: one token per device, a token bound to one device, conditional forgetting."""

from __future__ import annotations

from storage.base import PushStore
from storage.records import DeviceToken


def token(user: str, device: str, value: str, registered_at: int = 1) -> DeviceToken:
    return DeviceToken(user, device, "fcm", value, None, False, registered_at)


async def test_a_device_has_one_token_and_a_token_one_device(push: PushStore) -> None:
    await push.put_token(token("alice", "a1", "t1"))
    await push.put_token(token("alice", "a1", "t2"))  # a new token replaces the old
    await push.put_token(token("bob", "b1", "t3"))
    await push.put_token(token("bob", "b2", "t3"))  # the token moves to another device
    assert {(t.user, t.device, t.token) for t in await push.tokens(["alice", "bob"])} == {
        ("alice", "a1", "t2"),
        ("bob", "b2", "t3"),
    }
    assert await push.token_of("alice", "a1") == token("alice", "a1", "t2")
    assert await push.token_of("bob", "b1") is None


async def test_forgetting_tokens(push: PushStore) -> None:
    await push.put_token(token("alice", "a1", "t1", registered_at=100))
    await push.put_token(token("bob", "b1", "t2"))
    assert not await push.delete_token("t1", registered_before=99)  # registered again since
    assert await push.delete_token("t1", registered_before=100)
    assert not await push.delete_token("t1")
    assert await push.delete_device_token("bob", "b1")
    assert not await push.delete_device_token("bob", "b1")
    assert await push.tokens(["alice", "bob"]) == []
