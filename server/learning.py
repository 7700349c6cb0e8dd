"""What learning is doing for a developer, for `heedful/status`: collecting feedback toward the next
round, training one (phase, step of steps), or paused by a guard or an admin, and how the last round ended.

The training worker writes where it stands per scope (`storage.models.TrainingStatus`, refreshed while a
round runs) and the rollouts it has collected; `LearningMonitor` reads both for the scopes of the
connected developers every `POLL_S` and tells its listeners which scopes changed. It reads the store,
not the worker's process, so a developer sees the same thing whether their own `heedful serve` trains
(`training.in_server`) or a team's worker on another machine does.

`learning_state` is pure: it turns what the store says into the state the editor shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server.background import every
from storage.models import TrainingStatus, as_utc, utcnow
from storage.repositories import RolloutRepository, Scope, ScopeControlRepository, TrainingStatusRepository
from storage.store import RolloutStore

log = logging.getLogger(__name__)

POLL_S = 2.0
# A round writes its progress at least every `personalization.worker.PROGRESS_BEAT_S`; one not heard of
# for this long died (killed, or its machine went away) and is not shown as training.
STALE_S = 300.0

Listener = Callable[[Scope], None]


@dataclass(frozen=True, slots=True)
class ScopeFacts:
    """What the store says of one scope's learning (a copy: no database row outlives its query)."""

    pending: int  # rollouts collected and not trained on yet
    paused: str | None = None  # why training is paused, when it is
    running: bool = False  # a round runs now (its worker wrote its progress within STALE_S)
    phase: str | None = None
    step: int | None = None
    steps: int | None = None
    rollouts: int | None = None
    last_status: str | None = None
    last_reason: str | None = None
    last_version: str | None = None
    last_finished_at: datetime | None = None
    recording_paused: bool = False  # the developer paused recording: their sessions store nothing


def scope_facts(
    pending: int, paused: str | None, status: TrainingStatus | None, now: datetime, *, recording_paused: bool = False
) -> ScopeFacts:
    if status is None:
        return ScopeFacts(pending, paused, recording_paused=recording_paused)
    running = status.phase is not None and (now - as_utc(status.updated_at)).total_seconds() < STALE_S
    return ScopeFacts(
        pending,
        paused,
        running,
        status.phase if running else None,
        status.step if running else None,
        status.steps if running else None,
        status.rollouts if running else None,
        status.last_status,
        status.last_reason,
        status.last_version,
        as_utc(status.last_finished_at) if status.last_finished_at else None,
        recording_paused,
    )


def learning_state(facts: ScopeFacts, *, needed: int, in_server: bool) -> dict[str, Any]:
    """The `learning` object of `heedful/status` for a developer whose adapter scope has these facts.

    state: `training` (a round runs: phase, step, steps), `paused` (reason), or `collecting` (feedback of
    needed before the next round). `trainer` says who trains: this server (`in-server`) or a separate
    `heedful train` worker (`worker`). `lastRound` is how the last round ended, when there was one.
    `recording` is "paused" while the developer has paused recording (absent otherwise).
    """
    out: dict[str, Any] = {
        "trainer": "in-server" if in_server else "worker",
        "feedback": facts.pending,
        "needed": needed,
    }
    if facts.paused is not None:
        out.update(state="paused", reason=facts.paused)
    elif facts.running:
        out.update(state="training", phase=facts.phase, step=facts.step, steps=facts.steps, rollouts=facts.rollouts)
    else:
        out["state"] = "collecting"
    if facts.recording_paused:
        out["recording"] = "paused"
    if facts.last_status is not None:
        out["lastRound"] = {
            "status": facts.last_status,
            "reason": facts.last_reason,
            "version": facts.last_version,
            "finishedAt": facts.last_finished_at.isoformat() if facts.last_finished_at else None,
        }
    return out


class LearningMonitor:
    """Follows the learning facts of the scopes someone watches; tells listeners which scopes changed."""

    def __init__(self, store: RolloutStore, poll_s: float = POLL_S) -> None:
        self._store = store
        self.poll_s = poll_s
        self._watchers: dict[Scope, int] = {}
        self._facts: dict[Scope, ScopeFacts] = {}
        self._listeners: set[Listener] = set()
        self._task: asyncio.Task[None] | None = None

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def watch(self, scope: Scope) -> Callable[[], None]:
        """Follow `scope` until the returned function is called (a session watches its developer's scope)."""
        self._watchers[scope] = self._watchers.get(scope, 0) + 1
        done = False

        def unwatch() -> None:
            nonlocal done
            if done:
                return
            done = True
            left = self._watchers.get(scope, 0) - 1
            if left > 0:
                self._watchers[scope] = left
            else:
                self._watchers.pop(scope, None)
                self._facts.pop(scope, None)

        return unwatch

    def facts(self, scope: Scope) -> ScopeFacts | None:
        return self._facts.get(scope)

    def recording_paused(self, scope: Scope) -> bool:
        """Whether the developer of `scope` paused recording, as last read (False until first read)."""
        facts = self._facts.get(scope)
        return facts is not None and facts.recording_paused

    async def first_read(self, scope: Scope) -> None:
        """Read a newly watched scope's facts now, telling no listener: a session's first status carries
        them, instead of a second status a poll later (whose timing a recorded session would depend on)."""
        if scope in self._facts or scope not in self._watchers:
            return
        facts = await self._read([scope])
        if scope in self._watchers:
            self._facts.setdefault(scope, facts[scope])

    async def _read(self, scopes: list[Scope]) -> dict[Scope, ScopeFacts]:
        async with self._store.unit() as s:
            statuses = await TrainingStatusRepository(s).of(scopes)
            controls = ScopeControlRepository(s)
            paused = await controls.paused()
            unrecorded = await controls.recording_paused()
            pending = {sc: await RolloutRepository(s).count_pending(sc) for sc in scopes}
            now = utcnow()
            return {
                sc: scope_facts(pending[sc], paused.get(sc), statuses.get(sc), now, recording_paused=sc in unrecorded)
                for sc in scopes
            }

    async def refresh(self) -> list[Scope]:
        """Read the watched scopes' facts; return the scopes whose facts changed."""
        scopes = list(self._watchers)
        if not scopes:
            return []
        facts = await self._read(scopes)
        scopes = [sc for sc in scopes if sc in self._watchers]  # some may have been unwatched meanwhile
        changed = [sc for sc in scopes if facts[sc] != self._facts.get(sc)]
        self._facts.update({sc: facts[sc] for sc in scopes})
        for sc in changed:
            for listener in list(self._listeners):
                try:
                    listener(sc)
                except Exception:
                    log.exception("a learning-state listener failed")
        return changed

    def start(self) -> None:
        if self._task is None:
            failed = "reading the training status failed; the editors keep the last known one"
            self._task = asyncio.create_task(every(self.poll_s, self.refresh, failed), name="learning-monitor")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
