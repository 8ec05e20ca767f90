"""What the pipeline asks an adapter to publish."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One publish the adapter must make."""

    topic: str
    payload: bytes
    qos: int = 1
