"""Settings routes: your privacy, and a conversation's mute and encryption flags
(bridge.settings)."""

from typing import Any

from fastapi import APIRouter

from bridge.http.context import ERROR_RESPONSES, Api, Caller, ConvPath
from bridge.http.schemas import PrivacyIn, PrivacyOut, SettingsIn, SettingsOut
from storage.records import UserSettings

router = APIRouter(responses=ERROR_RESPONSES)


def render_privacy(settings: UserSettings) -> dict[str, Any]:
    return {"who_may_add_me": settings.who_may_add, "presence": settings.presence}


@router.get("/v1/me/settings", response_model=PrivacyOut, summary="Your privacy settings")
async def get_my_settings(who: Caller, api: Api) -> dict[str, Any]:
    return render_privacy(await api.settings.privacy(who.user))


@router.put(
    "/v1/me/settings", response_model=PrivacyOut, summary="Who may add you to groups and channels; who sees you online"
)
async def put_my_settings(body: PrivacyIn, who: Caller, api: Api) -> dict[str, Any]:
    settings = await api.settings.set_privacy(who.user, who_may_add=body.who_may_add_me, presence=body.presence)
    return render_privacy(settings)


@router.put(
    "/v1/conversations/{conv}/settings",
    response_model=SettingsOut,
    summary="Mute a conversation (yours) or mark it end-to-end encrypted (everyone's)",
)
async def put_settings(conv: ConvPath, body: SettingsIn, who: Caller, api: Api) -> dict[str, Any]:
    settings = await api.settings.set_conversation(who.user, conv, muted=body.muted, e2e=body.e2e)
    return {"conv": settings.conv, "muted": settings.muted, "e2e": settings.e2e}
