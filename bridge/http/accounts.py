"""Logout and account deletion (bridge.accounts): a user's own routes under ``/v1/me``, and the
admin API under ``/admin/v1`` for a service holding the admin credential (``mqchat.tokens``)."""

import asyncio
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from bridge.accounts import DeletionState
from bridge.http.context import ERROR_RESPONSES, Api, ApiContext, Caller, IdPath, bearer_token
from bridge.http.schemas import DeletionOut, DevicesOut, LogoutOut
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import is_valid_id
from mqchat.tokens import is_credential

router = APIRouter(responses=ERROR_RESPONSES, tags=["accounts"])
admin = APIRouter(responses=ERROR_RESPONSES, tags=["admin"])

FRESH_TOKEN_S = 300
"""Deleting one's own account takes a token issued within this many seconds (a fresh sign-in)."""
DELETION_WAIT_S = 20.0
"""How long a deletion call waits for the erasure before answering 202 (it goes on regardless)."""


def _id(value: str, what: str) -> str:
    if not is_valid_id(value):
        raise RequestError(ErrorCode.BAD_REQUEST, f"not a {what} id (1-64 of A-Z a-z 0-9 _ . @ -)")
    return value


async def _logout(api: ApiContext, user: str, device: str | None) -> dict[str, Any]:
    before = await api.accounts.logout(user, device)
    return {"user": user, "device": device, "revoked_before": before}


async def _delete(api: ApiContext, user: str) -> JSONResponse:
    state = await api.accounts.begin_deletion(user)
    running = api.deletions.run(user)
    try:
        async with asyncio.timeout(DELETION_WAIT_S):
            await asyncio.shield(running)
    except TimeoutError:
        return JSONResponse(_deletion(state), status_code=202)
    except Exception:  # the job failed: it is resumed by the sweep; the caller may ask again
        return JSONResponse(_deletion(state), status_code=202)
    return JSONResponse(_deletion(DeletionState(user, state.started_at, True)), status_code=200)


def _deletion(state: DeletionState) -> dict[str, Any]:
    return {"user": state.user, "status": "deleted" if state.finished else "deleting", "started_at": state.started_at}


# --- the user's own ------------------------------------------------------------------------------


@router.post("/v1/me/logout", response_model=LogoutOut, summary="Log this device out (its token stops working)")
async def logout_self(who: Caller, api: Api) -> dict[str, Any]:
    return await _logout(api, who.user, who.device)


@router.post(
    "/v1/me/devices/{device}/logout",
    response_model=LogoutOut,
    summary="Log another of your devices out: its connections close and its tokens stop working",
)
async def logout_device(device: IdPath, who: Caller, api: Api) -> dict[str, Any]:
    return await _logout(api, who.user, _id(device, "device"))


@router.delete(
    "/v1/me",
    response_model=DeletionOut,
    responses={202: {"model": DeletionOut, "description": "the erasure goes on; ask again for its end"}},
    summary="Delete your account (needs a token issued in the last 5 minutes)",
)
async def delete_self(who: Caller, api: Api) -> JSONResponse:
    if who.issued_at is None or time.time() - who.issued_at > FRESH_TOKEN_S:
        raise RequestError(
            ErrorCode.FORBIDDEN, "deleting an account needs a fresh sign-in (a token under 5 minutes old)"
        )
    return await _delete(api, who.user)


# --- admin ---------------------------------------------------------------------------------------


async def admin_caller(request: Request, api: Api) -> None:
    """The caller holds the admin credential (a bearer token)."""
    if not is_credential(bearer_token(request), api.admin_credential):
        raise RequestError(ErrorCode.UNAUTHORIZED, "the admin API needs the admin credential as a bearer token")


Admin = Annotated[None, Depends(admin_caller)]


@admin.get("/admin/v1/users/{user}/devices", response_model=DevicesOut, summary="A user's devices and their state")
async def user_devices(user: IdPath, api: Api, _: Admin) -> dict[str, Any]:
    _id(user, "user")
    return {"user": user, "devices": await api.accounts.devices(user)}


@admin.post(
    "/admin/v1/users/{user}/devices/{device}/logout",
    response_model=LogoutOut,
    summary="Kick a device: its connections close on every node, its push token and tokens stop working",
)
async def kick_device(user: IdPath, device: IdPath, api: Api, _: Admin) -> dict[str, Any]:
    return await _logout(api, _id(user, "user"), _id(device, "device"))


@admin.post("/admin/v1/users/{user}/logout", response_model=LogoutOut, summary="Log every device of a user out")
async def logout_user(user: IdPath, api: Api, _: Admin) -> dict[str, Any]:
    return await _logout(api, _id(user, "user"), None)


@admin.delete(
    "/admin/v1/users/{user}",
    response_model=DeletionOut,
    responses={202: {"model": DeletionOut, "description": "the erasure goes on; ask again for its end"}},
    summary="Delete a user's account (idempotent; resumed after a crash)",
)
async def delete_user(user: IdPath, api: Api, _: Admin) -> JSONResponse:
    return await _delete(api, _id(user, "user"))


@admin.get("/admin/v1/users/{user}/deletion", response_model=DeletionOut, summary="Where a user's deletion stands")
async def deletion_state(user: IdPath, api: Api, _: Admin) -> dict[str, Any]:
    state = await api.accounts.deletion_state(_id(user, "user"))
    if state is None:
        raise RequestError(ErrorCode.NOT_FOUND, "no deletion of this user was asked for")
    return _deletion(state)
