"""``mqchat bench connections``: a ramp of idle authenticated devices, per broker.

::

    baseline devices connect ──▶ 1:1 QoS1 latency with them idle
    the rest connect from two ramp processes ──▶ connect rate per slice, broker RSS per connection
    all held connected ──▶ 1:1 QoS1 latency again: its ratio to the baseline

A ramp slower than ``STALL_RATE`` connects/s for ``STALL_WINDOW_S``, or past its time limit,
is stopped and the measurement goes on with what connected.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from clients.testing import loadgen
from clients.testing.loadgen import Creds
from mqchat.bench.harness import (
    CTX,
    HOST,
    LOAD_CPU,
    PAYLOAD_BYTES,
    BenchError,
    Options,
    available_systems,
    child_setup,
    heading,
    progress,
    raise_nofile,
    ratio,
    recorded,
    run_async,
    spawn,
    stop_process,
)
from mqchat.bench.processes import BrokerProc, run_broker, run_load
from mqchat.bench.report import dress, figure, ok, paired_bars, print_notes, print_table, save

SLICE = 2000  # connections per slice of the connect-rate curve (smaller for small ramps)
STALL_RATE = 20.0  # a ramp slower than this (connects/s) ...
STALL_WINDOW_S = 30.0  # ... for this long is stopped

Devices = list[tuple[Creds, list[str]]]


def _ramp_child(
    devices: Devices,
    port: int,
    concurrency: int,
    counter: Any,
    slot: int,
    stop: Any,
    release: Any,
    time_limit: float,
    conn: Connection,
) -> None:
    child_setup(LOAD_CPU)

    def on_connected(n: int) -> None:
        counter[slot] = n

    try:
        run_async(
            loadgen.ramp_connections(
                host=HOST,
                port=port,
                devices=devices,
                concurrency=concurrency,
                should_stop=stop.is_set,
                on_connected=on_connected,
                hold=lambda: not release.is_set(),
                report=conn.send,
                time_limit=time_limit,
            )
        )
    except BaseException as exc:
        with contextlib.suppress(OSError):
            conn.send({"error": f"{type(exc).__name__}: {exc}"})


@dataclass
class _Ramp:
    procs: list[BaseProcess]
    conns: list[Connection]
    counter: Any
    slots: list[int]
    stop: Any
    release: Any
    reports: list[dict[str, Any]] = field(default_factory=list)

    def total(self) -> int:
        return sum(int(self.counter[s]) for s in self.slots)

    def running(self) -> bool:
        return any(p.is_alive() for p in self.procs) and not all(c.poll() for c in self.conns)


def _start_ramp(
    groups: Sequence[Devices], port: int, counter: Any, first_slot: int, release: Any, time_limit: float
) -> _Ramp:
    ramp = _Ramp([], [], counter, [], CTX.Event(), release)
    for k, devices in enumerate(groups):
        slot = first_slot + k
        p, conn = spawn(
            _ramp_child, (devices, port, 16, counter, slot, ramp.stop, release, time_limit), name=f"ramp-{slot}"
        )
        ramp.procs.append(p)
        ramp.conns.append(conn)
        ramp.slots.append(slot)
    return ramp


def _collect_reports(ramp: _Ramp, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    for c in ramp.conns:
        if c.poll(max(0.1, deadline - time.monotonic())):
            try:
                ramp.reports.append(c.recv())
            except EOFError:
                ramp.reports.append({"error": "ramp process died"})
        else:
            ramp.reports.append({"error": "no report"})


def _connection_latency(b: BrokerProc, params: dict[str, Any], label: str) -> dict[str, Any]:
    """1:1 QoS1 relay: the service (ours) or a plain client publishes to one device's in topic."""
    sub = b.device("lat", "lat-dev")
    pub = b.service("lat")
    rate, seconds = params["latency_rate"], params["latency_seconds"]
    result: dict[str, Any] = run_load(
        "relay_run",
        {
            "host": HOST,
            "port": b.port,
            "publishers": [(pub, "u/lat/lat-dev/in")],
            "subscriber": sub,
            "sub_filters": ["u/lat/lat-dev/in"],
            "qos": 1,
            "count": int(rate * seconds),
            "rate": rate,
            "payload_size": PAYLOAD_BYTES,
            "time_limit": seconds + 30,
        },
        label=label,
        limit_s=seconds + 90,
    )
    return result


def run(opts: Options, workdir: Path) -> dict[str, Any]:
    requested = opts.connections or (2000 if opts.quick else 20000)
    fd_limit = raise_nofile()
    n_max = min(requested, fd_limit - 200)
    base = min(100, n_max)
    params: dict[str, Any] = {
        "requested_connections": requested,
        "connections": n_max,
        "baseline_connections": base,
        "slice": min(SLICE, max(100, n_max // 10)),
        "subscriptions_per_device": 2,
        "keepalive_s": 120,
        "concurrent_connects": 32,
        "ramp_time_limit_s": 45.0 if opts.quick else 300.0,
        "stall_rule": f"stop when fewer than {STALL_RATE:g} connects/s over {STALL_WINDOW_S:g} s",
        "latency_rate": 500.0,
        "latency_seconds": opts.duration or (2.0 if opts.quick else 5.0),
    }
    notes = []
    if n_max < requested:
        notes.append(f"capped at {n_max} connections: the open-file limit of a broker process is {fd_limit}")
    systems, skipped = available_systems(opts)
    results: dict[str, Any] = {}
    for system in systems:
        with recorded(results, system), run_broker(system, workdir) as b:
            heading(f"connections: {b.label} on port {b.port}, ramp to {n_max}")
            results[system] = _connections_one(b, params)
    ratios = {}
    for s, r in results.items():
        ratios[f"{s}_p99_at_n_vs_at_base"] = r.get("latency_ratio_p99")
    ours, stock = results.get("ours", {}), results.get("stock", {})
    ratios["connect_rate_ours_vs_stock"] = ratio(ours.get("connect_rate"), stock.get("connect_rate"))
    ratios["rss_per_connection_stock_vs_ours"] = ratio(
        stock.get("rss_per_connection_bytes"), ours.get("rss_per_connection_bytes")
    )
    return {"parameters": params, "systems": results, "skipped": skipped, "ratios": ratios, "notes": notes}


def _watch_ramp(b: BrokerProc, ramp: _Ramp, params: dict[str, Any], t_start: float, todo: int) -> str | None:
    """Report progress once a second until the ramp is done or stopped; return why it was stopped."""
    n_max, base = params["connections"], params["baseline_connections"]
    history: list[tuple[float, int]] = [(t_start, 0)]
    while True:
        time.sleep(1.0)
        now, done = time.monotonic(), ramp.total()
        history.append((now, done))
        alive = ramp.running()
        rate = (done - history[-2][1]) / (now - history[-2][0])
        progress(f"{b.label}: {base + done:,}/{n_max:,} connected ({rate:,.0f}/s)")
        if done >= todo or not alive:
            return None
        window = [h for h in history if h[0] >= now - STALL_WINDOW_S]
        stopped = None
        if now - t_start >= STALL_WINDOW_S and done - window[0][1] < STALL_RATE * STALL_WINDOW_S:
            stopped = f"stalled below {STALL_RATE:g} connects/s for {STALL_WINDOW_S:g} s"
        elif now - t_start >= params["ramp_time_limit_s"]:
            stopped = f"ramp time limit ({params['ramp_time_limit_s']:g} s)"
        if stopped:
            ramp.stop.set()
            progress(f"{b.label}: stopping the ramp at {base + done:,}: {stopped}")
            return stopped


def _slices(done_at: list[float], t_start: float, base: int, size: int) -> list[dict[str, Any]]:
    """The connect rate over each ``size`` connections of the ramp (and the remainder)."""
    slices = []
    prev_t, prev_n = t_start, base
    for j, t in enumerate(done_at):
        total = base + j + 1
        if total % size == 0 or j == len(done_at) - 1:
            if total > prev_n and t > prev_t:
                slices.append(
                    {
                        "from": prev_n,
                        "to": total,
                        "seconds": round(t - prev_t, 3),
                        "rate": round((total - prev_n) / (t - prev_t), 1),
                    }
                )
            prev_t, prev_n = t, total
    return slices


def _ramp_summary(ramp: _Ramp, t_start: float, base: int, size: int) -> dict[str, Any]:
    done_at = sorted(t for r in ramp.reports for t in r.get("done_at", []))
    errors = [e for r in ramp.reports for e in ([r["error"]] if "error" in r else r.get("errors", []))]
    elapsed = (done_at[-1] - t_start) if done_at else 0.0
    return {
        "connected": base + len(done_at),
        "errors": errors[:5],
        "error_count": sum(int(r.get("error_count", 0)) for r in ramp.reports),
        "ramp_seconds": round(elapsed, 3),
        "connect_rate": round(len(done_at) / elapsed, 1) if elapsed > 0 else None,
        "slices": _slices(done_at, t_start, base, size),
    }


def _connections_one(b: BrokerProc, params: dict[str, Any]) -> dict[str, Any]:
    n_max, base = params["connections"], params["baseline_connections"]
    devices = [
        (b.device(f"cu{i}", f"cd{i}"), [f"u/cu{i}/in", f"u/cu{i}/cd{i}/in"]) for i in range(n_max)
    ]  # tokens are signed here, outside the timed ramp
    counter = CTX.RawArray("l", 3)
    release = CTX.Event()
    time.sleep(0.5)
    rss0 = b.rss()
    ramps: list[_Ramp] = []
    out: dict[str, Any] = {"label": b.label, "rss_at_0_bytes": rss0}
    try:
        # The first `base` devices, then the 1:1 latency with them idle.
        hold_limit = params["ramp_time_limit_s"] + 300.0  # the whole measurement, not only the ramp
        ramps.append(_start_ramp([devices[:base]], b.port, counter, 0, release, hold_limit))
        _collect_reports(ramps[0], 120.0)
        out["latency_at_base"] = _connection_latency(b, params, f"{b.system} latency @{base}")
        progress(f"{b.label}: latency with {base} idle: p50 {out['latency_at_base']['p50_ms']} ms")
        # The ramp: the rest, split over two processes.
        rest = devices[base:]
        half = (len(rest) + 1) // 2
        t_start = time.monotonic()
        ramp = _start_ramp([rest[:half], rest[half:]], b.port, counter, 1, release, hold_limit)
        ramps.append(ramp)
        stopped = _watch_ramp(b, ramp, params, t_start, len(rest))
        _collect_reports(ramp, 60.0)
        summary = _ramp_summary(ramp, t_start, base, params["slice"])
        connected = summary["connected"]
        time.sleep(1.0)
        rss_n = b.rss()
        out.update(
            {
                "connected": connected,
                "stopped": stopped,
                **{k: v for k, v in summary.items() if k != "connected"},
                "rss_at_n_bytes": rss_n,
                "rss_per_connection_bytes": round((rss_n - rss0) / connected) if connected else None,
            }
        )
        progress(f"{b.label}: {connected:,} connected at {out['connect_rate']} connects/s; measuring latency")
        try:
            out["latency_at_n"] = _connection_latency(b, params, f"{b.system} latency @{connected}")
        except BenchError as exc:
            out["latency_at_n"] = {"error": str(exc), "p50_ms": None, "p99_ms": None, "lost": None}
        out["latency_ratio_p99"] = ratio(out["latency_at_n"]["p99_ms"], out["latency_at_base"]["p99_ms"])
        out["latency_ratio_p50"] = ratio(out["latency_at_n"]["p50_ms"], out["latency_at_base"]["p50_ms"])
    finally:
        release.set()
        for r in ramps:
            r.stop.set()
            for p in r.procs:
                stop_process(p, grace_s=30)
    return out


def table(data: dict[str, Any]) -> None:
    rows = []
    for s in ok(data):
        first = s["slices"][0]["rate"] if s.get("slices") else None
        last = s["slices"][-1]["rate"] if s.get("slices") else None
        rows.append(
            [
                s["label"],
                s.get("connected"),
                s.get("connect_rate"),
                first,
                last,
                round(s["rss_per_connection_bytes"] / 1024, 1) if s.get("rss_per_connection_bytes") else None,
                s["latency_at_base"]["p99_ms"],
                s.get("latency_at_n", {}).get("p99_ms"),
                s.get("latency_at_n", {}).get("lost"),
                s.get("latency_ratio_p99"),
                s.get("stopped") or "",
            ]
        )
    p = data["parameters"]
    print_table(
        f"connections: ramp of idle devices (2 subscriptions each), then 1:1 QoS1 @{p['latency_rate']:g}/s",
        [
            "system",
            "connected",
            "connects/s",
            "first slice",
            "last slice",
            "KiB/conn",
            f"p99 @{p['baseline_connections']}",
            "p99 @N",
            "lost @N",
            "ratio",
            "stopped",
        ],
        rows,
    )
    print_notes(data)


def plot(data: dict[str, Any], path: Path) -> None:
    fig, axes = figure(3, size=(16, 5))
    systems = ok(data)
    params = data["parameters"]
    ax = axes[0]
    for s in systems:
        sl = s.get("slices", [])
        ax.plot([x["to"] for x in sl], [x["rate"] for x in sl], marker="o", label=s["label"])
    dress(
        ax,
        title=f"Connect rate per {params['slice']:,}-connection slice",
        xlabel="connections reached (end of slice)",
        ylabel="connect + auth + subscribe per second (log)",
        log=True,
        grid=True,
        legend_size=8,
    )
    ax = axes[1]
    vals = [(s.get("rss_per_connection_bytes") or 0) / 1024 for s in systems]
    bars = ax.bar(range(len(systems)), vals)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8)
    dress(
        ax,
        title="Memory per connection",
        ylabel="KiB of broker RSS per idle connection",
        xticks=[s["label"] for s in systems],
        legend=False,
    )
    ax = axes[2]
    base = params["baseline_connections"]
    paired_bars(
        ax,
        [
            (label, [(s.get(key) or {}).get("p99_ms") or 0 for s in systems])
            for key, label in (("latency_at_base", f"p99 with {base} idle"), ("latency_at_n", "p99 with N idle"))
        ],
    )
    dress(
        ax,
        title=f"1:1 QoS1 latency @{params['latency_rate']:g}/s",
        ylabel="ms (log)",
        xticks=[f"{s['label']}\nN={s.get('connected', 0):,}" for s in systems],
        log=True,
        legend_size=8,
    )
    save(fig, path, data)
