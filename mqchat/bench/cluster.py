"""``mqchat bench cluster``: mqchat nodes on one Cassandra node and one Redis, on this machine.

::

    one node   pairs of devices on node 1 ──▶ sends/s per node-CPU-second, latency
    two nodes  pairs on node 1 (same node) and pairs split over nodes 1 and 2 (cross node)
               ──▶ latency of each, and node CPU per message (the relay's cost on both nodes)
    node loss  devices on node 1; node 1 killed -9 ──▶ each back through HAProxy (on node 2)
               and caught up over HTTP: seconds from the kill

The nodes share CPU 0; Cassandra, Redis, HAProxy and the load generator run on CPU 1. The
figures that size a cluster are the CPU seconds per message of a node (and of Cassandra), which
do not depend on how many cores this machine has; docs/design/scaling.md projects from them.
"""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path
from typing import Any

from mqchat.bench.harness import HOST, PAYLOAD_BYTES, BenchError, Options, heading, progress, ratio
from mqchat.bench.processes import ServeProc, cpu_seconds, run_haproxy, run_load, run_redis, run_serve

RECONNECT_TARGET_S = 10.0
WARMUP_RATE = 50.0
IDLE_S = 5.0


def _params(opts: Options) -> dict[str, Any]:
    return {
        "pairs": 4 if opts.quick else 10,
        "rates": list(opts.rates or ((50.0,) if opts.quick else (50.0, 100.0, 200.0))),
        "seconds_per_rate": opts.duration or (3.0 if opts.quick else 8.0),
        "warmup_s": 5.0 if opts.quick else 20.0,
        "drain_s": 10.0,
        "storm_devices": opts.connections or (1000 if opts.quick else 5000),
        "reconnect_target_s": RECONNECT_TARGET_S,
        "placement": "nodes on CPU 0; Cassandra (heap 1g, commitlog batch), Redis, HAProxy, load on CPU 1",
    }


def _cpu(pids: list[int]) -> float:
    import psutil  # type: ignore[import-untyped]

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            total += cpu_seconds(pid)
    return total


def _chat(
    sender: ServeProc,
    recipient: ServeProc,
    params: dict[str, Any],
    *,
    label: str,
    rates: list[float] | None = None,
    seconds: float | None = None,
) -> list[dict[str, Any]]:
    pairs = []
    tag = secrets.token_hex(3)
    for i in range(params["pairs"]):
        a, b = f"ka{tag}{i}", f"kb{tag}{i}"
        pairs.append((a, sender.device(a, f"{a}-dev"), b, recipient.device(b, f"{b}-dev")))
    rates = rates or params["rates"]
    seconds = seconds or params["seconds_per_rate"]
    steps: list[dict[str, Any]] = run_load(
        "chat_run",
        {
            "host": HOST,
            "port": sender.mqtt_port,
            "recipient_port": recipient.mqtt_port,
            "pairs": pairs,
            "rates": rates,
            "duration": seconds,
            "id_prefix": f"k{tag}",
            "drain_s": params["drain_s"],
            "body_size": PAYLOAD_BYTES,
        },
        label=label,
        limit_s=len(rates) * (seconds * 3 + params["drain_s"] + 10) + 120,
    )
    return steps


def _measured(
    sender: ServeProc, recipient: ServeProc, nodes: list[ServeProc], params: dict[str, Any], label: str
) -> dict[str, Any]:
    """Each rate in a run of its own, with the nodes' CPU over it: gross, and net of what the
    nodes spend idle (measured first, over IDLE_S)."""
    import time

    pids = [pid for node in nodes for pid in node.pids()]
    before, started = _cpu(pids), time.monotonic()
    time.sleep(IDLE_S)
    idle_per_s = (_cpu(pids) - before) / (time.monotonic() - started)
    steps = []
    for rate in params["rates"]:
        before, started = _cpu(pids), time.monotonic()
        (step,) = _chat(sender, recipient, params, label=f"{label} {rate:g}/s", rates=[rate])
        spent, elapsed = _cpu(pids) - before, time.monotonic() - started
        delivered = step["sent"] - step["lost_delivery"]
        net = max(0.0, spent - idle_per_s * elapsed)
        step["node_cpu_ms_per_message"] = round(spent * 1000 / delivered, 3) if delivered else None
        step["node_cpu_ms_per_message_net"] = round(net * 1000 / delivered, 3) if delivered else None
        step["messages_per_node_cpu_s_net"] = round(delivered / net, 1) if net else None
        steps.append(step)
    return {"steps": steps, "idle_node_cpu_percent": round(idle_per_s * 100, 2)}


def run(opts: Options, workdir: Path) -> dict[str, Any]:
    from storage.cassandra.devnode import CassandraNode, DevNodeError

    params = _params(opts)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    heading("cluster: starting a Cassandra node and Redis")
    node = CassandraNode(directory=workdir / "cassandra", heap="1g", commitlog_sync="batch")
    try:
        node.start()
    except DevNodeError as exc:
        raise BenchError(f"the Cassandra node did not start: {exc}") from None
    try:
        with run_redis(workdir) as redis_url:
            secret = secrets.token_urlsafe(32)

            def env(name: str) -> dict[str, str]:
                return {"MQCHAT_REDIS_URL": redis_url, "MQCHAT_NODE_ID": name}

            with run_serve("inbroker", workdir, name="-n1", store=node.store_url, secret=secret, env=env("n1")) as n1:
                if not n1.wait_healthy(60):
                    raise BenchError(f"node 1 did not become healthy:\n{n1.log_tail()}")
                progress(f"warm-up at {WARMUP_RATE:.0f}/s for {params['warmup_s']:.0f} s (not reported)")
                _chat(n1, n1, params, label="warm-up", rates=[WARMUP_RATE], seconds=params["warmup_s"])
                heading("cluster: one node")
                results["one_node"] = {"label": "1 node", **_measured(n1, n1, [n1], params, "1 node")}
                with run_serve(
                    "inbroker", workdir, name="-n2", store=node.store_url, secret=secret, env=env("n2")
                ) as n2:
                    if not n2.wait_healthy(60):
                        raise BenchError(f"node 2 did not become healthy:\n{n2.log_tail()}")
                    _chat(n2, n1, params, label="warm-up n2", rates=[WARMUP_RATE], seconds=params["warmup_s"])
                    heading("cluster: two nodes, both ends on node 1")
                    results["same_node"] = {
                        "label": "2 nodes, same node",
                        **_measured(n1, n1, [n1, n2], params, "same node"),
                    }
                    heading("cluster: two nodes, sender on node 1, recipient on node 2")
                    results["cross_node"] = {
                        "label": "2 nodes, cross node",
                        **_measured(n1, n2, [n1, n2], params, "cross node"),
                    }
                    heading(f"cluster: node loss, {params['storm_devices']} devices on node 1, node 1 killed -9")
                    try:
                        results["node_loss"] = _node_loss(n1, n2, params, workdir)
                    except BenchError as exc:
                        if "not installed" not in str(exc):
                            raise
                        skipped["node_loss"] = str(exc)
    finally:
        node.stop()
    ratios = {
        "cross_vs_same_node_p50": ratio(_p(results, "cross_node", "p50_ms"), _p(results, "same_node", "p50_ms")),
        "cross_vs_same_node_p99": ratio(_p(results, "cross_node", "p99_ms"), _p(results, "same_node", "p99_ms")),
    }
    notes = [
        "Latency is send -> recipient delivery at the highest rate, p50/p99 in ms; every run offers the "
        "same rates with the same pairs count.",
        "messages per node-CPU-second: messages delivered over the CPU seconds of every mqchat node process "
        "during the run (Cassandra's JVM and Redis not included).",
        "Node loss: devices connect straight to node 1, node 1 (supervisor and node process) is killed -9, "
        "and each device reconnects through HAProxy (checks every 1 s, down after 2) with a random first wait "
        "up to 0.2 s, then calls GET /v1/conversations (its catch-up).",
    ]
    return {"parameters": params, "systems": results, "skipped": skipped, "ratios": ratios, "notes": notes}


def _p(results: dict[str, Any], key: str, which: str) -> float | None:
    steps = results.get(key, {}).get("steps") or []
    value = steps[-1]["delivery"][which] if steps else None
    return float(value) if value is not None else None


def _node_loss(n1: ServeProc, n2: ServeProc, params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    count = params["storm_devices"]
    tag = secrets.token_hex(3)
    devices = [n1.device(f"st{tag}{i}", f"st{tag}{i}-d") for i in range(count)]
    with run_haproxy(workdir, [("n1", n1.mqtt_port, n1.http_port), ("n2", n2.mqtt_port, n2.http_port)]) as (
        lb_mqtt,
        lb_http,
    ):
        outcome: dict[str, Any] = run_load(
            "reconnect_storm",
            {
                "host": HOST,
                "node_port": n1.mqtt_port,
                "port": lb_mqtt,
                "http_port": lb_http,
                "devices": devices,
                "kill_pids": n1.pids(),
            },
            label="node loss",
            limit_s=300,
        )
    online, caught = outcome["online"], outcome["caught_up"]
    return {
        "label": "node loss",
        "devices": count,
        "back_online": len(online),
        "caught_up": len(caught),
        "online_s": _spread(online),
        "caught_up_s": _spread(caught),
        "within_target": len(caught) == count and caught[-1] <= RECONNECT_TARGET_S,
        "connect_attempts": outcome["connect_attempts"],
        "errors": outcome["errors"],
        "curve": {"online": _curve(online), "caught_up": _curve(caught)},
    }


def _spread(times: list[float]) -> dict[str, float | None]:
    """p50, p99 and the last of sorted times (seconds)."""

    def at(q: float) -> float | None:
        return round(times[min(len(times) - 1, int(q * len(times)))], 2) if times else None

    return {"p50": at(0.5), "p99": at(0.99), "all": round(times[-1], 2) if times else None}


def _curve(times: list[float], points: int = 200) -> list[tuple[float, int]]:
    """(seconds, devices done by then), at most ``points`` of them, the last included."""
    step = max(1, len(times) // points)
    marks = list(range(step - 1, len(times), step))
    if times and marks[-1] != len(times) - 1:
        marks.append(len(times) - 1)
    return [(round(times[i], 3), i + 1) for i in marks]


def table(data: dict[str, Any]) -> None:
    from mqchat.bench.chat import STEP_COLUMNS, step_row
    from mqchat.bench.report import fmt, print_table

    runs = [data["systems"][k] for k in ("one_node", "same_node", "cross_node") if k in data["systems"]]
    rows = [step_row(s["label"], st) for s in runs for st in s["steps"]]
    print_table("cluster: 1:1 sends on Cassandra + Redis (ms from intended send time)", ["run", *STEP_COLUMNS], rows)
    for s in runs:
        costs = ", ".join(
            f"{st['rate']:g}/s: {fmt(st['node_cpu_ms_per_message'])} ms ({fmt(st['node_cpu_ms_per_message_net'])} net"
            f" of idle, {fmt(st['messages_per_node_cpu_s_net'])} messages per node-CPU-second)"
            for st in s["steps"]
        )
        print(f"{s['label']}: node CPU per message {costs}; idle {fmt(s['idle_node_cpu_percent'])}% CPU")
    loss = data["systems"].get("node_loss")
    if loss:
        print(
            f"node loss: {loss['back_online']}/{loss['devices']} back online (all in {fmt(loss['online_s']['all'])} s, "
            f"p50 {fmt(loss['online_s']['p50'])} s), {loss['caught_up']} caught up (all in "
            f"{fmt(loss['caught_up_s']['all'])} s); target {RECONNECT_TARGET_S:.0f} s: "
            f"{'met' if loss['within_target'] else 'missed'}"
        )


def plot(data: dict[str, Any], path: Path) -> None:
    from mqchat.bench.report import dress, figure, paired_bars, save

    fig, axes = figure(2, size=(13, 5))
    runs = [data["systems"][k] for k in ("one_node", "same_node", "cross_node") if k in data["systems"]]
    last = [r["steps"][-1]["delivery"] for r in runs]
    paired_bars(axes[0], [("p50", [d["p50_ms"] or 0 for d in last]), ("p99", [d["p99_ms"] or 0 for d in last])])
    dress(
        axes[0],
        title=f"send → delivery at {runs[0]['steps'][-1]['rate']:g}/s" if runs else "send → delivery",
        ylabel="ms",
        xticks=[r["label"] for r in runs],
    )
    loss = data["systems"].get("node_loss")
    ax = axes[1]
    if loss:
        for key, label in (("online", "back online (CONNACK + SUBACK)"), ("caught_up", "caught up (HTTP sync)")):
            points = loss["curve"][key]
            ax.step([t for t, _ in points], [n for _, n in points], where="post", label=label)
        ax.axvline(RECONNECT_TARGET_S, color="red", lw=0.8, ls=":", label=f"{RECONNECT_TARGET_S:.0f} s target")
        title = f"node 1 killed -9: its {loss['devices']} devices"
        dress(ax, title=title, ylabel="devices", xlabel="s after the kill")
    else:
        ax.set_axis_off()
    save(fig, path, data)
