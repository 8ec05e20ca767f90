"""Push providers against local APNs and FCM servers: the real aioapns and firebase-admin clients, over real
sockets (HTTP/2 + TLS for APNs, HTTP/1.1 for FCM), with replies scripted per device token."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import google.oauth2.credentials
import pytest

from push.apns import ApnsProvider, apns_result
from push.base import (
    Outcome,
    PushConfigError,
    PushMessage,
    PushProvider,
    PushResult,
    derive_notification_id,
    send_with_retries,
    token_fingerprint,
)
from push.fcm import FcmProvider
from push.log import LogProvider
from tests.fakes.apns import ApnsReply, FakeApns, new_p256_key_pem
from tests.fakes.fcm import DEFAULT_ACCESS_TOKEN, FakeFcm, FcmReply

TOPIC = "chat.mqchat.app"
APNS_TOKEN = "a1" * 32
FCM_TOKEN = "fcm-registration-token:APA91b" + "x" * 40


def apns_msg(token: str = APNS_TOKEN, **fields: Any) -> PushMessage:
    fields.setdefault("collapse_id", "conv-1")
    fields.setdefault("notification_id", str(uuid.uuid4()))
    return PushMessage(platform="apns", token=token, **fields)


def fcm_msg(token: str = FCM_TOKEN, **fields: Any) -> PushMessage:
    fields.setdefault("collapse_id", "conv-1")
    fields.setdefault("notification_id", str(uuid.uuid4()))
    return PushMessage(platform="fcm", token=token, **fields)


class Sleeps:
    """Stands in for asyncio.sleep in send_with_retries: records the delays, does not wait."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


# --- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
async def apns() -> AsyncIterator[FakeApns]:
    async with FakeApns() as fake:
        yield fake


def make_apns_provider(apns: FakeApns, **settings: Any) -> ApnsProvider:
    settings.setdefault("key_pem", apns.key_pem)
    settings.setdefault("timeout_s", 3.0)
    return ApnsProvider(
        key_id=apns.key_id,
        team_id=apns.team_id,
        topic=TOPIC,
        host="127.0.0.1",
        sandbox_host="localhost",
        port=apns.port,
        ca_file=apns.ca_file,
        **settings,
    )


@pytest.fixture
async def apns_provider(apns: FakeApns, tmp_path: Path) -> AsyncIterator[ApnsProvider]:
    key_file = tmp_path / "AuthKey_TEST.p8"
    key_file.write_text(apns.key_pem)
    async with make_apns_provider(apns, key_pem=None, key_file=key_file) as provider:
        yield provider


@pytest.fixture
async def fcm() -> AsyncIterator[FakeFcm]:
    async with FakeFcm() as fake:
        yield fake


def make_fcm_provider(fcm: FakeFcm, **settings: Any) -> FcmProvider:
    if "service_account_file" not in settings:
        settings.setdefault("credentials", google.oauth2.credentials.Credentials(token=DEFAULT_ACCESS_TOKEN))
        settings.setdefault("project_id", fcm.project_id)
    settings.setdefault("timeout_s", 3.0)
    return FcmProvider(endpoint=fcm.url, **settings)


@pytest.fixture
async def fcm_provider(fcm: FakeFcm) -> AsyncIterator[FcmProvider]:
    async with make_fcm_provider(fcm) as provider:
        yield provider


# --- messages, results, retries (no network) ---------------------------------------------------------


def test_message_validation_and_token_redaction() -> None:
    msg = apns_msg(notification_id=derive_notification_id("alice/phone/conv-1/42").upper())
    assert msg.notification_id == derive_notification_id("alice/phone/conv-1/42")  # canonical, stable
    assert APNS_TOKEN not in repr(msg)
    assert msg.token_fingerprint == token_fingerprint(APNS_TOKEN)
    assert APNS_TOKEN[:16] not in msg.token_fingerprint
    with pytest.raises(ValueError, match="UUID"):
        apns_msg(notification_id="retry-1")
    with pytest.raises(ValueError, match="reserved"):
        apns_msg(data={"aps": "x"})
    with pytest.raises(ValueError, match="reserved"):
        fcm_msg(data={"google.sent_time": "1"})
    with pytest.raises(ValueError, match="priority"):
        apns_msg(priority="urgent")


@pytest.mark.parametrize(
    ("status", "reason", "outcome"),
    [
        ("200", None, Outcome.DELIVERED),
        ("410", "Unregistered", Outcome.INVALID_TOKEN),
        ("410", "ExpiredToken", Outcome.INVALID_TOKEN),
        ("400", "BadDeviceToken", Outcome.INVALID_TOKEN),
        ("400", "DeviceTokenNotForTopic", Outcome.INVALID_TOKEN),
        ("400", "BadCollapseId", Outcome.REJECTED),
        ("400", "PayloadEmpty", Outcome.REJECTED),
        ("400", "TopicDisallowed", Outcome.AUTH_ERROR),
        ("403", "InvalidProviderToken", Outcome.AUTH_ERROR),
        ("403", "ExpiredProviderToken", Outcome.AUTH_ERROR),
        ("413", "PayloadTooLarge", Outcome.REJECTED),
        ("429", "TooManyRequests", Outcome.RETRY),
        ("500", "InternalServerError", Outcome.RETRY),
        ("503", "ServiceUnavailable", Outcome.RETRY),
    ],
)
def test_apns_status_table(status: str, reason: str | None, outcome: Outcome) -> None:
    assert apns_result(status, reason).outcome is outcome


class ScriptedProvider(PushProvider):
    """A provider answering from a list, for the retry policy alone."""

    platform = "apns"

    def __init__(self, results: Sequence[PushResult]) -> None:
        self.results = list(results)
        self.sent: list[PushMessage] = []

    async def send(self, msg: PushMessage) -> PushResult:
        self.sent.append(msg)
        return self.results.pop(0)


async def test_retry_policy_backoff_jitter_and_retry_after_cap() -> None:
    retry = PushResult(Outcome.RETRY, "503", "ServiceUnavailable")
    slow_down = PushResult(Outcome.RETRY, "429", "TooManyRequests", retry_after_s=120.0)
    provider = ScriptedProvider([retry, slow_down, retry, retry, PushResult(Outcome.DELIVERED, "200")])
    sleeps = Sleeps()
    result = await send_with_retries(provider, apns_msg(), attempts=5, base_delay_s=0.5, max_delay_s=4.0, sleep=sleeps)
    assert result.outcome is Outcome.DELIVERED
    assert len(provider.sent) == 5
    assert len({m.notification_id for m in provider.sent}) == 1
    assert 0 <= sleeps.delays[0] <= 0.5
    assert sleeps.delays[1] == 4.0  # Retry-After honoured, capped at max_delay_s
    assert 0 <= sleeps.delays[2] <= 2.0
    assert 0 <= sleeps.delays[3] <= 4.0

    gone = ScriptedProvider([PushResult(Outcome.INVALID_TOKEN, "410", "Unregistered")])
    assert (await send_with_retries(gone, apns_msg(), sleep=sleeps)).delete_token
    assert len(gone.sent) == 1


# --- APNs ------------------------------------------------------------------------------------------


async def test_apns_alert_delivered_with_headers_and_payload(apns: FakeApns, apns_provider: ApnsProvider) -> None:
    msg = apns_msg(
        title="Alice",
        body="lunch?",
        badge=3,
        priority="high",
        collapse_id="conv-42",
        data={"conv": "conv-42", "seq": "17"},
        ttl_s=600,
    )
    result = await apns_provider.send(msg)
    assert result.outcome is Outcome.DELIVERED
    assert result.status == "200"
    assert result.message_id == msg.notification_id

    [request] = apns.requests
    assert request.token == APNS_TOKEN
    assert request.headers[":path"] == f"/3/device/{APNS_TOKEN}"
    assert request.headers["apns-id"] == msg.notification_id
    assert request.headers["apns-topic"] == TOPIC
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-collapse-id"] == "conv-42"
    assert abs(int(request.headers["apns-expiration"]) - (time.time() + 600)) < 5
    assert request.headers["host"] == "127.0.0.1"
    assert request.aps == {
        "alert": {"title": "Alice", "body": "lunch?"},
        "sound": "default",
        "badge": 3,
        "thread-id": "conv-42",
    }
    assert request.payload["conv"] == "conv-42"
    assert request.payload["seq"] == "17"

    # Group conversation: normal priority; a per-message topic overrides the provider's.
    await apns_provider.send(apns_msg(body="hi all", priority="normal", topic="chat.mqchat.app.beta"))
    assert apns.requests[1].headers["apns-priority"] == "5"
    assert apns.requests[1].headers["apns-topic"] == "chat.mqchat.app.beta"
    assert apns.requests[1].aps["alert"] == {"body": "hi all"}


async def test_apns_content_free_is_mutable_with_no_text_of_ours(apns: FakeApns, apns_provider: ApnsProvider) -> None:
    msg = apns_msg(content_free=True, title="Alice", body="the secret plan", data={"conv": "c9", "seq": "3"})
    assert (await apns_provider.send(msg)).outcome is Outcome.DELIVERED
    [request] = apns.requests
    assert request.aps["mutable-content"] == 1
    assert request.aps["alert"] == {"body": "New message"}
    assert request.headers["apns-push-type"] == "alert"
    raw = json.dumps(request.payload)
    assert "secret plan" not in raw
    assert "Alice" not in raw
    assert request.payload["conv"] == "c9"


async def test_apns_badge_only_is_a_background_push(apns: FakeApns, apns_provider: ApnsProvider) -> None:
    assert (await apns_provider.send(apns_msg(badge=0, priority="high"))).outcome is Outcome.DELIVERED
    [request] = apns.requests
    assert request.headers["apns-push-type"] == "background"
    assert request.headers["apns-priority"] == "5"  # APNs requires 5 for background pushes
    assert request.aps == {"content-available": 1, "badge": 0, "thread-id": "conv-1"}


async def test_apns_sandbox_tokens_go_to_the_sandbox_host(apns: FakeApns, apns_provider: ApnsProvider) -> None:
    assert (await apns_provider.send(apns_msg(body="dev build", sandbox=True))).outcome is Outcome.DELIVERED
    assert apns.requests[0].headers["host"] == "localhost"

    forced = make_apns_provider(apns, use_sandbox=False)
    try:
        assert (await forced.send(apns_msg(body="dev build", sandbox=True))).outcome is Outcome.DELIVERED
    finally:
        await forced.aclose()
    assert apns.requests[1].headers["host"] == "127.0.0.1"


async def test_apns_unregistered_410_invalidates_the_token(apns: FakeApns, apns_provider: ApnsProvider) -> None:
    since_ms = int(time.time() * 1000) - 60_000
    apns.script(APNS_TOKEN, ApnsReply(410, "Unregistered", timestamp_ms=since_ms))
    result = await apns_provider.send(apns_msg(body="hi"))
    assert result.outcome is Outcome.INVALID_TOKEN
    assert result.delete_token
    assert (result.status, result.reason) == ("410", "Unregistered")
    assert result.token_invalid_since == since_ms / 1000


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [
        ((400, "BadDeviceToken"), Outcome.INVALID_TOKEN),
        ((400, "DeviceTokenNotForTopic"), Outcome.INVALID_TOKEN),
        ((400, "BadCollapseId"), Outcome.REJECTED),
        ((413, "PayloadTooLarge"), Outcome.REJECTED),
    ],
)
async def test_apns_400s(apns: FakeApns, apns_provider: ApnsProvider, reply: tuple[int, str], outcome: Outcome) -> None:
    apns.script(APNS_TOKEN, reply)
    sleeps = Sleeps()
    result = await send_with_retries(apns_provider, apns_msg(body="hi"), sleep=sleeps)
    assert result.outcome is outcome
    assert result.reason == reply[1]
    assert len(apns.requests) == 1  # neither is retried
    assert sleeps.delays == []


async def test_apns_429_is_retried_with_the_same_apns_id(apns: FakeApns, apns_provider: ApnsProvider) -> None:
    apns.script(APNS_TOKEN, (429, "TooManyRequests"))
    msg = apns_msg(body="hi")
    first = await apns_provider.send(msg)
    assert first.outcome is Outcome.RETRY
    assert first.status == "429"

    apns.script(APNS_TOKEN, (429, "TooManyRequests"))
    sleeps = Sleeps()
    result = await send_with_retries(apns_provider, msg, base_delay_s=0.01, sleep=sleeps)
    assert result.outcome is Outcome.DELIVERED
    assert len(sleeps.delays) == 1
    assert [r.status for r in apns.requests] == [429, 429, 200]
    assert {r.apns_id for r in apns.requests} == {msg.notification_id}


async def test_apns_5xx_retried_then_given_up(apns: FakeApns, apns_provider: ApnsProvider) -> None:
    apns.script(APNS_TOKEN, 503, 500, 503, 200)
    msg = apns_msg(body="hi")
    sleeps = Sleeps()
    result = await send_with_retries(apns_provider, msg, attempts=3, base_delay_s=0.01, sleep=sleeps)
    assert result.outcome is Outcome.RETRY
    assert (result.status, result.reason) == ("503", "ServiceUnavailable")
    assert [r.status for r in apns.requests] == [503, 500, 503]
    assert {r.apns_id for r in apns.requests} == {msg.notification_id}
    assert len(sleeps.delays) == 2
    assert all(0 <= d <= 0.02 for d in sleeps.delays)


async def test_apns_wrong_key_is_an_auth_error_not_a_dead_token(apns: FakeApns) -> None:
    provider = make_apns_provider(apns, key_pem=new_p256_key_pem())
    try:
        sleeps = Sleeps()
        result = await send_with_retries(provider, apns_msg(body="hi"), sleep=sleeps)
    finally:
        await provider.aclose()
    assert result.outcome is Outcome.AUTH_ERROR
    assert not result.delete_token
    assert (result.status, result.reason) == ("403", "InvalidProviderToken")
    assert len(apns.requests) == 1
    assert sleeps.delays == []


async def test_apns_timeout_is_honoured_and_the_connection_stays_usable(apns: FakeApns) -> None:
    provider = make_apns_provider(apns, timeout_s=0.3)
    try:
        apns.script(APNS_TOKEN, ApnsReply(hang=True), ApnsReply(hang=True))
        started = time.monotonic()
        result = await provider.send(apns_msg(body="hi"))
        assert result.outcome is Outcome.RETRY
        assert result.status == "timeout"
        assert 0.25 < time.monotonic() - started < 2

        # The caller's per-attempt timeout bounds a send too.
        started = time.monotonic()
        capped = await send_with_retries(provider, apns_msg(body="hi"), attempts=1, timeout_s=0.1, sleep=Sleeps())
        assert capped.status == "timeout"
        assert time.monotonic() - started < 0.3

        assert (await provider.send(apns_msg(body="again"))).outcome is Outcome.DELIVERED
        assert apns.connections_made == 1
    finally:
        await provider.aclose()


async def test_apns_send_many_gathers(apns: FakeApns, apns_provider: ApnsProvider) -> None:
    tokens = [f"{i:02x}" * 32 for i in range(6)]
    apns.script(tokens[2], (410, "Unregistered"))
    apns.script(tokens[4], 503)
    results = await apns_provider.send_many([apns_msg(t, body="hi") for t in tokens])
    outcomes = [r.outcome for r in results]
    assert outcomes == [Outcome.DELIVERED] * 2 + [Outcome.INVALID_TOKEN, Outcome.DELIVERED, Outcome.RETRY] + [
        Outcome.DELIVERED
    ]
    assert len(apns.requests) == 6


async def test_apns_misconfiguration_is_reported_at_construction(apns: FakeApns, tmp_path: Path) -> None:
    key = new_p256_key_pem()
    ok: dict[str, Any] = {"key_id": "KEYID12345", "team_id": "TEAMID1234", "topic": TOPIC}
    with pytest.raises(PushConfigError, match="cannot read"):
        ApnsProvider(key_file=tmp_path / "missing.p8", **ok)
    (tmp_path / "garbage.p8").write_text("not a key")
    with pytest.raises(PushConfigError, match="not a PEM private key"):
        ApnsProvider(key_file=tmp_path / "garbage.p8", **ok)
    with pytest.raises(PushConfigError, match="P-256"):
        ApnsProvider(key_pem=_rsa_pem(), **ok)
    with pytest.raises(PushConfigError, match="exactly one"):
        ApnsProvider(**ok)
    with pytest.raises(PushConfigError, match="key id"):
        ApnsProvider(key_pem=key, **(ok | {"key_id": "short"}))
    with pytest.raises(PushConfigError, match="CA file"):
        ApnsProvider(key_pem=key, ca_file=tmp_path / "missing-ca.pem", **ok)
    await ApnsProvider(key_pem=key, ca_file=apns.ca_file, **ok).aclose()  # fine: clients are built on first send


def _rsa_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return pem.decode()


# --- FCM -------------------------------------------------------------------------------------------


async def test_fcm_delivered_with_notification_and_android_mapping(fcm: FakeFcm, fcm_provider: FcmProvider) -> None:
    msg = fcm_msg(title="Alice", body="lunch?", badge=2, collapse_id="conv-42", data={"conv": "conv-42", "seq": "17"})
    result = await fcm_provider.send(msg)
    assert result.outcome is Outcome.DELIVERED
    assert result.message_id is not None
    assert result.message_id.startswith(f"projects/{fcm.project_id}/messages/")

    [request] = fcm.requests
    assert request.headers["authorization"] == f"Bearer {DEFAULT_ACCESS_TOKEN}"
    assert request.message["token"] == FCM_TOKEN
    assert request.message["notification"] == {"title": "Alice", "body": "lunch?"}
    assert request.data == {"conv": "conv-42", "seq": "17"}
    assert request.android["priority"] == "high"
    assert request.android["collapse_key"] == "conv-42"
    assert request.android["ttl"] == "86400s"
    assert request.android["notification"] == {"tag": "conv-42", "notification_count": 2}

    await fcm_provider.send(fcm_msg(body="hi all", priority="normal", collapse_id="group-7", ttl_s=60))
    assert fcm.requests[1].android["priority"] == "normal"
    assert fcm.requests[1].android["collapse_key"] == "group-7"
    assert fcm.requests[1].android["ttl"] == "60s"


async def test_fcm_content_free_is_data_only(fcm: FakeFcm, fcm_provider: FcmProvider) -> None:
    msg = fcm_msg(content_free=True, title="Alice", body="the secret plan", data={"conv": "c9", "seq": "3"})
    assert (await fcm_provider.send(msg)).outcome is Outcome.DELIVERED
    [request] = fcm.requests
    assert "notification" not in request.message
    assert "notification" not in request.android
    assert request.data == {"conv": "c9", "seq": "3"}
    assert "secret plan" not in json.dumps(request.message)


@pytest.mark.parametrize(
    ("reply", "outcome", "status"),
    [
        (FcmReply("UNREGISTERED"), Outcome.INVALID_TOKEN, "404"),
        (FcmReply("INVALID_ARGUMENT", field="message.token"), Outcome.INVALID_TOKEN, "400"),
        (FcmReply("INVALID_ARGUMENT", field="message.android.ttl"), Outcome.REJECTED, "400"),
        (FcmReply("SENDER_ID_MISMATCH"), Outcome.AUTH_ERROR, "403"),
        (FcmReply("PERMISSION_DENIED"), Outcome.AUTH_ERROR, "403"),
    ],
)
async def test_fcm_errors(
    fcm: FakeFcm, fcm_provider: FcmProvider, reply: FcmReply, outcome: Outcome, status: str
) -> None:
    fcm.script(FCM_TOKEN, reply)
    sleeps = Sleeps()
    result = await send_with_retries(fcm_provider, fcm_msg(body="hi"), sleep=sleeps)
    assert result.outcome is outcome
    assert result.status == status
    assert result.reason == reply.error
    assert len(fcm.requests) == 1
    assert sleeps.delays == []


async def test_fcm_429_honours_retry_after_then_delivers(fcm: FakeFcm, fcm_provider: FcmProvider) -> None:
    fcm.script(FCM_TOKEN, FcmReply("QUOTA_EXCEEDED", retry_after="2"))
    sleeps = Sleeps()
    result = await send_with_retries(fcm_provider, fcm_msg(body="hi"), base_delay_s=0.01, sleep=sleeps)
    assert result.outcome is Outcome.DELIVERED
    assert sleeps.delays == [2.0]
    assert [r.status for r in fcm.requests] == [429, 200]


async def test_fcm_5xx_retried_then_given_up_without_library_retries(fcm: FakeFcm, fcm_provider: FcmProvider) -> None:
    fcm.script(FCM_TOKEN, "UNAVAILABLE", "INTERNAL", "UNAVAILABLE", "UNAVAILABLE")
    sleeps = Sleeps()
    started = time.monotonic()
    result = await send_with_retries(fcm_provider, fcm_msg(body="hi"), attempts=3, base_delay_s=0.01, sleep=sleeps)
    assert result.outcome is Outcome.RETRY
    assert (result.status, result.reason) == ("503", "UNAVAILABLE")
    assert [r.status for r in fcm.requests] == [503, 500, 503]  # one HTTP request per attempt
    assert len(sleeps.delays) == 2
    assert time.monotonic() - started < 1


async def test_fcm_rejected_access_token_is_an_auth_error(fcm: FakeFcm) -> None:
    # A refreshable credential: the library refreshes on 401 (twice), then gives up.
    refreshes: list[str] = []

    def refresh_handler(request: Any, scopes: Any) -> tuple[str, datetime]:
        refreshes.append("x")
        return f"revoked-{len(refreshes)}", datetime.now(UTC).replace(tzinfo=None) + timedelta(hours=1)

    revoked = google.oauth2.credentials.Credentials(token="revoked-0", refresh_handler=refresh_handler)
    async with make_fcm_provider(fcm, credentials=revoked) as provider:
        result = await send_with_retries(provider, fcm_msg(body="hi"), sleep=Sleeps())
    assert result.outcome is Outcome.AUTH_ERROR
    assert (result.status, result.reason) == ("401", "UNAUTHENTICATED")
    assert len(refreshes) == 2

    # A bare access token cannot be refreshed at all.
    bare = google.oauth2.credentials.Credentials(token="expired")
    async with make_fcm_provider(fcm, credentials=bare) as provider:
        result = await provider.send(fcm_msg(body="hi"))
    assert result.outcome is Outcome.AUTH_ERROR
    assert result.status == "credentials"


async def test_fcm_third_party_auth_and_wrong_project_are_auth_errors(fcm: FakeFcm, fcm_provider: FcmProvider) -> None:
    fcm.script(FCM_TOKEN, "THIRD_PARTY_AUTH_ERROR")
    third_party = await fcm_provider.send(fcm_msg(body="hi"))
    assert third_party.outcome is Outcome.AUTH_ERROR

    async with make_fcm_provider(fcm, project_id="someone-else") as provider:
        result = await provider.send(fcm_msg(body="hi"))
    assert result.outcome is Outcome.AUTH_ERROR
    assert (result.status, result.reason) == ("404", "NOT_FOUND")


async def test_fcm_timeout(fcm: FakeFcm) -> None:
    fcm.script(FCM_TOKEN, FcmReply(hang=True))
    async with make_fcm_provider(fcm, timeout_s=0.3) as provider:
        started = time.monotonic()
        result = await provider.send(fcm_msg(body="hi"))
        assert (result.outcome, result.status) == (Outcome.RETRY, "timeout")
        assert 0.25 < time.monotonic() - started < 2
        assert (await provider.send(fcm_msg(body="again"))).outcome is Outcome.DELIVERED


async def test_fcm_send_many_batches_in_order(fcm: FakeFcm) -> None:
    # batch_size (500 by default, FCM's limit per call) is lowered to see several calls at test scale.
    tokens = [f"token-{i}" for i in range(23)]
    fcm.script(tokens[1], "UNREGISTERED")
    fcm.script(tokens[2], "QUOTA_EXCEEDED")
    fcm.script(tokens[21], "INVALID_ARGUMENT")
    async with make_fcm_provider(fcm, batch_size=10) as provider:
        results = await provider.send_many([fcm_msg(t, body="hi") for t in tokens])
    assert len(results) == 23
    assert results[0].outcome is Outcome.DELIVERED
    assert results[1].outcome is Outcome.INVALID_TOKEN
    assert results[2].outcome is Outcome.RETRY
    assert results[21].outcome is Outcome.INVALID_TOKEN
    assert sum(r.outcome is Outcome.DELIVERED for r in results) == 20
    assert sorted(r.target for r in fcm.requests) == sorted(tokens)
    with pytest.raises(PushConfigError, match="batch size"):
        make_fcm_provider(fcm, batch_size=501)


async def test_fcm_installation_id_target(fcm: FakeFcm) -> None:
    async with make_fcm_provider(fcm, target="fid") as provider:
        assert (await provider.send(fcm_msg("fid-123", body="hi"))).outcome is Outcome.DELIVERED
    assert fcm.requests[0].message["fid"] == "fid-123"
    assert "token" not in fcm.requests[0].message


async def test_fcm_service_account_file_fetches_tokens_off_the_loop(fcm: FakeFcm, tmp_path: Path) -> None:
    key_file = tmp_path / "service-account.json"
    key_file.write_text(json.dumps(fcm.service_account_info()))
    async with make_fcm_provider(fcm, service_account_file=key_file) as provider:
        assert provider.project_id == fcm.project_id
        assert fcm.token_requests == 1  # at start
        assert (await provider.send(fcm_msg(body="hi"))).outcome is Outcome.DELIVERED
    assert fcm.requests[0].headers["authorization"] == "Bearer ya29.fake-1"
    assert fcm.token_requests == 1


async def test_fcm_misconfiguration_is_reported(fcm: FakeFcm, tmp_path: Path) -> None:
    with pytest.raises(PushConfigError, match="service-account file"):
        make_fcm_provider(fcm, service_account_file=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PushConfigError, match="service-account file"):
        make_fcm_provider(fcm, service_account_file=tmp_path / "bad.json")
    with pytest.raises(PushConfigError, match="project id"):
        FcmProvider(credentials=google.oauth2.credentials.Credentials(token="t"), endpoint=fcm.url)
    with pytest.raises(PushConfigError, match="endpoint"):
        FcmProvider(project_id="p", credentials=google.oauth2.credentials.Credentials(token="t"), endpoint="fcm")

    # A key the token endpoint does not know: refused at start, before any send.
    other = fcm.service_account_info(private_key_pem=_rsa_pem())
    fcm.service_account_info()  # the server's own key exists
    (tmp_path / "other.json").write_text(json.dumps(other))
    provider = make_fcm_provider(fcm, service_account_file=tmp_path / "other.json")
    try:
        with pytest.raises(PushConfigError, match="credentials rejected"):
            await provider.start()
    finally:
        await provider.aclose()
    assert fcm.requests == []


# --- log only --------------------------------------------------------------------------------------


async def test_log_provider_never_logs_the_token_or_the_text(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="push")
    provider = LogProvider("apns")
    msg = apns_msg(title="Alice", body="the secret plan", data={"conv": "c1", "seq": "9"})
    result = await provider.send(msg)
    assert result.outcome is Outcome.DELIVERED
    assert caplog.records
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert APNS_TOKEN not in text
    assert APNS_TOKEN[:12] not in text
    assert "secret plan" not in text
    assert token_fingerprint(APNS_TOKEN) in text
    assert msg.notification_id in text
    with pytest.raises(ValueError, match="sends apns"):
        await provider.send(fcm_msg(body="hi"))
    with pytest.raises(PushConfigError):
        LogProvider("sms")
