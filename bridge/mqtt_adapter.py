"""The MQTT-client adapter: feeds the pipeline from any MQTT 3.1.1 broker.

::

    broker ──u/+/+/out (QoS1; a worker: $share/…, clean session)──▶ reader ──job per request──▶ Pipeline
       ▲                                                                            │
       └────────────── publish QoS1 (ack / error / msg) ◀───────────────────────────┘
       └── MqttPublisher (the current connection): events made outside a request (receipts)

The ``MqttPublisher`` exists before the pipeline (the receipt coalescer publishes through it);
the adapter hands it each connection it makes and takes it back when the connection ends.
Requests are dispatched in arrival order, each in its own task (at most ``max_inflight``), so
many share one group commit. paho-mqtt acknowledges a request to the broker as it arrives, not
once it is answered: requests the adapter holds when its process dies are lost to it, and the
devices re-send them (they re-send anything not acked). The connection is re-established with
capped exponential backoff; beside mqchat's own broker the session is persistent, so the broker
queues requests meanwhile.

Several bridge workers (``mqchat bridge --workers N``, on any number of machines) share one
broker's requests through a shared subscription, ``$share/mqchat-bridge/u/+/+/out`` (MQTT 5, and
accepted by Mosquitto 2 and EMQX from 3.1.1 clients too): the broker hands each request to one of
them. Each worker's client id names its machine's node id and its number. Its session is clean:
a worker that is gone must not keep a share of the requests waiting for it, and the others take
the devices' re-sends. Sequencing and dedup live in the shared store, so the order in which
workers take requests never decides a conversation's order.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import aiomqtt

from bridge.pipeline import Outgoing, Pipeline
from mqchat.clock import SYSTEM_CLOCK, Clock
from mqchat.internal_topics import DEVICES_TOPIC_FILTER, DEVICES_TOPIC_PREFIX
from mqchat.mqtt_client import MqttClient
from mqchat.protocol import OUT_TOPIC_FILTER, PRESENCE_TOPIC_FILTER, parse_out_topic
from mqchat.service import Service
from mqchat.tokens import SERVICE_CLIENT_PREFIX, SERVICE_USERNAME
from mqchat.topic_table import SHARED_REQUESTS

logger = logging.getLogger(__name__)


class MqttPublisher:
    """Publishes on the adapter's current connection; while there is none, a publish is dropped
    (devices read the same state from the sync endpoint)."""

    def __init__(self) -> None:
        self._client: aiomqtt.Client | None = None

    def attach(self, client: aiomqtt.Client | None) -> None:
        """The connection to publish on from now on (None: disconnected)."""
        self._client = client

    async def publish(self, outgoing: list[Outgoing]) -> None:
        if self._client is not None:
            await publish_all(self._client, outgoing)


class MqttClientAdapter(Service):
    """Connects to a broker as the bridge service and runs requests through the pipeline; a
    service (async context manager) with one worker, the connection loop. Each request is a task
    of the connection it came from: when the connection is lost, the requests in flight finish
    (their publishes fail quietly); at ``aclose()`` they are cancelled with the loop."""

    name = "bridge MQTT adapter"

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        publisher: MqttPublisher,
        host: str,
        port: int,
        service_password: str,
        instance: int = 0,
        node: str = "",
        max_inflight: int = 2048,
        clock: Clock = SYSTEM_CLOCK,
        backoff_cap_s: float = 5.0,
        on_presence: Callable[[str, bytes], None] | None = None,
        shared: bool = False,
    ) -> None:
        super().__init__()
        self._pipeline = pipeline
        self._publisher = publisher
        self._host = host
        self._port = port
        self._password = service_password
        self._client_id = (
            f"{SERVICE_CLIENT_PREFIX}-{node}-{instance}" if shared else f"{SERVICE_CLIENT_PREFIX}-{instance}"
        )
        self._clean_session = shared
        self._slots = asyncio.Semaphore(max_inflight)
        self._clock = clock
        self._backoff_cap_s = backoff_cap_s
        self._connected = asyncio.Event()
        self._on_presence = on_presence  # set: also follow every user's retained p/{user} and devices
        self._requests = SHARED_REQUESTS if shared else OUT_TOPIC_FILTER

    async def _start(self) -> None:
        self.start_worker(self._run(), name="bridge-mqtt-adapter")

    def is_connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until the adapter is connected and subscribed."""
        await self._connected.wait()

    async def _run(self) -> None:
        attempt = 0
        ever_connected = False
        while True:
            try:
                await self._serve_connection()
                attempt = 0
            except aiomqtt.MqttError as exc:
                ever_connected = ever_connected or self._connected.is_set()
                self._connected.clear()
                attempt += 1
                delay = random.uniform(0, min(self._backoff_cap_s, 0.1 * 2**attempt))
                logger.log(
                    logging.WARNING if ever_connected else logging.INFO,
                    "bridge cannot reach the broker (%s); retrying in %.2fs",
                    exc,
                    delay,
                )
                await self._clock.sleep(delay)

    async def _serve_connection(self) -> None:
        lost: aiomqtt.MqttError | None = None
        async with MqttClient(
            self._host,
            self._port,
            username=SERVICE_USERNAME,
            password=self._password,
            identifier=self._client_id,
            clean_session=self._clean_session,
            keepalive=30,
            max_inflight_messages=1000,
        ) as client:
            await client.subscribe(self._requests, qos=1)
            if self._on_presence is not None:
                await client.subscribe([(PRESENCE_TOPIC_FILTER, 1), (DEVICES_TOPIC_FILTER, 1)])
            logger.info("bridge connected to the broker at %s:%d", self._host, self._port)
            self._publisher.attach(client)
            self._connected.set()
            try:
                async with asyncio.TaskGroup() as requests:
                    try:
                        async for message in client.messages:
                            await self._route(client, requests, message)
                    except aiomqtt.MqttError as exc:
                        lost = exc  # let in-flight requests finish (their publishes fail quietly)
            finally:
                self._publisher.attach(None)
        if lost is not None:
            raise lost

    async def _route(self, client: aiomqtt.Client, requests: asyncio.TaskGroup, message: aiomqtt.Message) -> None:
        """One message of the subscription: a presence update, or a device's request, processed
        in a task of this connection (waits for a free slot first: the broker queues meanwhile)."""
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes | bytearray):
            return
        if self._on_presence is not None and topic.startswith(("p/", DEVICES_TOPIC_PREFIX)):
            self._on_presence(topic, bytes(payload))
            return
        origin = parse_out_topic(topic)
        if origin is None:
            return
        await self._slots.acquire()
        requests.create_task(self._process(client, origin[0], origin[1], bytes(payload)), name="bridge-request")

    async def publish(self, outgoing: list[Outgoing]) -> None:
        """Publish events made outside a request (coalesced receipts); dropped while disconnected:
        devices read the same state from the sync endpoint."""
        await self._publisher.publish(outgoing)

    async def _process(self, client: aiomqtt.Client, user: str, device: str, payload: bytes) -> None:
        try:
            outgoing = await self._pipeline.handle(user, device, payload)
            await publish_all(client, outgoing)
        finally:
            self._slots.release()


async def publish_all(client: aiomqtt.Client, outgoing: list[Outgoing]) -> None:
    """Publish each result; a lost connection drops them (devices re-send, then re-sync)."""
    for out in outgoing:
        try:
            await client.publish(out.topic, out.payload, qos=out.qos)
        except aiomqtt.MqttError as exc:
            logger.warning("could not publish a reply: %s", exc)
            return
