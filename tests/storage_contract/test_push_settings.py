"""PushSettings: muted per user and conversation, end-to-end encryption per conversation."""

from __future__ import annotations

from storage.base import PushStore


async def test_muted_is_per_user_and_e2e_per_conversation(push: PushStore) -> None:
    assert await push.settings("alice", "dm:alice:bob") == (False, False)
    await push.set_muted("alice", "dm:alice:bob", True)
    await push.set_e2e("dm:alice:bob", True)
    assert await push.settings("alice", "dm:alice:bob") == (True, True)
    assert await push.settings("bob", "dm:alice:bob") == (False, True)
    await push.set_muted("alice", "dm:alice:bob", False)
    assert await push.settings("alice", "dm:alice:bob") == (False, True)
