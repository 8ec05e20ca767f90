"""The HTTP API: history and catch-up paging, validation errors as JSON, health, metrics, OpenAPI."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from mqchat.ids import dm_conv
from tests.conftest import Stack
from tests.helpers import connect_device, send_env, unique


@pytest.fixture
async def history(stack: Stack) -> tuple[str, str, str]:
    """A conversation with 25 messages; returns (alice, bob, conv)."""
    alice, bob = unique("alice"), unique("bob")
    conv = dm_conv(alice, bob)
    async with connect_device(stack.mqtt_port, alice, "a1", stack.token(alice, "a1")) as a1:
        for i in range(1, 26):
            await a1.send(send_env(conv, f"m{i}"))
        await a1.wait_for(lambda e: e["type"] == "ack", count=25)
    return alice, bob, conv


async def test_catch_up_after_seq_pages_ascending(stack: Stack, history: tuple[str, str, str]) -> None:
    _, bob, conv = history
    async with stack.http(bob) as http:
        first = (await http.get(f"/v1/conversations/{conv}/messages", params={"after": 0, "limit": 10})).json()
        assert [m["seq"] for m in first["messages"]] == list(range(1, 11))
        assert first["more"] is True
        assert first["last_seq"] == 25
        rest = (await http.get(f"/v1/conversations/{conv}/messages", params={"after": 20, "limit": 10})).json()
        assert [m["seq"] for m in rest["messages"]] == [21, 22, 23, 24, 25]
        assert rest["more"] is False
        m = rest["messages"][0]
        assert set(m) == {"type", "conv", "seq", "mid", "from", "dev", "id", "ts", "kind", "body"}
        assert m["body"] == "m21"
        assert m["type"] == "msg"


async def test_scrollback_before_seq(stack: Stack, history: tuple[str, str, str]) -> None:
    alice, _, conv = history
    async with stack.http(alice) as http:
        page = (await http.get(f"/v1/conversations/{conv}/messages", params={"before": 26, "limit": 10})).json()
        assert [m["seq"] for m in page["messages"]] == list(range(16, 26))
        assert page["more"] is True
        oldest = (await http.get(f"/v1/conversations/{conv}/messages", params={"before": 4, "limit": 10})).json()
        assert [m["seq"] for m in oldest["messages"]] == [1, 2, 3]
        assert oldest["more"] is False


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ({"after": -1}, 400, "bad_request"),
        ({"after": "x"}, 400, "bad_request"),
        ({"limit": 0}, 400, "bad_request"),
        ({"limit": 100_000}, 400, "bad_request"),
        ({"before": 0}, 400, "bad_request"),
        ({"after": 1, "before": 5}, 400, "bad_request"),
    ],
)
async def test_bad_paging_gets_a_json_4xx(stack: Stack, query: dict[str, object], status: int, code: str) -> None:
    async with stack.http("alice") as http:
        r = await http.get(f"/v1/conversations/{dm_conv('alice', 'bob')}/messages", params=query)
    assert r.status_code == status
    assert r.json()["error"] == code
    assert r.json()["message"]


@pytest.mark.parametrize(
    ("conv", "status", "code"),
    [
        ("dm:bob:alice", 400, "bad_conv"),
        ("nope", 400, "bad_conv"),
        ("g:01ARZ3NDEKTSV4RRFFQ69G5FAV", 404, "not_found"),
    ],
)
async def test_bad_conversation_ids(stack: Stack, conv: str, status: int, code: str) -> None:
    async with stack.http("alice") as http:
        r = await http.get(f"/v1/conversations/{conv}/messages")
    assert (r.status_code, r.json()["error"]) == (status, code)


async def test_unknown_route_is_a_json_404(stack: Stack) -> None:
    async with stack.http("alice") as http:
        r = await http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"


async def test_health_metrics_and_openapi(stack: Stack, history: tuple[str, str, str]) -> None:
    async with stack.http() as http:
        health = await http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["broker"] == "connected"
        metrics = (await http.get("/metrics")).text
        assert "mqchat_messages_accepted_total" in metrics
        assert "mqchat_pipeline_latency_seconds_bucket" in metrics
        assert "mqchat_broker_connected_clients" in metrics
        spec = (await http.get("/openapi.json")).json()
        assert "/v1/conversations/{conv}/messages" in spec["paths"]


def test_every_error_is_an_mqchat_error_and_every_code_has_an_http_status() -> None:
    from mqchat.errors import ConfigError, ErrorCode, MqchatError
    from push.base import PushConfigError
    from storage.base import StoreRefusal

    assert issubclass(PushConfigError, ConfigError)
    assert issubclass(StoreRefusal, MqchatError)
    statuses = {code: code.http_status for code in ErrorCode}
    assert statuses[ErrorCode.NOT_MEMBER] == 403
    assert statuses[ErrorCode.UNAVAILABLE] == 503
    assert all(400 <= status < 600 for status in statuses.values())


async def test_a_store_refusal_reaching_a_route_is_answered_with_its_code(tmp_path: Path) -> None:
    """Two admins remove the same member at once: both find bob in the group, the store refuses
    the second removal (NotMember), and the route answers 403 not_member, not 500. Every store
    refusal is translated the same way: not_found 404, bad_seq 400."""
    from bridge.http import create_app
    from bridge.refusals import refusal_error
    from mqchat.tokens import TokenVerifier, issue_token
    from storage.base import NoSuchConversation, SeqBeyondEnd
    from storage.records import Group
    from storage.sqlite import SqliteMessageStore

    class RemovedMeanwhile(SqliteMessageStore):
        """bob leaves the group between the service's read of it and its write."""

        async def group(self, conv: str) -> Group | None:
            found = await super().group(conv)
            if found is not None and found.member("bob") is not None:
                await self.remove_member(conv=conv, user="bob")
            return found

    secret = "s" * 40
    async with await RemovedMeanwhile.open(tmp_path / "s.sqlite3") as store:
        app = create_app(store=store, verifier=TokenVerifier(secret=secret))
        token = issue_token(secret=secret, user="alice", device="a1", ttl_s=60)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://mqchat",
            headers={"Authorization": f"Bearer {token}"},
        ) as http:
            created = await http.post("/v1/groups", json={"name": "g", "members": ["bob"]})
            assert created.status_code == 201, created.text
            removed = await http.delete(f"/v1/groups/{created.json()['conv']}/members/bob")
    assert removed.status_code == 403
    assert removed.json() == {"error": "not_member", "message": "you are not a member of this conversation"}
    assert refusal_error(NoSuchConversation("g:x")).code.http_status == 404
    assert refusal_error(SeqBeyondEnd("past the end")).code.http_status == 400
