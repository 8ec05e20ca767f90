"""``mqchat bench relay``: raw publish → subscriber throughput and open-loop latency, per broker.

Four publishers → one subscriber, 100-byte payloads, QoS0 and QoS1: first a fixed number of
messages as fast as the broker takes them (with the broker's CPU time per message), then a
series of open-loop offered rates. On ours the publishers are devices on their own out topics
and the subscriber is the bridge's service credential on ``u/+/+/out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clients.testing.loadgen import Creds
from mqchat.bench.harness import (
    HOST,
    PAYLOAD_BYTES,
    Options,
    available_systems,
    heading,
    progress,
    ratio,
    recorded,
)
from mqchat.bench.processes import BrokerProc, run_broker, run_load
from mqchat.bench.report import dress, figure, fmt, ok, p99_p50_lines, paired_bars, print_notes, print_table, save


def relay_params(opts: Options) -> dict[str, Any]:
    return {
        "publishers": 4,
        "payload_bytes": PAYLOAD_BYTES,
        "throughput_messages": opts.messages or (5_000 if opts.quick else 60_000),
        "rates": list(opts.rates or ((500.0, 2000.0) if opts.quick else (500.0, 1000.0, 2000.0, 4000.0))),
        "seconds_per_rate": opts.duration or (2.0 if opts.quick else 5.0),
        "qos1_window_per_publisher": 64,
    }


def _relay_endpoints(b: BrokerProc) -> tuple[list[tuple[Creds, str]], Creds]:
    pubs = [(b.device(f"ru{i}", f"rd{i}"), f"u/ru{i}/rd{i}/out") for i in range(4)]
    return pubs, b.service("relay")


def _one_qos(b: BrokerProc, params: dict[str, Any], qos: int) -> dict[str, Any]:
    """Max throughput, then latency at each offered rate, at one QoS."""
    pubs, sub = _relay_endpoints(b)
    count = params["throughput_messages"]
    endpoints = {
        "host": HOST,
        "port": b.port,
        "publishers": pubs,
        "subscriber": sub,
        "sub_filters": ["u/+/+/out"],
        "qos": qos,
        "payload_size": PAYLOAD_BYTES,
    }
    cpu0 = b.cpu_seconds()
    tp = run_load(
        "relay_run",
        {**endpoints, "count": count, "rate": None, "time_limit": 120.0, "window": params["qos1_window_per_publisher"]},
        label=f"{b.system} qos{qos} max",
        limit_s=180,
    )
    cpu = b.cpu_seconds() - cpu0
    tp["broker_cpu_ms_per_msg"] = round(cpu * 1000 / tp["received"], 4) if tp["received"] else None
    tp["broker_cpu_utilization"] = round(cpu / tp["seconds"], 2) if tp["seconds"] else None
    progress(f"{b.label} QoS{qos}: {tp['msg_per_s']:,.0f} msg/s ({tp['received']}/{count} received)")
    latency = []
    for rate in params["rates"]:
        n = max(1, int(rate * params["seconds_per_rate"]))
        r = run_load(
            "relay_run",
            {**endpoints, "count": n, "rate": rate, "time_limit": params["seconds_per_rate"] * 2 + 10},
            label=f"{b.system} qos{qos} @{rate:g}/s",
            limit_s=params["seconds_per_rate"] * 2 + 60,
        )
        progress(f"{b.label} QoS{qos} @{rate:g}/s: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, lost {r['lost']}")
        latency.append(r)
    return {"throughput": tp, "latency": latency}


def run(opts: Options, workdir: Path) -> dict[str, Any]:
    params = relay_params(opts)
    systems, skipped = available_systems(opts)
    results: dict[str, Any] = {}
    for system in systems:
        with recorded(results, system), run_broker(system, workdir) as b:
            heading(f"relay: {b.label} on port {b.port}")
            entry: dict[str, Any] = {"label": b.label}
            for qos in (0, 1):
                entry[f"qos{qos}"] = _one_qos(b, params, qos)
            results[system] = entry
    ratios: dict[str, Any] = {}
    for qos in (0, 1):

        def tput(s: str, q: int = qos) -> float | None:
            v = results.get(s, {}).get(f"qos{q}", {}).get("throughput", {}).get("msg_per_s")
            return float(v) if v else None

        ratios[f"qos{qos}_throughput_ours_vs_stock"] = ratio(tput("ours"), tput("stock"))
        ratios[f"qos{qos}_throughput_mosquitto_vs_ours"] = ratio(tput("mosquitto"), tput("ours"))
    notes = []
    for entry in results.values():
        for qos in (0, 1) if "error" not in entry else ():
            util = entry[f"qos{qos}"]["throughput"].get("broker_cpu_utilization")
            if util is not None and util < 0.8:
                notes.append(
                    f"{entry['label']} QoS{qos}: the broker used {util:.0%} of its CPU during the throughput test, "
                    "so the number is bound by the load generator (one core of Python), not by the broker"
                )
    return {"parameters": params, "systems": results, "skipped": skipped, "ratios": ratios, "notes": notes}


def table(data: dict[str, Any]) -> None:
    rows = []
    for s in ok(data):
        rows.append(
            [
                s["label"],
                s["qos0"]["throughput"]["msg_per_s"],
                s["qos0"]["throughput"]["lost"],
                s["qos1"]["throughput"]["msg_per_s"],
                s["qos1"]["throughput"]["lost"],
                s["qos1"]["throughput"]["broker_cpu_ms_per_msg"],
            ]
        )
    print_table(
        "relay: 4 publishers -> 1 subscriber, 100-byte payloads, max throughput",
        ["system", "QoS0 msg/s", "lost", "QoS1 msg/s", "lost", "broker CPU ms/msg (QoS1)"],
        rows,
    )
    rows = []
    for s in ok(data):
        for qos in (0, 1):
            for r in s[f"qos{qos}"]["latency"]:
                rows.append([s["label"], qos, r["rate"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"], r["lost"]])
    print_table(
        "relay: open-loop latency (ms, from intended send time)",
        ["system", "QoS", "rate/s", "p50", "p90", "p99", "max", "lost"],
        rows,
    )
    print("ratios: " + ", ".join(f"{k} = {fmt(v, 2)}" for k, v in data["ratios"].items()))
    print_notes(data)


def plot(data: dict[str, Any], path: Path) -> None:
    fig, axes = figure(3, size=(16, 5))
    systems = ok(data)
    ax = axes[0]
    paired_bars(
        ax,
        [(f"QoS{qos}", [s[f"qos{qos}"]["throughput"]["msg_per_s"] for s in systems]) for qos in (0, 1)],
        value_format="{:,.0f}",
    )
    dress(
        ax,
        title="Max throughput, 4 publishers → 1 subscriber",
        ylabel="messages/s (log scale)",
        xticks=[s["label"] for s in systems],
        log=True,
    )
    ax.set_ylim(bottom=100)
    for ax, qos in ((axes[1], 0), (axes[2], 1)):
        for s in systems:
            lat = [r for r in s[f"qos{qos}"]["latency"] if r["p99_ms"] is not None]
            rates = [r["rate"] for r in lat]
            p99_p50_lines(ax, rates, [r["p99_ms"] for r in lat], [r["p50_ms"] for r in lat], s["label"])
        dress(
            ax,
            title=f"QoS{qos} latency: p99 solid, p50 dashed",
            xlabel="offered rate (messages/s, open loop)",
            ylabel="latency ms (log scale)",
            log=True,
            grid=True,
            legend_size=7,
        )
    save(fig, path, data)
