"""mqchat client SDK: one device talking wire protocol v1 over MQTT.

Data flow::

    app ── send(conv, body) ──► Outbox ──► MQTT publish u/{user}/{device}/out (QoS 1)
                                  ▲   └── re-published with the same id after reconnect and
                                  │       every resend_after s while unacked (the server dedups)
                                  │
                          ack clears the entry; send_and_wait() / wait_acked() return it
                                  │
    MQTT in (QoS 1) ── u/{user}/{device}/in : ack, error ──┐
                    └─ u/{user}/in          : msg, receipt, typing, conv
                                                           ▼
                                  parse_event ─► dedup msg on (conv, seq) ─► events() iterator

``clients.aio.ChatClient`` is the asyncio client (aiomqtt); ``clients.blocking.BlockingChatClient``
the same for scripts (paho-mqtt, no event loop); ``clients.cli`` the ``mqchat chat|send|listen``
commands. The SDK imports only ``mqchat.protocol``, ``mqchat.ids`` and ``mqchat.errors`` from the
server, so it ships on its own.
"""

from clients.aio import ChatClient, ClientStatistics, Clock, backoff_delay
from clients.blocking import BlockingChatClient
from clients.errors import AuthFailed, ClientClosed, ClientError, ConnectionFailed, SendFailed
from clients.events import Ack, ErrorReply, Event, Message, OtherEvent, parse_event
from clients.outbox import MemoryOutbox, Outbox, PendingSend

__all__ = [
    "Ack",
    "AuthFailed",
    "BlockingChatClient",
    "ChatClient",
    "ClientClosed",
    "ClientError",
    "ClientStatistics",
    "Clock",
    "ConnectionFailed",
    "ErrorReply",
    "Event",
    "MemoryOutbox",
    "Message",
    "OtherEvent",
    "Outbox",
    "PendingSend",
    "SendFailed",
    "backoff_delay",
    "parse_event",
]
