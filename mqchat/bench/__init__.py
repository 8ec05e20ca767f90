"""``mqchat bench``: our broker and pipeline beside stock amqtt and Mosquitto, in one run.

::

    mqchat bench SCENARIO ──▶ for each system: start its broker in a process pinned to CPU 0
                               (ours: broker.server; stock: amqtt.broker.Broker; Mosquitto: /usr/sbin/mosquitto)
                          ──▶ load-generator processes pinned to CPU 1 (clients.testing.loadgen, raw MQTT)
                          ──▶ table on the terminal, bench/results/SCENARIO.json, bench/results/SCENARIO.png

The harness is shared by every scenario: ``harness`` (options, CPU pinning, forked children,
progress lines), ``processes`` (brokers, load generators, the lossy proxy, ``mqchat serve``),
``report`` (environment, tables, the JSON file, plot helpers) and ``command`` (the flags).
One module per scenario, each with ``run``, ``table`` and ``plot``: ``relay`` (raw publish →
subscriber throughput and open-loop latency), ``chat`` (the full pipeline through ``mqchat
serve``, per adapter), ``fanout`` (one publish → 500 subscribers), ``connections`` (a ramp of
idle authenticated devices: connect rate, memory, latency under load), ``acl`` (the cost of the
presence/channel ACL's membership answers, cached and not), ``abuse`` (one device floods while
another user chats: that user's send→ack with and without the flood, with the rate limits on
and lifted).

Comparisons are ratios measured side by side in the same run: the machine is shared and noisy,
so absolute numbers from different runs do not compare. See ``bench/README.md``. This package is
tooling: no product module imports it (``mqchat.cli`` loads it only for ``mqchat bench``).
"""

from __future__ import annotations

from mqchat.bench.command import main

__all__ = ["main"]
