"""Sync and history routes: what changed since a cursor, catch-up and scrollback
(bridge.history decides what a caller may read)."""

from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Query

from bridge.history import HistoryPage, SyncPage, message_event
from bridge.http.context import ERROR_RESPONSES, Api, ApiContext, Caller, ConvPath
from bridge.http.schemas import ConversationsPage, MessagesPage
from bridge.refusals import parse_conversation
from storage.records import StoredMessage


async def known_media(api: ApiContext, messages: Iterable[StoredMessage]) -> dict[str, dict[str, Any]]:
    """What is known of the files the messages carry (nothing when media is not served here)."""
    ids = [m for message in messages for m in message.media]
    return await api.media.attachments(ids) if ids and api.media is not None else {}


def render_page(page: HistoryPage, known: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "conv": page.conv,
        "messages": [message_event(m, known) for m in page.messages],
        "more": page.more,
        "last_seq": page.last_seq,
    }


def render_changes(page: SyncPage, known: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    out: list[dict[str, Any]] = []
    for change in page.changes:
        state = change.state
        item: dict[str, Any] = {
            "conv": state.conv,
            "kind": state.kind,
            "last_seq": state.last_seq,
            "delivered": state.delivered,
            "read": state.read,
            "unread": state.unread,
            "updated_at": state.updated_at,
        }
        if change.recent is not None:
            item["messages"] = [message_event(m, known) for m in change.recent]
            item["messages_more"] = change.recent_more
        out.append(item)
    return {"conversations": out, "cursor": page.cursor, "more": page.more}


def sync_router(*, max_limit: int) -> APIRouter:
    """The sync and history routes, whose ``limit`` is at most max_limit (in their schema too)."""
    router = APIRouter(responses=ERROR_RESPONSES)
    Limit = Annotated[int, Query(ge=1, le=max_limit)]

    @router.get(
        "/v1/conversations/{conv}/messages",
        response_model=MessagesPage,
        response_model_exclude_none=True,
        summary="Catch-up (after=SEQ, ascending) or scrollback (before=SEQ)",
    )
    async def messages(
        conv: ConvPath,
        who: Caller,
        api: Api,
        after: Annotated[int | None, Query(ge=0, lt=2**63)] = None,
        before: Annotated[int | None, Query(ge=1, lt=2**63)] = None,
        limit: Limit = 100,
    ) -> dict[str, Any]:
        parsed = parse_conversation(conv)
        page = await api.history.page(who.user, parsed, after=after, before=before, limit=limit)
        return render_page(page, await known_media(api, page.messages))

    @router.get(
        "/v1/conversations",
        response_model=ConversationsPage,
        response_model_exclude_none=True,
        summary="What changed for you since a cursor (sync): conversations with your watermarks and unread",
    )
    async def conversations(
        who: Caller,
        api: Api,
        since: Annotated[str | None, Query(max_length=64, description="the cursor of your last sync")] = None,
        limit: Limit = 100,
        include_messages: Annotated[int, Query(ge=0, le=100)] = 0,
    ) -> dict[str, Any]:
        page = await api.history.changes(who.user, since=since, limit=limit, include_messages=include_messages)
        recent = [m for change in page.changes for m in change.recent or ()]
        return render_changes(page, await known_media(api, recent))

    return router
