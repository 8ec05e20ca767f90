"""Identifiers of wire protocol v1.

User, device and client message ids: 1–64 characters of ``[A-Za-z0-9_.@-]``.
Conversations: ``dm:{a}:{b}`` (a, b sorted user ids) and ``g:{ulid}``. Server message
ids (``mid``) are ULIDs, so they sort by creation time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from ulid import ULID

ID_PATTERN = r"[A-Za-z0-9_.@-]{1,64}"
_ID_RE = re.compile(ID_PATTERN)
_ULID_RE = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")

ConvKind = Literal["dm", "group"]


def is_valid_id(value: object) -> bool:
    """True for a user, device or client message id: 1–64 of ``[A-Za-z0-9_.@-]``."""
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def new_mid() -> str:
    """A new server message id: a ULID string, time-sortable."""
    return str(ULID())


def new_group_id() -> str:
    return f"g:{ULID()}"


def dm_conv(a: str, b: str) -> str:
    """The 1:1 conversation id of users a and b (order does not matter)."""
    if not (is_valid_id(a) and is_valid_id(b)):
        raise ValueError("user ids must be 1-64 characters of [A-Za-z0-9_.@-]")
    lo, hi = sorted((a, b))
    return f"dm:{lo}:{hi}"


@dataclass(frozen=True, slots=True)
class Conv:
    """A parsed conversation id."""

    id: str
    kind: ConvKind
    members: tuple[str, ...] = ()  # known from the id itself for dm conversations


def parse_conv(value: object) -> Conv | None:
    """Parse a conversation id; None when it is not one."""
    if not isinstance(value, str) or len(value) > 140:
        return None
    if value.startswith("dm:"):
        parts = value.split(":")
        if len(parts) != 3 or not (is_valid_id(parts[1]) and is_valid_id(parts[2])):
            return None
        a, b = parts[1], parts[2]
        if a > b:  # not canonical: clients must sort the two ids
            return None
        members = (a,) if a == b else (a, b)
        return Conv(value, "dm", members)
    if value.startswith("g:") and _ULID_RE.fullmatch(value[2:]):
        return Conv(value, "group")
    return None
