"""Small helpers shared by the asyncio and blocking clients."""

from __future__ import annotations

# MQTT 3.1.1 CONNACK 4 (bad user name or password) and 5 (not authorised), and the MQTT 5 reason
# codes paho-mqtt 2 maps them to (134, 135).
_AUTH_REFUSALS = frozenset({4, 5, 134, 135})


def is_auth_refusal_code(rc: object) -> bool:
    """True when a CONNACK code (int, paho ReasonCode or ConnackCode) refuses credentials."""
    value = getattr(rc, "value", rc)
    return isinstance(value, int) and value in _AUTH_REFUSALS
