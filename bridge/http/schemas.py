"""The HTTP API's request and response bodies (their names are the OpenAPI schema names)."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bridge.groups import MAX_MEMBERS_PER_CALL
from mqchat.ids import ID_PATTERN


class ErrorBody(BaseModel):
    error: str = Field(description="stable error code")
    message: str


class Attachment(BaseModel):
    id: str
    type: str = Field(description="content type (application/octet-stream when encrypted)")
    size: int = Field(description="bytes")
    name: str | None = Field(default=None, description="the file name the sender gave (never for encrypted files)")
    width: int | None = Field(default=None, description="images: pixels, as displayed")
    height: int | None = None
    thumbnail: str | None = Field(default=None, description="images: a small JPEG, base64")
    encrypted: bool | None = Field(default=None, description="an end-to-end encrypted blob (opaque to the server)")


class MediaInfo(Attachment):
    state: Literal["uploading", "ready"]
    offset: int = Field(description="bytes received (the size when ready)")
    sha256: str
    upload_url: str = Field(description="where the upload's bytes go (tus: HEAD, PATCH, DELETE)")


class DirectUploadIn(BaseModel):
    model_config = ConfigDict(strict=True)

    size: int = Field(ge=1)
    type: str | None = Field(default=None, max_length=129, description="content type (not needed when encrypted)")
    sha256: str = Field(min_length=64, max_length=64, description="hex digest of the file")
    name: str = Field(default="", max_length=255)
    encrypted: bool = False


class DirectUploadOut(BaseModel):
    id: str
    url: str = Field(description="PUT the file's bytes here")
    headers: dict[str, str] = Field(description="send these headers with the PUT")
    expires_in: float = Field(description="seconds the URL is valid")


class MessageOut(BaseModel):
    type: str = "msg"
    conv: str
    seq: int
    mid: str
    from_: str = Field(alias="from")
    dev: str
    id: str
    ts: int
    kind: str
    body: str
    media: list[str] | None = None
    attachments: list[Attachment] | None = Field(default=None, description="what is known of each media id")


class ConversationOut(BaseModel):
    conv: str
    kind: str
    last_seq: int
    delivered: int = Field(description="your delivered watermark")
    read: int = Field(description="your read watermark")
    unread: int = Field(description="last_seq - read")
    updated_at: int = Field(description="ms since the epoch of the last change")
    messages: list[MessageOut] | None = Field(
        default=None, description="with include_messages=N: the newest N messages, ascending"
    )
    messages_more: bool | None = Field(default=None, description="older messages exist before `messages`")


class ConversationsPage(BaseModel):
    conversations: list[ConversationOut]
    cursor: str = Field(description="pass as `since` next time")
    more: bool = Field(description="more changes wait: call again with the new cursor now")


class MessagesPage(BaseModel):
    conv: str
    messages: list[MessageOut]
    more: bool = Field(description="more messages exist in the direction of the read")
    last_seq: int = Field(description="the conversation's highest seq right now")


class GroupIn(BaseModel):
    model_config = ConfigDict(strict=True)  # 0 is not false, "1" is not true: what the schema says

    name: str = Field(min_length=1, max_length=200)
    members: list[Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]] = Field(
        default_factory=list, max_length=MAX_MEMBERS_PER_CALL, description="at most 1,000; add more in further calls"
    )
    kind: str = Field(default="group", pattern="^(group|channel)$")


class MembersIn(BaseModel):
    model_config = ConfigDict(strict=True)  # 0 is not false, "1" is not true: what the schema says

    members: list[Annotated[str, Field(pattern=f"^{ID_PATTERN}$")]] = Field(
        min_length=1, max_length=MAX_MEMBERS_PER_CALL, description="at most 1,000; add more in further calls"
    )


class GroupMemberOut(BaseModel):
    user: str
    role: str
    joined_seq: int = Field(description="the first seq this member can read")


class GroupOut(BaseModel):
    conv: str
    name: str
    kind: str
    creator: str
    created_at: int
    members: list[GroupMemberOut]


class PresenceOut(BaseModel):
    user: str
    state: str = Field(description="online | offline")
    last_seen: int | None = Field(description="ms since the epoch: online since, or last seen; null: never seen")


class PresencePage(BaseModel):
    users: list[PresenceOut]


class PushTokenIn(BaseModel):
    model_config = ConfigDict(strict=True)  # 0 is not false, "1" is not true: what the schema says

    platform: str = Field(pattern="^(apns|fcm)$")
    token: str = Field(min_length=1, max_length=4096, pattern=r"^[\x21-\x7e]+$")
    topic: str | None = Field(
        default=None, max_length=255, description="APNs: the app's bundle id, if not the server's"
    )
    sandbox: bool = Field(default=False, description="APNs: a development build (Apple's sandbox)")


class PushTokenOut(BaseModel):
    device: str
    platform: str
    sandbox: bool


class SettingsIn(BaseModel):
    model_config = ConfigDict(strict=True)  # 0 is not false, "1" is not true: what the schema says

    muted: bool | None = Field(default=None, description="yours: no alert for this conversation (badge still updates)")
    e2e: bool | None = Field(
        default=None, description="the conversation's: bodies are ciphertext, pushes carry no text (groups: admins)"
    )


class PrivacyIn(BaseModel):
    model_config = ConfigDict(strict=True)

    who_may_add_me: str | None = Field(
        default=None,
        pattern="^(everyone|contacts|nobody)$",
        description="who may add you to a group or channel: everyone; contacts (users you share a conversation "
        "with); nobody",
    )
    presence: str | None = Field(
        default=None, pattern="^(contacts|nobody)$", description="who sees you online: contacts; nobody"
    )


class PrivacyOut(BaseModel):
    who_may_add_me: str
    presence: str


class SettingsOut(BaseModel):
    conv: str
    muted: bool
    e2e: bool


class EmqxHookRequest(BaseModel):
    """The strings of an EMQX hook request take any text, lone surrogates included (pydantic
    refuses those under a length constraint): the limits are declared in the schema only, and
    the route answers "deny" to a request past them (within_limits) rather than 400, which EMQX
    takes as "ignore"."""

    model_config = ConfigDict(extra="ignore")

    def within_limits(self) -> bool:
        """Every field within the ``maxLength`` its schema declares."""
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra
            limit = extra.get("maxLength") if isinstance(extra, dict) else None
            if isinstance(limit, int) and len(getattr(self, name)) > limit:
                return False
        return True


def any_text(max_length: int) -> Any:
    """A string field of EmqxHookRequest: any text, its limit checked by within_limits."""
    return Field(json_schema_extra={"maxLength": max_length})


class EmqxAuthnRequest(EmqxHookRequest):
    """What EMQX 5's HTTP authenticator is configured to send (see the README)."""

    clientid: str = any_text(1024)
    username: str = any_text(1024)
    password: str = any_text(16384)


class EmqxAuthzRequest(EmqxHookRequest):
    """What EMQX 5's HTTP authorizer is configured to send (see the README)."""

    clientid: str = any_text(1024)
    username: str = any_text(1024)
    topic: str = any_text(65535)
    action: Literal["publish", "subscribe"]


class EmqxAuthnAnswer(BaseModel):
    result: Literal["allow", "deny"]
    is_superuser: bool = False
    expire_at: int | None = Field(default=None, description="unix seconds: the token's expiry (EMQX 5.8+)")


class EmqxAuthzAnswer(BaseModel):
    result: Literal["allow", "deny"]


class LogoutOut(BaseModel):
    user: str
    device: str | None = Field(description="the device logged out; null: every device of the user")
    revoked_before: int = Field(description="ms since the epoch: tokens issued before it are refused")


class DeviceOut(BaseModel):
    device: str
    connected: bool = Field(description="connected to the server now")
    push: str | None = Field(description="the platform of its push token (apns, fcm); null: none")


class DevicesOut(BaseModel):
    user: str
    devices: list[DeviceOut]


class DeletionOut(BaseModel):
    user: str
    status: Literal["deleting", "deleted"]
    started_at: int = Field(description="ms since the epoch when the deletion was asked for")
