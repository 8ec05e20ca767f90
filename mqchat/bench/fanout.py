"""``mqchat bench fanout``: one publish → 500 subscribers, and a 500-member group through the pipeline.

Per broker: one QoS1 publish to a topic 500 clients subscribe to, the time until the last one
has it (ours runs open: anonymous, no ACL, broker fan-out only). Then ``mqchat serve`` with
the in-broker adapter: one ``send`` to a 500-member group, the time until the last member has
its ``msg``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from mqchat.bench.harness import HOST, BenchError, Options, available_systems, heading, progress, ratio, recorded
from mqchat.bench.processes import run_broker, run_load, run_serve
from mqchat.bench.report import dress, figure, ok, paired_bars, print_notes, print_table, save
from mqchat.tokens import issue_token


def run(opts: Options, workdir: Path) -> dict[str, Any]:
    params = {"subscribers": 500, "repeats": 10 if opts.quick else 20, "qos": 1, "pause_s": 0.3}
    systems, skipped = available_systems(opts)
    results: dict[str, Any] = {}
    for system in systems:
        run_as = "ours-open" if system == "ours" else system
        with recorded(results, run_as), run_broker(run_as, workdir) as b:
            heading(f"fanout: {b.label} on port {b.port}")
            r = run_load(
                "fanout_run",
                {
                    "host": HOST,
                    "port": b.port,
                    "subscribers": params["subscribers"],
                    "topic": "fan/bench",
                    "repeats": params["repeats"],
                    "qos": params["qos"],
                    "pause_s": params["pause_s"],
                    "time_limit": 150.0,
                },
                label=f"{run_as} fanout",
                limit_s=200,
            )
            progress(f"{b.label}: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, incomplete {r['incomplete']}")
            results[run_as] = {"label": b.label, **r}
    if "ours" in systems:
        with recorded(results, "pipeline"):
            results["pipeline"] = _group_fanout(params, workdir)
    ours = results.get("ours-open", {}).get("p99_ms")
    ratios = {
        "p99_stock_vs_ours": ratio(results.get("stock", {}).get("p99_ms"), ours),
        "p99_ours_vs_mosquitto": ratio(ours, results.get("mosquitto", {}).get("p99_ms")),
    }
    notes = [
        "ours-open runs the mqchat broker class in an open configuration (anonymous, no ACL): broker fan-out only.",
        "pipeline: a 500-member group through `mqchat serve` (in-broker adapter): send -> store -> one msg per "
        "member, time until the last member has it.",
    ]
    return {"parameters": params, "systems": results, "skipped": skipped, "ratios": ratios, "notes": notes}


def _group_fanout(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One message to a 500-member group through the whole pipeline."""
    heading("fanout: a 500-member group through mqchat serve")
    with run_serve("inbroker", workdir) as serve:
        if not serve.wait_healthy():
            raise BenchError(f"serve did not become healthy:\n{serve.log_tail()}")
        owner = "gowner"
        users = [f"gm{i:03d}" for i in range(params["subscribers"] - 1)]
        token = issue_token(secret=serve.secret, user=owner, device="gowner-http", ttl_s=3600)
        r = httpx.post(
            f"http://{HOST}:{serve.http_port}/v1/groups",
            json={"name": "bench", "members": users},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        r.raise_for_status()
        conv = r.json()["conv"]
        members = [(serve.device(u, f"{u}-dev"), u) for u in (owner, *users)]
        result: dict[str, Any] = run_load(
            "group_fanout_run",
            {
                "host": HOST,
                "port": serve.mqtt_port,
                "conv": conv,
                "sender": (serve.device(owner, "gowner-send"), owner),
                "members": members,
                "repeats": params["repeats"],
                "pause_s": params["pause_s"],
                "time_limit": 150.0,
            },
            label="pipeline group fanout",
            limit_s=200,
        )
        progress(f"pipeline: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, incomplete {result['incomplete']}")
        return {"label": "mqchat serve: 500-member group", **result}


def table(data: dict[str, Any]) -> None:
    rows = [
        [s["label"], s["complete"], s["incomplete"], s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]]
        for s in ok(data)
    ]
    p = data["parameters"]
    print_table(
        f"fanout: one QoS{p['qos']} publish -> {p['subscribers']} subscribers, time until the last has it (ms)",
        ["system", "complete", "incomplete", "p50", "p90", "p99", "max"],
        rows,
    )
    print_notes(data)


def plot(data: dict[str, Any], path: Path) -> None:
    fig, ax = figure(1, size=(8, 5))
    systems = ok(data)
    paired_bars(ax, [(key[:3], [s[key] or 0 for s in systems]) for key in ("p50_ms", "p99_ms")])
    p = data["parameters"]
    dress(
        ax,
        title=f"Fan-out of one QoS{p['qos']} publish to {p['subscribers']} subscribers ({p['repeats']} repeats)",
        ylabel="ms until the last subscriber has the message",
        xticks=[s["label"] for s in systems],
    )
    save(fig, path, data)
