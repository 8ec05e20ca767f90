"""How bad the network is, as pure data: ``NetemProfile``, the presets, and ``fault_plan``,
which turns a profile, a seed and a connection's ordinal into that connection's fault decisions."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class NetemProfile:
    """How bad the network is. Rates are expected events per connection per second (Poisson)."""

    latency_ms: float = 0.0
    """One-way base delay, applied in each direction."""
    jitter_ms: float = 0.0
    """Uniform ± around ``latency_ms`` (a delay never goes below 0 and never reorders bytes)."""
    cut_rate: float = 0.0
    """Abrupt cuts: both sides closed with a reset."""
    stall_rate: float = 0.0
    """Stalls: the link forwards nothing, in either direction, for ``stall_ms``, without closing."""
    stall_ms: float = 0.0
    reset_mid_packet_rate: float = 0.0
    """Forward only a strict prefix of the next chunk (either direction), then reset both sides."""
    max_connection_s: float | None = None
    """Reset every connection this long after it was established."""
    bandwidth_bytes_per_s: float | None = None
    """Per direction, per connection."""

    def __post_init__(self) -> None:
        for name in ("latency_ms", "jitter_ms", "cut_rate", "stall_rate", "stall_ms", "reset_mid_packet_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_connection_s is not None and self.max_connection_s <= 0:
            raise ValueError("max_connection_s must be > 0 (or None)")
        if self.bandwidth_bytes_per_s is not None and self.bandwidth_bytes_per_s <= 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0 (or None)")

    @property
    def has_faults(self) -> bool:
        """True when connections get a fault timer (any rate, or a maximum age)."""
        rates = (self.cut_rate, self.stall_rate, self.reset_mid_packet_rate)
        return any(rate > 0 for rate in rates) or self.max_connection_s is not None


PERFECT = NetemProfile()
"""Forward everything at once: the proxy is transparent."""

GOOD_4G = NetemProfile(
    latency_ms=30,
    jitter_ms=10,
    cut_rate=1 / 600,
    stall_rate=1 / 120,
    stall_ms=500,
    reset_mid_packet_rate=1 / 1800,
    bandwidth_bytes_per_s=2_500_000,
)
"""A decent mobile link: a cut every ~10 minutes, a short stall every ~2 minutes."""

FLAKY_3G = NetemProfile(
    latency_ms=150,
    jitter_ms=75,
    cut_rate=1 / 30,
    stall_rate=1 / 15,
    stall_ms=3000,
    reset_mid_packet_rate=1 / 60,
    bandwidth_bytes_per_s=100_000,
)
"""A poor link: a cut every ~30 s, a 3 s stall every ~15 s, slow."""

CHAOS = NetemProfile(
    latency_ms=20,
    jitter_ms=20,
    cut_rate=0.5,
    stall_rate=1.0,
    stall_ms=500,
    reset_mid_packet_rate=0.5,
    max_connection_s=10.0,
)
"""For tests: a fault every second or so, and no connection lives longer than 10 s."""

PRESETS: Mapping[str, NetemProfile] = MappingProxyType(
    {"perfect": PERFECT, "good_4g": GOOD_4G, "flaky_3g": FLAKY_3G, "chaos": CHAOS}
)


class FaultKind(StrEnum):
    CUT = "cut"
    STALL = "stall"
    RESET_MID_PACKET = "reset_mid_packet"
    EXPIRE = "expire"
    """``max_connection_s`` reached: a cut."""


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault decision, ``at_s`` seconds after the connection was established."""

    at_s: float
    kind: FaultKind
    duration_s: float = 0.0
    """For a stall."""
    fraction: float = 0.0
    """For a mid-packet reset: which share of the chunk gets through (always a strict prefix)."""


def fault_plan(profile: NetemProfile, *, seed: int, ordinal: int) -> Iterator[Fault]:
    """The fault decisions for connection ``ordinal``, in time order; pure and reproducible.

    Cuts, stalls and mid-packet resets are independent Poisson processes merged in time order.
    The plan ends after the first cut, or with an ``EXPIRE`` at ``max_connection_s``; without
    either it is endless when any rate is positive (and empty when none is).
    """
    rng = random.Random(f"netem-faults:{seed}:{ordinal}")
    rates = {
        FaultKind.CUT: profile.cut_rate,
        FaultKind.STALL: profile.stall_rate,
        FaultKind.RESET_MID_PACKET: profile.reset_mid_packet_rate,
    }
    upcoming = {kind: rng.expovariate(rate) for kind, rate in rates.items() if rate > 0}
    end = profile.max_connection_s
    while upcoming:
        kind = min(upcoming, key=upcoming.__getitem__)
        at = upcoming[kind]
        if end is not None and at >= end:
            break
        if kind is FaultKind.CUT:
            yield Fault(at, kind)
            return
        if kind is FaultKind.STALL:
            yield Fault(at, kind, duration_s=profile.stall_ms / 1000)
        else:
            yield Fault(at, kind, fraction=rng.random())
        upcoming[kind] = at + rng.expovariate(rates[kind])
    if end is not None:
        yield Fault(end, FaultKind.EXPIRE)


def prefix_length(size: int, fraction: float) -> int:
    """How many bytes of a ``size``-byte chunk a mid-packet reset lets through: a strict prefix,
    non-empty whenever the chunk has at least 2 bytes."""
    if size < 2:
        return 0
    return min(size - 1, max(1, int(size * fraction)))
