"""The HTTP hooks EMQX 5 calls (its documented request and response shapes): authentication at
CONNECT and authorisation at each publish and subscribe, answered with mqchat's own tokens and
topic table. EMQX itself is not in Debian or PyPI; these requests are the ones its HTTP
authenticator and authorizer send when configured as the README shows."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mqchat.ids import dm_conv
from mqchat.tokens import SERVICE_USERNAME, hooks_credential, service_password
from tests.conftest import Stack
from tests.helpers import connect_device, send_env, unique

AUTHN, AUTHZ = "/hooks/emqx/authn", "/hooks/emqx/authz"
JSON = {"content-type": "application/json"}


def broker(stack: Stack) -> httpx.AsyncClient:
    """EMQX's side: the hooks credential as the bearer token of every hook request."""
    secret = hooks_credential(stack.config.auth.jwt_secret)
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.http_port}", headers={"Authorization": f"Bearer {secret}"}, timeout=10
    )


async def result(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> str:
    answer = await http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    verdict: str = answer.json()["result"]
    return verdict


async def test_only_the_broker_may_call_the_hooks(stack: Stack) -> None:
    body = {"clientid": "a1", "username": "alice", "password": stack.token("alice", "a1")}
    async with stack.http("alice") as device:  # a device's own token is not the service credential
        answer = await device.post(AUTHN, json=body)
    assert answer.status_code == 401
    assert answer.json()["error"] == "unauthorized"
    bridge = {"Authorization": f"Bearer {service_password(stack.config.auth.jwt_secret)}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.http_port}", headers=bridge) as other:
        assert (await other.post(AUTHN, json=body)).status_code == 401, "the bridge's password is not the hooks'"
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{stack.http_port}") as anonymous:
        answer = await anonymous.post(AUTHZ, json={**body, "topic": "u/alice/in", "action": "subscribe"})
        assert answer.status_code == 401


async def test_connect_is_allowed_with_the_devices_own_token_until_it_expires(stack: Stack) -> None:
    token = stack.token("alice", "a1", ttl_s=600)
    async with broker(stack) as http:
        answer = (await http.post(AUTHN, json={"clientid": "a1", "username": "alice", "password": token})).json()
        assert answer["result"] == "allow"
        assert answer["is_superuser"] is False
        assert abs(answer["expire_at"] - (time.time() + 600)) < 60, "EMQX ends the session when the token expires"
        for clientid, username, password in (
            ("a2", "alice", token),  # another device's client id
            ("a1", "bob", token),  # another user's name
            ("a1", "alice", token[:-2]),  # a forged signature
            ("a1", "alice", stack.token("alice", "a1", ttl_s=1)[:20]),
            ("$mqchat-bridge-0", SERVICE_USERNAME, token),  # the service name with a device's token
            ("a1", SERVICE_USERNAME, service_password(stack.config.auth.jwt_secret)),  # not a bridge client id
        ):
            body = {"clientid": clientid, "username": username, "password": password}
            assert await result(http, AUTHN, body) == "deny", body
        service = {"clientid": "$mqchat-bridge-3", "username": SERVICE_USERNAME}
        secret = service_password(stack.config.auth.jwt_secret)
        answer = (await http.post(AUTHN, json={**service, "password": secret})).json()
        assert answer == {"result": "allow", "is_superuser": True}, "EMQX asks nothing of the bridge's publishes"


async def test_a_logged_out_devices_token_is_denied(stack: Stack) -> None:
    token = stack.token("dana", "d1")
    body = {"clientid": "d1", "username": "dana", "password": token}
    async with broker(stack) as http, stack.http("dana", "d2") as other_device:
        assert await result(http, AUTHN, body) == "allow"
        assert (await other_device.post("/v1/me/devices/d1/logout")).status_code == 200
        assert await result(http, AUTHN, body) == "deny"


async def test_publish_and_subscribe_follow_mqchats_topic_table(stack: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")

    async def may(user: str, device: str, action: str, topic: str) -> str:
        return await result(http, AUTHZ, {"clientid": device, "username": user, "topic": topic, "action": action})

    async with broker(stack) as http:
        assert await may(alice, "a1", "publish", f"u/{alice}/a1/out") == "allow"
        assert await may(alice, "a1", "publish", f"u/{alice}/a2/out") == "deny"
        assert await may(alice, "a1", "publish", f"u/{bob}/in") == "deny"
        assert await may(alice, "a1", "subscribe", f"u/{alice}/in") == "allow"
        assert await may(alice, "a1", "subscribe", f"u/{alice}/a1/in") == "allow"
        for topic in (f"u/{bob}/in", "u/+/in", "#", f"u/{alice}/+", f"$share/g/u/{alice}/in"):
            assert await may(alice, "a1", "subscribe", topic) == "deny", topic
        # Presence: seen by those who share a conversation.
        assert await may(alice, "a1", "subscribe", f"p/{bob}") == "deny"
        async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
            await a1.send(send_env(dm_conv(alice, bob), "hi"))
            await a1.wait_for(lambda e: e["type"] == "ack")
        assert await may(alice, "a1", "subscribe", f"p/{bob}") == "allow"
        assert await may(carol, "c1", "subscribe", f"p/{bob}") == "deny"
        # A channel: its members read it.
        async with stack.http(alice) as api:
            created = await api.post("/v1/groups", json={"name": "news", "kind": "channel", "members": [bob]})
        conv = created.json()["conv"]
        assert await may(bob, "b1", "subscribe", f"c/{conv}/in") == "allow"
        assert await may(carol, "c1", "subscribe", f"c/{conv}/in") == "deny"
        assert await may(bob, "b1", "publish", f"c/{conv}/in") == "deny"
        # The bridge workers: the shared subscription, and publishing events.
        for action, topic in (("subscribe", "$share/mqchat-bridge/u/+/+/out"), ("publish", f"u/{bob}/in")):
            assert await may(SERVICE_USERNAME, "$mqchat-bridge-0", action, topic) == "allow"
        assert await may(SERVICE_USERNAME, "$mqchat-bridge-0", "subscribe", "#") == "deny"


@pytest.mark.parametrize(
    "body",
    [
        {"clientid": "a1", "username": "alice"},
        {"clientid": "a1", "username": "alice", "topic": "u/alice/in", "action": "all"},
        {"clientid": 1, "username": "alice", "topic": "u/alice/in", "action": "publish"},
        [],
    ],
)
async def test_a_malformed_hook_request_gets_400_with_a_json_body(stack: Stack, body: Any) -> None:
    async with broker(stack) as http:
        for path in (AUTHN, AUTHZ):
            answer = await http.post(path, json=body)
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"] == "bad_request"


any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=80)
ACTIONS = st.sampled_from(["publish", "subscribe"])


@pytest.mark.parametrize("stack", ["inbroker"], indirect=True)
async def test_any_unicode_in_a_hook_request_gets_an_answer_never_a_failure(stack: Stack) -> None:
    """Hypothesis drives a blocking client from a thread while the server runs on this loop."""
    secret = hooks_credential(stack.config.auth.jwt_secret)
    base = f"http://127.0.0.1:{stack.http_port}"

    def fuzz() -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {secret}", **JSON}, timeout=10) as http:

            @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
            @given(clientid=any_text, username=any_text, text=any_text, action=ACTIONS)
            # Always tried: lone surrogates (pydantic refuses them in a length-constrained str)
            # and fields over their limits.
            @example(clientid="", username="", text="\ud800", action="publish")
            @example(clientid="\udfff", username="a\ud800", text="", action="subscribe")
            @example(clientid="c" * 1025, username="alice", text="t" * 70_000, action="publish")
            def probe(clientid: str, username: str, text: str, action: str) -> None:
                # Lone surrogates cannot be UTF-8: sent as JSON escapes (\ud800), as JSON allows.
                for path, body in (
                    (AUTHN, {"clientid": clientid, "username": username, "password": text}),
                    (AUTHZ, {"clientid": clientid, "username": username, "topic": text, "action": action}),
                ):
                    answer = http.post(path, content=json.dumps(body).encode())
                    assert answer.status_code == 200, answer.text
                    assert answer.json()["result"] in ("allow", "deny")
                    if path == AUTHN:
                        assert answer.json()["result"] == "deny", "no random text is a token"

            probe()

    await asyncio.to_thread(fuzz)
