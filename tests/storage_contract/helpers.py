"""Messages for the contract tests."""

from __future__ import annotations

from storage.records import NewMessage


def new(conv: str, client_id: str, sender: str = "alice", body: str = "hi", ts: int = 1) -> NewMessage:
    members = tuple(conv.split(":")[1:]) if conv.startswith("dm:") else (sender,)
    return NewMessage(
        conv=conv,
        members=members,
        sender=sender,
        device="d1",
        client_id=client_id,
        kind="text",
        body=body,
        media=(),
        ts=ts,
    )
