"""The refusals the bridge's services share, each worded once::

parse_conversation(conv) ──▶ Conv, or bad_conv          (every route and service taking a conv)
not_member / no_such_conversation ──▶ the protocol's fixed wording of a membership refusal
refusal_error(StoreRefusal) ──▶ the RequestError a client is told (pipeline and HTTP API alike)
push_store_or_refuse(None) ──▶ unavailable, on a server without push
"""

from __future__ import annotations

from typing import TypeVar

from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import Conv, parse_conv
from storage.base import DeviceTokens, PushSettings, StoreRefusal

__all__ = ["no_such_conversation", "not_member", "parse_conversation", "push_store_or_refuse", "refusal_error"]

_Push = TypeVar("_Push", DeviceTokens, PushSettings)


def parse_conversation(conv: str) -> Conv:
    """The conversation id conv, parsed (bad_conv when it is not one)."""
    parsed = parse_conv(conv)
    if parsed is None:
        raise RequestError(ErrorCode.BAD_CONV, "not a conversation id")
    return parsed


def not_member(conv: str | None, id: str | None = None) -> RequestError:
    return RequestError(ErrorCode.NOT_MEMBER, "you are not a member of this conversation", id=id, conv=conv)


def no_such_conversation(conv: str | None, id: str | None = None) -> RequestError:
    return RequestError(ErrorCode.NOT_FOUND, "no such conversation", id=id, conv=conv)


def refusal_error(exc: StoreRefusal, *, id: str | None = None, conv: str | None = None) -> RequestError:
    """What a client is told when the store refuses its request. Membership refusals get the
    protocol's fixed wording (the store's own names users); the others say what the store said."""
    if exc.code is ErrorCode.NOT_MEMBER:
        return not_member(conv, id)
    if exc.code is ErrorCode.NOT_FOUND:
        return no_such_conversation(conv, id)
    return RequestError(exc.code, str(exc), id=id, conv=conv)


def push_store_or_refuse(push_store: _Push | None) -> _Push:
    """The push store, or unavailable (503) on a server without push."""
    if push_store is None:
        raise RequestError(ErrorCode.UNAVAILABLE, "push is not available on this server")
    return push_store
