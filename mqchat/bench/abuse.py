"""``mqchat bench abuse``: another user's send → ack while one device floods.

Three fresh ``mqchat serve`` runs (in-broker adapter, defaults): no flood with the rate limits
on, a flood with the limits on, and a flood with the send limits lifted. The legitimate user
sends open loop at a fixed rate; the flooder publishes sends as fast as PUBACKs allow.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from mqchat.bench.harness import HOST, BenchError, Options, heading
from mqchat.bench.processes import run_load, run_serve
from mqchat.bench.report import dress, figure, paired_bars, print_notes, print_ratios, print_table, save
from mqchat.ids import dm_conv

_RUNS = (
    ("quiet", "no flood, limits on (defaults)", True, False),
    ("flood", "one device floods, limits on (defaults)", True, True),
    ("flood_unlimited", "one device floods, send limits lifted", False, True),
)


def run(opts: Options, workdir: Path) -> dict[str, Any]:
    """Another user's send→ack while one device floods, on ``mqchat serve`` (one node, defaults)."""
    params: dict[str, Any] = {
        "legit_rate": 50.0,
        "seconds": opts.duration or (4.0 if opts.quick else 10.0),
        "flood_inflight": 200,
        "placement": "the whole server on CPU 0; both clients (one load process) on CPU 1",
        "limits": "defaults: 50 sends/s per device (burst 500), 100/s per user (burst 1000)",
    }
    results: dict[str, Any] = {}
    for key, label, limits, flood in _RUNS:
        heading(f"abuse: {label}")
        entry: dict[str, Any] = {"label": label, "available": True}
        with run_serve("inbroker", workdir, limits=limits, name=f"-{key}") as serve:
            try:
                if not serve.wait_healthy():
                    entry.update(available=False, reason=f"serve did not become healthy:\n{serve.log_tail()}")
                    results[key] = entry
                    continue
                flooder = (
                    ("flooder", serve.device("flooder", "flooder-dev"), dm_conv("flooder", "victim")) if flood else None
                )
                entry.update(
                    run_load(
                        "abuse_run",
                        {
                            "host": HOST,
                            "port": serve.mqtt_port,
                            "legit": ("legit", serve.device("legit", "legit-dev"), dm_conv("friend", "legit")),
                            "flooder": flooder,
                            "legit_rate": params["legit_rate"],
                            "duration": params["seconds"],
                            "id_prefix": f"a{secrets.token_hex(3)}",
                            "flood_inflight": params["flood_inflight"],
                        },
                        label=f"abuse {key}",
                        limit_s=params["seconds"] * 3 + 60,
                    )
                )
            except BenchError as exc:
                entry["error"] = str(exc)
        results[key] = entry
    ratios: dict[str, Any] = {}
    quiet, flooded = results.get("quiet", {}), results.get("flood", {})
    if "ack" in quiet and "ack" in flooded and quiet["ack"]["p99_ms"] and flooded["ack"]["p99_ms"]:
        ratios["legit_p99_flood_vs_quiet"] = round(flooded["ack"]["p99_ms"] / quiet["ack"]["p99_ms"], 2)
        ratios["legit_p99_under_flood_ms"] = flooded["ack"]["p99_ms"]
        ratios["target_p99_under_flood_below_50ms"] = flooded["ack"]["p99_ms"] < 50
    notes = [
        "legit: one device, open loop at legit_rate sends/s; flood: one device publishing sends as fast as"
        " PUBACKs allow (a refused send is answered rate_limited and stores nothing).",
        "Each run is a fresh `mqchat serve` (in-broker adapter, SQLite, fsync per group commit).",
    ]
    return {"parameters": params, "systems": results, "skipped": {}, "ratios": ratios, "notes": notes}


def table(data: dict[str, Any]) -> None:
    rows = []
    for s in data["systems"].values():
        if "ack" not in s:
            rows.append([s["label"], "-", "-", "-", "-", "-", "-"])
            continue
        errors = ", ".join(f"{k} {v}" for k, v in s["flood_errors"].items()) or "-"
        rows.append(
            [
                s["label"],
                f"{s['legit_acked']}/{s['legit_sent']}",
                s["ack"]["p50_ms"],
                s["ack"]["p99_ms"],
                s["flood_sent"],
                s["flood_acked"],
                errors,
            ]
        )
    print_table(
        "abuse: another user's send->ack while one device floods",
        ["run", "legit acked", "legit p50 ms", "legit p99 ms", "flood sent", "flood acked", "flood errors"],
        rows,
    )
    print_ratios(data)
    print_notes(data)


def plot(data: dict[str, Any], path: Path) -> None:
    fig, (left, right) = figure(2, size=(11, 4.5))
    systems = [s for s in data["systems"].values() if "ack" in s]
    labels = [s["label"].replace(", ", ",\n") for s in systems]
    paired_bars(left, [(pct[:-3], [s["ack"][pct] or 0 for s in systems]) for pct in ("p50_ms", "p99_ms")])
    left.axhline(50, color="red", linestyle="--", linewidth=1, label="target p99 50 ms")
    dress(
        left,
        title="Another user's latency",
        ylabel="legit user's send→ack (ms)",
        xticks=labels,
        tick_size=7,
        legend_size=8,
    )
    acked = [s["flood_acked"] for s in systems]
    refused = [sum(s["flood_errors"].values()) for s in systems]
    right.bar(range(len(systems)), acked, label="acked (stored)")
    right.bar(range(len(systems)), refused, bottom=acked, label="rate_limited (nothing stored)")
    dress(
        right,
        title=f"The flood ({data['parameters']['seconds']:g} s)",
        ylabel="flood sends answered",
        xticks=labels,
        tick_size=7,
        legend_size=8,
    )
    save(fig, path, data)
