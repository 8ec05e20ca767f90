"""Prometheus metrics of the bridge."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

MESSAGES_ACCEPTED = Counter(
    "mqchat_messages_accepted_total", "Messages stored and acknowledged (first time, not duplicates)"
)
MESSAGES_DUPLICATE = Counter(
    "mqchat_messages_duplicate_total", "Sends of an already stored (sender, client id): re-acknowledged"
)
REQUESTS_REJECTED = Counter("mqchat_requests_rejected_total", "Requests answered with an error envelope", ["code"])
PIPELINE_LATENCY = Histogram(
    "mqchat_pipeline_latency_seconds",
    "Time from a request reaching the bridge to its replies being ready (includes the durable commit)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CHANNEL_PUBLISHES = Counter(
    "mqchat_channel_publishes_total", "Channel messages published (once each, to c/{conv}/in: fan-out on read)"
)
