"""What every route receives: the caller, the services (one ``ApiContext`` on ``app.state``),
and the shared shapes of path parameters and error answers."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from bridge.accounts import AccountDeletions, AccountService
from bridge.broker_hooks import BrokerHooks
from bridge.devices import DeviceService
from bridge.groups import GroupService
from bridge.history import History
from bridge.http.schemas import ErrorBody
from bridge.media.service import MediaService
from bridge.settings import SettingsService
from bridge.visibility import Visibility
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import ID_PATTERN
from mqchat.tokens import Identity


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiContext:
    """The services behind the routes, and what /healthz reports."""

    history: History
    groups: GroupService
    settings: SettingsService
    devices: DeviceService
    visibility: Visibility
    hooks: BrokerHooks
    broker_connected: Callable[[], bool]  # the bridge reaches the broker now
    dead_workers: Callable[[], list[str]]  # background workers that died
    accounts: AccountService
    deletions: AccountDeletions
    node: str = ""  # this node's name in a cluster ("": unnamed)
    admin_credential: str = ""  # what the admin API's callers present ("": the admin API is closed)
    media: MediaService | None = None  # None: media is not served by this app (503)


def bearer_token(request: Request) -> str:
    """The request's bearer token ("" when it has none)."""
    scheme, _, credential = request.headers.get("authorization", "").partition(" ")
    return credential.strip() if scheme.lower() == "bearer" else ""


async def api_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.api
    return context


async def identity(request: Request) -> Identity:
    """The caller, authenticated (and their rate budget taken) by the Authenticate middleware
    before the body was read."""
    who = getattr(request.state, "identity", None)
    if not isinstance(who, Identity):
        raise RequestError(ErrorCode.UNAUTHORIZED, "missing bearer token")
    return who


Api = Annotated[ApiContext, Depends(api_context)]
Caller = Annotated[Identity, Depends(identity)]

# Path parameters: their patterns are documented (OpenAPI) and checked by the routes themselves,
# which answer bad_conv / bad_request (400) with the protocol's own codes.
CONV_PATTERN = f"^(dm:{ID_PATTERN}:{ID_PATTERN}|g:[0-9A-HJKMNP-TV-Z]{{26}})$"
ConvPath = Annotated[
    str, Path(description="dm:{a}:{b} (a, b sorted) or g:{ulid}", json_schema_extra={"pattern": CONV_PATTERN})
]
IdPath = Annotated[str, Path(description="a user or device id", json_schema_extra={"pattern": f"^{ID_PATTERN}$"})]

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 413, 429, 503)
}
