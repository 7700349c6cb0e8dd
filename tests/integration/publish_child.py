"""Child process of the publish crash test: publishes one adapter and, at the named stage, prints
`STAGE <stage>` and stops there (sleeps) so the parent can SIGKILL it at exactly that point.

Usage: python -m tests.integration.publish_child DATABASE_URL ADAPTERS_ROOT SOURCE_DIR STAGE SCOPE
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from adapters.lifecycle import PublishStage, publish_adapter
from kernel.settings import Settings
from personalization.gates import GateResult
from server.stores import open_store
from storage.repositories import Scope


async def main(url: str, root: str, source: str, stop_at: str, scope: str) -> None:
    s = Settings()
    s.database.url = url
    store = await open_store(s)

    def hook(stage: PublishStage) -> None:
        if stage == stop_at:
            print(f"STAGE {stage}", flush=True)
            time.sleep(3600)  # blocks this thread (or the event loop): the parent kills us here

    result = await publish_adapter(
        store,
        Scope.parse(scope),
        Path(source),
        step=7,
        kl=0.25,
        metrics={"loss": 0.1},
        adapters_root=Path(root),
        gate=GateResult(True, [], {"kl": 0.25}),
        on_stage=hook,
    )
    print(f"DONE {result.version_id}", flush=True)
    await store.close()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
