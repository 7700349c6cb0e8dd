"""The training worker as a child of `heedful serve` (`training.in_server = true`): one process is the
whole product on a laptop.

The child is `heedful train` on the same settings file, so it trains exactly as a separate worker would
(low priority, capped threads, gates, atomic publishing); serving picks up what it publishes through the
adapter registry. Training yields to serving: while any completion request is in flight the child is
stopped (SIGSTOP) and it continues (SIGCONT) once requests have been idle for `IDLE_RESUME_S`. So that
a steady stream of requests cannot starve it forever (or hold a database lock it took for too long),
a child stopped for `MAX_PAUSE_S` runs for `STARVATION_RUN_S` before it is stopped again.

A child that exits is started again after `RESTART_DELAY_S`; on shutdown it is continued and asked to
stop (SIGTERM), then killed if it does not. Publishing is atomic, so a child killed at any moment
never leaves a half-written adapter in serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from kernel.paths import heedful_command

log = logging.getLogger(__name__)

IDLE_RESUME_S = 0.3
MAX_PAUSE_S = 10.0
STARVATION_RUN_S = 2.0
RESTART_DELAY_S = 30.0
STOP_TIMEOUT_S = 15.0


def train_command(config_path: Path | None, interval_s: float) -> list[str]:
    return heedful_command(config_path, "train", "--interval", str(interval_s))


class TrainingChild:
    """Runs `heedful train` beside serving and pauses it while requests are in flight."""

    def __init__(self, command: list[str], log_path: Path) -> None:
        self.command = command
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.paused_since: float | None = None
        self.pauses = 0
        self._busy = 0
        self._run_until = 0.0  # starvation relief: run regardless of requests until then
        self._resume_handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # --- process ---------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name="training-child")

    async def _supervise(self) -> None:
        while not self._closing:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as out:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
                )
            log.info("training worker started (pid %d), logging to %s", self.proc.pid, self.log_path)
            if self._busy:
                self._signal(signal.SIGSTOP)
            watchdog = asyncio.create_task(self._watch_starvation())
            try:
                code = await self.proc.wait()
            finally:
                watchdog.cancel()
            self.paused_since = None
            if self._closing:
                return
            log.error("the training worker exited with %s; starting it again in %.0f s", code, RESTART_DELAY_S)
            await asyncio.sleep(RESTART_DELAY_S)

    def _signal(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        if sig == signal.SIGSTOP:
            if self.paused_since is None:
                self.paused_since = time.monotonic()
                self.pauses += 1
        elif sig == signal.SIGCONT:
            self.paused_since = None

    async def _watch_starvation(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if self.paused_since is not None and now - self.paused_since > MAX_PAUSE_S:
                self._run_until = now + STARVATION_RUN_S
                self._signal(signal.SIGCONT)
            elif self.paused_since is None and self._busy and now >= self._run_until:
                self._signal(signal.SIGSTOP)

    # --- requests ----------------------------------------------------------------------------------------

    def request_started(self) -> None:
        self._busy += 1
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume_handle = None
        if time.monotonic() >= self._run_until:
            self._signal(signal.SIGSTOP)

    def request_finished(self) -> None:
        self._busy = max(0, self._busy - 1)
        if self._busy == 0 and self.paused_since is not None and self._resume_handle is None:
            self._resume_handle = asyncio.get_running_loop().call_later(IDLE_RESUME_S, self._resume_if_idle)

    def _resume_if_idle(self) -> None:
        self._resume_handle = None
        if self._busy == 0:
            self._signal(signal.SIGCONT)

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    async def close(self) -> None:
        self._closing = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self._signal(signal.SIGCONT)
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout=STOP_TIMEOUT_S)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await proc.wait()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
