"""mqchat: a self-hostable messaging backend for mobile chat apps.

What every part shares lives here, as leaf modules anyone may import::

    ids.py             user/device/client ids, conversation ids, ULID message ids
    protocol.py        topics and JSON envelopes of wire protocol v1
    internal_topics.py the server's own ``$mqchat/`` topics (never used by the SDK)
    mqtt_codec.py      sans-IO MQTT 3.1.1 packets: the broker's reader, the load generator, tests
    errors.py          the exception tree and the stable error codes clients see
    tokens.py          JWT access tokens and the broker's service credential
    config.py          frozen config sections, loaded once from file, env and flags
    service.py         the lifecycle of a long-lived service (a TaskGroup, named tasks, aclose)
    tasks.py           cancel_and_wait: stopping tasks so that shutdown always finishes
    clock.py           the injected clock
    mqtt_client.py     aiomqtt's client, waiting without losing a cancellation

and the one place that wires the parts together (never imported by the parts)::

    app.py        one process: broker, bridge or both (node), with the HTTP API
    child.py      one such process: logging, start-up checks, the watchdog, exit codes
    supervisor.py `mqchat serve`: runs those processes, restarts one that dies
    cli.py        the `mqchat` command

Tooling has its own package, ``mqchat.bench`` (``mqchat bench``), which no product module imports.

Importing `mqchat` itself imports nothing else, so the client SDK can ship alone.
"""

__version__ = "0.1.0"
