"""Opening the rollout store: the database URL, SQLite pragmas, health checks and schema upgrades.

SQLite (default, a file in the data dir) runs in WAL mode with foreign keys on, a busy timeout and
`synchronous=FULL`, so a committed transaction survives a killed process and a power cut. PostgreSQL
is used through asyncpg when `database.url` names it; the code above this module is the same for both.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from kernel import paths

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
BUSY_TIMEOUT_S = 30.0  # default of database.busy_timeout_s


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message names the thing, the value and the fix."""


@dataclass(slots=True)
class Database:
    engine: AsyncEngine
    sessions: async_sessionmaker[Any]
    url: str
    dialect: str
    sqlite_path: Path | None

    async def dispose(self) -> None:
        await self.engine.dispose()


def database_url(configured: str) -> str:
    """`database.url`, else the SQLite file `heedful.db` in the data dir."""
    if configured:
        return configured
    return f"sqlite+aiosqlite:///{paths.data_dir() / 'heedful.db'}"


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    if not parsed.database or parsed.database == ":memory:":
        raise StoreError(f"database.url {url!r} is an in-memory SQLite database: give a file path so nothing is lost")
    return Path(parsed.database)


def _check_sqlite_file(path: Path) -> None:
    """Refuse a read-only, locked-for-good or corrupt database before anything is written to it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the directory for database {path}: {exc.strerror}") from None
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(f"database {path} is not readable and writable by this user: fix its permissions")
    if not os.access(path.parent, os.W_OK):
        raise StoreError(
            f"directory {path.parent} is read-only: SQLite needs to write its journal beside {path.name}; "
            "fix the permissions or set HEEDFUL_DATA_DIR"
        )
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
        try:
            row = conn.execute("PRAGMA quick_check").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(
            f"database {path} is corrupt or not a SQLite file ({exc}): move it aside (Heedful then starts a new "
            "one) or restore it from a backup"
        ) from None
    if row is None or row[0] != "ok":
        raise StoreError(
            f"database {path} failed its integrity check ({row[0] if row else 'no answer'}): move it aside or "
            "restore it from a backup"
        )


def _on_sqlite_connect(busy_timeout_s: float, dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={round(busy_timeout_s * 1000)}")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


async def open_database(
    configured_url: str = "", *, upgrade: bool = True, busy_timeout_s: float = BUSY_TIMEOUT_S
) -> Database:
    """Connect, check and (by default) upgrade the schema to the newest revision."""
    url = database_url(configured_url)
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise StoreError(
            f"database.url {url!r} is not a database URL ({exc}): use sqlite+aiosqlite:///PATH or "
            "postgresql+asyncpg://USER@HOST/DB"
        ) from None
    backend = parsed.get_backend_name()
    if backend == "sqlite" and parsed.get_driver_name() != "aiosqlite":
        url = str(parsed.set(drivername="sqlite+aiosqlite"))
    elif backend == "postgresql" and parsed.get_driver_name() != "asyncpg":
        url = str(parsed.set(drivername="postgresql+asyncpg"))
    elif backend not in ("sqlite", "postgresql"):
        raise StoreError(f"database.url {url!r} names {backend!r}: Heedful supports sqlite and postgresql")
    sqlite_path = _sqlite_file(url)
    if sqlite_path is not None:
        _check_sqlite_file(sqlite_path)
        engine = create_async_engine(url, connect_args={"timeout": busy_timeout_s})
        event.listen(engine.sync_engine, "connect", functools.partial(_on_sqlite_connect, busy_timeout_s))
    else:
        engine = create_async_engine(url, pool_pre_ping=True)
    db = Database(
        engine=engine,
        sessions=async_sessionmaker(engine, expire_on_commit=False),
        url=url,
        dialect=backend,
        sqlite_path=sqlite_path,
    )
    try:
        if upgrade:
            await upgrade_schema(db)
        else:
            async with engine.connect():
                pass
    except StoreError:
        await engine.dispose()
        raise
    except Exception as exc:
        await engine.dispose()
        where = sqlite_path or parsed.render_as_string(hide_password=True)
        raise StoreError(f"cannot open the database at {where}: {exc}") from None
    return db


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None
    return head


async def upgrade_schema(db: Database, revision: str = "head") -> None:
    """Bring the schema to `revision` (the server and the worker do this on start).

    SQLite runs DDL outside a transaction, so two processes opening a fresh file at once (two editor
    windows, a server and its worker) would both create the first tables and one would fail with "table
    already exists": they take turns on a lock file beside the database (`<file>.upgrade-lock`)."""

    def run(connection: Connection) -> None:
        command.upgrade(_alembic_config(connection), revision)

    if db.sqlite_path is None:
        async with db.engine.begin() as conn:
            await conn.run_sync(run)
        return
    lock = db.sqlite_path.with_name(db.sqlite_path.name + ".upgrade-lock")
    with lock.open("a+b") as fh:
        await asyncio.to_thread(fcntl.flock, fh.fileno(), fcntl.LOCK_EX)
        try:
            async with db.engine.begin() as conn:
                await conn.run_sync(run)
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


async def current_revision(db: Database) -> str | None:
    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    async with db.engine.connect() as conn:
        return await conn.run_sync(read)
