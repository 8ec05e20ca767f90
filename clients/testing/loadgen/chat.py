"""Load through the full pipeline of ``mqchat serve``, with the wire protocol's envelopes.

::

    chat_run    senders ──send──▶ mqchat ──ack──▶ senders, ──msg──▶ recipients   (per offered rate)
    abuse_run   one user sends open loop ──▶ send→ack, while one device floods
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from clients.testing.loadgen.client import Creds, MessageCallback, MqttClient, connect
from clients.testing.loadgen.measure import Progress, Ticker, close_all, drain, open_loop, percentiles, wait_writable
from mqchat.ids import dm_conv

__all__ = ["abuse_run", "chat_run"]


async def chat_run(
    *,
    host: str,
    port: int,
    pairs: Sequence[tuple[str, Creds, str, Creds]],
    rates: Sequence[float],
    duration: float,
    id_prefix: str,
    drain_s: float = 15.0,
    body_size: int = 100,
    progress: Progress | None = None,
    recipient_port: int | None = None,
) -> list[dict[str, Any]]:
    """Sender a_i sends to b_i over ``dm:{a_i}:{b_i}``; each rate (total sends/s, open loop) runs
    for ``duration`` seconds. Measures send→ack and send→recipient latency and what was lost.

    ``pairs`` are (user a, device creds of a, user b, device creds of b); recipients connect to
    ``recipient_port`` when given (another node of a cluster), else to ``port``. A rate that loses more
    than a fifth of its messages ends the run (higher rates would only pile on)."""
    sent_at: dict[str, int] = {}
    ack_ms: list[float] = []
    deliver_ms: list[float] = []
    delivered: set[str] = set()
    acked: set[str] = set()
    errors: list[str] = []

    def on_sender(topic: str, payload: bytes, qos: int) -> None:
        if not topic.endswith("/in"):
            return
        env = json.loads(payload)
        mid = env.get("id")
        if env.get("type") == "ack" and isinstance(mid, str) and mid in sent_at and mid not in acked:
            acked.add(mid)
            ack_ms.append((time.monotonic_ns() - sent_at[mid]) / 1e6)
        elif env.get("type") == "error" and len(errors) < 5:
            errors.append(str(env.get("code")))

    def on_recipient(topic: str, payload: bytes, qos: int) -> None:
        env = json.loads(payload)
        if env.get("type") != "msg":
            return
        mid = env.get("id")
        if isinstance(mid, str) and mid in sent_at and mid not in delivered:
            delivered.add(mid)
            deliver_ms.append((time.monotonic_ns() - sent_at[mid]) / 1e6)

    senders: list[tuple[MqttClient, str, str]] = []
    recipients: list[MqttClient] = []
    try:
        await _connect_pairs(host, port, recipient_port or port, pairs, on_sender, on_recipient, senders, recipients)
        results: list[dict[str, Any]] = []
        ticker = Ticker(progress)
        ids: list[str] = []
        step = {"rate": 0.0, "count": 0}
        send = _sender(senders, ids, sent_at, pad="." * max(0, body_size - 20))
        writable = functools.partial(wait_writable, [c for c, _t, _v in senders])
        line = functools.partial(_status, step, sent_at, acked, delivered)

        for rate in rates:
            for coll in (sent_at, acked, delivered, ack_ms, deliver_ms, errors):
                coll.clear()
            count = int(rate * duration)
            step.update(rate=rate, count=count)
            ids[:] = [f"{id_prefix}-{int(rate)}-{i}" for i in range(count)]
            t0 = time.monotonic()
            sent = await open_loop(rate, count, t0 + duration * 3 + 5, send, writable, lambda i: ticker(line))
            await drain(functools.partial(_pending, sent, acked, delivered), drain_s, lambda: ticker(line))
            result = {"rate": rate, "sent": sent, "send_seconds": round(time.monotonic() - t0, 3)}
            results.append(result | _outcome(sent, acked, delivered, errors, ack_ms, deliver_ms))
            if progress is not None:
                progress(line() + " (done)")
            if sent == 0 or (sent - len(delivered)) > sent / 5:
                break
            await asyncio.sleep(1.0)
        return results
    finally:
        await close_all([*(c for c, _t, _v in senders), *recipients])


async def _connect_pairs(
    host: str,
    port: int,
    recipient_port: int,
    pairs: Sequence[tuple[str, Creds, str, Creds]],
    on_sender: MessageCallback,
    on_recipient: MessageCallback,
    senders: list[tuple[MqttClient, str, str]],
    recipients: list[MqttClient],
) -> None:
    """Connect and subscribe both devices of each pair; senders get (client, out topic, conv)."""
    for a, ca, b, cb in pairs:
        s = await connect(host, port, ca, on_message=on_sender)
        await s.subscribe([(f"u/{a}/in", 1), (f"u/{a}/{ca.client_id}/in", 1)])
        r = await connect(host, recipient_port, cb, on_message=on_recipient)
        await r.subscribe([(f"u/{b}/in", 1), (f"u/{b}/{cb.client_id}/in", 1)])
        senders.append((s, f"u/{a}/{ca.client_id}/out", dm_conv(a, b)))
        recipients.append(r)


def _sender(
    senders: Sequence[tuple[MqttClient, str, str]], ids: list[str], sent_at: dict[str, int], *, pad: str
) -> Callable[[int, int], None]:
    """``send(i, intended_ns)``: message ``ids[i]`` from sender ``i % n``, its send time noted."""
    n = len(senders)

    def send(i: int, intended: int) -> None:
        client, topic, conv = senders[i % n]
        mid = ids[i]
        sent_at[mid] = intended
        env = {"type": "send", "id": mid, "conv": conv, "kind": "text", "body": f"{intended:020d}{pad}"}
        client.publish(topic, json.dumps(env, separators=(",", ":")).encode(), 1)

    return send


def _status(step: dict[str, float], sent_at: dict[str, int], acked: set[str], delivered: set[str]) -> str:
    return (
        f"{step['rate']:g}/s: sent {len(sent_at)}/{int(step['count'])}, acked {len(acked)}, delivered {len(delivered)}"
    )


def _pending(sent: int, *seen: set[str]) -> bool:
    """Whether some of the ``sent`` messages are still missing from one of ``seen``."""
    return any(len(s) < sent for s in seen)


def _outcome(
    sent: int,
    acked: set[str],
    delivered: set[str],
    errors: list[str],
    ack_ms: list[float],
    deliver_ms: list[float],
) -> dict[str, Any]:
    """What came of one rate's sends: counts, losses, errors and latency percentiles."""
    return {
        "acked": len(acked),
        "delivered": len(delivered),
        "lost_ack": sent - len(acked),
        "lost_delivery": sent - len(delivered),
        "errors": list(errors),
        "ack": percentiles(ack_ms),
        "delivery": percentiles(deliver_ms),
    }


# --- abuse: one device floods while another user chats -----------------------------------------


async def abuse_run(
    *,
    host: str,
    port: int,
    legit: tuple[str, Creds, str],
    flooder: tuple[str, Creds, str] | None,
    legit_rate: float,
    duration: float,
    id_prefix: str,
    flood_inflight: int = 200,
    drain_s: float = 10.0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``legit`` = (user, creds, conv) sends at ``legit_rate``/s (open loop) for ``duration`` s
    and measures send→ack; meanwhile ``flooder`` (if any) publishes sends as fast as the broker
    acknowledges them (at most ``flood_inflight`` unacknowledged). Counts what the flood got:
    acks, and errors by code."""
    sent_at: dict[str, int] = {}
    ack_ms: list[float] = []
    flood = {"sent": 0, "acked": 0}
    flood_errors: dict[str, int] = {}

    def on_legit(topic: str, payload: bytes, qos: int) -> None:
        env = json.loads(payload)
        mid = env.get("id")
        if env.get("type") == "ack" and isinstance(mid, str) and mid in sent_at:
            ack_ms.append((time.monotonic_ns() - sent_at.pop(mid)) / 1e6)

    def on_flood(topic: str, payload: bytes, qos: int) -> None:
        env = json.loads(payload)
        if env.get("type") == "ack":
            flood["acked"] += 1
        elif env.get("type") == "error":
            code = str(env.get("code"))
            flood_errors[code] = flood_errors.get(code, 0) + 1

    user, creds, conv = legit
    clients: list[MqttClient] = []
    try:
        good = await connect(host, port, creds, on_message=on_legit)
        clients.append(good)
        await good.subscribe([(f"u/{user}/in", 1), (f"u/{user}/{creds.client_id}/in", 1)])
        good_topic = f"u/{user}/{creds.client_id}/out"
        end = time.monotonic() + duration

        def send(i: int, intended: int) -> None:
            mid = f"{id_prefix}-l{i}"
            sent_at[mid] = intended
            env = {"type": "send", "id": mid, "conv": conv, "body": f"hello {i}"}
            good.publish(good_topic, json.dumps(env, separators=(",", ":")).encode(), 1)

        ticker = Ticker(progress)

        def line() -> str:
            return f"legit acked {len(ack_ms)}, flood sent {flood['sent']} acked {flood['acked']} errors {flood_errors}"

        count = int(legit_rate * duration)
        pump = _flood(
            host, port, flooder, on_flood, clients, flood, until=end, id_prefix=id_prefix, inflight=flood_inflight
        )
        flooding = asyncio.create_task(pump, name="abuse-flood")
        sent = await open_loop(legit_rate, count, end + duration, send, good.wait_writable, lambda i: ticker(line))
        await flooding
        await drain(lambda: len(ack_ms) < sent, drain_s, lambda: ticker(line))
        return {
            "legit_sent": sent,
            "legit_acked": len(ack_ms),
            "ack": percentiles(ack_ms),
            "flood_sent": flood["sent"],
            "flood_acked": flood["acked"],
            "flood_errors": dict(flood_errors),
        }
    finally:
        await close_all(clients)


async def _flood(
    host: str,
    port: int,
    flooder: tuple[str, Creds, str] | None,
    on_flood: MessageCallback,
    clients: list[MqttClient],
    flood: dict[str, int],
    *,
    until: float,
    id_prefix: str,
    inflight: int,
) -> None:
    """The flooding device (if any): sends as fast as PUBACKs allow until ``until``."""
    if flooder is None:
        return
    f_user, f_creds, f_conv = flooder
    bad = await connect(host, port, f_creds, on_message=on_flood)
    clients.append(bad)
    await bad.subscribe([(f"u/{f_user}/{f_creds.client_id}/in", 1)])
    topic = f"u/{f_user}/{f_creds.client_id}/out"
    while time.monotonic() < until:
        await bad.wait_inflight_at_most(inflight)
        env = {"type": "send", "id": f"{id_prefix}-f{flood['sent']}", "conv": f_conv, "body": "spam"}
        bad.publish(topic, json.dumps(env, separators=(",", ":")).encode(), 1)
        flood["sent"] += 1
        if flood["sent"] % 64 == 0:
            await bad.wait_writable()
            await asyncio.sleep(0)
