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
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from server.engine import AdapterRef, Engine, EngineError, create_engine
from server.engine.tokens import LocalTokenizer
from server.metrics import ServingMetrics
from server.model_prep import ModelError, verify_model
from server.settings import ResolvedSettings, Settings, resolve
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
        return EngineStatus(self._state, self._message, self.settings.engine.mode, model)

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
        self.metrics = ServingMetrics()  # counted always; exposed only with `heedful serve --metrics-port`

    @classmethod
    async def open(cls, config_path: Path | None, *, engine: Engine | None = None) -> Services:
        """Resolve the global settings, check the model, open the store, start the engine (in the background)."""
        base = resolve(config_path)
        settings = base.settings
        model_path = settings.model_path()
        verify_model(model_path, checksums=False)  # a missing or broken folder fails here, with the fix
        tokenizer = LocalTokenizer(model_path)
        store = await RolloutStore.open(settings, tokenize=tokenizer.encode)
        host = EngineHost(settings, engine)
        host.start()
        return cls(config_path, base, host, store, tokenizer)

    def resolve(self, developer: str, team: str | None) -> ResolvedSettings:
        return resolve(self.config_path, developer=developer, team=team)

    def adapter_for(self, developer: str, team: str | None) -> AdapterRef | None:
        """The adapter serving this developer; none until a trained adapter is published for them."""
        return None

    async def close(self) -> None:
        self.metrics.close()
        try:
            await self.store.close()
        finally:
            await self.engine.close()
