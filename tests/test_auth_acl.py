"""Authentication on CONNECT and the topic ACL, with real MQTT clients."""

from __future__ import annotations

import asyncio
import json
import time

import aiomqtt
import jwt
import pytest

from mqchat.ids import dm_conv
from mqchat.tokens import SERVICE_CLIENT_PREFIX, SERVICE_USERNAME, issue_token
from tests.conftest import Stack
from tests.helpers import connect_device, send_env, unique


async def _connect_refused(port: int, *, username: str, password: str, client_id: str) -> None:
    client = aiomqtt.Client("127.0.0.1", port, username=username, password=password, identifier=client_id, timeout=10)
    with pytest.raises(aiomqtt.MqttCodeError) as refused:
        async with client:
            pass
    # CONNACK return code 5 (not authorised), which paho reports as a reason code
    assert str(refused.value.rc) in ("Not authorized", "5"), refused.value.rc


def _token(stack: Stack, **claims: object) -> str:
    base: dict[str, object] = {"sub": "alice", "dev": "a1", "exp": int(time.time()) + 3600}
    base.update(claims)
    return jwt.encode(base, stack.config.auth.jwt_secret, algorithm="HS256")


@pytest.mark.parametrize(
    ("case", "username", "client_id"),
    [
        ("expired", "alice", "a1"),
        ("forged", "alice", "a1"),
        ("wrong_user", "mallory", "a1"),
        ("wrong_device", "alice", "a2"),
        ("garbage", "alice", "a1"),
        ("empty", "alice", "a1"),
        ("no_dev_claim", "alice", "a1"),
    ],
)
async def test_bad_credentials_get_a_refused_connack(stack: Stack, case: str, username: str, client_id: str) -> None:
    password = {
        "expired": issue_token(secret=stack.config.auth.jwt_secret, user="alice", device="a1", ttl_s=1, now=0),
        "forged": jwt.encode({"sub": "alice", "dev": "a1", "exp": 2**40}, "not-the-secret-" * 3, algorithm="HS256"),
        "wrong_user": _token(stack),
        "wrong_device": _token(stack),
        "garbage": "not.a.jwt",
        "empty": "",
        "no_dev_claim": jwt.encode(
            {"sub": "alice", "exp": int(time.time()) + 60}, stack.config.auth.jwt_secret, algorithm="HS256"
        ),
    }[case]
    await _connect_refused(stack.mqtt_port, username=username, password=password, client_id=client_id)


async def test_a_device_token_cannot_pass_as_the_service(stack: Stack) -> None:
    device_token = stack.token("alice", "a1")
    await _connect_refused(
        stack.mqtt_port,
        username=SERVICE_USERNAME,
        password=device_token,
        client_id=f"{SERVICE_CLIENT_PREFIX}-9",
    )
    # and a device cannot claim a service-looking client id either
    await _connect_refused(stack.mqtt_port, username="alice", password=device_token, client_id=SERVICE_CLIENT_PREFIX)


async def test_bob_cannot_subscribe_to_alices_topics(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    async with connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1"), subscribe=False) as b1:
        for topic in (
            f"u/{alice}/in",
            f"u/{alice}/a1/in",
            f"u/{alice}/a1/out",
            "u/+/in",
            "#",
            f"u/{bob}/+/in",
        ):
            result = await b1.client.subscribe(topic, qos=1)
            assert result == [128] or [getattr(r, "value", r) for r in result] == [128], topic  # type: ignore[union-attr]
        ok = await b1.client.subscribe(f"u/{bob}/in", qos=1)
        assert [getattr(r, "value", r) for r in ok] == [1]  # type: ignore[union-attr]


async def test_bob_cannot_publish_on_alices_out_topic(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with (
        connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1,
        connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1,
    ):
        await b1.send(send_env(conv, "pretending to be alice"), topic=f"u/{alice}/a1/out")
        errors = await b1.wait_for(lambda e: e["type"] == "error")
        assert errors[0]["code"] == "forbidden"
        await asyncio.sleep(0.3)
        assert a1.envelopes() == []
    assert await stack.store.last_seq(conv) == 0


async def test_bob_cannot_send_into_a_conversation_he_is_not_in(stack: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    env = send_env(dm_conv(alice, carol), "hi")
    async with connect_device(stack.mqtt_port, bob, "b1", stack.token(bob, "b1")) as b1:
        await b1.send(env)
        errors = await b1.wait_for(lambda e: e["type"] == "error")
    assert errors[0]["code"] == "not_member"
    assert errors[0]["id"] == env["id"]
    assert await stack.store.last_seq(dm_conv(alice, carol)) == 0


async def test_bob_cannot_read_a_foreign_history_over_http(stack: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
        await a1.send(send_env(dm_conv(alice, carol), "private"))
        await a1.wait_for(lambda e: e["type"] == "ack")
    async with stack.http(bob) as http:
        r = await http.get(f"/v1/conversations/{dm_conv(alice, carol)}/messages")
    assert r.status_code == 403
    assert r.json()["error"] == "not_member"
    async with stack.http(carol) as http:
        r = await http.get(f"/v1/conversations/{dm_conv(alice, carol)}/messages")
    assert r.status_code == 200
    assert [m["body"] for m in r.json()["messages"]] == ["private"]


async def test_http_requires_a_valid_bearer_token(stack: Stack) -> None:
    url = f"/v1/conversations/{dm_conv('alice', 'bob')}/messages"
    async with stack.http() as http:
        assert (await http.get(url)).status_code == 401
        r = await http.get(url, headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert r.json()["error"] == "unauthorized"
        expired = issue_token(secret=stack.config.auth.jwt_secret, user="alice", device="d", ttl_s=1, now=0)
        r = await http.get(url, headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401
        assert "nope" not in r.text


async def test_a_will_on_someone_elses_topic_is_refused(stack: Stack) -> None:
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    forged = json.dumps(send_env(conv, "sent by bob's will as alice")).encode()
    client = aiomqtt.Client(
        "127.0.0.1",
        stack.mqtt_port,
        username=bob,
        password=stack.token(bob, "b1"),
        identifier="b1",
        will=aiomqtt.Will(topic=f"u/{alice}/a1/out", payload=forged, qos=1),
        timeout=10,
    )
    with pytest.raises(aiomqtt.MqttCodeError):
        async with client:
            pass
    # a will on one's own out topic is fine
    own = aiomqtt.Client(
        "127.0.0.1",
        stack.mqtt_port,
        username=bob,
        password=stack.token(bob, "b1"),
        identifier="b1",
        will=aiomqtt.Will(topic=f"u/{bob}/b1/out", payload=b"{}", qos=1),
        timeout=10,
    )
    async with own:
        pass
    assert await stack.store.last_seq(conv) == 0


async def test_a_device_id_held_by_another_users_session_is_refused(stack: Stack) -> None:
    """amqtt reuses a persistent session by client id alone; it must never go to another user."""
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    device = unique("phone")
    bob_client = aiomqtt.Client(
        "127.0.0.1", stack.mqtt_port, username=bob, password=stack.token(bob, device),
        identifier=device, clean_session=False, timeout=10,
    )  # fmt: skip
    async with bob_client:
        await bob_client.subscribe(f"u/{bob}/in", qos=1)
    await _connect_refused_persistent(stack, alice, device)
    async with connect_device(stack.mqtt_port, carol, "c1", stack.token(carol, "c1")) as c1:
        await c1.send(send_env(dm_conv(bob, carol), "for bob only"))
        await c1.wait_for(lambda e: e["type"] == "ack")
    # bob, not alice, still owns the device id
    async with connect_device(stack.mqtt_port, bob, device, stack.token(bob, device), clean_session=False):
        pass


async def _connect_refused_persistent(stack: Stack, user: str, device: str) -> None:
    client = aiomqtt.Client(
        "127.0.0.1", stack.mqtt_port, username=user, password=stack.token(user, device),
        identifier=device, clean_session=False, timeout=10,
    )  # fmt: skip
    with pytest.raises(aiomqtt.MqttCodeError):
        async with client:
            pytest.fail("connected with another user's session")
