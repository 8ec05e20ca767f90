"""Groups: creation, members and join points, removal, roles; refusals for strangers and unknown groups."""

from __future__ import annotations

import pytest

from storage.base import MessageStore, NoSuchConversation, NotMember
from storage.records import NewMessage


async def test_groups_membership_and_join_points(store: MessageStore) -> None:
    conv = "g:01ARZ3NDEKTSV4RRFFQ69G5FAV"
    group = await store.create_group(conv=conv, name="g", kind="group", creator="alice", members=("bob",), ts=1)
    assert {(m.user, m.role, m.joined_seq) for m in group.members} == {("alice", "admin", 1), ("bob", "member", 1)}

    def gnew(sender: str, cid: str) -> NewMessage:
        return NewMessage(
            conv=conv, members=(), sender=sender, device="d", client_id=cid, kind="text", body="x", media=(), ts=2
        )

    first = await store.append(gnew("bob", "g1"))
    assert first.members == ("alice", "bob")
    with pytest.raises(NotMember):
        await store.append(gnew("carol", "g2"))
    group = await store.add_members(conv=conv, users=("carol", "bob"), ts=3)
    assert group.member("carol") is not None
    assert group.member("carol").joined_seq == 2  # type: ignore[union-attr]
    assert group.member("bob").joined_seq == 1  # type: ignore[union-attr]
    carol_state = await store.conversation_state(conv=conv, user="carol")
    assert carol_state is not None
    assert carol_state.unread == 0  # nothing before the join point is unread
    assert (await store.append(gnew("carol", "g3"))).members == ("alice", "bob", "carol")
    group = await store.remove_member(conv=conv, user="bob")
    assert group.users == ("alice", "carol")
    with pytest.raises(NotMember):
        await store.append(gnew("bob", "g4"))
    with pytest.raises(NotMember):
        await store.set_watermark(conv=conv, user="bob", delivered=1, read=None)
    assert await store.conversation_state(conv=conv, user="bob") is None
    group = await store.set_role(conv=conv, user="carol", role="admin")
    assert group.member("carol").role == "admin"  # type: ignore[union-attr]
    with pytest.raises(NoSuchConversation):
        await store.append(
            NewMessage(conv="g:01BX5ZZKBKACTAV9WEVGEMMVRZ", members=(), sender="a", device="d", client_id="z",
                       kind="text", body="x", media=(), ts=1)
        )  # fmt: skip
    assert await store.group("g:01BX5ZZKBKACTAV9WEVGEMMVRZ") is None
