"""Inference engines: one `Engine` interface, an embedded vLLM and a remote vLLM server."""

from __future__ import annotations

from kernel.settings import Settings
from server.engine.base import (
    AdapterError,
    AdapterRef,
    Candidate,
    Engine,
    EngineError,
    EngineInfo,
    Generation,
    Timing,
)


def create_engine(settings: Settings) -> Engine:
    """The engine `engine.mode` asks for (not started yet: await `start()`)."""
    if settings.engine.mode == "remote":
        from server.engine.remote import RemoteEngine

        return RemoteEngine(settings)
    from server.engine.embedded import EmbeddedEngine

    return EmbeddedEngine(settings)


__all__ = [
    "AdapterError",
    "AdapterRef",
    "Candidate",
    "Engine",
    "EngineError",
    "EngineInfo",
    "Generation",
    "Timing",
    "create_engine",
]
