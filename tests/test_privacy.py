"""Consent: nobody is put in a group or channel by people they never chose, and presence can be
hidden. Settings: GET/PUT /v1/me/settings (who_may_add_me: everyone | contacts | nobody;
presence: contacts | nobody)."""

from __future__ import annotations

from pathlib import Path

from mqchat.ids import dm_conv
from tests.conftest import Stack, both_adapters, make_config, open_stack
from tests.helpers import connect_device, send_env, unique


async def set_privacy(stack: Stack, user: str, **settings: str) -> dict[str, str]:
    async with stack.http(user) as http:
        r = await http.put("/v1/me/settings", json=settings)
    assert r.status_code == 200, r.text
    return dict(r.json())


@both_adapters
async def test_nobody_may_add_a_user_who_said_nobody(stack: Stack) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    assert await set_privacy(stack, bob, who_may_add_me="nobody") == {
        "who_may_add_me": "nobody",
        "presence": "contacts",
    }
    async with stack.http(alice) as http:
        refused = await http.post("/v1/groups", json={"name": "g", "members": [bob, carol]})
        assert (refused.status_code, refused.json()["error"]) == (403, "forbidden")
        assert bob in refused.json()["message"]
        conv = (await http.post("/v1/groups", json={"name": "g", "members": [carol]})).json()["conv"]
        refused = await http.post(f"/v1/groups/{conv}/members", json={"members": [bob]})
        assert refused.status_code == 403
        group = (await http.get(f"/v1/groups/{conv}")).json()
    assert sorted(m["user"] for m in group["members"]) == sorted([alice, carol]), "nothing changed"
    async with stack.http(bob) as http:
        own = await http.post("/v1/groups", json={"name": "mine", "members": []})
        assert own.status_code == 201, "one may always create one's own group"


@both_adapters
async def test_contacts_only_means_a_shared_conversation_first(stack: Stack) -> None:
    alice, dora = unique("alice"), unique("dora")
    await set_privacy(stack, dora, who_may_add_me="contacts")
    async with stack.http(alice) as http:
        assert (await http.post("/v1/groups", json={"name": "g", "members": [dora]})).status_code == 403
    async with connect_device(stack.mqtt_port, alice, "a", stack.token(alice, "a")) as dev:
        await dev.send(send_env(dm_conv(alice, dora), "hi dora"))
        await dev.wait_for(lambda e: e["type"] == "ack")
    async with stack.http(alice) as http:
        assert (await http.post("/v1/groups", json={"name": "g", "members": [dora]})).status_code == 201


async def test_the_servers_default_applies_until_a_user_chooses(tmp_path: Path) -> None:
    async with open_stack(make_config(tmp_path, default_who_may_add="contacts"), "inbroker") as stack:
        alice, erin = unique("alice"), unique("erin")
        async with stack.http(erin) as http:
            assert (await http.get("/v1/me/settings")).json() == {"who_may_add_me": "contacts", "presence": "contacts"}
        async with stack.http(alice) as http:
            assert (await http.post("/v1/groups", json={"name": "g", "members": [erin]})).status_code == 403
        await set_privacy(stack, erin, who_may_add_me="everyone")
        async with stack.http(alice) as http:
            assert (await http.post("/v1/groups", json={"name": "g", "members": [erin]})).status_code == 201


async def test_settings_refuse_what_they_do_not_know(stack: Stack) -> None:
    async with stack.http(unique("alice")) as http:
        for bad in ({"who_may_add_me": "friends"}, {"presence": "everyone"}, {"presence": 1}):
            r = await http.put("/v1/me/settings", json=bad)
            assert (r.status_code, r.json()["error"]) == (400, "bad_request"), bad
