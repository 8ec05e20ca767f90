"""Files only the server can read: data directories 0700, databases (and so their WAL and
shared-memory files, which SQLite creates with the database's mode) 0600, whatever the umask."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)


def private_dir(path: Path) -> None:
    """Create path (and parents) as 0700. An existing directory others can read or enter is
    reported, not changed: the operator may share it on purpose."""
    if not path.exists():
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o700)  # mkdir's mode is masked by the umask
        return
    if not path.is_dir():
        raise NotADirectoryError(20, "not a directory", str(path))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "data directory %s has mode %03o: other users can read or enter it; run chmod 700 on it", path, mode
        )


def private_file(path: Path) -> None:
    """Make sure path exists and is 0600 (before SQLite opens it, so its -wal and -shm are too)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
