"""The message store's tables, its schema version and the migrations from older versions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mqchat.errors import StorageError
from storage.sqlite.connection import connect, prepare_file
from storage.sqlite.queries import next_version

SCHEMA_VERSION = 6

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversations (
    conv TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    version INTEGER NOT NULL DEFAULT 0  -- channels: the change version of the last message
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    conv TEXT NOT NULL,
    seq INTEGER NOT NULL,
    mid TEXT NOT NULL,
    sender TEXT NOT NULL,
    device TEXT NOT NULL,
    client_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    kind TEXT NOT NULL,
    body TEXT NOT NULL,
    media TEXT,
    PRIMARY KEY (conv, seq)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_sender_client_id ON messages (sender, client_id);
CREATE TABLE IF NOT EXISTS user_convs (
    user TEXT NOT NULL,
    conv TEXT NOT NULL,
    kind TEXT NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    read INTEGER NOT NULL DEFAULT 0,
    version INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (user, conv)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS user_convs_by_version ON user_convs (user, version);
CREATE INDEX IF NOT EXISTS user_convs_channels ON user_convs (user) WHERE kind = 'channel';
CREATE TABLE IF NOT EXISTS groups (
    conv TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    creator TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (
    conv TEXT NOT NULL,
    user TEXT NOT NULL,
    role TEXT NOT NULL,
    joined_seq INTEGER NOT NULL,
    PRIMARY KEY (conv, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_settings (
    user TEXT PRIMARY KEY,
    who_may_add TEXT NOT NULL,
    presence TEXT NOT NULL
) WITHOUT ROWID;
-- schema 4: logout and account deletion
CREATE TABLE IF NOT EXISTS revocations (
    user TEXT NOT NULL,
    device TEXT NOT NULL,  -- '': every device of the user
    before_ms INTEGER NOT NULL,
    PRIMARY KEY (user, device)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS account_deletions (
    user TEXT PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    finished INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS account_deletions_pending ON account_deletions (at_ms) WHERE finished = 0;
-- schema 5: what each sender wrote, by conversation (an erasure finds and redacts it through this);
-- an index of a WITHOUT ROWID table ends with the primary key, so its entries are (sender, conv, seq)
CREATE INDEX IF NOT EXISTS messages_by_sender_conv ON messages (sender, conv);
-- schema 6: attachments (uploads in progress and files; their bytes are in the object store)
CREATE TABLE IF NOT EXISTS media (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    opaque INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    state TEXT NOT NULL,  -- 'uploading' | 'ready'
    offset INTEGER NOT NULL DEFAULT 0,
    staging TEXT NOT NULL DEFAULT '',
    filename TEXT NOT NULL DEFAULT '',
    width INTEGER NOT NULL DEFAULT 0,
    height INTEGER NOT NULL DEFAULT 0,
    thumbnail BLOB NOT NULL DEFAULT x'',
    completed_ms INTEGER NOT NULL DEFAULT 0,
    sent INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS media_by_owner ON media (owner);
-- the collector's work: uploads by age, and files never sent by completion
CREATE INDEX IF NOT EXISTS media_uploading ON media (created_ms) WHERE state = 'uploading';
CREATE INDEX IF NOT EXISTS media_unsent ON media (completed_ms) WHERE state = 'ready' AND sent = 0;
CREATE TABLE IF NOT EXISTS media_convs (
    media TEXT NOT NULL,
    conv TEXT NOT NULL,
    PRIMARY KEY (media, conv)
) WITHOUT ROWID;
"""


def init_schema(path: Path) -> None:
    """Create or migrate the database at path (another process may be doing the same)."""
    prepare_file(path)
    try:
        conn = connect(path, synchronous="FULL")
        try:
            conn.executescript(_SCHEMA)
            conn.execute("BEGIN IMMEDIATE")  # another process (broker, bridge) may be opening it too
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise StorageError(f"{path} has schema version {row[0]}, newer than this mqchat ({SCHEMA_VERSION})")
            if row is not None and int(row[0]) < 2:
                _migrate_to_v2(conn)
            if row is not None and int(row[0]) < 3:
                _migrate_to_v3(conn)
            # Schema 3 → 4 adds tables only (revocations, account_deletions), and 4 → 5 an index only
            # (messages_by_sender_conv, built from the log once), 5 → 6 tables only (media, media_convs):
            # created above.
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('change_version', '0')")
            conn.execute("COMMIT")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StorageError(f"cannot open {path}: {exc}") from exc


def _migrate_to_v3(conn: sqlite3.Connection) -> None:
    """Schema 2 → 3: conversations get a change version (channels change without touching members)."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(conversations)")}
    if "version" not in columns:
        conn.execute("ALTER TABLE conversations ADD COLUMN version INTEGER NOT NULL DEFAULT 0")


def _migrate_to_v2(conn: sqlite3.Connection) -> None:
    """Schema 1 → 2: give every member of every existing 1:1 conversation a state row."""
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('change_version', '0')")
    for conv, updated_at in conn.execute("SELECT conv, updated_at FROM conversations").fetchall():
        parts = conv.split(":")
        if len(parts) != 3 or parts[0] != "dm":
            continue
        for member in dict.fromkeys(parts[1:]):
            conn.execute(
                "INSERT OR IGNORE INTO user_convs (user, conv, kind, version, updated_at) VALUES (?, ?, 'dm', ?, ?)",
                (member, conv, next_version(conn), updated_at),
            )
