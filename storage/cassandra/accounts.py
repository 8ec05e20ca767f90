"""Logout and account deletion on Cassandra.

::

    revocations        ((user), device)   before_ms    written USING TIMESTAMP before_ms: the latest wins;
                                                   read for many users at once (IN on the partition key)
    account_deletions  ((user))           at_ms, finished      lightweight transactions only
    pending_deletions  ((shard 0), user)  at_ms        the deletions a worker resumes (few at a time)

    sender_convs       ((sender), conv)   written by append before the sender's first message in conv

    sender_conversations(sender)   the sender's sender_convs partition, SENDER_CONVS_ROWS a page
    redact_messages(conv, sender)
      bucket 0 … bucket_of(last_seq), each read MSG_SCAN_ROWS rows a page (seq, sender, kind and
      the row's write time; no bodies) ─▶ the sender's rows not yet redacted: one UPDATE each,
      CONCURRENT at a time (no batch: a conversation's rows would make one far too large)
    forget_conversation_states(user)
      the user's user_convs rows of 1:1 conversations (a slice: 'dm:' ≤ conv < 'dm;'), FORGET_ROWS a
      page ─▶ each one's watermarks partition, then the page's rows (one batch, the user's partition)
      the user's user_changes rows, FORGET_ROWS a page ─▶ those of 1:1 conversations (one batch)

A message row was written by a Paxos round, timestamped by the clock of the node that proposed
it; a redaction timed by a node whose clock lags would lose to it and vanish. So each redaction
is written with a timestamp past the row's own write time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from storage.base import Accounts
from storage.cassandra.core import CassandraPart, bounded, bucket_of
from storage.records import REDACTED_KIND

__all__ = ["FORGET_ROWS", "MSG_SCAN_ROWS", "SENDER_CONVS_ROWS", "STATEMENTS", "CassandraAccounts"]

STATEMENTS = {
    "revoke": "INSERT INTO {ks}.revocations (user, device, before_ms) VALUES (?, ?, ?) USING TIMESTAMP ?",
    "revocations_in": "SELECT user, device, before_ms FROM {ks}.revocations WHERE user IN ?",
    "deletion_begin": "INSERT INTO {ks}.account_deletions (user, at_ms, finished) VALUES (?, ?, false) IF NOT EXISTS",
    "deletion_restart": (
        "UPDATE {ks}.account_deletions SET at_ms = ?, finished = false WHERE user = ? IF finished = true"
    ),
    "deletion_finish": "UPDATE {ks}.account_deletions SET finished = true WHERE user = ? IF EXISTS",
    "deletion_get": "SELECT at_ms, finished FROM {ks}.account_deletions WHERE user = ?",
    "pending_deletion_put": "INSERT INTO {ks}.pending_deletions (shard, user, at_ms) VALUES (0, ?, ?)",
    "pending_deletion_delete": "DELETE FROM {ks}.pending_deletions WHERE shard = 0 AND user = ?",
    "pending_deletions_all": "SELECT user, at_ms FROM {ks}.pending_deletions WHERE shard = 0",
    "msg_scan": "SELECT seq, sender, kind, WRITETIME(kind) FROM {ks}.messages WHERE conv = ? AND bucket = ?",
    "msg_redact": (
        "UPDATE {ks}.messages USING TIMESTAMP ? SET kind = ?, body = '', media = null "
        "WHERE conv = ? AND bucket = ? AND seq = ?"
    ),
    "settings_delete": "DELETE FROM {ks}.user_settings WHERE user = ?",
    "sender_convs_of": "SELECT conv FROM {ks}.sender_convs WHERE sender = ?",
    # 1:1 conversation ids start with "dm:" (and ';' follows ':'): a slice of the user's partition.
    "forget_dm_states": "SELECT conv FROM {ks}.user_convs WHERE user = ? AND conv >= 'dm:' AND conv < 'dm;'",
    "forget_marks": "DELETE FROM {ks}.watermarks WHERE user = ? AND conv = ?",
    "forget_state": "DELETE FROM {ks}.user_convs WHERE user = ? AND conv = ?",
    "forget_changes_scan": "SELECT version, conv FROM {ks}.user_changes WHERE user = ?",
    "forget_change": "DELETE FROM {ks}.user_changes WHERE user = ? AND version = ? AND conv = ?",
}

MSG_SCAN_ROWS = 500
"""Rows per page of the redaction's scan of a bucket (and so its updates in flight per page)."""

SENDER_CONVS_ROWS = 1000
"""Conversations per page of a sender's sender_convs partition."""

REVOCATION_READ = 50
"""Users per read of revocations_of (one IN query on the partition key)."""

FORGET_ROWS = 100
"""Rows per page of forget_conversation_states' reads (and so deletes per batch)."""


class CassandraAccounts(CassandraPart, Accounts):
    async def revoke(self, user: str, *, device: str | None, before_ms: int) -> None:
        await self._cql.run("revoke", (user, device or "", before_ms, before_ms * 1000))

    async def revocations_of(self, users: Sequence[str]) -> dict[str, dict[str, int]]:
        wanted = list(dict.fromkeys(users))
        parts = [wanted[i : i + REVOCATION_READ] for i in range(0, len(wanted), REVOCATION_READ)]
        found: dict[str, dict[str, int]] = {}
        for rows in await asyncio.gather(*(self._cql.all_pages("revocations_in", (part,)) for part in parts)):
            for user, device, before in rows:
                found.setdefault(str(user), {})[str(device)] = int(before)
        return found

    async def begin_deletion(self, user: str, *, at_ms: int) -> int:
        # The pending row before the record: a process killed between the two leaves a pending
        # deletion, which the sweep of AccountDeletions resumes (and records); never a recorded
        # deletion that nothing resumes.
        await self._cql.run("pending_deletion_put", (user, at_ms))
        answer = await self._cql.conditional("deletion_begin", (user, at_ms))
        effective = at_ms
        if not answer.get("[applied]"):
            effective = int(answer["at_ms"])
            if answer.get("finished"):  # finished before: begun anew, unless another call just did
                restarted = await self._cql.conditional("deletion_restart", (at_ms, user))
                if restarted.get("[applied]"):
                    effective = at_ms
                else:
                    row = await self._cql.one("deletion_get", (user,))
                    effective = int(row[0]) if row is not None and row[0] is not None else at_ms
        if effective != at_ms:
            await self._cql.run("pending_deletion_put", (user, effective))
        return effective

    async def pending_deletions(self) -> list[tuple[str, int]]:
        rows = await self._cql.all_pages("pending_deletions_all", ())
        return sorted(((str(user), int(at_ms)) for user, at_ms in rows), key=lambda p: (p[1], p[0]))

    async def finish_deletion(self, user: str) -> None:
        # The record first: a failure between the two leaves the deletion pending, and the worker
        # that resumes it finishes it again.
        await self._cql.conditional("deletion_finish", (user,))
        await self._cql.run("pending_deletion_delete", (user,))

    async def deletion_state(self, user: str) -> tuple[int, bool] | None:
        row = await self._cql.one("deletion_get", (user,))
        if row is None or row[0] is None:
            return None
        return int(row[0]), bool(row[1])

    async def redact_messages(self, *, conv: str, sender: str) -> int:
        redacted = 0
        for bucket in range(bucket_of(await self._head(conv)) + 1):
            paging: bytes | None = None
            while True:
                page = await self._cql.page("msg_scan", (conv, bucket), paging_state=paging)
                now = time.time_ns() // 1000
                updates: list[tuple[Any, ...]] = [
                    (max(now, int(written or 0) + 1), REDACTED_KIND, conv, bucket, int(seq))
                    for seq, who, kind, written in page.rows
                    if seq is not None and who == sender and kind != REDACTED_KIND
                ]
                await bounded([self._cql.run("msg_redact", params) for params in updates])
                redacted += len(updates)
                paging = page.paging_state
                if paging is None:
                    break
        return redacted

    async def sender_conversations(self, sender: str) -> list[str]:
        return [str(conv) for (conv,) in await self._cql.all_pages("sender_convs_of", (sender,))]

    async def forget_conversation_states(self, user: str) -> None:
        # A conversation's watermarks before its state row: a call that fails between the two finds
        # the conversation again from its state row when it is retried.
        async for rows in self._cql.pages("forget_dm_states", (user,)):
            convs = [str(conv) for (conv,) in rows]
            await bounded([self._cql.run("forget_marks", (user, conv)) for conv in convs])
            await self._cql.batch([("forget_state", (user, conv)) for conv in convs])
        # The change index names each row's conversation itself: this step needs none of the above.
        async for rows in self._cql.pages("forget_changes_scan", (user,)):
            await self._cql.batch(
                [("forget_change", (user, version, conv)) for version, conv in rows if str(conv).startswith("dm:")]
            )

    async def delete_user_settings(self, user: str) -> None:
        await self._cql.run("settings_delete", (user,))
