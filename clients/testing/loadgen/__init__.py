"""A light MQTT 3.1.1 client and the load patterns of ``mqchat bench``.

::

    client       MqttClient, connect: raw-socket MQTT 3.1.1 on mqchat.mqtt_codec (no third-party MQTT code)
    measure      the payload stamp, percentiles, open-loop pacing, progress lines, clean-up
    relay        relay_run        publishers ──▶ broker ──▶ one subscriber   throughput / open-loop latency
    fanout       fanout_run       one publisher ──▶ broker ──▶ many subscribers of one topic
                 group_fanout_run one send ──▶ mqchat ──▶ every member of a group
    connections  ramp_connections many idle devices (connect + auth + subscribe), held open until released
    storm        reconnect_storm  a node's devices killed off it, back through the balancer, caught up
    chat         chat_run         senders ──send──▶ mqchat ──ack──▶ senders, ──msg──▶ recipients
                 abuse_run        one user's send→ack while one device floods

A client costs one small object, one transport and one timer, so one process holds ~10,000
idle connections. Latency is measured with ``time.monotonic_ns()``, which on Linux is one clock
for every process on the machine: payloads carry the *intended* send time (open-loop load), so
a slow sender cannot hide queueing delay. Every loop here is bounded in count and in time.

This package imports only mqchat's leaves (the wire protocol, the MQTT codec), never server code.
"""

from clients.testing.loadgen.chat import abuse_run, chat_run
from clients.testing.loadgen.client import ConnectRefused, Creds, LoadgenError, MqttClient, connect
from clients.testing.loadgen.connections import ramp_connections
from clients.testing.loadgen.fanout import fanout_run, group_fanout_run
from clients.testing.loadgen.measure import percentiles, stderr_progress
from clients.testing.loadgen.relay import relay_run
from clients.testing.loadgen.storm import reconnect_storm

__all__ = [
    "ConnectRefused",
    "Creds",
    "LoadgenError",
    "MqttClient",
    "abuse_run",
    "chat_run",
    "connect",
    "fanout_run",
    "group_fanout_run",
    "percentiles",
    "ramp_connections",
    "reconnect_storm",
    "relay_run",
    "stderr_progress",
]
