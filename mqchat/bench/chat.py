"""``mqchat bench chat``: 1:1 sends through the full pipeline of ``mqchat serve``, per adapter
(or, with ``--store cassandra``, per store: SQLite beside a Cassandra 5 node started here).

``mqchat serve`` runs once with ``--adapter mqtt`` and once with ``--adapter inbroker``; pairs
of devices send at open-loop rates (optionally through the lossy proxy) and the bench records
send → ack on the sender and send → msg on the recipient. The max sustainable rate is the
highest tested rate with both p99s under 100 ms and nothing lost.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from mqchat.bench.harness import HOST, PAYLOAD_BYTES, BenchError, Options, heading, pinning, progress, ratio
from mqchat.bench.processes import ServeProc, cpu_seconds, netem_proxy, run_load, run_serve
from mqchat.bench.report import dress, figure, fmt, p99_p50_lines, print_table, save


def _params(opts: Options) -> dict[str, Any]:
    return {
        "pairs": 4 if opts.quick else 10,
        "rates": list(opts.rates or ((100.0, 500.0) if opts.quick else (100.0, 500.0, 1000.0, 2000.0, 3000.0))),
        "seconds_per_rate": opts.duration or (3.0 if opts.quick else 5.0),
        "drain_s": 10.0 if opts.quick else 15.0,
        "body_bytes": PAYLOAD_BYTES,
        "sustainable": "highest rate with send->ack and send->delivery p99 < 100 ms and nothing lost",
        "placement": "the whole server (supervisor, broker, bridge) on CPU 0; load generator on CPU 1",
        "netem": opts.netem or "none",
    }


def _sustainable(steps: list[dict[str, Any]]) -> float | None:
    ok = [
        s["rate"]
        for s in steps
        if s["lost_ack"] == 0
        and s["lost_delivery"] == 0
        and (s["ack"]["p99_ms"] or 1e9) < 100
        and (s["delivery"]["p99_ms"] or 1e9) < 100
    ]
    return max(ok) if ok else None


def _one_adapter(serve: ServeProc, params: dict[str, Any], netem: str | None, adapter: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"label": f"mqchat serve --adapter {adapter}", "available": True}
    try:
        if not serve.wait_healthy():
            entry.update(available=False, reason=f"serve did not become healthy:\n{serve.log_tail()}")
            progress(f"adapter {adapter}: unavailable")
            return entry
        pairs = []
        for i in range(params["pairs"]):
            a, b = f"ca{i}", f"cb{i}"
            pairs.append((a, serve.device(a, f"{a}-dev"), b, serve.device(b, f"{b}-dev")))
        with netem_proxy(serve.mqtt_port, netem) as phone_port:
            steps = run_load(
                "chat_run",
                {
                    "host": HOST,
                    "port": phone_port,
                    "pairs": pairs,
                    "rates": params["rates"],
                    "duration": params["seconds_per_rate"],
                    "id_prefix": f"b{secrets.token_hex(3)}",
                    "drain_s": params["drain_s"],
                    "body_size": PAYLOAD_BYTES,
                },
                label=f"chat {adapter}",
                limit_s=len(params["rates"]) * (params["seconds_per_rate"] * 3 + params["drain_s"] + 10) + 60,
            )
        entry["steps"] = steps
        entry["max_sustainable_rate"] = _sustainable(steps)
        if serve.exited():
            entry["note"] = f"serve exited during the run:\n{serve.log_tail()}"
    except BenchError as exc:
        entry.update(available=False, reason=str(exc), log_tail=serve.log_tail())
    return entry


def run(opts: Options, workdir: Path) -> dict[str, Any]:
    params = _params(opts)
    if opts.store:
        return _compare_stores(params, workdir, opts.netem)
    results: dict[str, Any] = {}
    for adapter in ("mqtt", "inbroker"):
        heading(f"chat: mqchat serve --adapter {adapter}")
        with run_serve(adapter, workdir) as serve:
            results[adapter] = _one_adapter(serve, params, opts.netem, adapter)
    ratios = {
        "max_rate_inbroker_vs_mqtt": ratio(
            results.get("inbroker", {}).get("max_sustainable_rate"), results.get("mqtt", {}).get("max_sustainable_rate")
        )
    }
    notes = ["Rates not listed for an adapter were skipped after a rate lost more than a fifth of its messages."]
    return {"parameters": params, "systems": results, "skipped": {}, "ratios": ratios, "notes": notes}


COMMITLOG: Literal["batch", "group", "periodic"] = (
    "periodic" if os.environ.get("MQCHAT_BENCH_CASSANDRA_COMMITLOG") == "periodic" else "batch"
)
"""batch: durable before the ack on this one node, like SQLite's synchronous=FULL (group mode is
as durable, but each of a lightweight transaction's phases waits for a 5 ms group sync: 7×
slower rounds here). MQCHAT_BENCH_CASSANDRA_COMMITLOG=periodic measures Cassandra's default,
where a cluster's durability comes from its replicas."""
WARMUP_RATE = 200.0
_NODE_PLACEMENT = "on CPU 1, beside the load generator"


def _compare_stores(params: dict[str, Any], workdir: Path, netem: str | None) -> dict[str, Any]:
    """The in-broker adapter on SQLite, then on a Cassandra 5 node started here, same load."""
    from storage.cassandra.devnode import CassandraNode, DevNodeError

    params = {
        **params,
        "warmup_s": 5.0 if params["seconds_per_rate"] <= 3 else 20.0,
        "adapter": "inbroker",
        "cassandra": f"one local node: heap 1g, commitlog_sync {COMMITLOG}, "
        + (_NODE_PLACEMENT if pinning() else "unpinned"),
    }
    results: dict[str, Any] = {}
    heading("chat: mqchat serve on SQLite")
    with run_serve("inbroker", workdir, name="-sqlite") as serve:
        results["sqlite"] = _with_cpu(serve, params, netem, "sqlite", extra_pids=())
    heading("chat: mqchat serve on Cassandra (starting a node)")
    node = CassandraNode(directory=workdir / "cassandra", heap="1g", commitlog_sync=COMMITLOG)
    try:
        node.start()
    except DevNodeError as exc:
        results["cassandra"] = {"label": "mqchat serve --store cassandra", "available": False, "reason": str(exc)}
    else:
        try:
            with run_serve("inbroker", workdir, name="-cassandra", store=node.store_url) as serve:
                assert node.pid is not None
                results["cassandra"] = _with_cpu(serve, params, netem, "cassandra", extra_pids=(node.pid,))
        finally:
            node.stop()
    ratios = {
        "max_rate_cassandra_vs_sqlite": ratio(
            results.get("cassandra", {}).get("max_sustainable_rate"),
            results.get("sqlite", {}).get("max_sustainable_rate"),
        )
    }
    notes = [
        "Both runs use the in-broker adapter. The Cassandra node inherits the orchestrator's CPU: "
        f"{_NODE_PLACEMENT if pinning() else 'unpinned (this machine cannot pin)'}. Let onto both CPUs it "
        "measured 1.4x more JVM CPU per message and 3x the latency at 100/s, its threads waking each other "
        "across cores.",
        "CPU per message: CPU seconds of the server's processes (and the Cassandra JVM) over the whole run, "
        "divided by the messages offered.",
    ]
    return {"parameters": params, "systems": results, "skipped": {}, "ratios": ratios, "notes": notes}


def _with_cpu(
    serve: ServeProc, params: dict[str, Any], netem: str | None, store: str, *, extra_pids: tuple[int, ...]
) -> dict[str, Any]:
    """One store's run, with the CPU its server (and store) spent and, on Cassandra, the cost of
    the sequencing rounds from the server's /metrics."""
    import psutil  # type: ignore[import-untyped]

    def cpu(pids: list[int]) -> dict[int, float]:
        out = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                out[pid] = cpu_seconds(pid)
        return out

    server = serve.pids()
    serve.wait_healthy()
    server += serve.pids()
    # Warm up first (the JVM compiles its hot paths in the first tens of seconds), then measure.
    warmup = {**params, "rates": [WARMUP_RATE], "seconds_per_rate": params["warmup_s"], "drain_s": 5.0}
    progress(f"{store}: warm-up at {WARMUP_RATE:.0f}/s for {params['warmup_s']:.0f} s (not reported)")
    _one_adapter(serve, warmup, netem, "inbroker")
    before_server, before_store = cpu(server), cpu(list(extra_pids))
    before_rounds = _round_metrics(serve.http_port) if store == "cassandra" else {}
    entry = _one_adapter(serve, params, netem, "inbroker")
    after_server, after_store = cpu(server), cpu(list(extra_pids))
    entry["label"] = f"mqchat serve --store {store}"
    offered = sum(st["rate"] * params["seconds_per_rate"] for st in entry.get("steps", []))
    if offered:
        spent_server = sum(after_server.get(p, 0.0) - before_server.get(p, 0.0) for p in before_server)
        spent_store = sum(after_store.get(p, 0.0) - before_store.get(p, 0.0) for p in before_store)
        entry["cpu_ms_per_message"] = {
            "server": round(spent_server * 1000 / offered, 3),
            "store": round(spent_store * 1000 / offered, 3) if extra_pids else None,
        }
    if store == "cassandra":
        entry["sequencing"] = _sequencing(before_rounds, _round_metrics(serve.http_port))
    return entry


def _sequencing(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Mean time of a sequencing round (the conditional batch alone) and messages per round,
    over the measured run (the warm-up's rounds left out)."""
    values = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    rounds = values.get("mqchat_cassandra_sequence_round_seconds_count", 0.0)
    applied = values.get("mqchat_cassandra_sequence_batch_messages_count", 0.0)
    round_s = values.get("mqchat_cassandra_sequence_round_seconds_sum", 0.0)
    batched = values.get("mqchat_cassandra_sequence_batch_messages_sum", 0.0)
    return {
        "rounds": int(rounds),
        "mean_round_ms": round(round_s * 1000 / rounds, 2) if rounds else None,
        "messages_per_round": round(batched / applied, 2) if applied else None,
        "conflicts": int(values.get("mqchat_cassandra_sequence_conflicts_total", 0.0)),
    }


def _round_metrics(http_port: int) -> dict[str, float]:
    """The sequencer's counters, from the server's Prometheus metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{HOST}:{http_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    wanted = {
        "mqchat_cassandra_sequence_round_seconds_sum",
        "mqchat_cassandra_sequence_round_seconds_count",
        "mqchat_cassandra_sequence_batch_messages_sum",
        "mqchat_cassandra_sequence_batch_messages_count",
        "mqchat_cassandra_sequence_conflicts_total",
    }
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # summed over labels (the node's, the process's)
            if sample.name in wanted:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


STEP_COLUMNS = ("rate/s", "ack p50", "ack p99", "msg p50", "msg p99", "msg max", "no ack", "undelivered")


def step_row(label: str, st: dict[str, Any]) -> list[Any]:
    """One offered rate of a chat_run: the table row under STEP_COLUMNS."""
    ack, msg = st["ack"], st["delivery"]
    latencies = (ack["p50_ms"], ack["p99_ms"], msg["p50_ms"], msg["p99_ms"], msg["max_ms"])
    return [label, st["rate"], *latencies, st["lost_ack"], st["lost_delivery"]]


def table(data: dict[str, Any]) -> None:
    rows = []
    for s in data["systems"].values():
        if not s.get("available"):
            rows.append([s["label"], "unavailable", *[""] * 7])
            continue
        rows += [step_row(s["label"], st) for st in s["steps"]]
    print_table("chat: 1:1 sends through mqchat serve (ms from intended send time)", ["server", *STEP_COLUMNS], rows)
    for s in data["systems"].values():
        if s.get("available"):
            print(f"{s['label']}: max sustainable rate {fmt(s.get('max_sustainable_rate'))} sends/s")
            if "cpu_ms_per_message" in s:
                print(f"  CPU per message offered (ms): {s['cpu_ms_per_message']}")
            if "sequencing" in s:
                print(f"  sequencing rounds: {s['sequencing']}")
        else:
            print(f"{s['label']}: unavailable: {s.get('reason', '').splitlines()[0]}")


def plot(data: dict[str, Any], path: Path) -> None:
    fig, axes = figure(2, size=(13, 5))
    for ax, key, title in ((axes[0], "ack", "send → ack"), (axes[1], "delivery", "send → recipient delivery")):
        for s in data["systems"].values():
            if not s.get("available"):
                continue
            steps = [st for st in s["steps"] if st[key]["p99_ms"] is not None]
            rates = [st["rate"] for st in steps]
            p99_p50_lines(
                ax, rates, [st[key]["p99_ms"] for st in steps], [st[key]["p50_ms"] for st in steps], s["label"]
            )
        ax.axhline(100, color="red", lw=0.8, ls=":", label="100 ms target")
        dress(
            ax,
            title=f"{title}: p99 solid, p50 dashed",
            xlabel="offered sends/s (open loop)",
            ylabel="latency ms (log)",
            log=True,
            grid=True,
            legend_size=7,
        )
    save(fig, path, data)
