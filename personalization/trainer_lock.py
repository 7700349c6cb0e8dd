"""One training worker per store.

`heedful train` (started by hand, or by `heedful serve` as its child with `training.in_server`) holds an
exclusive lock on a file named after the store's database for as long as it runs. Two workers on one store
would train the same scope twice from the same rollouts, and the second one's start-up clean-up removes
adapter folders the first is still writing. So a second looping worker stands by until the first one
stops (a crash or SIGKILL releases the lock with the process), and `heedful train --once` refuses to start,
naming the process that holds the lock.

The lock is an `flock` on `<data dir>/locks/train-<hash of the database>.lock`: it covers the workers of
one machine. Workers on several machines sharing one PostgreSQL store are not coordinated by it: run one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.engine import make_url

from kernel import paths


class TrainerBusy(Exception):
    """Another worker holds the store's training lock."""


def store_key(database_url: str) -> str:
    """What identifies a store for the lock: a SQLite file by its resolved path, any other database by its
    URL without the password (which never reaches the lock file or its name)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        database = url.database or ""
        return "sqlite:" + (
            str(Path(database).expanduser().resolve()) if database not in ("", ":memory:") else database
        )
    return url._replace(password=None, drivername=url.get_backend_name()).render_as_string(hide_password=False)


class TrainerLock:
    """The store's training lock (see the module docstring). Not reentrant: one per worker."""

    def __init__(self, database_url: str, *, locks_dir: Path | None = None) -> None:
        key = store_key(database_url)
        name = f"train-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
        self.path = (locks_dir or paths.data_dir() / "locks") / name
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lock if nobody holds it (never waits); True when this worker holds it now."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        who = f"pid {os.getpid()} on {socket.gethostname()}, since {datetime.now(UTC).isoformat(timespec='seconds')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, who.encode() + b"\n", 0)
        self._fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it ("unknown" when it cannot be read)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            text = ""
        return text or "unknown"

    def acquire_or_raise(self) -> None:
        if not self.try_acquire():
            raise TrainerBusy(
                f"another training worker ({self.holder()}) is training this store (lock {self.path}); "
                "let it run the round, or stop it first"
            )

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock
