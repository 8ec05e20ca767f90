"""The ``mqchat bench`` command line: parse the flags, run the scenarios, write their results."""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mqchat.bench.harness import LOAD_CPU, SYSTEMS, BenchError, Options, pin, raise_nofile
from mqchat.bench.report import write_result

SCENARIOS = ("relay", "chat", "fanout", "connections", "acl", "abuse", "media", "cluster")
"""Each is a module of this package with ``run`` (measure, return the result body), ``table``
(print it) and ``plot`` (draw it); it is imported only when it runs, so ``--help`` starts no
broker code."""
EVERY = SCENARIOS[:-1]
"""What ``all`` runs: ``cluster`` also needs Java 17, the Cassandra jars and HAProxy, so it runs
when named."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    """One scenario's three steps, as its module defines them."""

    run: Callable[[Options, Path], dict[str, Any]]
    table: Callable[[dict[str, Any]], None]
    plot: Callable[[dict[str, Any], Path], None]


def load_scenario(name: str) -> Scenario:
    module = importlib.import_module(f"mqchat.bench.{name}")
    return Scenario(run=module.run, table=module.table, plot=module.plot)


def run_scenario(name: str, opts: Options) -> dict[str, Any]:
    scenario = load_scenario(name)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mqchat-bench-{name}-") as tmp:
        body = scenario.run(opts, Path(tmp))
    if name == "chat" and opts.store:
        name = "chat-store"  # its own result files: the adapters' comparison stays as it was
    data = write_result(name, body, quick=opts.quick, wall_seconds=time.monotonic() - started, out=opts.out)
    scenario.table(data)
    for s in data["systems"].values():
        if "error" in s:
            print(f"failed {s['label']}: {s['error']}")
    for system, why in data["skipped"].items():
        print(f"skipped {system}: {why}")
    png = opts.out / f"{name}.png"
    scenario.plot(data, png)
    print(f"wrote {opts.out / f'{name}.json'} and {png}")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mqchat bench", description="Benchmark our broker and pipeline beside stock amqtt and Mosquitto."
    )
    p.add_argument("scenario", choices=(*SCENARIOS, "all"))
    p.add_argument("--quick", action="store_true", help="small sizes: each scenario in about a minute")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="where JSON and PNG go (bench/results)")
    p.add_argument("--duration", type=float, help="seconds per offered rate (relay, chat, connection latency)")
    p.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)} (default all)"
    )
    p.add_argument("--messages", type=int, help="relay: messages per throughput test")
    p.add_argument("--rates", help="relay/chat: comma-separated offered rates, messages/s")
    p.add_argument(
        "--connections", type=int, help="connections: idle devices (default 20000); cluster: devices on the killed node"
    )
    p.add_argument(
        "--netem",
        choices=("perfect", "good_4g", "flaky_3g", "chaos"),
        help="chat: put a lossy-network proxy between the phones and the server (the load generator does not "
        "reconnect, so with cuts a cut connection's messages count as lost: use good_4g for latency)",
    )
    p.add_argument(
        "--store",
        choices=("cassandra",),
        help="chat: run mqchat serve (in-broker adapter) on SQLite and on a local Cassandra 5 node side by side, "
        "instead of comparing the adapters (results in chat-store.json/png)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        print(f"mqchat bench: unknown systems {unknown}; choose from {', '.join(SYSTEMS)}", file=sys.stderr)
        return 2
    try:
        rates = tuple(float(r) for r in args.rates.split(",")) if args.rates else None
    except ValueError:
        print("mqchat bench: --rates takes numbers, e.g. 500,1000", file=sys.stderr)
        return 2
    opts = Options(
        scenario=args.scenario,
        quick=args.quick,
        out=args.out,
        systems=systems,
        duration=args.duration,
        messages=args.messages,
        rates=rates,
        connections=args.connections,
        netem=args.netem,
        store=args.store,
    )
    pin(LOAD_CPU)  # keep the orchestrator off the brokers' CPU
    raise_nofile()
    names = EVERY if args.scenario == "all" else (args.scenario,)
    failed = []
    for name in names:
        try:
            run_scenario(name, opts)
        except BenchError as exc:
            print(f"mqchat bench {name}: failed: {exc}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0
