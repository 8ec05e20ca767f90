"""Account deletion: a service call (the admin API) and the user's own (with a fresh token) erase
a user on every store backend: devices logged out, push tokens and settings gone, memberships
removed (the group hears ``members_removed``), message bodies replaced by a deletion marker in
every conversation with seq and order kept, so the other members' history and sync have no hole.
Idempotent; interrupted by kill -9 and resumed (a real `mqchat serve`, SQLite files)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from mqchat.config import StorageConfig
from mqchat.ids import dm_conv
from mqchat.tokens import admin_credential, issue_token
from storage import open_storage
from storage.records import NewMessage
from tests.conftest import Stack, both_stores, make_config, open_stack, start_served, stop_served, storage_for
from tests.helpers import connect_device, send_env, unique
from tests.mqtt_raw import RawClient

pytestmark = both_stores


@pytest.fixture
async def node(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    config = make_config(tmp_path, storage=storage_for(request, tmp_path))
    async with open_stack(config, "inbroker") as stack:
        yield stack


def admin(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{stack.http_port}",
        headers={"Authorization": f"Bearer {admin_credential(stack.config.auth.jwt_secret)}"},
        timeout=30,
    )


async def history(http: httpx.AsyncClient, conv: str) -> list[tuple[int, str, str, str]]:
    page = (await http.get(f"/v1/conversations/{conv}/messages", params={"after": 0})).json()
    return [(m["seq"], m["from"], m["kind"], m["body"]) for m in page["messages"]]


async def test_deleting_a_user_erases_them_and_leaves_no_hole(node: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    dm = dm_conv(alice, bob)
    async with node.http(alice, "phone") as as_alice, node.http(bob) as as_bob, node.http(carol) as as_carol:
        group = (await as_bob.post("/v1/groups", json={"name": "trip", "members": [alice, carol]})).json()["conv"]
        old_group = (await as_bob.post("/v1/groups", json={"name": "old", "members": [alice]})).json()["conv"]
        assert (
            await as_alice.put("/v1/devices/phone/push", json={"platform": "apns", "token": "a" * 64})
        ).status_code == 200
        assert (await as_alice.put("/v1/me/settings", json={"who_may_add_me": "nobody"})).status_code == 200
        phone_token = node.token(alice, "phone")
        async with (
            connect_device(node.mqtt_port, alice, "phone", phone_token) as phone,
            connect_device(node.mqtt_port, bob, "b1", node.token(bob, "b1")) as b1,
        ):
            for conv, body in ((dm, "secret 1"), (dm, "secret 2"), (group, "group secret"), (old_group, "left")):
                await phone.send(send_env(conv, body))
            await phone.wait_for(lambda e: e["type"] == "ack", count=4)
            # A group she wrote in and left long before her account was deleted.
            assert (await as_alice.delete(f"/v1/groups/{old_group}/members/{alice}")).status_code == 200
            await b1.send(send_env(dm, "bob's own"))
            await b1.wait_for(lambda e: e["type"] == "ack")
            async with node.http(carol, "c1") as as_c1:
                await as_c1.get("/v1/conversations")
            carol_sends = node.token(carol, "c1")
            async with connect_device(node.mqtt_port, carol, "c1", carol_sends) as c1:
                await c1.send(send_env(group, "carol's own"))
                await c1.wait_for(lambda e: e["type"] == "ack")
            before_bob = await history(as_bob, dm)
            assert [b for *_, b in before_bob] == ["secret 1", "secret 2", "bob's own"]

            async with admin(node) as service:
                answer = await service.delete(f"/admin/v1/users/{alice}")
                assert answer.status_code == 200, answer.text
                assert answer.json()["status"] == "deleted"
                # The group heard that alice left, through the usual conv event.
                left = await b1.wait_for(
                    lambda e: e["type"] == "conv" and e["event"] == "members_removed" and e["conv"] == group
                )
                assert (left[0]["conv"], left[0]["users"]) == (group, [alice])
                # Idempotent: asked again, the same answer (nothing left to do).
                again = await service.delete(f"/admin/v1/users/{alice}")
                assert (again.status_code, again.json()["status"]) == (200, "deleted")
                state = (await service.get(f"/admin/v1/users/{alice}/deletion")).json()
                assert state["status"] == "deleted"
                assert (await service.get(f"/admin/v1/users/{alice}/devices")).json()["devices"] in (
                    [],
                    [{"device": "phone", "connected": True, "push": None}],
                )  # the close may still be on its way

        # Bob's history of the DM: the same seqs, alice's bodies replaced by the marker.
        assert await history(as_bob, dm) == [
            (1, alice, "deleted", ""),
            (2, alice, "deleted", ""),
            (3, bob, "text", "bob's own"),
        ]
        assert await history(as_carol, group) == [(1, alice, "deleted", ""), (2, carol, "text", "carol's own")]
        assert await history(as_bob, old_group) == [(1, alice, "deleted", "")]
        members = (await as_bob.get(f"/v1/groups/{group}")).json()["members"]
        assert sorted(m["user"] for m in members) == sorted([bob, carol])
        # A fresh device of bob's catching up (sync from nothing, messages included): no hole.
        synced = (await as_bob.get("/v1/conversations", params={"include_messages": 10})).json()["conversations"]
        by_conv = {c["conv"]: c for c in synced}
        assert by_conv[dm]["last_seq"] == 3
        assert [(m["seq"], m["kind"]) for m in by_conv[dm]["messages"]] == [(1, "deleted"), (2, "deleted"), (3, "text")]
        assert "secret" not in json.dumps(synced)
        # Her presence is gone: private now (no conversation state of hers is left to share), or
        # never seen.
        for _ in range(50):
            seen = await as_bob.get("/v1/presence", params={"users": alice})
            if seen.status_code == 403 or seen.json()["users"][0]["last_seen"] is None:
                break
            await asyncio.sleep(0.1)
        assert seen.status_code in (200, 403), seen.text
        if seen.status_code == 200:
            assert seen.json()["users"] == [{"user": alice, "state": "offline", "last_seen": None}]
        # Alice's tokens are refused, over HTTP and at CONNECT.
        assert (await as_alice.get("/v1/conversations")).status_code == 401
        # Her own conversation states are gone too (nothing for a later token of hers to sync).
        async with node.http(alice, "new-phone") as later:
            assert (await later.get("/v1/conversations")).json()["conversations"] == []
    with await asyncio.to_thread(RawClient, node.mqtt_port) as raw:
        assert await asyncio.to_thread(raw.connect, "phone", alice, phone_token) == 5


async def test_a_user_deletes_their_own_account_with_a_fresh_token(node: Stack) -> None:
    erin = unique("erin")
    stale = issue_token(
        secret=node.config.auth.jwt_secret, user=erin, device="phone", ttl_s=3600, now=time.time() - 600
    )
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{node.http_port}", headers={"Authorization": f"Bearer {stale}"}
    ) as old:
        refused = await old.delete("/v1/me")
        assert refused.status_code == 403
        assert "fresh sign-in" in refused.json()["message"]
    async with node.http(erin, "phone") as fresh:
        done = await fresh.delete("/v1/me")
        assert (done.status_code, done.json()["status"]) == (200, "deleted")
        assert (await fresh.get("/v1/conversations")).status_code == 401


def erased_conversations(storage: StorageConfig) -> int:
    """Enough conversations that erasing them takes seconds (a Cassandra redaction reads the
    conversation and writes each row, far slower than SQLite's)."""
    return 3000 if storage.backend == "sqlite" else 800


async def fill(storage: StorageConfig, user: str) -> None:
    """One-to-one conversations with a message of user's each, written straight into the store
    (so that erasing them takes long enough to be interrupted)."""
    async with open_storage(storage) as opened:
        await asyncio.gather(
            *(
                opened.messages.append(
                    NewMessage(
                        conv=dm_conv(user, f"friend{i}"),
                        members=tuple(sorted((user, f"friend{i}"))),
                        sender=user,
                        device="phone",
                        client_id=f"fill-{i}",
                        kind="text",
                        body=f"private {i}",
                        media=(),
                        ts=int(time.time() * 1000),
                    )
                )
                for i in range(erased_conversations(storage))
            )
        )


async def deletion_of(storage: StorageConfig, user: str) -> tuple[tuple[int, bool] | None, int]:
    """(the store's deletion state of user, how many of the filled conversations still hold a body)."""
    async with open_storage(storage, push=False) as opened:
        state = await opened.messages.deletion_state(user)
        left = 0
        for i in range(0, erased_conversations(storage), 100):
            pages = await asyncio.gather(
                *(opened.messages.fetch_after(dm_conv(user, f"friend{j}"), 0, 1) for j in range(i, i + 100))
            )
            left += sum(1 for page in pages if page.messages and page.messages[0].kind == "text")
        return state, left


async def test_a_deletion_interrupted_by_kill_9_is_resumed(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    storage = storage_for(request, tmp_path / "data")
    await fill(storage, "frank")
    env = {"MQCHAT_STORE": storage.url} if storage.backend != "sqlite" else None
    secret = "k" * 40
    served = start_served(tmp_path / "data", secret, tmp_path / "serve.log", adapter="inbroker", env=env)
    try:
        await served.wait_healthy()
        credential = {"Authorization": f"Bearer {admin_credential(secret)}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.http_port}", headers=credential) as service:
            asking = asyncio.create_task(service.delete("/admin/v1/users/frank", timeout=60))
            for _ in range(500):  # the deletion is recorded (durably) before it starts
                if (await service.get("/admin/v1/users/frank/deletion")).status_code == 200:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail(f"the deletion was not recorded within 5 s; log:\n{served.log()}")
            # kill -9 the whole server mid-erasure: the node and its supervisor.
            os.kill(served.pid("node"), signal.SIGKILL)
            os.kill(served.proc.pid, signal.SIGKILL)
            served.proc.wait(10)
            with pytest.raises(httpx.HTTPError):
                await asking
    finally:
        stop_served(served)
    state, left = await deletion_of(storage, "frank")
    assert state is not None, "the deletion was not recorded before the kill"
    assert state[1] is False, "the erasure finished before the kill: nothing was interrupted"
    assert left > 0, left
    # Started again, the server resumes the deletion by itself.
    served = start_served(tmp_path / "data", secret, tmp_path / "serve2.log", adapter="inbroker", env=env)
    try:
        await served.wait_healthy()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{served.http_port}", headers=credential) as service:
            for _ in range(600):
                answer = (await service.get("/admin/v1/users/frank/deletion")).json()
                if answer["status"] == "deleted":
                    break
                await asyncio.sleep(0.1)
            assert answer["status"] == "deleted", served.log()
    finally:
        stop_served(served)
    state, left = await deletion_of(storage, "frank")
    assert (state is not None and state[1], left) == (True, 0)
