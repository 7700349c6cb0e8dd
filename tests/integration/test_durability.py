"""Kill the writer's process with SIGKILL at a random moment: every acknowledged write is in the database
and the database is intact."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from kernel.settings import Settings
from server.stores import open_store
from storage.models import Event


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_acknowledged_writes_survive_sigkill(database_url: str, seed: int) -> None:
    rng = random.Random(seed)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.durability_child", database_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "READY", proc.stderr.read() if proc.stderr else ""
    import threading

    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)  # type: ignore[union-attr]
    reader.start()
    kill_after = rng.uniform(0.3, 2.0)
    time.sleep(kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join(timeout=10)
    acked: set[int] = set()
    for line in lines:
        if (
            line.startswith("ACK ") and line.endswith("\n") and line[4:-1].isdigit()
        ):  # a line cut by the kill is not an ack
            acked.add(int(line[4:-1]))
    assert len(acked) > 50, f"the child acknowledged only {len(acked)} writes before the kill"

    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[1]
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()
    s = Settings()
    s.database.url = database_url
    store = await open_store(s)
    try:
        async with store.unit() as session:
            stored = set(await session.scalars(select(Event.accepted_length).where(Event.session_id == "dur")))
    finally:
        await store.close()
    missing = acked - stored
    assert not missing, f"{len(missing)} acknowledged writes were lost, e.g. {sorted(missing)[:5]}"
    print(f"killed after {kill_after:.2f} s: {len(acked)} acknowledged, {len(stored)} stored")
