"""Bad input never crashes the bridge and never writes anything: it gets a clean error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.pipeline import Pipeline
from mqchat.config import StorageConfig
from mqchat.errors import StorageError
from mqchat.ids import dm_conv
from storage import open_storage
from storage.records import NewMessage
from storage.sqlite import SqliteMessageStore
from tests.conftest import Stack, both_adapters
from tests.helpers import connect_device, send_env, unique

ALICE, BOB = "alice", "bob"
CONV = dm_conv(ALICE, BOB)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"not json", "bad_json"),
        (b"\xff\xfe\x00", "bad_json"),
        (b"[1, 2]", "bad_json"),
        (b'"send"', "bad_json"),
        (b"{}", "bad_request"),
        (json.dumps({"type": 7}).encode(), "bad_request"),
        (json.dumps({"type": "launch", "conv": CONV}).encode(), "unknown_type"),
        (json.dumps({"type": "send", "id": "x1", "body": "hi"}).encode(), "bad_request"),
        (json.dumps({"type": "send", "id": "x1", "conv": "dm:bob:alice", "body": "hi"}).encode(), "bad_conv"),
        (json.dumps({"type": "send", "id": "x1", "conv": "dm:alice", "body": "hi"}).encode(), "bad_conv"),
        (json.dumps({"type": "send", "id": "x1", "conv": 5, "body": "hi"}).encode(), "bad_conv"),
        (json.dumps({"type": "send", "id": "x1", "conv": "g:nope", "body": "hi"}).encode(), "bad_conv"),
        (json.dumps({"type": "send", "id": "bad id!", "conv": CONV, "body": "hi"}).encode(), "bad_request"),
        (json.dumps({"type": "send", "id": "x" * 65, "conv": CONV, "body": "hi"}).encode(), "bad_request"),
        (json.dumps({"type": "send", "id": "x1", "conv": CONV, "body": 5}).encode(), "bad_request"),
        (json.dumps({"type": "send", "id": "x1", "conv": CONV, "body": ""}).encode(), "bad_request"),
        (
            json.dumps({"type": "send", "id": "x1", "conv": CONV, "body": "hi", "kind": "gif"}).encode(),
            "bad_request",
        ),
        (
            json.dumps({"type": "send", "id": "x1", "conv": CONV, "kind": "media", "media": []}).encode(),
            "bad_request",
        ),
        (json.dumps({"type": "send", "id": "x1", "conv": CONV, "body": "x" * 70_000}).encode(), "too_large"),
        (
            json.dumps({"type": "send", "id": "x1", "conv": "g:01ARZ3NDEKTSV4RRFFQ69G5FAV", "body": "hi"}).encode(),
            "not_found",
        ),
        (json.dumps({"type": "read", "conv": CONV, "seq": -1}).encode(), "bad_request"),
        (json.dumps({"type": "read", "conv": CONV, "seq": True}).encode(), "bad_request"),
        (json.dumps({"type": "typing", "conv": CONV, "state": "yes"}).encode(), "bad_request"),
        (b'{"type":"send","id":"x1","conv":"%s","body":"a\\ud800b"}' % CONV.encode(), "bad_request"),
        (b'{"type":"send","id":"x1","conv":"%s","body":"\\udfff"}' % CONV.encode(), "bad_request"),
        (b'{"type":"typing","conv":"%s","state":true,"x\\ud83d":1}' % CONV.encode(), "bad_request"),
        (b"[" * 100_000, "too_large"),
        (b"[" * 5000 + b"]" * 5000, "bad_json"),
    ],
)
async def test_each_malformed_request_gets_its_error_over_mqtt(stack: Stack, payload: bytes, code: str) -> None:
    device = unique("d")
    async with connect_device(stack.mqtt_port, ALICE, device, stack.token(ALICE, device)) as dev:
        await dev.send(payload)
        errors = await dev.wait_for(lambda e: e["type"] == "error")
    assert errors[0]["code"] == code, errors[0]
    assert isinstance(errors[0]["message"], str)
    assert errors[0]["message"]
    assert "Traceback" not in errors[0]["message"]
    assert await stack.store.last_seq(CONV) == 0


@both_adapters
async def test_a_lone_surrogate_is_refused_and_the_next_send_is_acked(stack: Stack) -> None:
    """A body holding a lone UTF-16 surrogate (valid JSON, not encodable as UTF-8) once killed
    the store's writer thread: every later request waited forever."""
    device = unique("d")
    async with connect_device(stack.mqtt_port, ALICE, device, stack.token(ALICE, device)) as dev:
        await dev.send(b'{"type":"send","id":"sur1","conv":"%s","body":"a\\ud800b"}' % CONV.encode())
        error = (await dev.wait_for(lambda e: e["type"] == "error"))[0]
        assert (error["code"], error["id"]) == ("bad_request", "sur1")
        await dev.send(send_env(CONV, "a\U0001f600 pair is fine", id="sur2"))
        ack = (await dev.wait_for(lambda e: e["type"] == "ack"))[0]
    assert (ack["id"], ack["seq"]) == ("sur2", 1)


async def test_a_failing_write_fails_alone_and_the_writer_goes_on(tmp_path: Path) -> None:
    """Whatever one job raises (here the store is handed text SQLite cannot encode, as if the
    edge had let it through), that job gets an error and the writer serves the next ones."""
    async with await SqliteMessageStore.open(tmp_path / "s.sqlite3") as store:

        def message(client_id: str, body: str) -> NewMessage:
            return NewMessage(
                conv=CONV, members=(ALICE, BOB), sender=ALICE, device="d", client_id=client_id,
                kind="text", body=body, media=(), ts=1,
            )  # fmt: skip

        with pytest.raises(StorageError):
            await store.append(message("bad", "a\ud800b"))
        good = await store.append(message("good", "fine"))
        assert good.message.seq == 1
        assert await store.last_seq(CONV) == 1


@both_adapters
async def test_an_error_carries_the_request_id_and_the_bridge_keeps_serving(stack: Stack) -> None:
    device = unique("d")
    async with connect_device(stack.mqtt_port, ALICE, device, stack.token(ALICE, device)) as dev:
        await dev.send({"type": "send", "id": "keep1", "conv": CONV, "body": "hi", "kind": "sticker"})
        good = send_env(CONV, "still here")
        await dev.send(b"\x00garbage")
        await dev.send(good)
        await dev.wait_for(lambda e: e["type"] == "ack")
        errors = await dev.wait_for(lambda e: e["type"] == "error", count=2)
    assert errors[0]["id"] == "keep1"
    assert errors[0]["conv"] == CONV
    assert "id" not in errors[1]


# --- property-based fuzzing of the pipeline (real SQLite store) -------------------------------

# All of Unicode, lone surrogates included (st.text() leaves out category Cs by default).
any_text = st.text(alphabet=st.characters(exclude_categories=()), max_size=40)
ids = st.one_of(st.text(max_size=70), any_text, st.sampled_from(["m1", "x.y@z", "a" * 64]), st.integers(), st.none())
convs = st.one_of(
    st.sampled_from([CONV, dm_conv(ALICE, "carol"), "dm:bob:alice", "g:01ARZ3NDEKTSV4RRFFQ69G5FAV", "dm::", ""]),
    st.text(max_size=80),
    st.integers(),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "type": st.one_of(st.sampled_from(["send", "recv", "read", "typing", "ack", "msg"]), json_values),
        "id": ids,
        "conv": convs,
        "body": st.one_of(st.text(max_size=200), any_text, json_values),
        "kind": st.one_of(st.sampled_from(["text", "media"]), json_values),
        "media": st.one_of(st.lists(st.text(max_size=10), max_size=3), json_values),
        "seq": st.one_of(st.integers(-1, 3), st.integers(), json_values),
        "state": json_values,
    },
)
payloads = st.one_of(envelopes.map(lambda e: json.dumps(e).encode()), st.binary(max_size=300))


@pytest.fixture(scope="module")
def fuzz_storage(tmp_path_factory: pytest.TempPathFactory) -> StorageConfig:
    return StorageConfig(data_dir=tmp_path_factory.mktemp("fuzz"))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=payloads, user=st.sampled_from([ALICE, BOB, "carol"]))
async def test_fuzzed_envelopes_never_crash_and_get_the_right_kind_of_reply(
    fuzz_storage: StorageConfig, payload: bytes, user: str
) -> None:
    async with open_storage(fuzz_storage, push=False) as storage:
        store = storage.messages
        pipeline = Pipeline(log=store, states=store, groups=store, max_envelope_bytes=4096)
        before = await store.last_seq(CONV)
        out = await pipeline.handle(user, "d1", payload)
        replies: list[dict[str, Any]] = [json.loads(o.payload) for o in out]
        member_topics = {f"u/{m}/in" for m in (ALICE, BOB, "carol")}
        if not out or replies[0]["type"] in ("receipt", "typing"):
            # a valid recv/read/typing: no reply to the device; members may get an event
            request = json.loads(payload)
            assert request["type"] in ("recv", "read", "typing")
            assert {o.topic for o in out} <= member_topics
            assert all(
                r["type"] == request["type"].replace("recv", "receipt").replace("read", "receipt") for r in replies
            )
            assert all(r["user"] == user for r in replies)
            return
        assert out[0].topic == f"u/{user}/d1/in"
        first = replies[0]
        assert first["type"] in ("ack", "error")
        if first["type"] == "error":
            assert len(out) == 1
            assert first["code"] != "internal"
            assert await store.last_seq(CONV) == before
        else:
            assert {o.topic for o in out[1:]} <= member_topics
            assert all(r["type"] == "msg" and r["seq"] == first["seq"] for r in replies[1:])


# --- the same fuzz through the real broker: the node still acks a normal send after each ----------

deep = st.integers(1, 20_000).map(
    lambda n: b'{"type":"send","id":"deep","conv":"%s","body":' % CONV.encode() + b"[" * n + b"]" * n + b"}"
)
huge_numbers = st.sampled_from(
    [
        b'{"type":"read","conv":"%s","seq":%s}' % (CONV.encode(), b"9" * 5000),
        b'{"type":"read","conv":"%s","seq":1e400}' % CONV.encode(),
        b'{"type":"read","conv":"%s","seq":-1e-400}' % CONV.encode(),
        b'{"type":"read","conv":"%s","seq":18446744073709551616}' % CONV.encode(),
        b'{"type":"send","id":"n1","conv":"%s","body":"x","kind":%s}' % (CONV.encode(), b"1" * 4000),
    ]
)
hostile = st.one_of(envelopes.map(lambda e: json.dumps(e).encode()), deep, huge_numbers, st.binary(max_size=200))


@pytest.mark.parametrize("stack", ["inbroker"], indirect=True)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=hostile)
async def test_fuzz_through_the_real_broker_never_stops_the_node(stack: Stack, payload: bytes) -> None:
    device = unique("f")
    async with connect_device(stack.mqtt_port, ALICE, device, stack.token(ALICE, device)) as dev:
        await dev.send(payload)
        probe = send_env(CONV, "still serving")
        await dev.send(probe)
        await dev.wait_for(lambda e: e["type"] == "ack" and e["id"] == probe["id"], timeout=10)
        for _, envelope in dev.received:
            if envelope["type"] == "error":
                assert envelope["code"] != "internal", envelope
