"""The keyspace, its tables, its schema version and the migrations (docs/design/cassandra.md
gives the reasoning and the sizing).

The keyspace is created with ``NetworkTopologyStrategy`` and the configured replication factor
in the local datacenter. ``schema_version`` holds one row: a store refuses to open a keyspace
written by a newer version, and an older one is migrated forward step by step (each step a
list of idempotent CQL statements, ``MIGRATIONS[n]`` taking version n-1 to n, and for a table
that indexes older ones, ``BACKFILLS[n]`` filling it from them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mqchat.config import StorageConfig
from mqchat.errors import StorageError
from storage.cassandra.core import bounded
from storage.cassandra.session import Cql, translate

__all__ = ["SCHEMA_VERSION", "ensure_schema"]

_TABLES = [
    "CREATE TABLE IF NOT EXISTS {ks}.schema_version (id int PRIMARY KEY, version int)",
    # The log: one partition per (conversation, bucket of BUCKET_SIZE seqs). ``last_seq`` (static)
    # is the bucket's highest seq, the compare-and-set point of the sequencer.
    """CREATE TABLE IF NOT EXISTS {ks}.messages (
        conv text, bucket bigint, seq bigint, last_seq bigint static,
        mid text, sender text, device text, client_id text, ts bigint, kind text, body text, media list<text>,
        PRIMARY KEY ((conv, bucket), seq)
    ) WITH CLUSTERING ORDER BY (seq ASC)""",
    # The log's newest bucket (a hint written when a bucket begins, USING TIMESTAMP = seq so the
    # highest wins under concurrent writers; the head is found by walking forward from it).
    "CREATE TABLE IF NOT EXISTS {ks}.conv_heads (conv text PRIMARY KEY, last_seq bigint)",
    # Idempotency: one partition per (sender, client id), written before the message (with the
    # seq it may take from after_seq on) and completed with its seq after; kept 30 days.
    """CREATE TABLE IF NOT EXISTS {ks}.client_ids (
        sender text, client_id text, conv text, mid text, after_seq bigint, seq bigint,
        PRIMARY KEY ((sender, client_id))
    ) WITH default_time_to_live = 2592000""",
    # Each user's conversations (membership from the user's side) and their change versions.
    """CREATE TABLE IF NOT EXISTS {ks}.user_convs (
        user text, conv text, kind text, version bigint, updated_at bigint,
        PRIMARY KEY (user, conv)
    )""",
    "CREATE TABLE IF NOT EXISTS {ks}.user_channels (user text, conv text, PRIMARY KEY (user, conv))",
    # The per-user change index behind sync: a row per change; rows left behind by a later change
    # of the same conversation are skipped and deleted by the read that meets them. Kept 14 days
    # (CHANGE_TTL_S): a cursor older than that gets the full list from user_convs.
    """CREATE TABLE IF NOT EXISTS {ks}.user_changes (
        user text, version bigint, conv text,
        PRIMARY KEY (user, version, conv)
    ) WITH CLUSTERING ORDER BY (version ASC, conv ASC) AND default_time_to_live = 1209600""",
    # Watermarks: the maximum of the values written (monotonic under concurrent writers without
    # a transaction); rows below the maximum are pruned by a range delete.
    """CREATE TABLE IF NOT EXISTS {ks}.watermarks (
        user text, conv text, mark text, value bigint,
        PRIMARY KEY ((user, conv), mark, value)
    ) WITH CLUSTERING ORDER BY (mark ASC, value DESC)""",
    # A channel's change version (its messages do not touch its members' rows).
    "CREATE TABLE IF NOT EXISTS {ks}.channel_versions (conv text PRIMARY KEY, version bigint, updated_at bigint)",
    """CREATE TABLE IF NOT EXISTS {ks}.groups (
        conv text PRIMARY KEY, name text, kind text, creator text, created_at bigint
    )""",
    # Membership from the conversation's side.
    """CREATE TABLE IF NOT EXISTS {ks}.group_members (
        conv text, user text, role text, joined_seq bigint,
        PRIMARY KEY (conv, user)
    )""",
    "CREATE TABLE IF NOT EXISTS {ks}.user_settings (user text PRIMARY KEY, who_may_add text, presence text)",
    # --- push ---
    """CREATE TABLE IF NOT EXISTS {ks}.push_tokens (
        push_token text PRIMARY KEY, platform text, user text, device text, topic text, sandbox boolean,
        registered_at bigint
    )""",
    """CREATE TABLE IF NOT EXISTS {ks}.device_tokens (
        user text, device text, push_token text, platform text, topic text, sandbox boolean, registered_at bigint,
        PRIMARY KEY (user, device)
    )""",
    "CREATE TABLE IF NOT EXISTS {ks}.conv_mutes (user text, conv text, muted boolean, PRIMARY KEY (user, conv))",
    "CREATE TABLE IF NOT EXISTS {ks}.conv_flags (conv text PRIMARY KEY, e2e boolean)",
    # A device's waiting messages of one conversation, and the window state (claimed with a lease).
    """CREATE TABLE IF NOT EXISTS {ks}.push_items (
        user text, device text, conv text, seq bigint, sender text, preview text,
        PRIMARY KEY ((user, device, conv), seq)
    ) WITH default_time_to_live = 604800""",
    """CREATE TABLE IF NOT EXISTS {ks}.push_windows (
        user text, device text, conv text, pushed_seq bigint, due_at bigint, owner text, lease_until bigint,
        PRIMARY KEY ((user, device, conv))
    )""",
    # Windows being sent, by owner (a node) and lease. This table and push_due are queues: their
    # deletes' tombstones are collected after 3 hours (the default hint window), not 10 days.
    """CREATE TABLE IF NOT EXISTS {ks}.push_claimed (
        shard int, user text, device text, conv text, owner text, lease_until bigint,
        PRIMARY KEY (shard, user, device, conv)
    ) WITH gc_grace_seconds = 10800""",
    # Open windows by due time, spread over PUSH_SHARDS partitions.
    """CREATE TABLE IF NOT EXISTS {ks}.push_due (
        shard int, due_at bigint, user text, device text, conv text,
        PRIMARY KEY (shard, due_at, user, device, conv)
    ) WITH gc_grace_seconds = 10800""",
]

_ACCOUNTS = [
    # Logout: a row per (user, device); device '' is every device of the user. Written USING
    # TIMESTAMP before_ms (in microseconds), so the latest before_ms wins without a read.
    """CREATE TABLE IF NOT EXISTS {ks}.revocations (
        user text, device text, before_ms bigint,
        PRIMARY KEY (user, device)
    )""",
    # Account deletions: one record per user (written by lightweight transactions only, kept once
    # finished), and the pending ones, which a worker resumes after a crash. The pending list is
    # one partition (shard 0): deletions are rare and leave it when they finish, so it holds the
    # few in progress; like the push queue's tables, its tombstones go after 3 hours.
    "CREATE TABLE IF NOT EXISTS {ks}.account_deletions (user text PRIMARY KEY, at_ms bigint, finished boolean)",
    """CREATE TABLE IF NOT EXISTS {ks}.pending_deletions (
        shard int, user text, at_ms bigint,
        PRIMARY KEY (shard, user)
    ) WITH gc_grace_seconds = 10800""",
]

_SENDER_CONVS = [
    # The conversations each sender has written in (an erasure reads them): a row per (sender,
    # conv), written before the sender's first message there. The dedup table cannot answer it:
    # its partitions are (sender, client_id), one per message, and its rows expire after 30 days.
    "CREATE TABLE IF NOT EXISTS {ks}.sender_convs (sender text, conv text, PRIMARY KEY (sender, conv))",
]

_MEDIA = [
    # Attachments (storage/cassandra/media.py): a row per upload or file, its state written by
    # lightweight transactions; ``received`` is its durable offset.
    """CREATE TABLE IF NOT EXISTS {ks}.media (
        id text PRIMARY KEY, owner text, size bigint, content_type text, sha256 text, opaque boolean,
        created_ms bigint, state text, received bigint, staging text, filename text, width int, height int,
        thumbnail blob, completed_ms bigint, sent boolean
    )""",
    # The conversations each was sent to (who may read it), and each owner's uploads and files.
    "CREATE TABLE IF NOT EXISTS {ks}.media_convs (media text, conv text, PRIMARY KEY (media, conv))",
    "CREATE TABLE IF NOT EXISTS {ks}.media_by_owner (owner text, id text, PRIMARY KEY (owner, id))",
    # The collector's work: uploads in progress and files not yet sent, over PENDING_SHARDS
    # partitions; a queue, so its tombstones go after 3 hours.
    """CREATE TABLE IF NOT EXISTS {ks}.media_pending (
        shard int, id text, state text, created_ms bigint, completed_ms bigint,
        PRIMARY KEY (shard, id)
    ) WITH gc_grace_seconds = 10800""",
]

SCHEMA_VERSION = 4

MIGRATIONS: dict[int, list[str]] = {1: _TABLES, 2: _ACCOUNTS, 3: _SENDER_CONVS, 4: _MEDIA}
"""``MIGRATIONS[n]`` takes the keyspace from version n-1 to n (idempotent statements)."""

BACKFILL_PAGE_ROWS = 1000
"""Message rows per page of a backfill's scan of the log (and so its writes in flight at most)."""


async def _backfill_sender_convs(cql: Cql) -> None:
    """Version 3: a row of ``sender_convs`` for every (sender, conv) of the messages already in the
    log, one page of the whole table at a time (a scan of every partition: run once, by the node
    that migrates; idempotent, so a node that dies in it starts over)."""
    await cql.prepare(
        {
            "backfill_scan": "SELECT conv, sender FROM {ks}.messages",
            "backfill_sender_conv": "INSERT INTO {ks}.sender_convs (sender, conv) VALUES (?, ?)",
        },
        page_rows={"backfill_scan": BACKFILL_PAGE_ROWS},
    )
    async for rows in cql.pages("backfill_scan", ()):
        pairs = {(str(sender), str(conv)) for conv, sender in rows if sender is not None}
        await bounded([cql.run("backfill_sender_conv", pair) for pair in pairs])


BACKFILLS: dict[int, Callable[[Cql], Awaitable[None]]] = {3: _backfill_sender_convs}
"""``BACKFILLS[n]``, when there is one, fills the tables of version n from the older ones: run after
``MIGRATIONS[n]`` and before the keyspace is marked version n."""


async def ensure_schema(cql: Cql, config: StorageConfig) -> None:
    """Create the keyspace and tables, or migrate them to ``SCHEMA_VERSION``."""
    dc = config.cassandra_dc or await _local_dc(cql)
    ks = config.cassandra_keyspace
    await _execute(
        cql,
        f"CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = "
        f"{{'class': 'NetworkTopologyStrategy', '{dc}': {config.cassandra_rf}}}",
    )
    await _execute(cql, _TABLES[0].format(ks=ks))
    rows = await _query(cql, f"SELECT version FROM {ks}.schema_version WHERE id = 0")
    current = int(str(rows[0][0])) if rows else 0
    if current > SCHEMA_VERSION:
        raise StorageError(
            f"keyspace {ks} has schema version {current}; this mqchat knows {SCHEMA_VERSION} (upgrade mqchat)"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in MIGRATIONS[version]:
            await _execute(cql, statement.format(ks=ks))
        if version in BACKFILLS:
            await BACKFILLS[version](cql)
        await _execute(cql, f"INSERT INTO {ks}.schema_version (id, version) VALUES (0, {version})")


async def _local_dc(cql: Cql) -> str:
    rows = await _query(cql, "SELECT data_center FROM system.local")
    return str(rows[0][0]) if rows else "datacenter1"


async def _query(cql: Cql, statement: str) -> list[tuple[object, ...]]:
    try:
        result = await asyncio.to_thread(cql.session.execute, statement)
    except Exception as exc:
        raise translate(exc) from exc
    return list(result.current_rows)


async def _execute(cql: Cql, statement: str) -> None:
    """A schema change (blocking in the driver, which waits for schema agreement: run in a thread)."""
    await _query(cql, statement)
