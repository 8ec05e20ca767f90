"""The chaos conversation, run against one `mqchat serve` or a cluster behind a balancer.

20 users (8 of them with two devices) exchange 2,000 messages in 1:1 conversations through a
lossy proxy (latency, jitter, cuts, stalls, resets in the middle of a packet) while the caller's
faults happen (processes killed, Redis restarted) at set points of the sending. At the end, for
every device: every message of its conversations is present exactly once, in seq order, with no
seq missing; every message a client sent was acked; the store holds no duplicate. One more
device, offline for the whole exchange, catches up through the sync endpoint alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiomqtt
import httpx

from clients import ChatClient, Message
from clients.errors import ConnectionFailed
from clients.testing.netem import LossyProxy, NetemProfile
from mqchat.ids import dm_conv
from tests.helpers import unique

USERS = 20
TWO_DEVICES = 8
MESSAGES = 2000
DEADLINE_S = 240.0

LOSSY = NetemProfile(
    latency_ms=30,
    jitter_ms=20,
    cut_rate=1 / 12,  # a cut every ~12 s per connection
    stall_rate=1 / 6,
    stall_ms=800,
    reset_mid_packet_rate=1 / 25,
)


class Target(Protocol):
    """Where the phones connect: one node, or a cluster's balancer."""

    @property
    def mqtt_port(self) -> int: ...

    @property
    def http_port(self) -> int: ...

    def token(self, user: str, device: str) -> str: ...

    def http(self, user: str | None = None) -> httpx.AsyncClient: ...


@dataclass(frozen=True)
class Fault:
    at: float  # the fraction of the sending time at which it happens
    what: str  # for the report
    act: Callable[[], Awaitable[None]]


@contextlib.asynccontextmanager
async def phone(
    target: Target, proxy: LossyProxy, http_proxy: LossyProxy, user: str, device: str, state: Path
) -> AsyncIterator[ChatClient]:
    """A ChatClient whose first connect is retried too (the network may cut it)."""
    deadline = time.monotonic() + 60
    while True:
        client = ChatClient(
            host="127.0.0.1",
            port=proxy.port,
            user=user,
            device=device,
            token=target.token(user, device),
            keepalive=5,
            resend_after=3.0,
            http_url=f"http://127.0.0.1:{http_proxy.port}",
            state_path=state,
            connect_timeout=5.0,
            gap_grace_s=0.5,
        )
        try:
            await client.__aenter__()
        except (ConnectionFailed, aiomqtt.MqttError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
            continue
        try:
            yield client
        finally:
            await client.aclose()
        return


async def run_chaos(target: Target, tmp_path: Path, faults: Sequence[Fault], *, send_seconds: float) -> str:
    """The exchange with faults; asserts every guarantee above and returns a report line."""
    rng = random.Random(20261123)
    users = [unique(f"c{i}-") for i in range(USERS)]
    devices = {u: [f"{u}-d0", f"{u}-d1"] if i < TWO_DEVICES else [f"{u}-d0"] for i, u in enumerate(users)}
    peers = {u: [users[(i + 1) % USERS], users[(i + 7) % USERS]] for i, u in enumerate(users)}
    convs_of: dict[str, set[str]] = defaultdict(set)
    for u, ps in peers.items():
        for p in ps:
            convs_of[u].add(dm_conv(u, p))
            convs_of[p].add(dm_conv(u, p))
    away_user = users[0]  # its second device stays away for the whole exchange

    received: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    sent_ids: dict[str, list[str]] = defaultdict(list)  # device -> client ids it sent

    async with (
        LossyProxy(target_port=target.mqtt_port, profile=LOSSY, seed=1) as proxy,
        LossyProxy(target_port=target.http_port, profile=LOSSY, seed=2) as http_proxy,
        contextlib.AsyncExitStack() as stack,
    ):
        clients: dict[str, ChatClient] = {}
        for u in users:
            for d in devices[u]:
                if u == away_user and d.endswith("-d1"):
                    continue
                clients[d] = await stack.enter_async_context(
                    phone(target, proxy, http_proxy, u, d, tmp_path / f"{d}.sqlite3")
                )

        async def consume(device: str, client: ChatClient) -> None:
            async for event in client.events():
                if isinstance(event, Message):
                    received[device][event.conv].append(event.seq)

        readers = [asyncio.create_task(consume(d, c), name=f"read-{d}") for d, c in clients.items()]

        async def chaos() -> None:
            for fault in sorted(faults, key=lambda f: f.at):
                await asyncio.sleep(send_seconds * fault.at - (time.monotonic() - started))
                await fault.act()

        started = time.monotonic()
        faulting = asyncio.create_task(chaos(), name="chaos")
        senders = list(clients.items())
        plan: dict[str, list[tuple[float, str]]] = defaultdict(list)  # device -> (when, conv)
        for n in range(MESSAGES):
            device, client = senders[n % len(senders)]
            plan[device].append((send_seconds * n / MESSAGES, dm_conv(client.user, rng.choice(peers[client.user]))))

        async def send_all(device: str) -> None:
            """One phone's user typing: its own pace, whatever the network does to the others."""
            client = clients[device]
            for k, (when, conv) in enumerate(plan[device]):
                await asyncio.sleep(max(0.0, started + when - time.monotonic()))
                sent_ids[device].append(await client.send(conv, f"{device} #{k}"))

        await asyncio.gather(*(send_all(d) for d in plan))
        await faulting
        phases = {"sent": time.monotonic() - started}

        # every message a client believed sent gets its ack, however long the network takes
        deadline = time.monotonic() + DEADLINE_S
        for device, ids in sent_ids.items():
            for id in ids:
                await clients[device].wait_acked(id, timeout=max(1.0, deadline - time.monotonic()))

        phases["acked"] = time.monotonic() - started

        # the server's view: each conversation gapless, no duplicate stored
        last_seq: dict[str, int] = {}
        stored_ids: list[str] = []
        stored_at: set[tuple[str, str]] = set()  # (id, conv#seq), for the report of a failure
        for conv in sorted({c for cs in convs_of.values() for c in cs}):
            member = conv.split(":")[1]
            async with target.http(member) as http:
                after, seqs = 0, []
                while True:
                    page = (
                        await http.get(f"/v1/conversations/{conv}/messages", params={"after": after, "limit": 500})
                    ).json()
                    seqs += [m["seq"] for m in page["messages"]]
                    stored_ids += [m["id"] for m in page["messages"]]
                    stored_at.update((m["id"], f"{conv}#{m['seq']}") for m in page["messages"])
                    if not page["more"]:
                        break
                    after = seqs[-1]
            assert seqs == list(range(1, len(seqs) + 1)), conv
            last_seq[conv] = len(seqs)
        sent = [i for ids in sent_ids.values() for i in ids]
        counts = Counter(stored_ids)
        twice = sorted((i, sorted(at for j, at in stored_at if j == i)) for i, n in counts.items() if n > 1)
        assert not twice, f"stored twice: {twice}"
        assert not set(sent) - set(stored_ids), f"acked but not stored: {sorted(set(sent) - set(stored_ids))}"
        assert sorted(stored_ids) == sorted(sent)
        assert len(sent) == MESSAGES

        # every device converges: all of its conversations, in order, exactly once
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            if all(
                received[d][c] == list(range(1, last_seq[c] + 1))
                for d, cl in clients.items()
                for c in convs_of[cl.user]
            ):
                break
            await asyncio.sleep(0.5)
        phases["converged"] = time.monotonic() - started
        for d, cl in clients.items():
            for c in convs_of[cl.user]:
                assert received[d][c] == list(range(1, last_seq[c] + 1)), (d, c, received[d][c][-5:])

        stats = proxy.statistics()
        for r in readers:
            r.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    # the device that was away for the whole exchange: one sync, one history call per conversation
    away = devices[away_user][1]
    requests = 0
    got: dict[str, list[int]] = {}
    async with target.http(away_user) as http:
        body: dict[str, Any] = (await http.get("/v1/conversations")).json()
        requests += 1
        for item in body["conversations"]:
            page = (
                await http.get(f"/v1/conversations/{item['conv']}/messages", params={"after": 0, "limit": 500})
            ).json()
            requests += 1
            got[item["conv"]] = [m["seq"] for m in page["messages"]]
    assert got == {c: list(range(1, last_seq[c] + 1)) for c in convs_of[away_user]}
    assert requests == 1 + len(convs_of[away_user])

    checked = sum(len(v) for d in received.values() for v in d.values())
    return (
        f"{len(users)} users, {len(clients)} connected devices (+1 away), {MESSAGES} messages in "
        f"{len(last_seq)} conversations; {checked} deliveries checked in order and exactly once; "
        f"proxy: {stats.accepted} connections, {stats.cuts} cuts, {stats.stalls} stalls, "
        f"{stats.mid_packet_resets} mid-packet resets; faults: {', '.join(f.what for f in faults)}; "
        f"away device {away} caught up in {requests} requests; "
        + ", ".join(f"{k} at {v:.0f} s" for k, v in phases.items())
    )
