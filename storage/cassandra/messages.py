"""The message log on Cassandra: sequencing and dedup without a single writer.

::

    append(m) ─▶ the conversation's queue ─▶ its chain (one task per conversation with work):
      0. head       the conversation's last seq (cached, or read), before the dedup read
      1. dedup      client_ids[(sender, client_id)]: stored → the stored message (duplicate);
                    pending (written, seq unknown) → look for it after after_seq
      2. pending    client_ids ← (conv, mid, after_seq)            before the message exists
                    sender_convs ← (sender, conv)                  once per sender and conv per process
      3. sequence   one Paxos round per batch, on the bucket's partition:
                      BEGIN BATCH
                        UPDATE messages SET last_seq = h+n WHERE (conv, bucket) IF last_seq = h
                        INSERT messages (conv, bucket, h+1 …)  …  INSERT (…, h+n)
                      APPLY BATCH
                    not applied → the answer carries last_seq now: look for the batch's
                    sends among the messages that took the seqs (another process may have
                    stored one: the same send retried through another node), retry the rest
      4. after      client_ids.seq, the members' state rows and change index, the sender's
                    watermarks (one unlogged batch per message); the head hint

The seq and the message are written by the same conditional batch, so a seq is never taken
without its message: the log has no holes, whatever process dies when (DESIGN §3).

A send is stored once even when two processes append it at the same time (a phone whose
connection was cut mid-send retries through another node). Another process's copy lands either
at or below the head read in step 0 — then its dedup row was written before that read, and step
1 finds the copy — or above it, and then this process's round is not applied and the look in
step 3 finds it. Sends are matched by (sender, client_id), not by mid: two processes that read
no dedup row give one send two mids. A burst in
one conversation shares one round; conversations run side by side. Appends from one process to
one conversation keep their call order (one chain per conversation); across processes the
compare-and-set orders them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Histogram

from mqchat.errors import StorageClosed, StorageError
from mqchat.ids import new_mid
from storage.base import BUCKET_SIZE, MessageLog, NotMember, StoreRefusal
from storage.cassandra.core import CassandraPart, bucket_of
from storage.records import AppendResult, NewMessage, Page, StoredMessage, StoreStatistics

__all__ = ["STATEMENTS", "CassandraMessageLog"]

_COLUMNS = "seq, mid, sender, device, client_id, ts, kind, body, media"

STATEMENTS = {
    "msg_cas": "UPDATE {ks}.messages SET last_seq = ? WHERE conv = ? AND bucket = ? IF last_seq = ?",
    "msg_insert": (
        "INSERT INTO {ks}.messages (conv, bucket, seq, mid, sender, device, client_id, ts, kind, body, media) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    ),
    "msg_after": f"SELECT {_COLUMNS} FROM {{ks}}.messages WHERE conv = ? AND bucket = ? AND seq > ? "
    "ORDER BY seq ASC LIMIT ?",
    "msg_before": f"SELECT {_COLUMNS} FROM {{ks}}.messages WHERE conv = ? AND bucket = ? AND seq < ? "
    "ORDER BY seq DESC LIMIT ?",
    "msg_at": f"SELECT {_COLUMNS} FROM {{ks}}.messages WHERE conv = ? AND bucket = ? AND seq = ?",
    "dedup_in": "SELECT client_id, conv, mid, after_seq, seq FROM {ks}.client_ids WHERE sender = ? AND client_id IN ?",
    "dedup_pending": "INSERT INTO {ks}.client_ids (sender, client_id, conv, mid, after_seq) VALUES (?, ?, ?, ?, ?)",
    "dedup_done": "UPDATE {ks}.client_ids SET seq = ? WHERE sender = ? AND client_id = ?",
    "sender_conv_put": "INSERT INTO {ks}.sender_convs (sender, conv) VALUES (?, ?)",
}

SEQUENCE_ROUND = Histogram(
    "mqchat_cassandra_sequence_round_seconds",
    "One sequencing round: the conditional batch that takes seqs and writes their messages",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
SEQUENCE_BATCH = Histogram(
    "mqchat_cassandra_sequence_batch_messages",
    "Messages written by one applied sequencing round",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
SEQUENCE_CONFLICTS = Counter(
    "mqchat_cassandra_sequence_conflicts_total",
    "Sequencing rounds not applied because another writer took the seq first (retried at once)",
)

MAX_BATCH_MESSAGES = 64
"""Messages per sequencing round (and so per conditional batch)."""

MAX_BATCH_BYTES = 48 * 1024
"""Body bytes per conditional batch (Cassandra's batch_size_fail_threshold defaults to 50 KiB;
a larger single message goes alone, which the cluster's threshold must allow)."""

_AFTER_BATCH = 40
"""Statements per unlogged batch of the writes that follow a round."""

CHAINS = 256
"""Conversations sequenced at the same time by one process."""


def _message(conv: str, row: tuple[Any, ...]) -> StoredMessage:
    seq, mid, sender, device, client_id, ts, kind, body, media = row
    return StoredMessage(
        conv=conv,
        seq=int(seq),
        mid=str(mid),
        sender=str(sender),
        device=str(device),
        client_id=str(client_id),
        ts=int(ts),
        kind=str(kind),
        body=str(body),
        media=tuple(media) if media else (),
    )


def _settle(future: asyncio.Future[AppendResult], result: AppendResult) -> None:
    if not future.done():  # a caller that gave up (cancelled) is not answered
        future.set_result(result)


def _fail(future: asyncio.Future[AppendResult], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


@dataclass(slots=True)
class _Append:
    message: NewMessage
    future: asyncio.Future[AppendResult]
    mid: str = field(default_factory=new_mid)
    after_seq: int | None = None  # set when a pending dedup row exists (its lower bound)


class CassandraMessageLog(CassandraPart, MessageLog):
    _queues: dict[str, deque[_Append]]
    _chains: dict[str, asyncio.Task[None]]
    _chain_slots: asyncio.Semaphore
    _closing: bool
    _appended: int
    _duplicates: int
    _commits: int

    def _init_log(self) -> None:
        self._queues = {}
        self._chains = {}
        self._chain_slots = asyncio.Semaphore(CHAINS)
        self._closing = False
        self._appended = self._duplicates = self._commits = 0

    # --- append ---------------------------------------------------------------------------------

    async def append(self, message: NewMessage) -> AppendResult:
        if self._closing:
            raise StorageClosed("the Cassandra store is closed")
        future: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(message.conv, deque()).append(_Append(message, future))
        if message.conv not in self._chains:
            self._chains[message.conv] = asyncio.create_task(self._chain(message.conv), name="cassandra-append")
        return await future

    async def _chain(self, conv: str) -> None:
        """Sequence conv's queued appends, a batch per round, until its queue is empty."""
        try:
            async with self._chain_slots:
                queue = self._queues[conv]
                while queue:
                    batch = [queue.popleft() for _ in range(min(len(queue), MAX_BATCH_MESSAGES * 4))]
                    try:
                        await self._append_batch(conv, batch)
                    except Exception as exc:  # a failing batch fails alone: its callers hear why
                        known = isinstance(exc, StorageError | StoreRefusal)
                        failure = exc if known else StorageError(f"append failed: {exc!r}")
                        for item in batch:
                            _fail(item.future, failure)
                        self._heads.pop(conv, None)  # the outcome may be unknown: re-read the head
        finally:
            # No await between the loop's last check and here: nothing was queued meanwhile.
            self._chains.pop(conv, None)
            if not self._queues.get(conv):
                self._queues.pop(conv, None)

    async def _append_batch(self, conv: str, batch: list[_Append]) -> None:
        kind = await self._kind(conv)
        if kind == "dm":
            members: tuple[str, ...] = batch[0].message.members
            allowed: set[str] = set(members)
        elif kind == "group":
            members = tuple(u for u, _, _ in await self._members(conv))
            allowed = set(members)
        else:  # a channel's members are not listed per message (fan-out on read)
            members = ()
            senders = {item.message.sender for item in batch}
            found = await asyncio.gather(*(self._is_member(conv, s) for s in senders))
            allowed = {s for s, ok in zip(senders, found, strict=True) if ok}
        # The head is read before the dedup rows (see the module's docstring).
        head = self._heads.get(conv)
        if head is None:
            head = await self._head(conv)
        fresh: list[_Append] = []
        first_of: dict[tuple[str, str], _Append] = {}
        followers: list[tuple[_Append, _Append]] = []
        for item in batch:
            key = (item.message.sender, item.message.client_id)
            if key in first_of:
                followers.append((item, first_of[key]))
                continue
            first_of[key] = item
            fresh.append(item)
        known = await self._known(fresh)
        settled = await asyncio.gather(
            *(
                self._dedup(conv, kind, members, item, known.get((item.message.sender, item.message.client_id)))
                for item in fresh
            )
        )
        to_write: list[_Append] = []
        for item, done in zip(fresh, settled, strict=True):
            if done:
                continue
            if item.message.sender not in allowed:
                _fail(item.future, NotMember(f"{item.message.sender} is not a member of {conv}"))
                continue
            to_write.append(item)
        if to_write:
            # The sender's sender_convs row goes with the dedup rows, before the message can exist:
            # an erasure that reads it never misses a message (once per sender and conv here).
            writers = dict.fromkeys(i.message.sender for i in to_write)
            unrecorded = [sender for sender in writers if (sender, conv) not in self._sender_convs]
            await self._cql.batch(
                [
                    *(
                        ("dedup_pending", (i.message.sender, i.message.client_id, conv, i.mid, head))
                        for i in to_write
                        if i.after_seq is None
                    ),
                    *(("sender_conv_put", (sender, conv)) for sender in unrecorded),
                ]
            )
            for sender in unrecorded:
                self._sender_convs.remember((sender, conv), True)
            written, landed = await self._sequence(conv, to_write, head)
            await self._after(conv, kind, members, sorted([*written, *landed.values()], key=lambda m: m.seq))
            by_mid = {m.mid: m for m in written}
            for item in to_write:
                key = (item.message.sender, item.message.client_id)
                duplicate = key in landed
                stored = landed[key] if duplicate else by_mid[item.mid]
                if duplicate:
                    self._duplicates += 1
                else:
                    self._appended += 1
                _settle(item.future, AppendResult(stored, duplicate=duplicate, members=members, kind=kind))
        for item, first in followers:
            await asyncio.wait([first.future])
            if first.future.cancelled() or first.future.exception() is not None:
                error = None if first.future.cancelled() else first.future.exception()
                _fail(item.future, error or StorageError("the first send with this id was cancelled"))
            else:
                self._duplicates += 1
                result = first.future.result()
                _settle(item.future, AppendResult(result.message, duplicate=True, members=members, kind=kind))

    async def _known(self, items: list[_Append]) -> dict[tuple[str, str], tuple[Any, ...]]:
        """The dedup rows of items' (sender, client_id), one query per sender and 100 ids."""
        ids: dict[str, list[str]] = {}
        for item in items:
            ids.setdefault(item.message.sender, []).append(item.message.client_id)
        queries = [(sender, wanted[i : i + 100]) for sender, wanted in ids.items() for i in range(0, len(wanted), 100)]
        pages = await asyncio.gather(*(self._cql.rows("dedup_in", (sender, part)) for sender, part in queries))
        return {
            (sender, str(row[0])): tuple(row[1:])
            for (sender, _), rows in zip(queries, pages, strict=True)
            for row in rows
        }

    async def _dedup(
        self, conv: str, kind: str, members: tuple[str, ...], item: _Append, row: tuple[Any, ...] | None
    ) -> bool:
        """Settle item if (sender, client_id) was stored before (row: its dedup row); False when it
        must be written."""
        if row is None:
            return False
        stored_conv, mid, after_seq, seq = row
        if seq is None:
            # Written before a message that may or may not have landed (its process died, or the
            # round's outcome was unknown, or another process is storing it now): look for it
            # after the head that process saw.
            key = (item.message.sender, item.message.client_id)
            stored = (await self._find_sends(str(stored_conv), int(after_seq or 0), {key})).get(key)
            if stored is None:
                if stored_conv == conv:
                    item.mid, item.after_seq = str(mid), int(after_seq or 0)
                # else recorded for another conversation but never stored there: this send takes over
                return False
            if stored_conv == conv:  # the earlier attempt stored it; what follows a store may not have run
                await self._after(conv, kind, members, [stored])
        else:
            found = await self._cql.one("msg_at", (stored_conv, bucket_of(int(seq)), int(seq)))
            if found is None:
                raise StorageError(f"message {stored_conv}#{seq} is missing from the log")
            stored = _message(str(stored_conv), found)
        self._duplicates += 1
        _settle(item.future, AppendResult(stored, duplicate=True, members=members, kind=kind))
        return True

    async def _find_sends(
        self, conv: str, after: int, keys: set[tuple[str, str]], *, upto: int | None = None
    ) -> dict[tuple[str, str], StoredMessage]:
        """The messages of conv after seq after (up to upto, or the end) whose (sender,
        client_id) is one of keys."""
        found: dict[tuple[str, str], StoredMessage] = {}
        while len(found) < len(keys) and (upto is None or after < upto):
            limit = 200 if upto is None else min(200, upto - after)
            page = await self.fetch_after(conv, after, limit)
            found.update(((m.sender, m.client_id), m) for m in page.messages if (m.sender, m.client_id) in keys)
            if not page.messages or (upto is None and not page.more):
                break
            after = page.messages[-1].seq
        return found

    async def _sequence(
        self, conv: str, items: list[_Append], head: int
    ) -> tuple[list[StoredMessage], dict[tuple[str, str], StoredMessage]]:
        """Give items the next seqs of conv, each round one conditional batch on one bucket.
        Returns the messages written now, and (by sender and client_id) those found stored by
        another attempt."""
        written: list[StoredMessage] = []
        found: dict[tuple[str, str], StoredMessage] = {}
        pending = list(items)
        while pending:
            bucket = bucket_of(head + 1)
            room = (bucket + 1) * BUCKET_SIZE - 1 - head
            chunk: list[_Append] = []
            size = 0
            for item in pending:
                cost = len(item.message.body.encode("utf-8", "surrogatepass")) + 200
                if chunk and (len(chunk) >= min(room, MAX_BATCH_MESSAGES) or size + cost > MAX_BATCH_BYTES):
                    break
                chunk.append(item)
                size += cost
            expected = head if head > 0 and bucket_of(head) == bucket else None
            statements: list[tuple[str, tuple[Any, ...]]] = [("msg_cas", (head + len(chunk), conv, bucket, expected))]
            stored = []
            for offset, item in enumerate(chunk, start=1):
                m = item.message
                message = StoredMessage.of(m, seq=head + offset, mid=item.mid)
                stored.append(message)
                statements.append(
                    (
                        "msg_insert",
                        (conv, bucket, message.seq, message.mid, m.sender, m.device, m.client_id, m.ts, m.kind, m.body,
                         list(m.media) or None),
                    )
                )  # fmt: skip
            with SEQUENCE_ROUND.time():
                answer = await self._cql.conditional_batch(statements)
            if answer.get("[applied]"):
                SEQUENCE_BATCH.observe(len(chunk))
                self._commits += 1
                head += len(chunk)
                self._heads.remember(conv, head)
                written.extend(stored)
                pending = pending[len(chunk) :]
                continue
            SEQUENCE_CONFLICTS.inc()
            now = answer.get("last_seq")
            moved_to = int(now) if now is not None else await self._head(conv)
            # The rounds that moved the head may hold one of these sends: an earlier attempt whose
            # outcome was unknown and which Paxos has now finished, or the same send retried
            # through another process at the same time. Then it is stored already.
            keys = {(item.message.sender, item.message.client_id) for item in pending}
            found.update(await self._find_sends(conv, head, keys, upto=moved_to))
            pending = [item for item in pending if (item.message.sender, item.message.client_id) not in found]
            head = moved_to
            self._heads.remember(conv, head)
        return written, found

    async def _after(self, conv: str, kind: str, members: tuple[str, ...], written: list[StoredMessage]) -> None:
        """What follows stored messages: their dedup rows completed, the members' state rows moved
        up the change index once for the round (a channel's: the channel's version), the senders'
        watermarks raised to their last message."""
        if not written:
            return
        last = written[-1]
        senders = {m.sender: m.seq for m in written}  # each sender's highest seq of the round
        users = list(senders) if kind == "channel" else list(dict.fromkeys(members))
        writes, version = self._state_writes(conv=conv, kind=kind, users=users, ts=last.ts)
        writes.extend(("dedup_done", (m.seq, m.sender, m.client_id)) for m in written)
        for sender, seq in senders.items():
            # The sender has read (and so received) what they sent.
            writes.extend(self._mark_writes(conv=conv, user=sender, delivered=seq, read=seq))
        if kind == "channel":
            writes.append(("channel_touch", (version, last.ts, conv)))
        # The head hint only has to name the newest bucket: it is written when a bucket begins.
        starts = [m.seq for m in written if m.seq % BUCKET_SIZE == 0]
        try:
            await asyncio.gather(
                *(self._cql.batch(writes[i : i + _AFTER_BATCH]) for i in range(0, len(writes), _AFTER_BATCH)),
                *(self._cql.run("head_hint_set", (conv, seq, seq)) for seq in starts[-1:]),
            )
        finally:
            self._clock.written(version)

    # --- reads ----------------------------------------------------------------------------------

    async def fetch_after(self, conv: str, after: int, limit: int) -> Page:
        out: list[StoredMessage] = []
        cursor = max(after, 0)
        while len(out) <= limit:
            bucket = bucket_of(cursor + 1)
            rows = await self._cql.rows("msg_after", (conv, bucket, cursor, limit + 1 - len(out)))
            out.extend(_message(conv, r) for r in rows)
            last_in_bucket = (bucket + 1) * BUCKET_SIZE - 1
            if not rows or int(rows[-1][0]) < last_in_bucket:
                break  # the log has no holes: a bucket that ends early is the last one
            cursor = last_in_bucket
        return Page(tuple(out[:limit]), more=len(out) > limit)

    async def fetch_before(self, conv: str, before: int, limit: int) -> Page:
        if before <= 1:
            return Page((), more=False)
        head = await self._head(conv)
        cursor = min(before, head + 1)
        out: list[StoredMessage] = []
        while cursor > 1 and len(out) <= limit:
            bucket = bucket_of(cursor - 1)
            rows = await self._cql.rows("msg_before", (conv, bucket, cursor, limit + 1 - len(out)))
            out.extend(_message(conv, r) for r in rows)
            cursor = bucket * BUCKET_SIZE  # the bucket's first seq: continue below it
            if bucket == 0:
                break
        page = out[:limit]
        page.reverse()
        return Page(tuple(page), more=len(out) > limit)

    async def last_seq(self, conv: str) -> int:
        return await self._head(conv)

    # --- lifecycle ------------------------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            appended=self._appended,
            duplicates=self._duplicates,
            commits=self._commits,
            queued=sum(len(q) for q in self._queues.values()),
        )

    async def _drain(self) -> None:
        """Stop taking appends and wait for the queued ones."""
        self._closing = True
        while self._chains:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._chains.values(), return_exceptions=True)
