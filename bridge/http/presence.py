"""The presence route (bridge.visibility decides who may see whom)."""

from typing import Annotated, Any

from fastapi import APIRouter, Query

from bridge.http.context import ERROR_RESPONSES, Api, Caller
from bridge.http.schemas import PresencePage
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import ID_PATTERN, is_valid_id

MAX_PRESENCE_USERS = 200

router = APIRouter(responses=ERROR_RESPONSES)


@router.get(
    "/v1/presence",
    response_model=PresencePage,
    summary="Online state and last seen of users you share a conversation with (and yourself)",
)
async def get_presence(
    who: Caller,
    api: Api,
    users: Annotated[
        str,
        Query(
            min_length=1,
            max_length=65 * MAX_PRESENCE_USERS - 1,
            pattern=f"^{ID_PATTERN}(,{ID_PATTERN}){{0,{MAX_PRESENCE_USERS - 1}}}$",
            description="a,b,c (at most 200)",
        ),
    ],
) -> dict[str, Any]:
    wanted = list(dict.fromkeys(u for u in users.split(",") if u))
    if not wanted or len(wanted) > MAX_PRESENCE_USERS or not all(is_valid_id(u) for u in wanted):
        raise RequestError(ErrorCode.BAD_REQUEST, f"users: 1 to {MAX_PRESENCE_USERS} user ids, comma-separated")
    found = await api.visibility.presence(who.user, wanted)
    return {"users": [{"user": u, **found[u].envelope()} for u in wanted]}
