"""A lossy-network TCP proxy: a simulated mobile network between MQTT clients and the broker.

::

    client ──▶ listener (loopback) ──accept #n──▶ link n ──connect──▶ target (the broker)

    link n:  client ─recv─▶ [due = now + latency ± jitter] ─▶ queue ─▶ wait(due, stall, pause,
                                                                       bandwidth) ─send─▶ target
             target ─recv─▶ ...the same, the other way...                          ─send─▶ client
             faults: fault_plan(profile, seed, n) ─▶ cut (RST both) | stall | arm mid-packet reset
                     | expire after max_connection_s (RST both)

    profiles   NetemProfile, the presets, fault_plan: how bad the network is, as pure data
    link       Link: one proxied connection (its pumps and its fault timer); Network: what the
               links of one proxy share (profile, seed, up/paused, counters)
    proxy      LossyProxy: the listener and the accept loop, one Link per accepted connection

Each direction keeps its byte order: a chunk is never sent before the one read ahead of it, so
jitter stretches gaps but never reorders. A connection's faults come from ``fault_plan``, a pure
generator seeded by the proxy's seed and the connection's ordinal (accept order), so a run with
the same seed and the same connection order makes the same fault decisions; the same goes for
the per-direction delay draws. ``LossyProxy`` is a :class:`mqchat.service.Service` (an async
context manager owning a ``TaskGroup``): the accept loop is its worker and each connection a job
(which owns its own pumps and fault timer); ``aclose()`` cancels and awaits all of them. An idle
connection only waits on its sockets and on its next fault time. Abrupt cuts close both sockets
with ``SO_LINGER`` 0, so both peers see a reset; a reset from a peer is counted and passed on to
the other side, never raised.

Only the standard library and mqchat's service base are used, so tests and ``mqchat bench`` can
import it anywhere.
"""

from clients.testing.netem.profiles import (
    CHAOS,
    FLAKY_3G,
    GOOD_4G,
    PERFECT,
    PRESETS,
    Fault,
    FaultKind,
    NetemProfile,
    fault_plan,
    prefix_length,
)
from clients.testing.netem.proxy import LossyProxy, ProxyStatistics

__all__ = [
    "CHAOS",
    "FLAKY_3G",
    "GOOD_4G",
    "PERFECT",
    "PRESETS",
    "Fault",
    "FaultKind",
    "LossyProxy",
    "NetemProfile",
    "ProxyStatistics",
    "fault_plan",
    "prefix_length",
]
