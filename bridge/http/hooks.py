"""EMQX 5's HTTP hooks: authentication at CONNECT, authorisation at each publish and subscribe
(bridge.broker_hooks decides). EMQX presents the hooks credential (``mqchat.tokens``) as a
bearer token; any other caller gets 401. A malformed body (not JSON, a field missing or of another type)
gets 400, which EMQX takes as "ignore": configure it to deny what no authenticator or authorizer
allows (see the README). Fields of any text are answered: over their length limits with "deny",
and any other text (lone surrogates included) by the usual checks."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from bridge.http.context import ERROR_RESPONSES, Api, bearer_token
from bridge.http.schemas import EmqxAuthnAnswer, EmqxAuthnRequest, EmqxAuthzAnswer, EmqxAuthzRequest
from mqchat.errors import ErrorCode, RequestError

router = APIRouter(responses=ERROR_RESPONSES, tags=["broker hooks"])


async def broker_caller(request: Request, api: Api) -> None:
    """The caller is the broker: it presents the hooks credential (derived from the JWT secret)."""
    if not api.hooks.is_broker(bearer_token(request)):
        raise RequestError(ErrorCode.UNAUTHORIZED, "the broker hooks need the hooks credential as a bearer token")


Broker = Annotated[None, Depends(broker_caller)]


@router.post(
    "/hooks/emqx/authn",
    response_model=EmqxAuthnAnswer,
    response_model_exclude_none=True,
    summary="EMQX 5 HTTP authentication: may this client connect?",
)
async def emqx_authenticate(body: EmqxAuthnRequest, api: Api, _: Broker) -> dict[str, Any]:
    if not body.within_limits():
        return {"result": "deny", "is_superuser": False}
    admission = await api.hooks.authenticate(username=body.username, password=body.password, clientid=body.clientid)
    answer: dict[str, Any] = {"result": "allow" if admission.allowed else "deny", "is_superuser": admission.superuser}
    if admission.expires_at is not None:
        answer["expire_at"] = admission.expires_at
    return answer


@router.post(
    "/hooks/emqx/authz",
    response_model=EmqxAuthzAnswer,
    summary="EMQX 5 HTTP authorisation: may this client publish to or subscribe to this topic?",
)
async def emqx_authorize(body: EmqxAuthzRequest, api: Api, _: Broker) -> dict[str, Any]:
    if not body.within_limits():
        return {"result": "deny"}
    allowed = await api.hooks.authorize(
        username=body.username, clientid=body.clientid, topic=body.topic, action=body.action
    )
    return {"result": "allow" if allowed else "deny"}
