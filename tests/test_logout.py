"""Logout and revocation: a device logged out (by itself, by its user from another device, by
the admin API) has its connections closed at once and its push token removed, and its tokens
issued before that moment are refused at CONNECT and over HTTP; a live connection does not
outlast its token. Across nodes the logout closes the device wherever it is connected."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import cast

import httpx
import pytest

from broker.serve import Listeners, serve_broker
from mqchat.app import BridgeHandle, run_node
from mqchat.config import AuthConfig, Config, PresenceConfig, StorageConfig
from mqchat.errors import AuthError
from mqchat.tokens import Identity, admin_credential, hooks_credential, issue_token
from storage import open_storage
from storage.base import Accounts
from storage.revocations import READ_BATCH, Revocations
from tests.cassandra_store import cassandra_storage_config  # noqa: F401
from tests.conftest import make_config, open_stack
from tests.mqtt_raw import RawClient
from tests.redis_server import RedisServer, redis_server, redis_url  # noqa: F401

NOT_AUTHORISED = 5


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[Config, BridgeHandle]]:
    config = make_config(tmp_path / "data")
    async with run_node(config) as running:
        yield config, running


def token(config: Config, user: str, device: str, ttl_s: int = 600) -> str:
    return issue_token(secret=config.auth.jwt_secret, user=user, device=device, ttl_s=ttl_s)


def http(node: BridgeHandle, bearer: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{node.http_port}", headers={"Authorization": f"Bearer {bearer}"}, timeout=10
    )


async def online(port: int, user: str, device: str, bearer: str) -> RawClient:
    """A device connected (CONNACK accepted) over a raw socket."""
    client = await asyncio.to_thread(RawClient, port)
    assert await asyncio.to_thread(client.connect, device, user, bearer) == 0
    return client


async def connect_code(port: int, user: str, device: str, bearer: str) -> int:
    with await asyncio.to_thread(RawClient, port) as client:
        return await asyncio.to_thread(client.connect, device, user, bearer)


async def test_a_device_logs_itself_out(node: tuple[Config, BridgeHandle]) -> None:
    config, running = node
    phone, tablet = token(config, "alice", "phone"), token(config, "alice", "tablet")
    async with http(running, phone) as as_phone, http(running, tablet) as as_tablet:
        registered = await as_phone.put("/v1/devices/phone/push", json={"platform": "fcm", "token": "f" * 40})
        assert registered.status_code == 200, registered.text
        connected_phone = await online(running.mqtt_port, "alice", "phone", phone)
        connected_tablet = await online(running.mqtt_port, "alice", "tablet", tablet)
        answer = await as_phone.post("/v1/me/logout")
        assert answer.status_code == 200, answer.text
        assert (answer.json()["user"], answer.json()["device"]) == ("alice", "phone")
        # Its connection is closed at once; the tablet's stays.
        assert await asyncio.to_thread(connected_phone.closed_by_peer, 5)
        assert not await asyncio.to_thread(connected_tablet.closed_by_peer, 0.5)
        # Its token is refused from now on, at CONNECT and over HTTP; the tablet's is not.
        assert await connect_code(running.mqtt_port, "alice", "phone", phone) == NOT_AUTHORISED
        refused = await as_phone.get("/v1/conversations")
        assert refused.status_code == 401
        assert "revoked" in refused.json()["message"]
        assert (await as_tablet.get("/v1/conversations")).status_code == 200
        # Its push token is gone.
        async with http(running, admin_credential(config.auth.jwt_secret)) as admin:
            devices = (await admin.get("/admin/v1/users/alice/devices")).json()["devices"]
        assert {d["device"]: (d["connected"], d["push"]) for d in devices} == {"tablet": (True, None)}
        # Signing in again (a token issued after the logout) works.
        assert await connect_code(running.mqtt_port, "alice", "phone", token(config, "alice", "phone")) == 0
        connected_phone.close()
        connected_tablet.close()


async def test_a_user_logs_out_another_of_their_devices_and_the_admin_kicks_one(
    node: tuple[Config, BridgeHandle],
) -> None:
    config, running = node
    phone, tablet = token(config, "bob", "phone"), token(config, "bob", "tablet")
    connected_phone = await online(running.mqtt_port, "bob", "phone", phone)
    connected_tablet = await online(running.mqtt_port, "bob", "tablet", tablet)
    async with http(running, tablet) as as_tablet:
        answer = await as_tablet.post("/v1/me/devices/phone/logout")
        assert answer.status_code == 200, answer.text
        assert await asyncio.to_thread(connected_phone.closed_by_peer, 5)
        assert not await asyncio.to_thread(connected_tablet.closed_by_peer, 0.5)
        assert await connect_code(running.mqtt_port, "bob", "phone", phone) == NOT_AUTHORISED
        bad = await as_tablet.post("/v1/me/devices/not%20an%20id/logout")
        assert bad.status_code == 400
    # The admin API: its own credential only (a user's token, the hooks' credential: 401).
    for wrong in (tablet, hooks_credential(config.auth.jwt_secret), "x" * 64):
        async with http(running, wrong) as not_admin:
            assert (await not_admin.get("/admin/v1/users/bob/devices")).status_code == 401
    async with http(running, admin_credential(config.auth.jwt_secret)) as admin:
        devices = (await admin.get("/admin/v1/users/bob/devices")).json()
        assert devices == {"user": "bob", "devices": [{"device": "tablet", "connected": True, "push": None}]}
        kicked = await admin.post("/admin/v1/users/bob/devices/tablet/logout")
        assert kicked.status_code == 200, kicked.text
        assert await asyncio.to_thread(connected_tablet.closed_by_peer, 5)
        assert await connect_code(running.mqtt_port, "bob", "tablet", tablet) == NOT_AUTHORISED
        for _ in range(50):  # the disconnect reaches the registry
            listed = (await admin.get("/admin/v1/users/bob/devices")).json()["devices"]
            if not listed:
                break
            await asyncio.sleep(0.1)
        assert listed == []
    connected_phone.close()
    connected_tablet.close()


async def test_a_live_connection_does_not_outlast_its_token(tmp_path: Path) -> None:
    base = make_config(tmp_path / "data")
    config = dataclasses.replace(base, auth=dataclasses.replace(base.auth, token_grace_s=0.5))
    async with run_node(config) as running:
        issued = time.time()
        short = issue_token(secret=config.auth.jwt_secret, user="carol", device="phone", ttl_s=3, now=issued)
        closing_at = int(issued) + 3 + 0.5  # exp (whole seconds) + grace
        connected = await online(running.mqtt_port, "carol", "phone", short)
        long_lived = await online(running.mqtt_port, "carol", "tablet", token(config, "carol", "tablet"))
        assert not await asyncio.to_thread(connected.closed_by_peer, closing_at - time.time() - 0.5)
        assert await asyncio.to_thread(connected.closed_by_peer, 5.0)
        assert time.time() >= closing_at - 0.05
        assert not await asyncio.to_thread(long_lived.closed_by_peer, 0.5)
        connected.close()
        long_lived.close()


async def test_logout_reaches_the_device_on_another_node(
    cassandra_storage_config: StorageConfig,  # noqa: F811
    redis_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    secret = "n" * 40
    presence = PresenceConfig(redis_url=redis_url)
    a = make_config(tmp_path / "a", secret=secret, presence=presence, storage=cassandra_storage_config)
    b = make_config(
        tmp_path / "b",
        secret=secret,
        presence=presence,
        storage=dataclasses.replace(cassandra_storage_config, data_dir=tmp_path / "b"),
    )
    assert a.auth == AuthConfig(jwt_secret=secret)
    async with open_stack(a, "inbroker") as node_a, open_stack(b, "inbroker") as node_b:
        phone = token(a, "dave", "phone")
        on_b = await online(node_b.mqtt_port, "dave", "phone", phone)
        async with http_of(node_a.http_port, admin_credential(secret)) as admin:
            assert (await admin.post("/admin/v1/users/dave/devices/phone/logout")).status_code == 200
        assert await asyncio.to_thread(on_b.closed_by_peer, 5)
        # Refused at once on both nodes (B heard of it through the relay, A made it).
        assert await connect_code(node_b.mqtt_port, "dave", "phone", phone) == NOT_AUTHORISED
        assert await connect_code(node_a.mqtt_port, "dave", "phone", phone) == NOT_AUTHORISED
        async with http_of(node_b.http_port, phone) as on_b_http:
            assert (await on_b_http.get("/v1/conversations")).status_code == 401
        on_b.close()


def http_of(port: int, bearer: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {bearer}"}, timeout=10
    )


async def test_a_logout_whose_event_never_arrived_still_closes_the_connection(tmp_path: Path) -> None:
    """The revocation is in the store but no logout event reached the broker (lost between
    processes): the broker's sweep closes the connection within its interval."""
    secret = "s" * 40
    async with open_storage(StorageConfig(data_dir=tmp_path)) as storage:
        revocations = Revocations(accounts=storage.messages, fresh_s=0.1)
        async with serve_broker(
            listeners=Listeners(host="127.0.0.1", mqtt=0), secret=secret, revocations=revocations, revalidate_s=0.3
        ) as broker:
            bearer = issue_token(secret=secret, user="erin", device="phone", ttl_s=600)
            connected = await online(broker.bound_port, "erin", "phone", bearer)
            other = await online(
                broker.bound_port, "erin", "tablet", issue_token(secret=secret, user="erin", device="tablet", ttl_s=600)
            )
            await storage.messages.revoke("erin", device="phone", before_ms=int(time.time() * 1000))
            assert await asyncio.to_thread(connected.closed_by_peer, 5)
            assert not await asyncio.to_thread(other.closed_by_peer, 1)
            connected.close()
            other.close()


class _CountedAccounts:
    """A store's revocation reads, counted, with the first one held until released."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts
        self.reads: list[list[str]] = []
        self.release = asyncio.Event()

    async def revocations_of(self, users: Sequence[str]) -> dict[str, dict[str, int]]:
        self.reads.append(list(users))
        if len(self.reads) == 1:
            await self.release.wait()
        return await self.accounts.revocations_of(users)


async def test_a_crowd_of_checks_shares_a_few_revocation_reads(tmp_path: Path) -> None:
    """Thousands of devices reconnecting at once (a node restarted): their checks are read
    together, not one store read each, and each still gets its own user's answer."""
    async with open_storage(StorageConfig(data_dir=tmp_path)) as storage:
        now = int(time.time() * 1000)
        await storage.messages.revoke("u7", device="d7", before_ms=now)
        counted = _CountedAccounts(storage.messages)
        revocations = Revocations(accounts=cast(Accounts, counted))
        identities = [Identity(user=f"u{i}", device=f"d{i}", expires_at=now // 1000 + 600, issued_at=(now - 1) / 1000)
                      for i in range(1200)]  # fmt: skip
        checks = [asyncio.ensure_future(revocations.check(identity)) for identity in identities]
        while not counted.reads:
            await asyncio.sleep(0)
        counted.release.set()  # the first read held while the rest queued behind it
        outcomes = await asyncio.gather(*checks, return_exceptions=True)
    assert [i for i, outcome in enumerate(outcomes) if outcome is not None] == [7]
    assert isinstance(outcomes[7], AuthError)
    assert sum(len(users) for users in counted.reads) == 1200
    assert max(len(users) for users in counted.reads) <= READ_BATCH
    assert len(counted.reads) <= 4
