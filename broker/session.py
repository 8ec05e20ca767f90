"""A session's lean state: three words instead of a state machine, lean queues instead of asyncio's.

- ``SessionStates`` is what amqtt uses of a session's ``transitions.Machine`` (new → connected ⇄
  disconnected): building that machine was half the cost of a connect and a large part of an
  idle connection's memory.
- ``MqchatSession`` keeps its queues in ``LeanQueue``; ``InboundQueue`` bounds the publishes a
  connection has read and the broker has not routed yet (its reader waits while it is full).
"""

from __future__ import annotations

from amqtt.session import Session
from transitions import MachineError

from broker.queues import LeanQueue


class InboundQueue(LeanQueue):
    """A session's bounded queue of received publishes (its reader waits while it is full)."""


class SessionStates:
    """What amqtt uses of a session's state machine: new → connected ⇄ disconnected."""

    __slots__ = ("_session", "state")

    def __init__(self, session: Session) -> None:
        self._session = session
        self.state = "new"

    def connect(self) -> None:
        if self.state == "connected":
            raise MachineError("session is already connected")
        self.state = "connected"
        self._session._on_enter_connected()

    def disconnect(self) -> None:
        self.state = "disconnected"
        self._session._on_enter_disconnected()

    def is_connected(self) -> bool:
        return self.state == "connected"


class MqchatSession(Session):
    def __init__(self) -> None:
        super().__init__()
        self.retained_messages = LeanQueue()
        self.delivered_message_queue = LeanQueue()

    def _init_states(self) -> None:
        self.transitions = SessionStates(self)
