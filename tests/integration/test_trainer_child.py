"""The in-server training worker yields to serving: a real child process is stopped while requests are
in flight, continued once they are idle, given a slice of CPU when requests never stop, started again
when it dies, and stopped with the server."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from server import trainer_child
from server.trainer_child import TrainingChild, train_command

BUSY = [sys.executable, "-c", "import time\nwhile True: time.sleep(0.01)"]


def state(pid: int) -> str:
    """The process state letter from /proc: T when stopped, S or R when running."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


async def settles(pid: int, states: str) -> str:
    """The process state once a signal has taken effect (delivery is asynchronous)."""
    for _ in range(40):
        now = state(pid)
        if now in states:
            return now
        await asyncio.sleep(0.025)
    return state(pid)


async def started(child: TrainingChild) -> int:
    for _ in range(100):
        if child.proc is not None and child.proc.returncode is None:
            return child.proc.pid
        await asyncio.sleep(0.05)
    raise AssertionError("the child did not start")


async def test_requests_in_flight_stop_the_worker_and_idleness_continues_it(tmp_path: Path) -> None:
    child = TrainingChild(BUSY, tmp_path / "train.log")
    child.start()
    try:
        pid = await started(child)
        assert state(pid) in "RS"
        child.request_started()
        child.request_started()
        assert await settles(pid, "T") == "T" and child.paused
        child.request_finished()
        await asyncio.sleep(trainer_child.IDLE_RESUME_S + 0.2)
        assert state(pid) == "T"  # one request is still in flight
        child.request_finished()
        child.request_started()  # a new keystroke before the idle delay: still stopped
        child.request_finished()
        await asyncio.sleep(trainer_child.IDLE_RESUME_S)
        assert await settles(pid, "RS") in "RS" and not child.paused
        assert child.pauses == 1
    finally:
        await child.close()
    assert child.proc is not None and child.proc.returncode is not None


async def test_a_never_idle_server_still_lets_the_worker_run_now_and_then(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(trainer_child, "MAX_PAUSE_S", 1.0)
    monkeypatch.setattr(trainer_child, "STARVATION_RUN_S", 1.0)
    child = TrainingChild(BUSY, tmp_path / "train.log")
    child.start()
    try:
        pid = await started(child)
        child.request_started()  # and it never finishes
        seen = set()
        for _ in range(60):
            seen.add(state(pid))
            await asyncio.sleep(0.05)
        assert {"T"} < seen, seen  # stopped, but continued for a while within 3 s
        assert child.pauses >= 2
    finally:
        await child.close()


async def test_a_worker_that_dies_is_started_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_child, "RESTART_DELAY_S", 0.2)
    child = TrainingChild([sys.executable, "-c", "print('round done')"], tmp_path / "train.log")
    child.start()
    try:
        await asyncio.sleep(3.0)
        assert (tmp_path / "train.log").read_text().count("round done") >= 2
    finally:
        await child.close()


def test_the_child_is_heedful_train_on_the_servers_settings(tmp_path: Path) -> None:
    config = tmp_path / "heedful.toml"
    assert train_command(config, 30.0) == [
        sys.executable, "-m", "server.cli", "--config", str(config), "train", "--interval", "30.0",
    ]  # fmt: skip
    assert train_command(None, 5.0)[-3:] == ["train", "--interval", "5.0"]
