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
                                                           ▲   (with http_url: OrderingBuffer,
    HTTP (http_url) ── GET /v1/conversations?since=cursor ─┤    seq order per conversation)
                    └─ GET …/{conv}/messages?after=last ───┘   after every connect and per gap

    events() ─► the app ─► recv watermark (auto_recv) ─► MQTT;  mark_read() ─► read watermark
    state_path (SQLite): SqliteOutbox + the sync cursor + the last seq the app took per conversation
                         + the URLs of unfinished uploads (SqliteUploads)

    send_file(conv, path) ─► media.upload: POST /v1/media, PATCH …/uploads/{id} from the server's
                             offset (tus 1.0; HEAD and resume after a cut) ─► send(kind="media")
    media.download(id, dest) ─► GET /v1/media/{id}, Range from what dest.part holds ─► dest

``clients.aio.ChatClient`` is the asyncio client (aiomqtt); ``clients.blocking.BlockingChatClient``
the same for scripts (paho-mqtt, no event loop); ``clients.media.MediaClient`` uploads and
downloads attachments; ``clients.cli`` the ``mqchat chat|send|listen|download`` commands. The SDK
imports only leaves of ``mqchat`` (``protocol``, ``ids``, ``errors``, ``tasks``, ``mqtt_client``),
never server code, so it ships on its own (``make test`` checks it).
``clients.testing`` (load generator, lossy-network proxy) is tooling the SDK never imports.
"""

from clients.aio import ChatClient, ClientStatistics, Clock, backoff_delay
from clients.blocking import BlockingChatClient
from clients.errors import (
    AuthFailed,
    ClientClosed,
    ClientError,
    ConnectionFailed,
    HistoryFailed,
    MediaFailed,
    SendFailed,
)
from clients.events import Ack, Attachment, ErrorReply, Event, Message, OtherEvent, parse_envelope, parse_event
from clients.history import UserPresence
from clients.media import MediaClient, MediaInfo, MediaStatistics, UploadedMedia
from clients.ordering import OrderingBuffer
from clients.outbox import MemoryOutbox, Outbox, PendingSend, SqliteOutbox
from clients.state import ClientState, MemoryState, MemoryUploads, SqliteState, SqliteUploads, UploadKey, UploadLedger

__all__ = [
    "Ack",
    "Attachment",
    "AuthFailed",
    "BlockingChatClient",
    "ChatClient",
    "ClientClosed",
    "ClientError",
    "ClientState",
    "ClientStatistics",
    "Clock",
    "ConnectionFailed",
    "ErrorReply",
    "Event",
    "HistoryFailed",
    "MediaClient",
    "MediaFailed",
    "MediaInfo",
    "MediaStatistics",
    "MemoryOutbox",
    "MemoryState",
    "MemoryUploads",
    "Message",
    "OrderingBuffer",
    "OtherEvent",
    "Outbox",
    "PendingSend",
    "SendFailed",
    "SqliteOutbox",
    "SqliteState",
    "SqliteUploads",
    "UploadKey",
    "UploadLedger",
    "UploadedMedia",
    "UserPresence",
    "backoff_delay",
    "parse_envelope",
    "parse_event",
]
