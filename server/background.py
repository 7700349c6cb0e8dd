"""The server's background loops: work repeated every few seconds until the server closes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def every(
    seconds: float, work: Callable[[], Awaitable[object]], failed: str, *, wait_first: bool = False
) -> None:
    """Run `work` every `seconds` until cancelled (after a first wait with `wait_first`). A pass that fails
    is logged, with `failed` saying what it means for serving, and the next one runs as planned."""
    if wait_first:
        await asyncio.sleep(seconds)
    while True:
        try:
            await work()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s", failed)
        await asyncio.sleep(seconds)
