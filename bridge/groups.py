"""Groups and channels: who may create, join, leave and run them, and who hears of it.

::

    GroupService.create / add_members / remove_member / promote
        │ the caller's standing (bad_conv / not_found / not_member / forbidden for non-admins)
        │ size limit (groups) and consent (storage.privacy: each added user's who_may_add_me)
        │ the broker must be reachable before a membership change (unavailable otherwise)
        ▼
    storage Groups (one transaction per change)
        ▼
    announce: the change to the broker first (MEMBERSHIP_TOPIC: its ACL drops cached answers and
    a removed member's channel subscription), then a ``conv`` event to every member's u/{m}/in
    (a channel: once on c/{conv}/in and to the users the change names)

A caller's standing in one group (``group_member``, without loading a channel's member list)
is asked here by the other services too (history's join point, settings).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from bridge.outgoing import Outgoing
from bridge.refusals import parse_conversation
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import new_group_id
from mqchat.internal_topics import MEMBERSHIP_TOPIC
from mqchat.protocol import channel_topic, encode, user_in_topic
from storage.base import Groups, PrivacySettings
from storage.privacy import refusing_to_be_added
from storage.records import DEFAULT_SETTINGS, Group, GroupMember, UserSettings

Publish = Callable[[list[Outgoing]], Awaitable[None]]

# One call adds at most this many members: the store writes them in one transaction and the
# server announces them at once, so an unbounded call would hold everyone else's writes behind it.
MAX_MEMBERS_PER_CALL = 1000


async def no_publish(outgoing: list[Outgoing]) -> None:
    return None


def membership_change(conv: str, kind: str, *, added: Sequence[str] = (), removed: Sequence[str] = ()) -> Outgoing:
    """The broker's notice that who may read conv changed (kind "settings", conv "": a user's
    presence setting changed, and removed names them)."""
    change = {"conv": conv, "kind": kind, "added": list(added), "removed": list(removed)}
    return Outgoing(MEMBERSHIP_TOPIC, encode(change))


class BrokerLink:
    """The way to the broker for changes its ACL must hear of before they take effect."""

    def __init__(self, *, publish: Publish = no_publish, connected: Callable[[], bool] = lambda: True) -> None:
        self.publish = publish
        self._connected = connected

    def require(self) -> None:
        """A membership change must reach the broker (its ACL drops a removed member's
        subscriptions); while it cannot, refuse before changing anything."""
        if not self._connected():
            raise RequestError(ErrorCode.UNAVAILABLE, "the server is reconnecting to its broker; retry")


def group_id(conv: str) -> str | None:
    """The id of group or channel conv; None for a 1:1 conversation (bad_conv if not an id)."""
    parsed = parse_conversation(conv)
    return parsed.id if parsed.kind == "group" else None


def as_group_member(found: object, member: GroupMember | None) -> GroupMember:
    """member, or the group API's refusal: not_found when found is None, else not_member."""
    if found is None:
        raise RequestError(ErrorCode.NOT_FOUND, "no such group")
    if member is None:
        raise RequestError(ErrorCode.NOT_MEMBER, "you are not a member of this group")
    return member


async def group_member(groups: Groups, gid: str, user: str) -> GroupMember:
    """user's membership of group or channel gid, without loading its member list."""
    standing = await groups.membership(conv=gid, user=user)
    return as_group_member(standing, standing.member if standing is not None else None)


class GroupService:
    """The rules of groups and channels, over the store's groups and its users' consent; every
    change is announced."""

    def __init__(
        self,
        *,
        groups: Groups,
        privacy: PrivacySettings,
        broker: BrokerLink,
        max_group_members: int = 1000,
        default_settings: UserSettings = DEFAULT_SETTINGS,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._groups = groups
        self._privacy = privacy
        self._broker = broker
        self._max_members = max_group_members
        self._default_settings = default_settings
        self._clock = clock

    async def member_group(self, conv: str, user: str) -> tuple[Group, GroupMember]:
        """The group named by conv and user's membership in it (bad_conv / not_found / not_member)."""
        gid = group_id(conv)
        group = await self._groups.group(gid) if gid is not None else None
        member = as_group_member(group, group.member(user) if group is not None else None)
        assert group is not None  # as_group_member raised otherwise
        return group, member

    async def admin_group(self, conv: str, user: str) -> Group:
        group, member = await self.member_group(conv, user)
        if member.role != "admin":
            raise RequestError(ErrorCode.FORBIDDEN, "only the group's admins may do this")
        return group

    async def create(self, *, creator: str, name: str, kind: str, members: Sequence[str]) -> Group:
        everyone = tuple(dict.fromkeys((creator, *members)))
        if kind == "group" and len(everyone) > self._max_members:
            raise RequestError(ErrorCode.TOO_LARGE, f"a group has at most {self._max_members} members")
        await self._require_consent(creator, list(everyone))
        group = await self._groups.create_group(
            conv=new_group_id(), name=name, kind=kind, creator=creator, members=everyone, ts=self._clock.time_ms()
        )
        await self._announce(group, "created", list(group.users), creator, added=list(group.users))
        return group

    async def add_members(self, conv: str, *, by: str, users: Sequence[str]) -> Group:
        group = await self.admin_group(conv, by)
        self._broker.require()
        new = [u for u in dict.fromkeys(users) if group.member(u) is None]
        if group.kind == "group" and len(group.members) + len(new) > self._max_members:
            raise RequestError(ErrorCode.TOO_LARGE, f"a group has at most {self._max_members} members")
        await self._require_consent(by, new)
        group = await self._groups.add_members(conv=group.conv, users=tuple(new), ts=self._clock.time_ms())
        if new:
            await self._announce(group, "members_added", new, by, added=new)
        return group

    async def remove_member(self, conv: str, *, by: str, user: str) -> Group:
        """An admin removes user, or user leaves."""
        if user == by:
            group, _ = await self.member_group(conv, by)
        else:
            group = await self.admin_group(conv, by)
        if group.member(user) is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such member")
        self._broker.require()
        group = await self._groups.remove_member(conv=group.conv, user=user)
        await self._announce(group, "members_removed", [user], by, removed=[user])
        return group

    async def promote(self, conv: str, *, by: str, user: str) -> Group:
        group = await self.admin_group(conv, by)
        if group.member(user) is None:
            raise RequestError(ErrorCode.NOT_FOUND, "no such member")
        group = await self._groups.set_role(conv=group.conv, user=user, role="admin")
        await self._announce(group, "admin_added", [user], by)
        return group

    async def _require_consent(self, adder: str, users: list[str]) -> None:
        refusing = await refusing_to_be_added(
            adder, users, groups=self._groups, privacy=self._privacy, default=self._default_settings
        )
        if refusing:
            names = ", ".join(refusing[:5]) + (f" and {len(refusing) - 5} more" if len(refusing) > 5 else "")
            raise RequestError(ErrorCode.FORBIDDEN, f"{names} may not be added by you (their privacy settings)")

    async def _announce(
        self,
        group: Group,
        event: str,
        users: list[str],
        by: str,
        *,
        added: Sequence[str] = (),
        removed: Sequence[str] = (),
    ) -> None:
        """A `conv` event to every member of a group; for a channel, once on its topic and to the
        users it names (so a new member learns to subscribe and a removed one to stop). Before
        it, the membership change to the broker, which drops its cached answers and a removed
        member's channel subscription."""
        payload = encode(
            {"type": "conv", "conv": group.conv, "kind": group.kind, "event": event, "users": users, "by": by}
        )
        out = [membership_change(group.conv, group.kind, added=added, removed=removed)]  # the ACL before the news
        if group.kind == "channel":
            out.append(Outgoing(channel_topic(group.conv), payload))
            out += [Outgoing(user_in_topic(u), payload) for u in dict.fromkeys((*users, by))]
        else:
            out += [Outgoing(user_in_topic(u), payload) for u in dict.fromkeys((*group.users, *removed))]
        await self._broker.publish(out)
