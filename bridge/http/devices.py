"""Push-token routes of a device (bridge.devices)."""

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from bridge.http.context import ERROR_RESPONSES, Api, Caller, IdPath
from bridge.http.schemas import PushTokenIn, PushTokenOut

router = APIRouter(responses=ERROR_RESPONSES)


@router.put(
    "/v1/devices/{device}/push",
    response_model=PushTokenOut,
    summary="Register this device's APNs/FCM token (a token moves with its latest registration)",
)
async def put_push_token(device: IdPath, body: PushTokenIn, who: Caller, api: Api) -> dict[str, Any]:
    await api.devices.register_push(
        who, device, platform=body.platform, token=body.token, topic=body.topic, sandbox=body.sandbox
    )
    return {"device": device, "platform": body.platform, "sandbox": body.sandbox}


@router.delete("/v1/devices/{device}/push", status_code=204, summary="Stop pushing to this device")
async def delete_push_token(device: IdPath, who: Caller, api: Api) -> Response:
    await api.devices.remove_push(who, device)
    return Response(status_code=204)
