"""A blocking client for scripts and tests, on paho-mqtt's network thread.

::

    send() ── publish u/{user}/{device}/out (QoS 1) ──► wait on a condition for the ack,
              re-publishing with the same id every resend_after s, until timeout
    paho thread: on_message ─► parse_event ─► ack/error: settle waiters
                                           └► dedup msg on (conv, seq) ─► queue ─► receive()

paho reconnects by itself (1 s doubling to 30 s) and ``on_connect`` re-subscribes. A CONNACK
refused for credentials stops the client: ``connect()``, ``send()`` and ``receive()`` raise
AuthFailed.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from types import TracebackType
from typing import Any, Literal, Self

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from clients._mqtt import is_auth_refusal_code
from clients.errors import AuthFailed, ClientClosed, ConnectionFailed, SendFailed
from clients.events import Ack, ErrorReply, Event, Message, SeenMessages, parse_event
from clients.outbox import PendingSend
from mqchat.ids import is_valid_id, parse_conv
from mqchat.protocol import device_in_topic, encode, out_topic, user_in_topic

logger = logging.getLogger(__name__)

_REMEMBERED_RESULTS = 4096


class BlockingChatClient:
    """One device, blocking calls. ``with BlockingChatClient(...) as c:`` connects and closes."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        device: str,
        token: str,
        keepalive: int = 30,
        resend_after: float = 5.0,
        connect_timeout: float = 10.0,
        max_buffered_events: int = 10_000,
    ) -> None:
        if not (is_valid_id(user) and is_valid_id(device)):
            raise ValueError("user and device ids must be 1-64 characters of [A-Za-z0-9_.@-]")
        self._host = host
        self._port = port
        self._user = user
        self._device = device
        self._keepalive = keepalive
        self._resend_after = resend_after
        self._connect_timeout = connect_timeout
        self._out_topic = out_topic(user, device)

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # results or state changed
        self._events: queue.Queue[Event | None] = queue.Queue(maxsize=max_buffered_events)
        self._seen = SeenMessages()
        self._results: OrderedDict[str, Ack | ErrorReply] = OrderedDict()
        self._connack_seen = False
        self._subscribe_mid: int | None = None
        self._subscribed = False
        self._fatal: BaseException | None = None
        self._closed = False
        self._started = False

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=device,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.username_pw_set(user, token)
        client.reconnect_delay_set(min_delay=1, max_delay=30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    # --- lifecycle ----------------------------------------------------------------------------

    def connect(self) -> None:
        """Connect, subscribe both in-topics and wait for the SUBACK; AuthFailed if refused."""
        if self._started:
            raise RuntimeError("connect() may be called once")
        self._started = True
        try:
            self._client.connect(self._host, self._port, self._keepalive)
        except OSError as exc:
            self._closed = True
            raise ConnectionFailed(f"cannot connect to {self._host}:{self._port}: {exc}") from None
        self._client.loop_start()
        deadline = time.monotonic() + self._connect_timeout
        with self._changed:
            while not self._subscribed and self._fatal is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            fatal, subscribed = self._fatal, self._subscribed
        if fatal is not None or not subscribed:
            self.close()
            if fatal is not None:
                raise fatal
            raise ConnectionFailed(f"no CONNACK/SUBACK from {self._host}:{self._port} in time")
        logger.info("connected to %s:%d as %s", self._host, self._port, self._device)

    def close(self) -> None:
        """Disconnect and stop the network thread. Idempotent."""
        with self._changed:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
        # paho closes its socket pair only in __del__, which in a collected cycle may run after the
        # sockets' own finalizers (ResourceWarning); reinitialise() is its public way to close them.
        self._client.reinitialise()
        with contextlib.suppress(queue.Full):
            self._events.put_nowait(None)

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._closed or not self._started:
            raise ClientClosed("the client is not connected; call connect() first")

    # --- paho callbacks (network thread: never raise) -----------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        failed = bool(getattr(reason_code, "is_failure", False))
        if not failed:
            _, mid = client.subscribe([(user_in_topic(self._user), 1), (device_in_topic(self._user, self._device), 1)])
            with self._changed:
                self._connack_seen = True
                self._subscribe_mid = mid
            return
        with self._changed:
            if is_auth_refusal_code(reason_code):
                logger.info("the broker refused the credentials of %s/%s", self._user, self._device)
                self._fatal = AuthFailed(f"the broker refused the credentials of user {self._user!r}")
            elif not self._connack_seen:
                self._fatal = ConnectionFailed(f"the broker refused the connection: {reason_code}")
            else:
                logger.warning("reconnect refused: %s; paho retries", reason_code)
                return
            self._changed.notify_all()
        client.disconnect()
        with contextlib.suppress(queue.Full):
            self._events.put_nowait(None)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        with self._changed:
            if mid == self._subscribe_mid:
                self._subscribed = True
                self._changed.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        event = parse_event(bytes(message.payload))
        if event is None:
            logger.debug("dropped an unreadable envelope of %d bytes", len(message.payload))
            return
        with self._changed:
            if isinstance(event, Message) and not self._seen.first_time(event.conv, event.seq):
                return
            if isinstance(event, Ack):
                if isinstance(self._results.get(event.id), Ack):
                    return
                self._settle(event.id, event)
            elif isinstance(event, ErrorReply) and event.id is not None:
                self._settle(event.id, event)
        try:
            self._events.put_nowait(event)
        except queue.Full:
            logger.warning("receive() is not called: an event was dropped")

    def _settle(self, id: str, result: Ack | ErrorReply) -> None:
        self._results[id] = result
        self._results.move_to_end(id)
        while len(self._results) > _REMEMBERED_RESULTS:
            self._results.popitem(last=False)
        self._changed.notify_all()

    # --- API ----------------------------------------------------------------------------------

    def send(
        self,
        conv: str,
        body: str,
        *,
        id: str | None = None,
        kind: Literal["text", "media"] = "text",
        media: tuple[str, ...] = (),
        timeout: float = 10.0,
    ) -> Ack:
        """Send and wait for the ack, re-publishing every resend_after s with the same id.

        Raises SendFailed on an error reply and TimeoutError when no ack comes in time.
        """
        self._check_open()
        msg_id = id if id is not None else uuid.uuid4().hex
        if not is_valid_id(msg_id):
            raise ValueError("id must be 1-64 characters of [A-Za-z0-9_.@-]")
        if parse_conv(conv) is None:
            raise ValueError("conv must be a conversation id: dm:{a}:{b} (sorted) or g:{ulid}")
        payload = encode(PendingSend(id=msg_id, conv=conv, body=body, kind=kind, media=media).envelope())
        with self._changed:
            self._results.pop(msg_id, None)
        deadline = time.monotonic() + timeout
        while True:
            self._client.publish(self._out_topic, payload, qos=1)  # queued by paho while offline
            resend_at = min(deadline, time.monotonic() + self._resend_after)
            with self._changed:
                while True:
                    result = self._results.get(msg_id)
                    if isinstance(result, Ack):
                        return result
                    if isinstance(result, ErrorReply):
                        raise SendFailed(result)
                    if self._fatal is not None:
                        raise self._fatal
                    if self._closed:
                        raise ClientClosed("the client was closed while sending")
                    left = resend_at - time.monotonic()
                    if left <= 0:
                        break
                    self._changed.wait(left)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no ack for send {msg_id} within {timeout} s")
            logger.debug("re-publishing unacked send %s", msg_id)

    def receive(self, timeout: float | None = None) -> Event | None:
        """The next event (Message deduplicated on (conv, seq), Ack, ErrorReply, OtherEvent), or
        None when none comes within ``timeout`` seconds."""
        self._check_open()
        try:
            event = self._events.get(timeout=timeout)
        except queue.Empty:
            return None
        if event is None:  # closed or failed: leave the marker for other readers
            with contextlib.suppress(queue.Full):
                self._events.put_nowait(None)
            self._check_open()
            raise ClientClosed("the client is closed")
        return event
