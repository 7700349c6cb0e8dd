"""Subprocess helpers shared by tests and fixtures: free ports, a real `vllm serve`."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_heedful(config: Path, *args: str, cwd: Path = ROOT, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`heedful --config CONFIG ARGS...` run to its end from `cwd` (this checkout by default)."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "--config", str(config), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def in_session(sid: int) -> list[int]:
    """The living processes of session `sid` (a process started with `start_new_session` and every process
    it starts, however deep, unless one leaves the session: orphans keep it), read from /proc (Linux).
    Zombies (ended, not yet reaped) are not living."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        # "pid (name) state ppid pgrp session ...": the name may hold spaces and parentheses.
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == sid and state != "Z":
            found.append(int(entry.name))
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(proc: subprocess.Popen[bytes], url: str, log_file: Path, timeout_s: float = 600.0) -> None:
    """Wait for the server to list its models; fail at once, with its log, if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_file.read_text(errors='replace')[-3000:]}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    pytest.fail(f"vllm serve did not answer within {timeout_s:.0f} s:\n{log_file.read_text(errors='replace')[-3000:]}")
