"""One training worker per store: real `heedful train` processes on one SQLite store, the lock an flock.

A second looping worker stands by while the first runs and takes over when it is killed; a `--once`
worker refuses to start, naming the holder. The lock is named after the store, however its URL is
spelled, and never carries a password.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from personalization.trainer_lock import TrainerLock, store_key
from tests.procs import ROOT, run_heedful


def test_one_lock_per_store_however_its_url_is_spelled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    locks = tmp_path / "locks"
    first = TrainerLock(f"sqlite+aiosqlite:///{tmp_path / 'heedful.db'}", locks_dir=locks)
    same = TrainerLock("sqlite:///heedful.db", locks_dir=locks)  # relative to the working directory
    other = TrainerLock(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}", locks_dir=locks)
    assert same.path == first.path != other.path
    assert first.try_acquire() and first.held
    assert not same.try_acquire() and not same.held  # a second open file: flock refuses it
    assert first.holder().startswith(f"pid {os.getpid()} on ")
    assert other.try_acquire()  # another store trains on its own
    first.release()
    assert same.try_acquire()
    same.release()
    other.release()
    assert store_key("postgresql+asyncpg://heedful:s3cret@db.example:5432/heedful") == (
        "postgresql://heedful@db.example:5432/heedful"
    )


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_a_second_worker_stands_by_and_takes_over_and_once_refuses(
    tmp_path: Path, small_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEEDFUL_DATA_DIR", str(tmp_path / "data"))  # the lock file lives in the data dir
    db = tmp_path / "heedful.db"
    config = tmp_path / "heedful.toml"
    config.write_text(
        f'[model]\npath = "{small_model}"\n\n[database]\nurl = "sqlite+aiosqlite:///{db}"\n\n'
        "[training]\nnice = 0\nthreads = 1\n"
    )
    lock = TrainerLock(f"sqlite+aiosqlite:///{db}")
    logs = [tmp_path / "first.log", tmp_path / "second.log"]

    def start(log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "server.cli", "--config", str(config), "train", "--interval", "1"],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    first = start(logs[0])
    second: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: lock.holder().startswith(f"pid {first.pid} "), 120, "the first worker to take the lock")
        second = start(logs[1])
        wait_for(lambda: "standing by" in logs[1].read_text(), 120, "the second worker to stand by")
        assert lock.holder().startswith(f"pid {first.pid} ")

        once = run_heedful(config, "train", "--once")
        assert once.returncode == 1, once.stderr
        assert f"another training worker (pid {first.pid} on " in once.stderr and str(lock.path) in once.stderr

        first.send_signal(signal.SIGKILL)  # a crash releases the lock with the process
        first.wait(30)
        wait_for(lambda: "trains the store now" in logs[1].read_text(), 60, "the second worker to take over")
        assert lock.holder().startswith(f"pid {second.pid} ")
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    for log in logs:
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
