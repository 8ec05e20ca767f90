"""Group and channel routes (bridge.groups decides and announces)."""

from typing import Any

from fastapi import APIRouter

from bridge.http.context import ERROR_RESPONSES, Api, Caller, ConvPath, IdPath
from bridge.http.schemas import GroupIn, GroupOut, MembersIn
from storage.records import Group

router = APIRouter(responses=ERROR_RESPONSES)


def render_group(group: Group) -> dict[str, Any]:
    return {
        "conv": group.conv,
        "name": group.name,
        "kind": group.kind,
        "creator": group.creator,
        "created_at": group.created_at,
        "members": [{"user": m.user, "role": m.role, "joined_seq": m.joined_seq} for m in group.members],
    }


@router.post("/v1/groups", status_code=201, response_model=GroupOut, summary="New group")
async def create_group(body: GroupIn, who: Caller, api: Api) -> dict[str, Any]:
    group = await api.groups.create(creator=who.user, name=body.name, kind=body.kind, members=body.members)
    return render_group(group)


@router.get("/v1/groups/{conv}", response_model=GroupOut, summary="A group you are in")
async def get_group(conv: ConvPath, who: Caller, api: Api) -> dict[str, Any]:
    group, _ = await api.groups.member_group(conv, who.user)
    return render_group(group)


@router.post("/v1/groups/{conv}/members", response_model=GroupOut, summary="Add members")
async def add_members(conv: ConvPath, body: MembersIn, who: Caller, api: Api) -> dict[str, Any]:
    return render_group(await api.groups.add_members(conv, by=who.user, users=body.members))


@router.delete(
    "/v1/groups/{conv}/members/{user}", response_model=GroupOut, summary="Remove a member (admins), or leave (yourself)"
)
async def remove_member(conv: ConvPath, user: IdPath, who: Caller, api: Api) -> dict[str, Any]:
    return render_group(await api.groups.remove_member(conv, by=who.user, user=user))


@router.post("/v1/groups/{conv}/admins/{user}", response_model=GroupOut, summary="Promote")
async def promote(conv: ConvPath, user: IdPath, who: Caller, api: Api) -> dict[str, Any]:
    return render_group(await api.groups.promote(conv, by=who.user, user=user))
