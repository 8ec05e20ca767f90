"""Who may read a conversation, and what they read: membership checks, the join point, history
pages and sync.

The pipeline (every ``recv``/``read``/``typing``) and the HTTP API (history, catch-up, sync)
ask the same questions here::

    require_member(groups, user, conv) ─▶ Audience (who hears the conversation's events)
    History.first_readable(user, conv) ─▶ the join point: a group member reads from the seq
                                          they joined at; 1 in a 1:1 conversation
    History.page / History.changes ─────▶ messages below the join point are never returned

A refusal is worded in ``bridge.refusals``.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bridge.groups import group_member
from bridge.refusals import no_such_conversation, not_member
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import Conv
from mqchat.protocol import msg_envelope
from storage.base import ConversationStates, Groups, MessageLog
from storage.records import ConvState, Page, StoredMessage

__all__ = [
    "Audience",
    "ConversationChange",
    "History",
    "HistoryPage",
    "SyncPage",
    "decode_cursor",
    "encode_cursor",
    "members_of",
    "message_event",
    "require_member",
]


def members_of(conv: Conv) -> tuple[str, ...]:
    """Members of a conversation, as far as the pipeline knows them (dm: from the id)."""
    return conv.members


@dataclass(frozen=True, slots=True)
class Audience:
    """Who hears about a conversation's events: its members, or (a channel) only the asking
    user — a channel's messages go to ``c/{conv}/in`` and its receipts stay with the reader."""

    kind: str  # "dm" | "group" | "channel"
    members: tuple[str, ...]


async def require_member(groups: Groups, user: str, conv: Conv, *, id: str | None = None) -> Audience:
    """The conversation's audience, after checking that it exists and user is a member
    (RequestError not_found / not_member otherwise). Every read goes through here; writes are
    checked again inside the store's transaction, in order with membership changes."""
    if conv.kind == "dm":
        if user not in conv.members:
            raise not_member(conv.id, id)
        return Audience("dm", members_of(conv))
    membership = await groups.membership(conv=conv.id, user=user)
    if membership is None:
        raise no_such_conversation(conv.id, id)
    if membership.member is None:
        raise not_member(conv.id, id)
    if membership.kind == "channel":
        return Audience("channel", (user,))
    group = await groups.group(conv.id)
    if group is None:
        raise no_such_conversation(conv.id, id)
    return Audience(membership.kind, group.users)


def message_event(stored: StoredMessage, known: Mapping[str, dict[str, Any]] | None = None) -> dict[str, object]:
    """The ``msg`` envelope of a stored message (also what the HTTP history returns); known:
    what is known of media files by id (``MediaService.attachments``), for ``attachments``."""
    attachments = [known[m] for m in stored.media if m in known] if known and stored.media else None
    return msg_envelope(
        conv=stored.conv,
        seq=stored.seq,
        mid=stored.mid,
        sender=stored.sender,
        device=stored.device,
        id=stored.client_id,
        ts=stored.ts,
        kind=stored.kind,
        body=stored.body,
        media=stored.media,
        attachments=attachments,
    )


def encode_cursor(version: int) -> str:
    return base64.urlsafe_b64encode(f"v1:{version}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    prefix, _, number = raw.partition(":")
    if prefix != "v1" or not number.isdigit() or len(number) > 19:
        return None
    return int(number)


def _from_join_point(page: Page, first: int) -> tuple[list[StoredMessage], bool]:
    """The messages of a backwards page a reader who joined at seq ``first`` may see, and
    whether older ones exist for them (none before their join point)."""
    visible = [m for m in page.messages if m.seq >= first]
    return visible, page.more and len(visible) == len(page.messages)


@dataclass(frozen=True, slots=True)
class HistoryPage:
    conv: str
    messages: list[StoredMessage]
    more: bool  # more messages in the direction of the read
    last_seq: int


@dataclass(frozen=True, slots=True)
class ConversationChange:
    state: ConvState
    recent: list[StoredMessage] | None  # with include_messages: the newest, ascending
    recent_more: bool | None  # older messages exist before ``recent``


@dataclass(frozen=True, slots=True)
class SyncPage:
    changes: list[ConversationChange]
    cursor: str  # pass as ``since`` next time
    more: bool  # more changes wait


class History:
    """History, catch-up and sync for one user at a time, from the join point on."""

    def __init__(self, *, log: MessageLog, states: ConversationStates, groups: Groups) -> None:
        self._log = log
        self._states = states
        self._groups = groups

    async def first_readable(self, user: str, conv: Conv) -> int:
        """The first seq user may read in conv (not_found / not_member if they may read none)."""
        if conv.kind == "group":
            return (await group_member(self._groups, conv.id, user)).joined_seq
        await require_member(self._groups, user, conv)
        return 1

    async def page(self, user: str, conv: Conv, *, after: int | None, before: int | None, limit: int) -> HistoryPage:
        """Catch-up (after a seq, ascending) or scrollback (before a seq) of conv for user."""
        first = await self.first_readable(user, conv)
        if after is not None and before is not None:
            raise RequestError(ErrorCode.BAD_REQUEST, "give after or before, not both")
        if before is not None:
            visible, more = _from_join_point(await self._log.fetch_before(conv.id, before, limit), first)
        else:
            page = await self._log.fetch_after(conv.id, max(after or 0, first - 1), limit)
            visible, more = list(page.messages), page.more
        return HistoryPage(conv.id, visible, more, await self._log.last_seq(conv.id))

    async def changes(self, user: str, *, since: str | None, limit: int, include_messages: int) -> SyncPage:
        """The conversations that changed for user since the cursor ``since`` (None: all), each
        with the newest ``include_messages`` messages user may read (0: none)."""
        after = 0
        if since is not None:
            decoded = decode_cursor(since)
            if decoded is None or decoded > await self._states.current_version():
                raise RequestError(ErrorCode.BAD_CURSOR, "not a cursor from this server; sync again without one")
            after = decoded
        page = await self._states.changes_since(user=user, version=after, limit=limit)
        changes = []
        for state in page.states:
            recent: list[StoredMessage] | None = None
            recent_more: bool | None = None
            if include_messages:
                first = await self._join_point(user, state)
                newest = await self._log.fetch_before(state.conv, state.last_seq + 1, include_messages)
                recent, recent_more = _from_join_point(newest, first)
            changes.append(ConversationChange(state, recent, recent_more))
        return SyncPage(changes, encode_cursor(page.version), page.more)

    async def _join_point(self, user: str, state: ConvState) -> int:
        """The first seq user may read in a conversation of their sync (past the end: none)."""
        if state.kind == "dm":
            return 1
        standing = await self._groups.membership(conv=state.conv, user=user)
        member = standing.member if standing is not None else None
        return member.joined_seq if member is not None else state.last_seq + 1
