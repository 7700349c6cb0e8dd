"""A SQLite database that is locked, read-only or corrupt: a clear error or a documented wait, never a
silent loss."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import pytest

from kernel.settings import Settings
from server.stores import open_store
from storage.db import StoreError, open_database
from storage.store import EventRecord, SessionStart


def settings(path: Path) -> Settings:
    s = Settings()
    s.database.url = f"sqlite:///{path}"
    return s


async def test_locked_database_delays_acknowledgement_until_the_commit(tmp_path: Path) -> None:
    db_file = tmp_path / "h.db"
    s = settings(db_file)
    s.database.busy_timeout_s = 5.0
    store = await open_store(s)
    store.writer._retry_initial_s = 0.01
    await store.start_session(SessionStart("s", "alice"))
    blocker = sqlite3.connect(db_file, timeout=0.1)
    blocker.execute("BEGIN EXCLUSIVE")
    fut = store.record_event(EventRecord("s", "correction", text="use pathlib"))
    await asyncio.sleep(7)  # longer than the 5 s busy timeout: the writer must keep the write, not drop it
    assert not fut.done(), "a write cannot be acknowledged while the database is locked"
    assert store.writer.stats["retries"] >= 1 and "locked" in (store.writer.last_error or "")
    blocker.rollback()
    blocker.close()
    event_id = await asyncio.wait_for(fut, 30)
    assert isinstance(event_id, int)
    assert (await store.stats())["events"]["correction"] == 1
    await store.close()


async def test_read_only_file_and_directory_are_refused_at_open(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions; covered for regular users")
    db_file = tmp_path / "h.db"
    (await open_database(f"sqlite:///{db_file}")).engine.sync_engine.dispose()
    db_file.chmod(0o444)
    with pytest.raises(StoreError, match="is not readable and writable by this user"):
        await open_database(f"sqlite:///{db_file}")


async def test_read_only_directory_is_refused_even_for_root(tmp_path: Path) -> None:
    # A read-only bind of the data dir is what root meets: simulate with a file where the directory should be.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create the directory for database"):
        await open_database(f"sqlite:///{blocker / 'h.db'}")


async def test_corrupt_file_is_refused_with_the_fix(tmp_path: Path) -> None:
    db_file = tmp_path / "h.db"
    db_file.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="is corrupt or not a SQLite file .*move it aside"):
        await open_database(f"sqlite:///{db_file}")
    assert db_file.read_bytes().startswith(b"this is not"), "the damaged file is left for the admin to inspect"


async def test_damaged_pages_fail_the_integrity_check(tmp_path: Path) -> None:
    db_file = tmp_path / "h.db"
    db = await open_database(f"sqlite:///{db_file}")
    await db.dispose()
    data = bytearray(db_file.read_bytes())
    for i in range(4096, min(len(data), 4096 * 6)):
        data[i] = 0xA5
    db_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"(failed its integrity check|is corrupt)"):
        await open_database(f"sqlite:///{db_file}")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite:///:memory:", "in-memory SQLite database"),
        ("mysql://u@h/db", "Heedful supports sqlite and postgresql"),
        ("not a url", "is not a database URL"),
    ],
)
async def test_unusable_urls(url: str, message: str) -> None:
    with pytest.raises(StoreError, match=message):
        await open_database(url)


async def test_unreachable_postgres_is_a_clear_error() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(
        StoreError, match=f"cannot open the database at postgresql://x@127.0.0.1:{port}/db: .*Connect call failed"
    ):
        await open_database(f"postgresql://x@127.0.0.1:{port}/db")


async def test_closed_store_refuses_writes(tmp_path: Path) -> None:
    store = await open_store(settings(tmp_path / "h.db"))
    await store.close()
    with pytest.raises(StoreError, match="the store is closing"):
        store.record_event(EventRecord("s", "correction", text="x"))
