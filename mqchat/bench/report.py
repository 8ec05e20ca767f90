"""What a run leaves behind: the environment it ran in, terminal tables, the JSON file and the plots.

A scenario's ``run`` returns a result body (``parameters``, ``systems``, ``skipped``, ``ratios``,
``notes``); ``write_result`` adds when and where it ran and writes ``SCENARIO.json``; the
scenario's ``table`` prints it and its ``plot`` draws ``SCENARIO.png`` with the helpers here:
``figure`` opens the figure, the scenario draws its data, ``dress`` labels each plot and ``save``
titles the figure with where and when it ran and writes it.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mqchat import __version__
from mqchat.bench.harness import BROKER_CPU, LOAD_CPU, MOSQUITTO, pinning

# --- environment ---------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _event_loop_name() -> str:
    version = _version("uvloop")
    return f"uvloop {version}" if version else "asyncio"


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
            f"brokers on CPU {BROKER_CPU}, load generators on CPU {LOAD_CPU}" if pinning() else "off (< 2 CPUs)"
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


def write_result(name: str, body: dict[str, Any], *, quick: bool, wall_seconds: float, out: Path) -> dict[str, Any]:
    """The whole result of one scenario, written to ``out/NAME.json``."""
    data = {
        "scenario": name,
        "timestamp": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "wall_seconds": round(wall_seconds, 1),
        "machine": machine_info(),
        "versions": versions(),
        **body,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    return data


# --- tables --------------------------------------------------------------------------------------


def fmt(v: Any, digits: int | None = None) -> str:
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
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    sys.stdout.flush()


def print_ratios(data: dict[str, Any]) -> None:
    for key, value in data["ratios"].items():
        print(f"ratio {key}: {value}")


def print_notes(data: dict[str, Any]) -> None:
    for note in data["notes"]:
        print(f"note: {note}")


def ok(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The systems of a result that ran (not those that failed with an error)."""
    return [s for s in data["systems"].values() if "error" not in s]


# --- plots ---------------------------------------------------------------------------------------


def figure(ncols: int, *, size: tuple[float, float]) -> tuple[Any, Any]:
    """A figure of ``size`` inches with ``ncols`` plots side by side (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=size)


def dress(
    ax: Any,
    *,
    title: str,
    ylabel: str,
    xlabel: str | None = None,
    xticks: Sequence[str] | None = None,
    tick_size: float = 8,
    log: bool = False,
    grid: bool = False,
    legend: bool = True,
    legend_size: float | None = None,
) -> None:
    """Label one plot once its data is drawn: the systems as x ticks (``xticks``), a log y axis
    (``log``), a grid, the legend (at ``legend_size``, else matplotlib's size) and the title."""
    if xticks is not None:
        ax.set_xticks(range(len(xticks)), xticks, fontsize=tick_size)
    if log:
        logy(ax)
    if xlabel is not None:
        ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if grid:
        ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(**({} if legend_size is None else {"fontsize": legend_size}))


def logy(ax: Any) -> None:
    """A log y axis labelled with plain numbers (1, 10, 100 rather than 10^0, 10^1, 10^2)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:,.0f}" if v >= 1 else f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda _v, _pos: ""))


def paired_bars(ax: Any, series: Sequence[tuple[str, Sequence[float]]], *, value_format: str = "{:.1f}") -> None:
    """Two bars per system side by side (one per series), each labelled with its value."""
    width = 0.38
    for k, (label, vals) in enumerate(series):
        bars = ax.bar([i + (k - 0.5) * width for i in range(len(vals))], vals, width, label=label)
        ax.bar_label(bars, labels=[value_format.format(v) for v in vals], fontsize=8)


def p99_p50_lines(ax: Any, xs: Sequence[float], p99: Sequence[float], p50: Sequence[float], label: str) -> None:
    """One system's p99 (solid) and p50 (dashed, same colour) against the offered rate."""
    (line,) = ax.plot(xs, p99, marker="o", label=f"{label} p99")
    ax.plot(xs, p50, marker=".", ls="--", color=line.get_color(), label=f"{label} p50")


def save(fig: Any, path: Path, data: dict[str, Any]) -> None:
    fig.suptitle(
        f"mqchat bench {data['scenario']} — {data['timestamp']} — {data['machine']['cpu_model']} "
        f"({data['machine']['pinning']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
