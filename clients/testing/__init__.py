"""Tooling for testing and benchmarking mqchat, kept apart from the SDK (which never imports it).

::

    loadgen   raw MQTT 3.1.1 load generator: many devices per process, no SDK overhead
              (mqchat bench's scenarios and the tests that need hundreds of connections)
    netem     LossyProxy: a TCP proxy that adds delay, jitter, loss-as-stalls and cuts between
              phones and a server (the chaos tests, mqchat bench --netem)

Import-linter checks the direction: the SDK (``clients``) and every product package may not
import ``clients.testing``; the benchmarks and the tests may.
"""
