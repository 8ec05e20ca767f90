"""Per-conversation ordering: messages leave strictly in ``seq`` order, each (conv, seq) once.

::

    offer(msg) ──► seq <= last or already held ──► dropped (duplicate)
               ├─► seq == last + 1 ──► released, with every held successor that now follows on
               └─► seq >  last + 1 ──► held; the gap (last, lowest held) opens with a deadline
                                       of now + grace
    gaps_due(now) ──► conversations whose gap outlived its grace: the client fetches
                      ``messages?after=last`` over HTTP and offers the result

A gap that a fetch could not close is re-armed (:meth:`rearm`); one that can never be closed is
given up with :meth:`skip_gap`, which releases what is held. An ``after=`` page (or a sync item's
included messages with nothing older) is authoritative: when it starts above ``last + 1``, the
range before it is not readable by this user (a member added to a group reads from their join
point on), and :meth:`skip_to` moves past it. Time is passed in, so the buffer is testable without
sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from clients.events import Message


@dataclass(frozen=True, slots=True)
class Offered:
    """What one :meth:`OrderingBuffer.offer` did."""

    ready: list[Message] = field(default_factory=list)  # to deliver now, in seq order
    duplicate: bool = False
    gap_opened: bool = False


class OrderingBuffer:
    """Holds messages that arrive ahead of a gap until the gap is filled."""

    def __init__(self, *, grace: float, start: dict[str, int] | None = None) -> None:
        self._grace = grace
        self._last: dict[str, int] = dict(start or {})
        self._held: dict[str, dict[int, Message]] = {}
        self._gap_deadline: dict[str, float] = {}

    def last(self, conv: str) -> int:
        """The last seq released for ``conv`` (0 when none)."""
        return self._last.get(conv, 0)

    def held(self) -> int:
        """How many messages wait behind gaps."""
        return sum(len(h) for h in self._held.values())

    def has_gap(self, conv: str) -> bool:
        return bool(self._held.get(conv))

    def offer(self, msg: Message, *, now: float) -> Offered:
        conv, seq = msg.conv, msg.seq
        last = self.last(conv)
        held = self._held.get(conv)
        if seq <= last or (held is not None and seq in held):
            return Offered(duplicate=True)
        if seq > last + 1:
            had_gap = bool(held)
            self._held.setdefault(conv, {})[seq] = msg
            if not had_gap:
                self._gap_deadline[conv] = now + self._grace
            return Offered(gap_opened=not had_gap)
        ready = [msg]
        self._last[conv] = seq
        ready.extend(self._release_following(conv, now=now))
        return Offered(ready=ready)

    def gaps_due(self, now: float) -> list[str]:
        """Conversations whose gap has been open for the grace period."""
        return [conv for conv, deadline in self._gap_deadline.items() if deadline <= now]

    def next_deadline(self) -> float | None:
        return min(self._gap_deadline.values(), default=None)

    def rearm(self, conv: str, *, now: float) -> None:
        """A fetch did not close the gap (the message is still in flight): wait another grace."""
        if self.has_gap(conv):
            self._gap_deadline[conv] = now + self._grace

    def skip_gap(self, conv: str, *, now: float) -> list[Message]:
        """Give up on the missing range before the lowest held message; release what follows on."""
        held = self._held.get(conv)
        if not held:
            return []
        first = min(held)
        self._last[conv] = first - 1
        return self._release_following(conv, now=now)

    def skip_to(self, conv: str, seq: int, *, now: float) -> list[Message]:
        """The server has nothing readable before ``seq`` beyond what was released: release what is
        held below ``seq`` (in order, past its holes), continue just before ``seq``, and release
        what follows on. Nothing happens when ``seq`` already follows on."""
        if seq <= self.last(conv) + 1:
            return []
        held = self._held.get(conv, {})
        ready = [held.pop(s) for s in sorted(s for s in held if s < seq)]
        self._last[conv] = seq - 1
        ready.extend(self._release_following(conv, now=now))
        if ready and self.has_gap(conv):  # a later gap is still open: its grace starts now
            self._gap_deadline[conv] = now + self._grace
        return ready

    def _release_following(self, conv: str, *, now: float) -> list[Message]:
        ready: list[Message] = []
        held = self._held.get(conv)
        if held:
            last = self._last.get(conv, 0)
            while (nxt := held.pop(last + 1, None)) is not None:
                ready.append(nxt)
                last += 1
            self._last[conv] = last
        if held:
            if ready:  # the old gap closed and a later one is still open: its grace starts now
                self._gap_deadline[conv] = now + self._grace
        else:
            self._held.pop(conv, None)
            self._gap_deadline.pop(conv, None)
        return ready
