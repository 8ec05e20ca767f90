"""Topics under ``$mqchat/`` that carry messages between the server's own processes.

::

    broker ──$mqchat/devices/{user} (retained)──▶ bridge      who is connected, per user
    bridge ──$mqchat/membership─────────────────▶ broker      a membership changed: drop cached answers
    bridge ──$mqchat/logout─────────────────────▶ every broker  a device (or a user) logged out: close it

Devices may neither publish nor subscribe to them (the broker's ACL refuses), and the client SDK
never imports this module: it ships only with the server.
"""

from __future__ import annotations

DEVICES_TOPIC_PREFIX = "$mqchat/devices/"
DEVICES_TOPIC_FILTER = "$mqchat/devices/+"
"""Broker → bridge only, retained per user: ``{"devices": [...]}`` connected to that broker (for a
bridge in another process without a shared registry: push skips connected devices)."""

MEMBERSHIP_TOPIC = "$mqchat/membership"
"""Bridge → broker only: a group's or channel's membership changed, as
``{"conv", "kind", "added": [users], "removed": [users]}``. The broker drops its cached
membership answers and a removed member's channel subscription; it routes this to no one."""

LOGOUT_TOPIC = "$mqchat/logout"
"""Bridge → every node's broker (relayed across nodes): ``{"user", "device": DEVICE | null,
"before": MS, "erase": BOOL}``. Tokens of that device (null: every device of the user) issued
before ``before`` are refused from now on, and its connections are closed at once; ``erase`` (an
account deleted) also drops the user's retained presence. Routed to no one."""
