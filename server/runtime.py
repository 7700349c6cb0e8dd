"""What every LSP connection of one `heedful serve` process shares: settings, engine, store, tokenizer.

The engine starts in the background (an embedded vLLM takes half a minute), so the server answers
`initialize` at once and reports `loading`, then `ready` or `failing`, through `EngineHost` listeners.
A request that meets a failing engine answers nothing; a later success marks it ready again.

This module wires parts together; it holds no LSP logic (that is `lsp_handlers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from kernel import paths
from kernel.settings import ResolvedSettings, Settings, SettingsError, resolve
from server.engine import Engine, EngineError, create_engine
from server.engine.tokens import LocalTokenizer
from server.guards import Guardian
from server.learning import STALE_S, LearningMonitor
from server.metrics import ServingMetrics
from server.model_prep import ModelError, verify_model
from server.registry import AdapterRegistry
from server.stores import open_store, write_policy
from server.trainer_child import TrainingChild, train_command
from storage.models import utcnow
from storage.repositories import EventRepository, TrainingStatusRepository
from storage.store import RolloutStore

log = logging.getLogger(__name__)


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    FAILING = "failing"


@dataclass(frozen=True, slots=True)
class EngineStatus:
    state: EngineState
    message: str | None
    kind: str
    model: str
    # Once the engine is up: "merged" or "multi-lora", and why merging is off where it was asked for
    # (`EngineInfo.adapter_serving`).
    adapter_serving: str | None = None
    adapter_serving_reason: str | None = None


Listener = Callable[[EngineStatus], None]
RETRY_REMOTE_S = 5.0


class EngineHost:
    """Owns the engine: starts it in the background and tells listeners how it is doing."""

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        self._engine = engine
        self._state = EngineState.LOADING
        self._message: str | None = "the engine is starting"
        self._listeners: set[Listener] = set()
        self._task: asyncio.Task[None] | None = None
        self._started = False

    @property
    def status(self) -> EngineStatus:
        model = self.settings.model.name or str(self.settings.model_path())
        serving: str | None = None
        reason: str | None = None
        if self._started and self._engine is not None:
            info = self._engine.info()
            serving, reason = info.adapter_serving, info.adapter_serving_reason
        return EngineStatus(self._state, self._message, self.settings.engine.mode, model, serving, reason)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.add(listener)
        return lambda: self._listeners.discard(listener)

    def _set(self, state: EngineState, message: str | None) -> None:
        if (state, message) == (self._state, self._message):
            return
        self._state, self._message = state, message
        status = self.status
        for listener in list(self._listeners):
            try:
                listener(status)
            except Exception:
                log.exception("a status listener failed")

    def start(self) -> None:
        """Start the engine in the background; `status` says when it is ready."""
        if self._task is None:
            self._task = asyncio.create_task(self._start(), name="engine-start")

    async def _start(self) -> None:
        while True:
            try:
                if self._engine is None:
                    self._engine = create_engine(self.settings)
                await self._engine.start()
                break
            except (EngineError, ModelError, OSError) as exc:
                log.error("the engine could not start: %s", exc)
                self._set(EngineState.FAILING, str(exc))
            except Exception as exc:  # an engine bug must not take the server down with it
                log.exception("the engine could not start")
                self._set(EngineState.FAILING, f"the engine could not start: {exc}")
            if self.settings.engine.mode != "remote":
                return  # an embedded engine that failed to load will not load on a second try
            # A remote server may come up later (or come back): keep trying, quietly.
            await asyncio.sleep(RETRY_REMOTE_S)
        log.info("engine ready (%s, %s)", self.settings.engine.mode, self.status.model)
        self._started = True
        self._set(EngineState.READY, None)

    def ready(self) -> Engine | None:
        """The engine when it can serve: started (a failing one is retried: it may have recovered)."""
        return self._engine if self._started else None

    def report_failure(self, reason: str) -> None:
        self._set(EngineState.FAILING, reason)

    def report_success(self) -> None:
        if self._started:
            self._set(EngineState.READY, None)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._engine is not None:
            await self._engine.close()


def arm_of(developer_id: str, arms: Sequence[str]) -> str:
    """The developer's experiment arm: a stable hash of the id picks one of `arms` (equal shares)."""
    if not arms:
        raise ValueError("experiment.arms is empty: name at least one arm")
    digest = hashlib.sha256(developer_id.encode("utf-8", "surrogatepass")).digest()
    return arms[int.from_bytes(digest[:8], "big") % len(arms)]


CORRECTIONS_TTL_S = 5.0


class RecordingPaused(SettingsError):
    """A developer's settings (their team's file, or the global file) cannot be resolved.

    Completions may still be served, but the store records nothing of a session that starts now until the
    file is fixed: recording it under the global settings instead would drop what the broken file sets,
    such as a team's `store_prompts = false` or its redaction patterns. Sessions already running keep the
    settings in force.
    """

    def __init__(self, cause: SettingsError, developer: str, team: str | None) -> None:
        who = f"developer {developer!r}" + (f", team {team!r}" if team else "")
        super().__init__(
            cause.source,
            cause.key,
            cause.value,
            f"{cause.allowed}; nothing of the new sessions of {who} is recorded until the file is fixed",
        )


class Services:
    """The shared parts of one server process."""

    def __init__(
        self,
        config_path: Path | None,
        base: ResolvedSettings,
        engine: EngineHost,
        store: RolloutStore,
        tokenizer: LocalTokenizer,
    ) -> None:
        self.config_path = config_path
        self.base = base
        self.engine = engine
        self.store = store
        self.tokenizer = tokenizer
        self.vocabulary = tokenizer.vocabulary()
        settings = base.settings
        self.adapters = AdapterRegistry(
            store, engine.ready, capacity=settings.engine.max_loras, poll_s=settings.engine.adapter_poll_s
        )
        self._corrections: dict[str, tuple[float, int, list[str]]] = {}
        self.guardian = Guardian(store, settings.thresholds)
        self.learning = LearningMonitor(store)
        self.training: TrainingChild | None = None
        if settings.training.in_server:
            log_path = Path(settings.logging.file).with_suffix(".train.log") if settings.logging.file else None
            self.training = TrainingChild(
                train_command(config_path, settings.training.interval_s),
                log_path or paths.data_dir() / "logs" / "train.log",
            )
        self.metrics = ServingMetrics()  # counted always; exposed only with `heedful serve --metrics-port`
        # A session that starts without `resolve` having run for it still gets its own privacy settings.
        store.resolve_settings = self._resolve_quietly

    @classmethod
    async def open(cls, config_path: Path | None, *, engine: Engine | None = None) -> Services:
        """Resolve the global settings, check the model, open the store, start the engine (in the background)."""
        base = resolve(config_path)
        settings = base.settings
        model_path = settings.model_path()
        verify_model(model_path, checksums=False)  # a missing or broken folder fails here, with the fix
        tokenizer = LocalTokenizer(model_path)
        store = await open_store(settings, tokenize=tokenizer.encode)
        host = EngineHost(settings, engine)
        host.start()
        services = cls(config_path, base, host, store, tokenizer)
        services.adapters.start()
        services.guardian.start()
        services.learning.start()
        if services.training is not None:
            services.training.start()
        return services

    def resolve(self, developer: str, team: str | None) -> ResolvedSettings:
        """Resolve a developer's settings, and make them what the store keeps of their sessions' writes
        (redaction patterns of the global file, the team file and developer tables; `store_prompts`).

        A file that cannot be used raises `RecordingPaused` (a `SettingsError` naming the file, key and
        value): the store records nothing of the sessions that start while it is broken.
        """
        try:
            resolved = resolve(self.config_path, developer=developer, team=team)
        except SettingsError as exc:
            self.store.settings_broken(developer, team, str(exc))
            raise RecordingPaused(exc, developer, team) from None
        self.store.settings_resolved(developer, team, write_policy(resolved.settings))
        return resolved

    def _resolve_quietly(self, developer: str, team: str | None) -> None:
        """`resolve` for the store, which needs only the outcome (it records it); an error is logged."""
        try:
            self.resolve(developer, team)
        except SettingsError as exc:
            log.error("settings for developer %r, team %r: %s", developer, team, exc)

    async def corrections_of(self, developer: str, limit: int) -> list[str]:
        """The developer's latest corrections (for the prompt-injection baseline), cached for a few seconds."""
        cached = self._corrections.get(developer)
        if cached is not None and time.monotonic() - cached[0] < CORRECTIONS_TTL_S and cached[1] == limit:
            return cached[2]
        async with self.store.unit() as s:
            notes = await EventRepository(s).latest_corrections(developer, limit)
        self._corrections[developer] = (time.monotonic(), limit, notes)
        return notes

    def request_started(self) -> None:
        """A completion request is in flight: the in-server training worker yields the CPU."""
        if self.training is not None:
            self.training.request_started()

    def request_finished(self) -> None:
        if self.training is not None:
            self.training.request_finished()

    def forget_corrections(self, developer: str) -> None:
        """A new correction was recorded: the next completion reads them again."""
        self._corrections.pop(developer, None)

    async def training_round_running(self) -> bool:
        """Whether this server's own training worker is in a round (one whose progress is not stale)."""
        if self.training is None:
            return False
        since = utcnow() - timedelta(seconds=STALE_S)
        async with self.store.unit() as s:
            return await TrainingStatusRepository(s).running(since) > 0

    async def close(self) -> None:
        self.metrics.close()
        try:
            if self.training is not None:
                await self.training.close()
            await self.guardian.close()
            await self.learning.close()
            await self.adapters.close()
            await self.store.close()
        finally:
            await self.engine.close()
