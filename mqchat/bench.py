"""``mqchat bench``: our broker and pipeline beside stock amqtt and Mosquitto, in one run.

::

    mqchat bench SCENARIO ──▶ for each system: start its broker in a process pinned to CPU 0
                               (ours: broker.server; stock: amqtt.broker.Broker; Mosquitto: /usr/sbin/mosquitto)
                          ──▶ load-generator processes pinned to CPU 1 (clients.testing.loadgen, raw MQTT)
                          ──▶ table on the terminal, bench/results/SCENARIO.json, bench/results/SCENARIO.png

Scenarios: ``relay`` (raw publish → subscriber throughput and open-loop latency), ``chat`` (the
full pipeline through ``mqchat serve``, per adapter), ``fanout`` (one publish → 500 subscribers),
``connections`` (a ramp of idle authenticated devices: connect rate, memory, latency under load),
``acl`` (the cost of the presence/channel ACL's membership answers, cached and not), ``abuse``
(one device floods while another user chats: that user's send→ack with and without the flood,
with the rate limits on and lifted).
Comparisons are ratios measured side by side in the same run: the machine is shared and noisy,
so absolute numbers from different runs do not compare. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import logging
import multiprocessing
import os
import platform
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import warnings
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from clients.testing import loadgen
from clients.testing.loadgen import Creds
from mqchat import __version__
from mqchat.ids import dm_conv
from mqchat.tokens import SERVICE_CLIENT_PREFIX, SERVICE_USERNAME, issue_token, service_password

logger = logging.getLogger(__name__)

SCENARIOS = ("relay", "chat", "fanout", "connections", "acl", "abuse")
SYSTEMS = ("ours", "stock", "mosquitto")
LABELS = {
    "ours": "ours (mqchat broker)",
    "ours-open": "ours (broker only, no ACL)",
    "stock": "stock amqtt",
    "mosquitto": "Mosquitto",
}
MOSQUITTO = "/usr/sbin/mosquitto"
BROKER_CPU = 0
LOAD_CPU = 1
HOST = "127.0.0.1"
PAYLOAD_BYTES = 100
SLICE = 2000  # connections per slice of the connect-rate curve (smaller for small ramps)
STALL_RATE = 20.0  # a ramp slower than this (connects/s) ...
STALL_WINDOW_S = 30.0  # ... for this long is stopped

_CTX = multiprocessing.get_context("fork")


class BenchError(Exception):
    """A benchmark step failed (a broker did not start, a load process failed or timed out)."""


@dataclass(frozen=True, slots=True)
class Options:
    scenario: str
    quick: bool
    out: Path
    systems: tuple[str, ...]
    duration: float | None = None
    messages: int | None = None
    rates: tuple[float, ...] | None = None
    connections: int | None = None
    netem: str | None = None  # chat: a lossy-network preset between the phones and the server


# --- processes -----------------------------------------------------------------------------------


_CAN_PIN = hasattr(os, "sched_setaffinity") and {BROKER_CPU, LOAD_CPU} <= os.sched_getaffinity(0)
"""Decided at import, before the orchestrator pins itself to the load CPU."""


def _pinning() -> bool:
    return _CAN_PIN


def _pin(cpu: int) -> None:
    if _pinning():
        os.sched_setaffinity(0, {cpu})


def _raise_nofile() -> int:
    """Raise the soft open-file limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        import asyncio

        return asyncio.run(coro)
    return uvloop.run(coro)


def _event_loop_name() -> str:
    version = _version("uvloop")
    return f"uvloop {version}" if version else "asyncio"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _rss(pid: int) -> int:
    import psutil  # type: ignore[import-untyped]

    rss: int = psutil.Process(pid).memory_info().rss
    return rss


def _cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def _quiet_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, force=True)
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


def _child_setup(cpu: int) -> None:
    """In a forked broker or load process: pin, raise the file limit, quiet logs and warnings
    (a parent under pytest turns warnings into errors; amqtt emits deprecation warnings)."""
    _pin(cpu)
    _raise_nofile()
    _quiet_logging()
    warnings.resetwarnings()
    warnings.simplefilter("ignore", DeprecationWarning)


def _python_broker_child(kind: str, port: int, secret: str, ready: Connection) -> None:
    """Body of a broker process: ours (mqchat plugins), ours-open (no plugins key) or stock."""
    _child_setup(BROKER_CPU)

    async def main() -> None:
        import asyncio

        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        listeners = {"default": {"type": "tcp", "bind": f"{HOST}:{port}", "max_connections": 0}}
        if kind == "ours":
            from broker.server import serve_broker, tune_gc
            from storage.presence import MemoryPresence

            tune_gc()

            # As `mqchat serve` runs it: every connect and disconnect also reported to presence.
            async with (
                MemoryPresence() as presence,
                serve_broker(host=HOST, port=port, secret=secret, presence=presence),
            ):
                ready.send(port)
                await stop.wait()
            return
        if kind == "ours-open":
            from broker.server import MqchatBroker

            broker: Any = MqchatBroker({"listeners": listeners})
        else:
            from amqtt.broker import Broker

            broker = Broker({"listeners": listeners})
        await broker.start()
        try:
            ready.send(port)
            await stop.wait()
        finally:
            await broker.shutdown()

    _run_async(main())


@dataclass
class BrokerProc:
    """A running broker: what it is, where it listens, and how to stop it."""

    system: str
    port: int
    pid: int
    stop: Callable[[], None]
    secret: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.system]

    def rss(self) -> int:
        return _rss(self.pid)

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.pid)

    def device(self, user: str, device: str) -> Creds:
        """Credentials of a device: a JWT on ours, anonymous elsewhere (same client id)."""
        if self.system == "ours":
            token = issue_token(secret=self.secret, user=user, device=device, ttl_s=6 * 3600)
            return Creds(device, user, token)
        return Creds(device)

    def service(self, name: str) -> Creds:
        """The bridge's credential on ours (may subscribe ``u/+/+/out`` and publish to in topics)."""
        if self.system == "ours":
            return Creds(f"{SERVICE_CLIENT_PREFIX}-{name}", SERVICE_USERNAME, service_password(self.secret))
        return Creds(f"bench-{name}")


def _wait_port(port: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {limit_s:.0f} s")


@contextlib.contextmanager
def run_broker(system: str, workdir: Path) -> Iterator[BrokerProc]:
    """Start one system's broker pinned to CPU 0 on an ephemeral port; stop it on exit."""
    port = free_port()
    secret = secrets.token_urlsafe(32)
    if system == "mosquitto":
        conf = workdir / f"mosquitto-{port}.conf"
        # Mosquitto drops QoS1 messages beyond 1,000 queued for one slow subscriber by default;
        # amqtt never drops, so the queue limit is lifted for a like-for-like throughput test.
        conf.write_text(f"listener {port} {HOST}\nallow_anonymous true\nmax_queued_messages 0\n")
        log = (workdir / f"mosquitto-{port}.log").open("wb")
        proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: _pin(BROKER_CPU),
        )

        def stop_mosquitto() -> None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.close()

        try:
            _wait_port(port, 10)
        except BaseException:
            stop_mosquitto()
            raise
        try:
            yield BrokerProc(system, port, proc.pid, stop_mosquitto)
        finally:
            stop_mosquitto()
        return
    parent, child = _CTX.Pipe(duplex=False)
    p = _CTX.Process(target=_python_broker_child, args=(system, port, secret, child), name=f"broker-{system}")
    p.start()
    child.close()

    def stop_python() -> None:
        if p.is_alive():
            assert p.pid is not None
            os.kill(p.pid, signal.SIGTERM)
            p.join(15)
        if p.is_alive():
            p.kill()
            p.join(5)

    try:
        if not parent.poll(30):
            raise BenchError(f"{LABELS[system]} did not start within 30 s")
        parent.recv()
        assert p.pid is not None
        yield BrokerProc(system, port, p.pid, stop_python, secret=secret)
    except EOFError:
        raise BenchError(f"{LABELS[system]} exited during start-up") from None
    finally:
        stop_python()


def _load_child(fn: str, kwargs: dict[str, Any], label: str, conn: Connection) -> None:
    _child_setup(LOAD_CPU)
    try:
        result = _run_async(getattr(loadgen, fn)(**kwargs, progress=loadgen.stderr_progress(label)))
        conn.send(("ok", result))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))


def run_load(fn: str, kwargs: dict[str, Any], *, label: str, limit_s: float) -> Any:
    """Run ``clients.testing.loadgen.<fn>(**kwargs)`` in a fresh process pinned to CPU 1; return its result."""
    parent, child = _CTX.Pipe(duplex=False)
    p = _CTX.Process(target=_load_child, args=(fn, kwargs, label, child), name=f"load-{label}")
    p.start()
    child.close()
    try:
        if not parent.poll(limit_s):
            raise BenchError(f"{label}: no result within {limit_s:.0f} s")
        status, value = parent.recv()
    except EOFError:
        raise BenchError(f"{label}: load process died") from None
    finally:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    if status != "ok":
        raise BenchError(f"{label}: {value}")
    return value


def _netem_child(target_port: int, preset: str, seed: int, ready: Connection) -> None:
    """A lossy proxy (clients.testing.netem) in its own process, pinned with the load generator."""
    _child_setup(LOAD_CPU)
    import asyncio

    from clients.testing.netem import PRESETS, LossyProxy

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with LossyProxy(target_port=target_port, profile=PRESETS[preset], seed=seed) as proxy:
            ready.send(proxy.port)
            await stop.wait()

    _run_async(main())


@contextlib.contextmanager
def netem_proxy(target_port: int, preset: str | None) -> Iterator[int]:
    """The port phones should use: the server's own, or a lossy proxy in front of it."""
    if preset is None:
        yield target_port
        return
    parent, child = _CTX.Pipe(duplex=False)
    p = _CTX.Process(target=_netem_child, args=(target_port, preset, 1, child), name="netem")
    p.start()
    child.close()
    try:
        if not parent.poll(15):
            raise BenchError("the lossy proxy did not start")
        yield int(parent.recv())
    finally:
        p.terminate()
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)


def progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def heading(line: str) -> None:
    print(f"== {line}", file=sys.stderr, flush=True)


# --- environment ---------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def mosquitto_version() -> str | None:
    if not Path(MOSQUITTO).exists():
        return None
    out = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, timeout=10, check=False)
    first = (out.stdout or out.stderr).splitlines()[:1]
    return first[0].removeprefix("mosquitto version ").strip() if first else "unknown"


def machine_info() -> dict[str, Any]:
    cpu_model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "pinning": (
            f"brokers on CPU {BROKER_CPU}, load generators on CPU {LOAD_CPU}" if _pinning() else "off (< 2 CPUs)"
        ),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def versions() -> dict[str, str | None]:
    return {
        "mqchat": __version__,
        "amqtt": _version("amqtt"),
        "mosquitto": mosquitto_version(),
        "event_loop": _event_loop_name(),
    }


def _available_systems(opts: Options) -> tuple[list[str], dict[str, str]]:
    chosen, skipped = [], {}
    for s in opts.systems:
        if s == "mosquitto" and not Path(MOSQUITTO).exists():
            skipped[s] = f"{MOSQUITTO} not found (apt-get install mosquitto)"
            continue
        chosen.append(s)
    return chosen, skipped


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _fmt(v: Any, digits: int | None = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if digits is None:
            digits = 3 if abs(v) < 1 else 2 if abs(v) < 100 else 0
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    sys.stdout.flush()


def _ok(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The systems of a result that ran (not those that failed with an error)."""
    return [s for s in data["systems"].values() if "error" not in s]


@contextlib.contextmanager
def _recorded(results: dict[str, Any], system: str) -> Iterator[None]:
    """Record a system that fails as ``{"label", "error"}`` and go on with the next one."""
    try:
        yield
    except BenchError as exc:
        progress(f"{LABELS[system]}: failed: {exc}")
        results[system] = {"label": LABELS[system], "error": str(exc)}


# --- relay ---------------------------------------------------------------------------------------


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


def bench_relay(opts: Options, workdir: Path) -> dict[str, Any]:
    params = relay_params(opts)
    systems, skipped = _available_systems(opts)
    results: dict[str, Any] = {}
    for system in systems:
        with _recorded(results, system), run_broker(system, workdir) as b:
            heading(f"relay: {b.label} on port {b.port}")
            pubs, sub = _relay_endpoints(b)
            entry: dict[str, Any] = {"label": b.label}
            for qos in (0, 1):
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
                    {
                        **endpoints,
                        "count": count,
                        "rate": None,
                        "time_limit": 120.0,
                        "window": params["qos1_window_per_publisher"],
                    },
                    label=f"{system} qos{qos} max",
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
                        {
                            **endpoints,
                            "count": n,
                            "rate": rate,
                            "time_limit": params["seconds_per_rate"] * 2 + 10,
                        },
                        label=f"{system} qos{qos} @{rate:g}/s",
                        limit_s=params["seconds_per_rate"] * 2 + 60,
                    )
                    progress(
                        f"{b.label} QoS{qos} @{rate:g}/s: p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, lost {r['lost']}"
                    )
                    latency.append(r)
                entry[f"qos{qos}"] = {"throughput": tp, "latency": latency}
            results[system] = entry
    ratios: dict[str, Any] = {}
    for qos in (0, 1):

        def tput(s: str, q: int = qos) -> float | None:
            v = results.get(s, {}).get(f"qos{q}", {}).get("throughput", {}).get("msg_per_s")
            return float(v) if v else None

        ratios[f"qos{qos}_throughput_ours_vs_stock"] = _ratio(tput("ours"), tput("stock"))
        ratios[f"qos{qos}_throughput_mosquitto_vs_ours"] = _ratio(tput("mosquitto"), tput("ours"))
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


def table_relay(data: dict[str, Any]) -> None:
    rows = []
    for s in _ok(data):
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
    for s in _ok(data):
        for qos in (0, 1):
            for r in s[f"qos{qos}"]["latency"]:
                rows.append([s["label"], qos, r["rate"], r["p50_ms"], r["p90_ms"], r["p99_ms"], r["max_ms"], r["lost"]])
    print_table(
        "relay: open-loop latency (ms, from intended send time)",
        ["system", "QoS", "rate/s", "p50", "p90", "p99", "max", "lost"],
        rows,
    )
    print("ratios: " + ", ".join(f"{k} = {_fmt(v, 2)}" for k, v in data["ratios"].items()))
    for note in data["notes"]:
        print(f"note: {note}")


def plot_relay(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    systems = _ok(data)
    names = [s["label"] for s in systems]
    ax = axes[0]
    width = 0.38
    for k, qos in enumerate((0, 1)):
        vals = [s[f"qos{qos}"]["throughput"]["msg_per_s"] for s in systems]
        xs = [i + (k - 0.5) * width for i in range(len(systems))]
        bars = ax.bar(xs, vals, width, label=f"QoS{qos}")
        ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(systems)), names, fontsize=8)
    _logy(ax)
    ax.set_ylim(bottom=100)
    ax.set_ylabel("messages/s (log scale)")
    ax.set_title("Max throughput, 4 publishers → 1 subscriber")
    ax.legend()
    for ax, qos in ((axes[1], 0), (axes[2], 1)):
        for s in systems:
            lat = [r for r in s[f"qos{qos}"]["latency"] if r["p99_ms"] is not None]
            rates = [r["rate"] for r in lat]
            (line,) = ax.plot(rates, [r["p99_ms"] for r in lat], marker="o", label=f"{s['label']} p99")
            ax.plot(
                rates,
                [r["p50_ms"] for r in lat],
                marker=".",
                ls="--",
                color=line.get_color(),
                label=f"{s['label']} p50",
            )
        _logy(ax)
        ax.set_xlabel("offered rate (messages/s, open loop)")
        ax.set_ylabel("latency ms (log scale)")
        ax.set_title(f"QoS{qos} latency: p99 solid, p50 dashed")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path, data)


# --- fan-out -------------------------------------------------------------------------------------


def bench_fanout(opts: Options, workdir: Path) -> dict[str, Any]:
    params = {"subscribers": 500, "repeats": 10 if opts.quick else 20, "qos": 1, "pause_s": 0.3}
    systems, skipped = _available_systems(opts)
    results: dict[str, Any] = {}
    for system in systems:
        run_as = "ours-open" if system == "ours" else system
        with _recorded(results, run_as), run_broker(run_as, workdir) as b:
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
        with _recorded(results, "pipeline"):
            results["pipeline"] = _group_fanout(params, workdir)
    ours = results.get("ours-open", {}).get("p99_ms")
    ratios = {
        "p99_stock_vs_ours": _ratio(results.get("stock", {}).get("p99_ms"), ours),
        "p99_ours_vs_mosquitto": _ratio(ours, results.get("mosquitto", {}).get("p99_ms")),
    }
    notes = [
        "ours-open runs the mqchat broker class in an open configuration (anonymous, no ACL): broker fan-out only.",
        "pipeline: a 500-member group through `mqchat serve` (in-broker adapter): send -> store -> one msg per "
        "member, time until the last member has it.",
    ]
    return {"parameters": params, "systems": results, "skipped": skipped, "ratios": ratios, "notes": notes}


def _group_fanout(params: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """One message to a 500-member group through the whole pipeline."""
    import httpx

    heading("fanout: a 500-member group through mqchat serve")
    secret = secrets.token_urlsafe(32)
    proc, mqtt_port, http_port, log_path = _serve("inbroker", workdir, secret)
    try:
        if not _wait_healthy(proc, http_port, 30.0):
            raise BenchError(f"serve did not become healthy:\n{_tail(log_path)}")
        owner = "gowner"
        users = [f"gm{i:03d}" for i in range(params["subscribers"] - 1)]
        token = issue_token(secret=secret, user=owner, device="gowner-http", ttl_s=3600)
        r = httpx.post(
            f"http://{HOST}:{http_port}/v1/groups",
            json={"name": "bench", "members": users},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        r.raise_for_status()
        conv = r.json()["conv"]
        members = [
            (Creds(f"{u}-dev", u, issue_token(secret=secret, user=u, device=f"{u}-dev", ttl_s=3600)), u)
            for u in (owner, *users)
        ]
        sender = (
            Creds("gowner-send", owner, issue_token(secret=secret, user=owner, device="gowner-send", ttl_s=3600)),
            owner,
        )
        result: dict[str, Any] = run_load(
            "group_fanout_run",
            {
                "host": HOST,
                "port": mqtt_port,
                "conv": conv,
                "sender": sender,
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
    finally:
        _stop_serve(proc)


def table_fanout(data: dict[str, Any]) -> None:
    rows = [
        [s["label"], s["complete"], s["incomplete"], s["p50_ms"], s["p90_ms"], s["p99_ms"], s["max_ms"]]
        for s in _ok(data)
    ]
    p = data["parameters"]
    print_table(
        f"fanout: one QoS{p['qos']} publish -> {p['subscribers']} subscribers, time until the last has it (ms)",
        ["system", "complete", "incomplete", "p50", "p90", "p99", "max"],
        rows,
    )
    for note in data["notes"]:
        print(f"note: {note}")


def plot_fanout(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    systems = _ok(data)
    width = 0.38
    for k, key in enumerate(("p50_ms", "p99_ms")):
        vals = [s[key] or 0 for s in systems]
        bars = ax.bar([i + (k - 0.5) * width for i in range(len(systems))], vals, width, label=key[:3])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(systems)), [s["label"] for s in systems], fontsize=8)
    ax.set_ylabel("ms until the last subscriber has the message")
    p = data["parameters"]
    ax.set_title(f"Fan-out of one QoS{p['qos']} publish to {p['subscribers']} subscribers ({p['repeats']} repeats)")
    ax.legend()
    _save(fig, path, data)


# --- connections ---------------------------------------------------------------------------------


def _ramp_child(
    devices: list[tuple[Creds, list[str]]],
    port: int,
    concurrency: int,
    counter: Any,
    slot: int,
    stop: Any,
    release: Any,
    conn: Connection,
    time_limit: float,
) -> None:
    _child_setup(LOAD_CPU)

    def on_connected(n: int) -> None:
        counter[slot] = n

    try:
        _run_async(
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
    procs: list[Any]
    conns: list[Connection]
    counter: Any
    slots: list[int]
    stop: Any
    release: Any
    reports: list[dict[str, Any]] = field(default_factory=list)

    def total(self) -> int:
        return sum(int(self.counter[s]) for s in self.slots)


def _start_ramp(
    groups: Sequence[list[tuple[Creds, list[str]]]],
    port: int,
    counter: Any,
    first_slot: int,
    release: Any,
    time_limit: float,
) -> _Ramp:
    stop = _CTX.Event()
    ramp = _Ramp([], [], counter, [], stop, release)
    for k, devices in enumerate(groups):
        parent, child = _CTX.Pipe(duplex=False)
        p = _CTX.Process(
            target=_ramp_child,
            args=(devices, port, 16, counter, first_slot + k, stop, release, child, time_limit),
            name=f"ramp-{first_slot + k}",
        )
        p.start()
        child.close()
        ramp.procs.append(p)
        ramp.conns.append(parent)
        ramp.slots.append(first_slot + k)
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


def bench_connections(opts: Options, workdir: Path) -> dict[str, Any]:
    requested = opts.connections or (2000 if opts.quick else 20000)
    fd_limit = _raise_nofile()
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
    systems, skipped = _available_systems(opts)
    results: dict[str, Any] = {}
    for system in systems:
        with _recorded(results, system), run_broker(system, workdir) as b:
            heading(f"connections: {b.label} on port {b.port}, ramp to {n_max}")
            results[system] = _connections_one(b, params)
    ratios = {}
    for s, r in results.items():
        ratios[f"{s}_p99_at_n_vs_at_base"] = r.get("latency_ratio_p99")
    ours, stock = results.get("ours", {}), results.get("stock", {})
    ratios["connect_rate_ours_vs_stock"] = _ratio(ours.get("connect_rate"), stock.get("connect_rate"))
    ratios["rss_per_connection_stock_vs_ours"] = _ratio(
        stock.get("rss_per_connection_bytes"), ours.get("rss_per_connection_bytes")
    )
    return {"parameters": params, "systems": results, "skipped": skipped, "ratios": ratios, "notes": notes}


def _connections_one(b: BrokerProc, params: dict[str, Any]) -> dict[str, Any]:
    n_max, base = params["connections"], params["baseline_connections"]
    devices = [
        (b.device(f"cu{i}", f"cd{i}"), [f"u/cu{i}/in", f"u/cu{i}/cd{i}/in"]) for i in range(n_max)
    ]  # tokens are signed here, outside the timed ramp
    counter = _CTX.RawArray("l", 3)
    release = _CTX.Event()
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
        history: list[tuple[float, int]] = [(t_start, 0)]
        stopped = None
        while True:
            time.sleep(1.0)
            now, done = time.monotonic(), ramp.total()
            history.append((now, done))
            alive = any(p.is_alive() for p in ramp.procs) and not all(c.poll() for c in ramp.conns)
            rate = (done - history[-2][1]) / (now - history[-2][0])
            progress(f"{b.label}: {base + done:,}/{n_max:,} connected ({rate:,.0f}/s)")
            if done >= len(rest) or not alive:
                break
            window = [h for h in history if h[0] >= now - STALL_WINDOW_S]
            if now - t_start >= STALL_WINDOW_S and done - window[0][1] < STALL_RATE * STALL_WINDOW_S:
                stopped = f"stalled below {STALL_RATE:g} connects/s for {STALL_WINDOW_S:g} s"
            elif now - t_start >= params["ramp_time_limit_s"]:
                stopped = f"ramp time limit ({params['ramp_time_limit_s']:g} s)"
            if stopped:
                ramp.stop.set()
                progress(f"{b.label}: stopping the ramp at {base + done:,}: {stopped}")
                break
        _collect_reports(ramp, 60.0)
        done_at = sorted(t for r in ramp.reports for t in r.get("done_at", []))
        errors = [e for r in ramp.reports for e in ([r["error"]] if "error" in r else r.get("errors", []))]
        connected = base + len(done_at)
        elapsed = (done_at[-1] - t_start) if done_at else 0.0
        slices = []
        prev_t, prev_n = t_start, base
        for j, t in enumerate(done_at):
            total = base + j + 1
            if total % params["slice"] == 0 or j == len(done_at) - 1:
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
        time.sleep(1.0)
        rss_n = b.rss()
        out.update(
            {
                "connected": connected,
                "stopped": stopped,
                "errors": errors[:5],
                "error_count": sum(int(r.get("error_count", 0)) for r in ramp.reports),
                "ramp_seconds": round(elapsed, 3),
                "connect_rate": round(len(done_at) / elapsed, 1) if elapsed > 0 else None,
                "slices": slices,
                "rss_at_n_bytes": rss_n,
                "rss_per_connection_bytes": round((rss_n - rss0) / connected) if connected else None,
            }
        )
        progress(f"{b.label}: {connected:,} connected at {out['connect_rate']} connects/s; measuring latency")
        try:
            out["latency_at_n"] = _connection_latency(b, params, f"{b.system} latency @{connected}")
        except BenchError as exc:
            out["latency_at_n"] = {"error": str(exc), "p50_ms": None, "p99_ms": None, "lost": None}
        p_base, p_n = out["latency_at_base"]["p99_ms"], out["latency_at_n"]["p99_ms"]
        out["latency_ratio_p99"] = _ratio(p_n, p_base)
        out["latency_ratio_p50"] = _ratio(out["latency_at_n"]["p50_ms"], out["latency_at_base"]["p50_ms"])
    finally:
        release.set()
        for r in ramps:
            r.stop.set()
            for p in r.procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join(5)
    return out


def table_connections(data: dict[str, Any]) -> None:
    rows = []
    for s in _ok(data):
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
    for note in data["notes"]:
        print(f"note: {note}")


def plot_connections(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    systems = _ok(data)
    ax = axes[0]
    for s in systems:
        sl = s.get("slices", [])
        ax.plot([x["to"] for x in sl], [x["rate"] for x in sl], marker="o", label=s["label"])
    _logy(ax)
    ax.set_xlabel("connections reached (end of slice)")
    ax.set_ylabel("connect + auth + subscribe per second (log)")
    ax.set_title(f"Connect rate per {data['parameters']['slice']:,}-connection slice")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    names = [s["label"] for s in systems]
    ax = axes[1]
    vals = [(s.get("rss_per_connection_bytes") or 0) / 1024 for s in systems]
    bars = ax.bar(range(len(systems)), vals)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8)
    ax.set_xticks(range(len(systems)), names, fontsize=8)
    ax.set_ylabel("KiB of broker RSS per idle connection")
    ax.set_title("Memory per connection")
    ax = axes[2]
    width = 0.38
    base = data["parameters"]["baseline_connections"]
    for k, key in enumerate(("latency_at_base", "latency_at_n")):
        v = [(s.get(key) or {}).get("p99_ms") or 0 for s in systems]
        lab = f"p99 with {base} idle" if k == 0 else "p99 with N idle"
        b2 = ax.bar([i + (k - 0.5) * width for i in range(len(systems))], v, width, label=lab)
        ax.bar_label(b2, labels=[f"{x:.1f}" for x in v], fontsize=8)
    ax.set_xticks(range(len(systems)), [f"{s['label']}\nN={s.get('connected', 0):,}" for s in systems], fontsize=8)
    _logy(ax)
    ax.set_ylabel("ms (log)")
    ax.set_title(f"1:1 QoS1 latency @{data['parameters']['latency_rate']:g}/s")
    ax.legend(fontsize=8)
    _save(fig, path, data)


# --- chat: the full pipeline ---------------------------------------------------------------------


SEND_LIMITS = ("SEND_RATE", "SEND_BURST", "USER_SEND_RATE", "USER_SEND_BURST")


def _serve(
    adapter: str, workdir: Path, secret: str, *, limits: bool = False, name: str = ""
) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """``mqchat serve`` pinned to the broker's CPU. The pipeline's capacity is measured with few
    devices sending fast, so the send rate limits are lifted unless ``limits``."""
    mqtt_port, http_port = free_port(), free_port()
    data_dir = workdir / f"data-{adapter}{name}"
    log_path = workdir / f"serve-{adapter}{name}.log"
    unlimited = {} if limits else {f"MQCHAT_{key}": "1000000000" for key in SEND_LIMITS}
    env = {**os.environ, "MQCHAT_JWT_SECRET": secret, **unlimited}
    env.pop("MQCHAT_CONFIG", None)
    cmd = [
        sys.executable,
        "-m",
        "mqchat",
        "serve",
        "--data-dir",
        str(data_dir),
        "--mqtt-port",
        str(mqtt_port),
        "--http-port",
        str(http_port),
        "--adapter",
        adapter,
        "--log-level",
        "WARNING",
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=lambda: _pin(BROKER_CPU))
    return proc, mqtt_port, http_port, log_path


def _wait_healthy(proc: subprocess.Popen[bytes], http_port: int, limit_s: float) -> bool:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"http://{HOST}:{http_port}/healthz", timeout=1) as resp,
        ):
            if resp.status == 200:
                return True
        time.sleep(0.2)
    return False


def _stop_serve(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tail(path: Path, lines: int = 8) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def bench_chat(opts: Options, workdir: Path) -> dict[str, Any]:
    params: dict[str, Any] = {
        "pairs": 4 if opts.quick else 10,
        "rates": list(opts.rates or ((100.0, 500.0) if opts.quick else (100.0, 500.0, 1000.0, 2000.0, 3000.0))),
        "seconds_per_rate": opts.duration or (3.0 if opts.quick else 5.0),
        "drain_s": 10.0 if opts.quick else 15.0,
        "body_bytes": PAYLOAD_BYTES,
        "sustainable": "highest rate with send->ack and send->delivery p99 < 100 ms and nothing lost",
        "placement": "the whole server (supervisor, broker, bridge) on CPU 0; load generator on CPU 1",
        "netem": opts.netem or "none",
    }
    results: dict[str, Any] = {}
    for adapter in ("mqtt", "inbroker"):
        heading(f"chat: mqchat serve --adapter {adapter}")
        secret = secrets.token_urlsafe(32)
        proc, mqtt_port, http_port, log_path = _serve(adapter, workdir, secret)
        entry: dict[str, Any] = {"label": f"mqchat serve --adapter {adapter}", "available": True}
        try:
            if not _wait_healthy(proc, http_port, 30.0):
                entry.update(available=False, reason=f"serve did not become healthy:\n{_tail(log_path)}")
                progress(f"adapter {adapter}: unavailable")
                results[adapter] = entry
                continue
            pairs = []
            for i in range(params["pairs"]):
                a, b = f"ca{i}", f"cb{i}"
                ta = issue_token(secret=secret, user=a, device=f"{a}-dev", ttl_s=3600)
                tb = issue_token(secret=secret, user=b, device=f"{b}-dev", ttl_s=3600)
                pairs.append((a, Creds(f"{a}-dev", a, ta), b, Creds(f"{b}-dev", b, tb)))
            with netem_proxy(mqtt_port, opts.netem) as phone_port:
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
            ok = [
                s["rate"]
                for s in steps
                if s["lost_ack"] == 0
                and s["lost_delivery"] == 0
                and (s["ack"]["p99_ms"] or 1e9) < 100
                and (s["delivery"]["p99_ms"] or 1e9) < 100
            ]
            entry["max_sustainable_rate"] = max(ok) if ok else None
            if proc.poll() is not None:
                entry["note"] = f"serve exited during the run:\n{_tail(log_path)}"
        except BenchError as exc:
            entry.update(available=False, reason=str(exc), log_tail=_tail(log_path))
        finally:
            _stop_serve(proc)
        results[adapter] = entry
    ratios = {
        "max_rate_inbroker_vs_mqtt": _ratio(
            results.get("inbroker", {}).get("max_sustainable_rate"), results.get("mqtt", {}).get("max_sustainable_rate")
        )
    }
    notes = ["Rates not listed for an adapter were skipped after a rate lost more than a fifth of its messages."]
    return {"parameters": params, "systems": results, "skipped": {}, "ratios": ratios, "notes": notes}


def table_chat(data: dict[str, Any]) -> None:
    rows = []
    for s in data["systems"].values():
        if not s.get("available"):
            rows.append([s["label"], "unavailable", *[""] * 7])
            continue
        for st in s["steps"]:
            rows.append(
                [
                    s["label"],
                    st["rate"],
                    st["ack"]["p50_ms"],
                    st["ack"]["p99_ms"],
                    st["delivery"]["p50_ms"],
                    st["delivery"]["p99_ms"],
                    st["delivery"]["max_ms"],
                    st["lost_ack"],
                    st["lost_delivery"],
                ]
            )
    print_table(
        "chat: 1:1 sends through mqchat serve (ms from intended send time)",
        ["server", "rate/s", "ack p50", "ack p99", "msg p50", "msg p99", "msg max", "no ack", "undelivered"],
        rows,
    )
    for s in data["systems"].values():
        if s.get("available"):
            print(f"{s['label']}: max sustainable rate {_fmt(s.get('max_sustainable_rate'))} sends/s")
        else:
            print(f"{s['label']}: unavailable: {s.get('reason', '').splitlines()[0]}")


def plot_chat(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, title in ((axes[0], "ack", "send → ack"), (axes[1], "delivery", "send → recipient delivery")):
        for s in data["systems"].values():
            if not s.get("available"):
                continue
            steps = [st for st in s["steps"] if st[key]["p99_ms"] is not None]
            rates = [st["rate"] for st in steps]
            (line,) = ax.plot(rates, [st[key]["p99_ms"] for st in steps], marker="o", label=f"{s['label']} p99")
            ax.plot(
                rates,
                [st[key]["p50_ms"] for st in steps],
                ls="--",
                marker=".",
                color=line.get_color(),
                label=f"{s['label']} p50",
            )
        ax.axhline(100, color="red", lw=0.8, ls=":", label="100 ms target")
        _logy(ax)
        ax.set_xlabel("offered sends/s (open loop)")
        ax.set_ylabel("latency ms (log)")
        ax.set_title(f"{title}: p99 solid, p50 dashed")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path, data)


# --- output --------------------------------------------------------------------------------------


def _logy(ax: Any) -> None:
    """A log y axis labelled with plain numbers (1, 10, 100 rather than 10^0, 10^1, 10^2)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, data: dict[str, Any]) -> None:
    fig.suptitle(
        f"mqchat bench {data['scenario']} — {data['timestamp']} — {data['machine']['cpu_model']} "
        f"({data['machine']['pinning']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


# --- acl -----------------------------------------------------------------------------------------


def bench_acl(opts: Options, workdir: Path) -> dict[str, Any]:
    from mqchat import bench_acl as acl

    return acl.run(workdir, quick=opts.quick, progress=progress)


def table_acl(data: dict[str, Any]) -> None:
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
    for key, value in data["ratios"].items():
        print(f"ratio {key}: {value}")
    for note in data["notes"]:
        print(f"note: {note}")


def plot_acl(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.5))
    systems = list(data["systems"].values())
    width = 0.38
    for k, question in enumerate(("shares", "member")):
        vals = [s[question]["mean_us"] for s in systems]
        bars = left.bar([i + (k - 0.5) * width for i in range(len(systems))], vals, width, label=question)
        left.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8)
    left.set_xticks(range(len(systems)), [s["label"] for s in systems], fontsize=8)
    left.set_ylabel("µs per answer (mean)")
    _logy(left)
    left.legend()
    left.set_title("One membership question")
    rates = [s["subscribes_per_s"] for s in systems]
    bars = right.bar(["uncached (store)", "cached"], [rates[0], rates[1]])
    right.bar_label(bars, labels=[f"{v:,.0f}" for v in rates], fontsize=8)
    right.set_ylabel("SUBSCRIBE/s (one client, sequential)")
    right.set_title(f"{data['parameters']['topics']} SUBSCRIBEs via the broker")
    _save(fig, path, data)


# --- abuse ---------------------------------------------------------------------------------------


def bench_abuse(opts: Options, workdir: Path) -> dict[str, Any]:
    """Another user's send→ack while one device floods, on ``mqchat serve`` (one node, defaults)."""
    params: dict[str, Any] = {
        "legit_rate": 50.0,
        "seconds": opts.duration or (4.0 if opts.quick else 10.0),
        "flood_inflight": 200,
        "placement": "the whole server on CPU 0; both clients (one load process) on CPU 1",
        "limits": "defaults: 50 sends/s per device (burst 500), 100/s per user (burst 1000)",
    }
    runs = (
        ("quiet", "no flood, limits on (defaults)", True, False),
        ("flood", "one device floods, limits on (defaults)", True, True),
        ("flood_unlimited", "one device floods, send limits lifted", False, True),
    )
    results: dict[str, Any] = {}
    for key, label, limits, flood in runs:
        heading(f"abuse: {label}")
        secret = secrets.token_urlsafe(32)
        proc, mqtt_port, http_port, log_path = _serve("inbroker", workdir, secret, limits=limits, name=f"-{key}")
        entry: dict[str, Any] = {"label": label, "available": True}
        try:
            if not _wait_healthy(proc, http_port, 30.0):
                entry.update(available=False, reason=f"serve did not become healthy:\n{_tail(log_path)}")
                results[key] = entry
                continue

            entry.update(
                run_load(
                    "abuse_run",
                    {
                        "host": HOST,
                        "port": mqtt_port,
                        "legit": ("legit", _creds(secret, "legit"), dm_conv("friend", "legit")),
                        "flooder": (
                            ("flooder", _creds(secret, "flooder"), dm_conv("flooder", "victim")) if flood else None
                        ),
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
        finally:
            _stop_serve(proc)
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


def _creds(secret: str, user: str) -> Creds:
    device = f"{user}-dev"
    return Creds(device, user, issue_token(secret=secret, user=user, device=device, ttl_s=3600))


def table_abuse(data: dict[str, Any]) -> None:
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
    for key, value in data["ratios"].items():
        print(f"ratio {key}: {value}")
    for note in data["notes"]:
        print(f"note: {note}")


def plot_abuse(data: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    systems = [s for s in data["systems"].values() if "ack" in s]
    labels = [s["label"].replace(", ", ",\n") for s in systems]
    width = 0.38
    for k, pct in enumerate(("p50_ms", "p99_ms")):
        vals = [s["ack"][pct] or 0 for s in systems]
        bars = left.bar([i + (k - 0.5) * width for i in range(len(systems))], vals, width, label=pct[:-3])
        left.bar_label(bars, labels=[f"{v:.1f}" for v in vals], fontsize=8)
    left.axhline(50, color="red", linestyle="--", linewidth=1, label="target p99 50 ms")
    left.set_xticks(range(len(systems)), labels, fontsize=7)
    left.set_ylabel("legit user's send→ack (ms)")
    left.legend(fontsize=8)
    left.set_title("Another user's latency")
    acked = [s["flood_acked"] for s in systems]
    refused = [sum(s["flood_errors"].values()) for s in systems]
    right.bar(range(len(systems)), acked, label="acked (stored)")
    right.bar(range(len(systems)), refused, bottom=acked, label="rate_limited (nothing stored)")
    right.set_xticks(range(len(systems)), labels, fontsize=7)
    right.set_ylabel("flood sends answered")
    right.legend(fontsize=8)
    right.set_title(f"The flood ({data['parameters']['seconds']:g} s)")
    _save(fig, path, data)


RUNNERS: dict[str, tuple[Callable[[Options, Path], dict[str, Any]], Callable[..., None], Callable[..., None]]] = {
    "relay": (bench_relay, table_relay, plot_relay),
    "chat": (bench_chat, table_chat, plot_chat),
    "fanout": (bench_fanout, table_fanout, plot_fanout),
    "connections": (bench_connections, table_connections, plot_connections),
    "acl": (bench_acl, table_acl, plot_acl),
    "abuse": (bench_abuse, table_abuse, plot_abuse),
}


def run_scenario(name: str, opts: Options) -> dict[str, Any]:
    bench, table, plot = RUNNERS[name]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"mqchat-bench-{name}-") as tmp:
        body = bench(opts, Path(tmp))
    data = {
        "scenario": name,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": opts.quick,
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": machine_info(),
        "versions": versions(),
        **body,
    }
    opts.out.mkdir(parents=True, exist_ok=True)
    json_path = opts.out / f"{name}.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    table(data)
    for s in data["systems"].values():
        if "error" in s:
            print(f"failed {s['label']}: {s['error']}")
    for system, why in data["skipped"].items():
        print(f"skipped {system}: {why}")
    png = opts.out / f"{name}.png"
    plot(data, png)
    print(f"wrote {json_path} and {png}")
    return data


# --- command line --------------------------------------------------------------------------------


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
    p.add_argument("--connections", type=int, help="connections: how many idle devices (default 20000)")
    p.add_argument(
        "--netem",
        choices=("perfect", "good_4g", "flaky_3g", "chaos"),
        help="chat: put a lossy-network proxy between the phones and the server (the load generator does not "
        "reconnect, so with cuts a cut connection's messages count as lost: use good_4g for latency)",
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
    )
    _pin(LOAD_CPU)  # keep the orchestrator off the brokers' CPU
    _raise_nofile()
    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    failed = []
    for name in names:
        try:
            run_scenario(name, opts)
        except BenchError as exc:
            print(f"mqchat bench {name}: failed: {exc}", file=sys.stderr)
            failed.append(name)
    return 1 if failed else 0
