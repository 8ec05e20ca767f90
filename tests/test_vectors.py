"""The shared protocol vectors (clients/vectors/, described in its README) replayed through the
Python SDK, as the TypeScript SDK's tests replay them (clients/js/sdk/test/unit/vectors.test.mjs).

Each file goes through the SDK's own code: ``clients.events.parse_event`` for events,
``PendingSend.envelope`` and ``ChatClient._publish_watermark`` for requests (``mqchat.protocol``'s
``parse_request``, the server's parser, for what is valid), ``ChatClient._dispatch`` for what the
outbox does with an error reply, ``HistoryClient`` for sync answers, ``ChatClient``'s catch-up
(``_dispatch``, ``_sync``, ``_repair_gap`` over its ``OrderingBuffer``) for gap scenarios,
``backoff_delay`` and ``clients.media`` for uploads. Both SDKs pass every case; the Python SDK
has no typing request and no parser for presence on ``p/{user}`` (it reads presence over HTTP),
so those cases are skipped here.
"""

from __future__ import annotations

import base64
import json
import random
from collections import deque
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.aio import ChatClient, Clock, backoff_delay
from clients.errors import HistoryFailed, MediaFailed
from clients.events import Ack, Attachment, ErrorReply, Event, Message, OtherEvent, parse_event
from clients.history import ConversationSummary, HistoryClient
from clients.media import MediaClient, encode_metadata
from clients.outbox import PendingSend
from clients.state import SqliteState
from mqchat.errors import ErrorCode, RequestError
from mqchat.ids import dm_conv, is_valid_id, parse_conv
from mqchat.protocol import TypingRequest, WatermarkRequest, encode, parse_request

VECTORS = Path(__file__).resolve().parent.parent / "clients" / "vectors"
BASE = "http://vectors.test"


def load(name: str) -> Any:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def cases(name: str, key: str) -> list[Any]:
    return [pytest.param(case, id=case["name"]) for case in load(name)[key]]


# --- the parsed form the vectors use: wire names, null for an absent optional value ------------------


def attachment_fields(a: Attachment) -> dict[str, Any]:
    return {
        "id": a.id,
        "type": a.type,
        "size": a.size,
        "name": a.name,
        "width": a.width,
        "height": a.height,
        "thumbnail": None if a.thumbnail is None else base64.b64encode(a.thumbnail).decode("ascii"),
        "encrypted": a.encrypted,
    }


def message_fields(m: Message) -> dict[str, Any]:
    return {
        "type": "msg",
        "conv": m.conv,
        "seq": m.seq,
        "mid": m.mid,
        "from": m.sender,
        "dev": m.device,
        "id": m.id,
        "ts": m.ts,
        "kind": m.kind,
        "body": m.body,
        "media": list(m.media),
        "attachments": [attachment_fields(a) for a in m.attachments],
    }


def event_fields(event: Event | None, expected: dict[str, Any] | None) -> dict[str, Any] | None:
    """The event as the vector writes it; an OtherEvent (receipt, typing, conv, unknown types: the
    Python SDK keeps them whole) is read for the fields the vector names."""
    if event is None:
        return None
    if isinstance(event, Message):
        return message_fields(event)
    if isinstance(event, Ack):
        return {"type": "ack", "id": event.id, "conv": event.conv, "seq": event.seq, "mid": event.mid, "ts": event.ts}
    if isinstance(event, ErrorReply):
        return {
            "type": "error",
            "code": event.code,
            "message": event.message,
            "id": event.id,
            "conv": event.conv,
            "retry_after_ms": event.retry_after_ms,
        }
    assert isinstance(event, OtherEvent)
    if expected is not None and expected["type"] == "other":
        return {"type": "other", "name": event.type, "data": event.data}
    wanted = [] if expected is None else [k for k in expected if k != "type"]
    return {"type": event.type, **{k: event.data.get(k) for k in wanted}}


def summary_fields(s: ConversationSummary) -> dict[str, Any]:
    return {
        "conv": s.conv,
        "kind": s.kind,
        "last_seq": s.last_seq,
        "delivered": s.delivered,
        "read": s.read,
        "unread": s.unread,
        "updated_at": s.updated_at,
        "messages": [message_fields(m) for m in s.messages],
        "messages_more": s.messages_more,
    }


# --- ids.json, requests.json -------------------------------------------------------------------------


def test_ids() -> None:
    v = load("ids.json")
    assert all(is_valid_id(i) for i in v["valid_ids"])
    assert not any(is_valid_id(i) for i in v["invalid_ids"])
    assert all(parse_conv(c) is not None for c in v["valid_convs"])
    assert [c for c in v["invalid_convs"] if parse_conv(c) is not None] == []
    assert [dm_conv(d["a"], d["b"]) for d in v["dm"]] == [d["conv"] for d in v["dm"]]


class RecordingMqtt:
    """Stands in for the client's MQTT connection: keeps what is published."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes, int]] = []

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        self.published.append((topic, payload, qos))


@pytest.mark.parametrize("case", cases("requests.json", "valid"))
async def test_requests_are_built_byte_for_byte(case: dict[str, Any]) -> None:
    args = case["args"]
    if case["request"] == "send":
        entry = PendingSend(
            id=args["id"], conv=args["conv"], body=args["body"], kind=args["kind"], media=tuple(args["media"])
        )
        assert encode(entry.envelope()).decode() == case["json"]
    elif case["request"] in ("recv", "read"):
        client = ChatClient(host="127.0.0.1", port=9, user="alice", device="alice-phone", token="t0ken")
        mqtt = RecordingMqtt()
        client._mqtt = mqtt  # type: ignore[assignment]
        assert await client._publish_watermark(case["request"], args["conv"], args["seq"])
        assert [(t, p.decode(), q) for t, p, q in mqtt.published] == [("u/alice/alice-phone/out", case["json"], 1)]
    else:
        pytest.skip("the Python SDK does not send typing requests")


@pytest.mark.parametrize("case", cases("requests.json", "valid"))
def test_the_server_takes_valid_requests_as_built(case: dict[str, Any]) -> None:
    request = parse_request(case["json"].encode())
    args = case["args"]
    if isinstance(request, TypingRequest):
        assert (request.conv.id, request.state) == (args["conv"], args["state"])
    elif isinstance(request, WatermarkRequest):
        assert (request.type, request.conv.id, request.seq) == (case["request"], args["conv"], args["seq"])
    else:
        assert (request.id, request.conv.id, request.body, request.kind) == (
            args["id"],
            args["conv"],
            args["body"],
            args["kind"],
        )
        assert list(request.media) == args["media"]


@pytest.mark.parametrize("case", cases("requests.json", "invalid"))
def test_the_server_refuses_invalid_requests_with_the_vectors_code(case: dict[str, Any]) -> None:
    with pytest.raises(RequestError) as refused:
        parse_request(encode({"type": case["request"], **case["args"]}))
    assert refused.value.code == case["code"]


# --- events.json, events-large.json ------------------------------------------------------------------


def payload_of(case: dict[str, Any]) -> bytes:
    if "payload_base64" in case:
        return base64.b64decode(case["payload_base64"])
    return str(case["payload"]).encode()


@pytest.mark.parametrize(
    "case",
    [
        *cases("events.json", "cases"),
        *cases("events-large.json", "cases"),
    ],
)
def test_events_parse_to_the_vectors_fields(case: dict[str, Any]) -> None:
    if case["topic"].startswith("p/"):
        pytest.skip("the Python SDK reads presence over HTTP only: it has no parser for p/{user}")
    expected = case["expected"]
    assert event_fields(parse_event(payload_of(case)), expected) == expected


# --- errors.json ------------------------------------------------------------------------------------


def test_every_error_code_with_its_http_status() -> None:
    v = load("errors.json")
    assert {c["code"] for c in v["codes"]} == {str(code) for code in ErrorCode}
    assert {c["code"]: c["http"] for c in v["codes"]} == {str(code): code.http_status for code in ErrorCode}


class StillClock(Clock):
    """Time that stands still unless a test moves it (``now``: seconds, or ms in a gap replay)."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        raise AssertionError(f"a replay never waits (asked to sleep {seconds})")


def send_reply_cases() -> list[Any]:
    return [pytest.param(c, id=c["name"]) for c in load("errors.json")["send_replies"]]


@pytest.mark.parametrize("case", send_reply_cases())
def test_the_outbox_treats_an_error_reply_as_the_vector_says(case: dict[str, Any]) -> None:
    clock = StillClock()
    client = ChatClient(host="127.0.0.1", port=9, user="alice", device="alice-phone", token="t0ken", clock=clock)
    for id_ in case["pending"]:
        client._outbox.add(PendingSend(id=id_, conv="dm:alice:bob", body="x"))
    if "acked_before" in case:
        client._dispatch(case["acked_before"].encode())
        assert isinstance(client._queue.get_nowait(), Ack)
    client._dispatch(case["reply"].encode())
    surfaced = [] if client._queue.empty() else [client._queue.get_nowait()]
    pending = [e.id for e in client._outbox.pending()]
    outcome = "final" if surfaced else ("retry" if json.loads(case["reply"])["id"] in pending else "stale")
    assert (outcome, pending) == (case["outcome"], case["pending_after"])
    if "held_ms" in case:
        assert client._held
        assert client._hold_until - clock.now == pytest.approx(case["held_ms"] / 1000)


# --- sync.json -------------------------------------------------------------------------------------


def scripted(exchanges: deque[dict[str, Any]]) -> httpx.MockTransport:
    """Answers each request with the next exchange, after checking it is the one expected."""

    def answer(request: httpx.Request) -> httpx.Response:
        assert exchanges, f"no request was expected: {request.method} {request.url}"
        exchange = exchanges.popleft()
        want = exchange["request"]
        got = (request.method, request.url.path, dict(request.url.params))
        assert got == (want["method"], want["path"], want["query"])
        return httpx.Response(exchange["response"]["status"], json=exchange["response"]["body"])

    return httpx.MockTransport(answer)


def history_client(exchanges: deque[dict[str, Any]]) -> tuple[HistoryClient, httpx.AsyncClient]:
    http = httpx.AsyncClient(base_url=BASE, transport=scripted(exchanges))
    return HistoryClient(http=http, token="t0ken", timeout=10, sleep=StillClock().sleep, backoff=lambda a: 0.0), http


@pytest.mark.parametrize("case", cases("sync.json", "sync_pages"))
async def test_sync_pages(case: dict[str, Any]) -> None:
    exchanges = deque([case])
    history, http = history_client(exchanges)
    async with http:
        if "error" in case:
            with pytest.raises(HistoryFailed) as failed:
                await history.sync(case["since"], include_messages=50)
            assert failed.value.code == case["error"]
        else:
            page = await history.sync(case["since"], include_messages=50)
            parsed = {"conversations": [summary_fields(s) for s in page.conversations], "cursor": page.cursor}
            assert {**parsed, "more": page.more} == case["expected"]
    assert not exchanges


@pytest.mark.parametrize("case", cases("sync.json", "messages_pages"))
async def test_messages_pages(case: dict[str, Any]) -> None:
    exchanges = deque([case])
    history, http = history_client(exchanges)
    async with http:
        if "error" in case:
            with pytest.raises(HistoryFailed) as failed:
                await history.messages_after(case["conv"], case["after"])
            assert failed.value.code == case["error"]
        else:
            page = await history.messages_after(case["conv"], case["after"])
            parsed = {"conv": page.conv, "messages": [message_fields(m) for m in page.messages]}
            assert {**parsed, "more": page.more, "last_seq": page.last_seq} == case["expected"]
    assert not exchanges


# --- gaps.json -------------------------------------------------------------------------------------


def take_delivered(client: ChatClient) -> list[list[Any]]:
    """What the app takes from events() now, as [conv, seq]; taking it is what marks it delivered."""
    taken = []
    while not client._queue.empty():
        event = client._queue.get_nowait()
        if isinstance(event, Message):
            client._handed_over(event)
            taken.append([event.conv, event.seq])
    return taken


@pytest.mark.parametrize("scenario", cases("gaps.json", "scenarios"))
async def test_gap_scenarios(scenario: dict[str, Any], tmp_path: Path) -> None:
    state_path = tmp_path / "bob.sqlite"
    seeded = SqliteState(state_path, user="bob")
    seeded.set_cursor(scenario["cursor"])
    for conv, seq in scenario["delivered"].items():
        seeded.set_delivered(conv, seq)
    seeded.close()
    clock = StillClock()  # in ms here: the grace is given in ms too, so the arithmetic is exact
    client = ChatClient(
        host="127.0.0.1",
        port=9,
        user="bob",
        device="bob-phone",
        token="t0ken",
        http_url=BASE,
        state_path=state_path,
        gap_grace_s=scenario["grace_ms"],
        clock=clock,
        rng=random.Random(0),
    )
    exchanges: deque[dict[str, Any]] = deque()
    client._history, http = history_client(exchanges)
    assert client._ordering is not None
    try:
        for i, step in enumerate(scenario["steps"]):
            where = f"step {i} at {step['at_ms']} ms"
            clock.now = float(step["at_ms"])
            exchanges.extend(step.get("http", []))
            before = (client._duplicates, client._gaps_detected, client._gap_fetches)
            due = client._ordering.gaps_due(clock.now)
            assert due == step.get("gaps_due", []), where
            if "live" in step:
                client._dispatch(encode(step["live"]))
            if step.get("sync"):
                await client._sync()
            for conv in due:  # what the client's gap task does when a gap is due
                client._gap_fetches += 1
                await client._repair_gap(conv)
            assert take_delivered(client) == step.get("deliver", []), where
            assert not exchanges, f"{where}: every expected request made"
            after = (client._duplicates, client._gaps_detected, client._gap_fetches)
            flags = (int(step.get("duplicate", False)), int(step.get("gap_opened", False)), len(due))
            assert tuple(a - b for a, b in zip(after, before, strict=True)) == flags, where
            if "cursor_saved" in step:
                assert client._state.cursor() == step["cursor_saved"], where
    finally:
        await http.aclose()
        client._state.close()
        client._uploads.close()
        if client._owned_outbox is not None:
            client._owned_outbox.close()


# --- backoff.json, tus.json ---------------------------------------------------------------------------


class Draw(random.Random):
    """A Random whose uniform(a, b) is the vector's draw u in [0, 1): a + (b - a) * u."""

    def __init__(self, u: float) -> None:
        super().__init__()
        self.u = u

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.u


def test_backoff() -> None:
    v = load("backoff.json")
    first, cap = v["first_ms"] / 1000, v["cap_ms"] / 1000
    for case in v["cases"]:
        delay = backoff_delay(case["attempt"], rng=Draw(case["random"]), first=first, cap=cap)
        assert delay * 1000 == pytest.approx(case["delay_ms"]), case
        assert backoff_delay(case["attempt"], rng=Draw(case["random"])) * 1000 == pytest.approx(case["delay_ms"])


def test_tus_metadata() -> None:
    v = load("tus.json")
    for case in v["metadata"]:
        assert encode_metadata(dict(case["pairs"])) == case["header"]
    for key in v["invalid_keys"]:
        with pytest.raises(ValueError, match="tus metadata key"):
            encode_metadata({key: "x"})


@pytest.mark.parametrize("case", cases("tus.json", "uploads"))
async def test_tus_upload_headers(case: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / case["filename"]
    path.write_bytes(base64.b64decode(case["file_base64"]))
    seen: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(403, json={"error": "forbidden", "message": "stop here"})

    async with httpx.AsyncClient(base_url=BASE, transport=httpx.MockTransport(refuse)) as http:
        media = MediaClient(http=http, token="t0ken", timeout=10, sleep=StillClock().sleep, backoff=lambda a: 0.0)
        with pytest.raises(MediaFailed):
            await media.upload(path, content_type=case["content_type"], encrypted=case["encrypted"])
    (request,) = seen
    assert (request.method, request.url.path) == ("POST", "/v1/media")
    assert request.headers["authorization"] == "Bearer t0ken"
    assert {k: request.headers[k] for k in case["headers"]} == case["headers"]
