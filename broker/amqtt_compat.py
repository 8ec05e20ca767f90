"""The amqtt release the broker is written against, and a fix to its stream writer."""

from __future__ import annotations

import amqtt
from amqtt.adapters import StreamWriterAdapter

AMQTT_VERSION = "0.12.1"
"""The amqtt release whose internals ``MqchatBroker`` overrides."""


def check_amqtt_version(version: str = amqtt.__version__) -> None:
    if version != AMQTT_VERSION:
        raise RuntimeError(
            f"mqchat's broker overrides amqtt {AMQTT_VERSION} internals but amqtt {version} is installed; "
            f"install amqtt=={AMQTT_VERSION}"
        )


class ClosingStreamWriter(StreamWriterAdapter):
    """amqtt's stream writer drains before it closes; when the peer already hung up the drain
    raises and the socket is never closed (a file descriptor leaked per such disconnect). This
    one closes the socket whatever the drain does."""

    async def close(self) -> None:
        if self.is_closed:
            return
        try:
            await super().close()
        except (ConnectionError, OSError):
            self._writer.close()
