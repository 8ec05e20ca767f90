"""mqchat: a self-hostable messaging backend for mobile chat apps.

What every part shares lives here, as leaf modules anyone may import::

    ids.py       user/device/client ids, conversation ids, ULID message ids
    protocol.py  topics and JSON envelopes of wire protocol v1
    errors.py    the exception tree and the stable error codes clients see
    tokens.py    JWT access tokens and the broker's service credential
    config.py    frozen config sections, loaded once from file, env and flags

and the one place that wires the parts together (never imported by the parts)::

    app.py        one process: broker, bridge or both (node), with the HTTP API
    supervisor.py `mqchat serve`: runs those processes, restarts one that dies
    cli.py        the `mqchat` command

Importing `mqchat` itself imports nothing else, so the client SDK can ship alone.
"""

__version__ = "0.1.0"
