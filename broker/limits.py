"""The broker's bounds, one frozen dataclass (``MqchatBroker(limits=…)``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BrokerLimits:
    max_packet_bytes: int = 256 * 1024
    max_queued_per_session: int = 1000  # messages waiting for one device session (in flight or offline)
    max_queued_service: int = 200_000  # the same for the bridge's session, which carries everyone's requests
    max_connections: int = 0  # 0: unlimited
    listen_backlog: int = 4096  # the TCP listener's accept queue (the kernel caps it at somaxconn)
    connects_per_ip_per_s: float = 0.0  # 0: unlimited; a burst of 5 × the rate is allowed
    connect_timeout_s: float = 10.0  # a new connection must send CONNECT within this
    max_inbound_per_session: int = 256  # received publishes waiting to be routed (then TCP pushes back)
    # A device that stops reading: its socket's unsent bytes are bounded. Past the first bound QoS 0
    # messages (typing, presence) are dropped: they are momentary, and losing one costs nothing.
    # Past the second the connection is closed: QoS 1 messages cannot be dropped without a gap,
    # and a device that reconnects catches up over HTTP, which a stalled one never would.
    max_buffered_qos0: int = 256 * 1024
    max_buffered_bytes: int = 4 * 1024 * 1024
    keepalive_factor: float = 1.5
    max_keepalive_s: int = 1200  # clients asking for none or more get this
