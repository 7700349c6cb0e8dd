"""Start a throw-away PostgreSQL server (Debian's package) on a free local port: for tests and benches."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise PostgresUnavailable("PostgreSQL's server is not installed (no initdb): `make setup` installs it")
    return Path(found[-1]).parent


@contextmanager
def temporary_postgres() -> Iterator[str]:
    """Yield `postgresql+asyncpg://heedful@127.0.0.1:PORT`; the server and its files go away after."""
    bindir = pg_bin()
    # Not under pytest's 0700 temp root: the server may run as the postgres user, who must reach it.
    root = Path(tempfile.mkdtemp(prefix="heedful-pg-"))
    data = root / "data"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        pwd.getpwnam("postgres")
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise PostgresUnavailable(f"{cmd[0]} failed: {proc.stderr.strip()[-1000:]}")

    log = root / "server.log"
    started = False
    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "heedful", "--auth=trust", "-E", "UTF8")
        run(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "start",
        )
        started = True
        deadline = time.monotonic() + 30
        while (
            subprocess.run(
                [str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True, check=False
            ).returncode
            != 0
        ):
            if time.monotonic() > deadline:
                raise PostgresUnavailable(f"PostgreSQL did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.2)
        yield f"postgresql+asyncpg://heedful@127.0.0.1:{port}"
    finally:
        if started:
            run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)


def create_database(base_url: str, name: str) -> str:
    port = base_url.rsplit(":", 1)[1]
    subprocess.run(
        [str(pg_bin() / "createdb"), "-h", "127.0.0.1", "-p", port, "-U", "heedful", name],
        check=True,
        capture_output=True,
    )
    return f"{base_url}/{name}"
