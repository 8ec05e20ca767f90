"""``mqchat bench acl``: what the broker's membership answers cost, cached and not.

A device's SUBSCRIBE to ``p/{user}`` asks "do we share a conversation?", to ``c/{conv}/in``
"am I a member?". Both are store reads; ``broker.membership.MembershipCache`` keeps the
answers until a membership change. Measured side by side in one run:

- per question: the store's answer (SQLite, indexed) vs a cache hit, µs per answer;
- end to end: SUBSCRIBEs per second through a real broker on 127.0.0.1 with the cache and
  with a cache that never keeps anything (``ttl_s=0``: every SUBSCRIBE asks the store).
"""

from __future__ import annotations

import asyncio
import random
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from broker.membership import MembershipCache
from broker.serve import Listeners, serve_broker
from clients.testing.loadgen import connect
from mqchat.bench.harness import Options, device_creds, progress
from mqchat.bench.report import dress, figure, paired_bars, print_notes, print_ratios, print_table, save
from mqchat.ids import new_group_id
from storage.sqlite import SqliteMessageStore


async def _populate(store: SqliteMessageStore, users: list[str], rng: random.Random) -> tuple[list[str], str]:
    groups = []
    for _ in range(len(users) // 4):  # each user in ~5 groups of 20
        members = tuple(rng.sample(users, 20))
        group = await store.create_group(
            conv=new_group_id(), name="g", kind="group", creator=members[0], members=members[1:], ts=0
        )
        groups.append(group.conv)
    channel = await store.create_group(
        conv=new_group_id(), name="c", kind="channel", creator=users[0], members=tuple(users[1:]), ts=0
    )
    return groups, channel.conv


async def _time_each(calls: list[Callable[[], Awaitable[bool]]]) -> dict[str, float]:
    times = []
    for call in calls:
        started = time.perf_counter_ns()
        await call()
        times.append((time.perf_counter_ns() - started) / 1000)
    times.sort()
    return {
        "answers": len(times),
        "mean_us": round(statistics.fmean(times), 2),
        "p50_us": round(times[len(times) // 2], 2),
        "p99_us": round(times[int(len(times) * 0.99)], 2),
    }


async def _subscribe_rate(store: SqliteMessageStore, cache: MembershipCache, topics: list[str], viewer: str) -> float:
    secret = secrets.token_urlsafe(32)
    async with serve_broker(listeners=Listeners(host="127.0.0.1", mqtt=0), secret=secret, membership=cache) as broker:
        device = "acl-bench"
        client = await connect(
            "127.0.0.1",
            broker.bound_port,
            device_creds(secret, viewer, device),
        )
        try:
            for topic in topics[:50]:  # warm up: the cached run serves these from memory afterwards
                await client.subscribe([(topic, 1)])
            started = time.perf_counter()
            for topic in topics:
                codes = await client.subscribe([(topic, 1)])
                if codes != [1]:
                    raise RuntimeError(f"subscribe to {topic} refused")
            return len(topics) / (time.perf_counter() - started)
        finally:
            client.disconnect()
            await client.wait_closed()


async def measure(workdir: Path, *, quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    rng = random.Random(7)
    n_users = 500 if quick else 2000
    users = [f"user{i}" for i in range(n_users)]
    store = await SqliteMessageStore.open(workdir / "acl.sqlite3")
    try:
        progress(f"acl: {n_users} users in {n_users // 4} groups of 20 and one channel")
        groups, channel = await _populate(store, users, rng)
        sharing = []
        for conv in rng.sample(groups, min(len(groups), 400)):
            group = await store.group(conv)
            assert group is not None
            a, b = rng.sample(list(group.users), 2)
            sharing.append((a, b))
        cache = MembershipCache(groups=store, privacy=store)
        for a, b in sharing:  # fill
            await cache.shares_conversation(a, b)
        for user in users:
            await cache.is_member(channel, user)
        progress("acl: timing store answers and cache hits")
        results: dict[str, dict[str, Any]] = {
            "store": {
                "label": "store (SQLite) per question",
                "shares": await _time_each([partial(store.shares_conversation, a, b) for a, b in sharing]),
                "member": await _time_each([partial(_member, store, channel, u) for u in users]),
            },
            "cache": {
                "label": "cache hit per question",
                "shares": await _time_each([partial(cache.shares_conversation, a, b) for a, b in sharing]),
                "member": await _time_each([partial(cache.is_member, channel, u) for u in users]),
            },
        }
        viewer = sharing[0][0]
        friends: set[str] = set()
        for conv in groups:
            group = await store.group(conv)
            if group is not None and viewer in group.users:
                friends.update(group.users)
        friends.discard(viewer)
        topics = [f"p/{u}" for u in sorted(friends)] + [f"c/{channel}/in"]
        topics = (topics * (1 + 400 // max(1, len(topics))))[:400]
        progress(f"acl: {len(topics)} SUBSCRIBEs through the broker, cached and uncached")
        cached_rate = await _subscribe_rate(store, MembershipCache(groups=store, privacy=store), topics, viewer)
        uncached = MembershipCache(groups=store, privacy=store, ttl_s=0)
        uncached_rate = await _subscribe_rate(store, uncached, topics, viewer)
        results["cache"]["subscribes_per_s"] = round(cached_rate, 1)
        results["store"]["subscribes_per_s"] = round(uncached_rate, 1)
    finally:
        await store.aclose()
    store_r, cache_r = results["store"], results["cache"]
    ratios = {
        "shares_store_vs_cache_mean": round(store_r["shares"]["mean_us"] / cache_r["shares"]["mean_us"], 1),
        "member_store_vs_cache_mean": round(store_r["member"]["mean_us"] / cache_r["member"]["mean_us"], 1),
        "subscribes_cached_vs_uncached": round(cached_rate / uncached_rate, 2),
    }
    notes = [
        "store: one indexed SQLite read per question (a reader thread); cache: MembershipCache hit (generation check).",
        "subscribes: one client, SUBSCRIBE after SUBACK, p/{user} of users sharing a group and the channel topic.",
        "A 'no' about sharing a conversation is never cached (a first 1:1 message creates one with no event).",
    ]
    params = {"users": n_users, "groups": len(groups), "group_size": 20, "pairs": len(sharing), "topics": len(topics)}
    return {"parameters": params, "systems": results, "skipped": {}, "ratios": ratios, "notes": notes}


async def _member(store: SqliteMessageStore, conv: str, user: str) -> bool:
    standing = await store.membership(conv=conv, user=user)
    return standing is not None and standing.member is not None


def run(opts: Options, workdir: Path) -> dict[str, Any]:
    return asyncio.run(measure(workdir, quick=opts.quick, progress=progress))


def table(data: dict[str, Any]) -> None:
    rows = [
        [
            s["label"],
            s["shares"]["mean_us"],
            s["shares"]["p99_us"],
            s["member"]["mean_us"],
            s["member"]["p99_us"],
            s["subscribes_per_s"],
        ]
        for s in data["systems"].values()
    ]
    print_table(
        "acl: membership answers for presence (shares a conversation?) and channel (member?) subscriptions",
        ["answered by", "shares mean us", "shares p99 us", "member mean us", "member p99 us", "SUBSCRIBE/s"],
        rows,
    )
    print_ratios(data)
    print_notes(data)


def plot(data: dict[str, Any], path: Path) -> None:
    fig, (left, right) = figure(2, size=(10, 4.5))
    systems = list(data["systems"].values())
    paired_bars(left, [(question, [s[question]["mean_us"] for s in systems]) for question in ("shares", "member")])
    dress(
        left,
        title="One membership question",
        ylabel="µs per answer (mean)",
        xticks=[s["label"] for s in systems],
        log=True,
    )
    rates = [s["subscribes_per_s"] for s in systems]
    bars = right.bar(["uncached (store)", "cached"], [rates[0], rates[1]])
    right.bar_label(bars, labels=[f"{v:,.0f}" for v in rates], fontsize=8)
    dress(
        right,
        title=f"{data['parameters']['topics']} SUBSCRIBEs via the broker",
        ylabel="SUBSCRIBE/s (one client, sequential)",
        legend=False,
    )
    save(fig, path, data)
