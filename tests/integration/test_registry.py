"""The adapter registry against real engines (the session's vLLM server, and the embedded engine) and a
real SQLite store: scopes resolve developer -> team -> base, adapters load on first use within the
engine's slots with least-recently-used eviction of idle ones, and a swap unloads the old version after
its last request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from personalization.publish import publish_adapter
from server.engine import Engine
from server.registry import AdapterRegistry
from server.settings import Settings
from storage.repositories import Scope
from storage.store import RolloutStore
from tests.conftest import make_lora_adapter

pytestmark = [pytest.mark.engine]


@pytest.fixture(params=["remote", "embedded"])
def engine(request: pytest.FixtureRequest) -> Engine:
    """The registry works the same on a remote vLLM server and on the engine inside this process."""
    found: Engine = request.getfixturevalue(f"{request.param}_engine")
    return found


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[RolloutStore]:
    settings = Settings()
    settings.database.url = f"sqlite+aiosqlite:///{tmp_path / 'heedful.db'}"
    st = await RolloutStore.open(settings)
    yield st
    await st.close()


@pytest.fixture(scope="module")
def loras(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("registry-loras")
    return [make_lora_adapter(small_model, root / f"l{i}", seed=20 + i) for i in range(4)]


async def publish(store: RolloutStore, scope: Scope, source: Path, root: Path) -> str:
    result = await publish_adapter(store, scope, source, step=1, kl=0.0, metrics={}, adapters_root=root, gate=None)
    return result.version_id


async def test_scopes_resolve_and_idle_adapters_are_evicted_least_recently_used_first(
    store: RolloutStore,
    engine: Engine,
    loras: list[Path],
    tmp_path: Path,
) -> None:
    v_a = await publish(store, Scope.developer("ann"), loras[0], tmp_path)
    v_b = await publish(store, Scope.developer("bob"), loras[1], tmp_path)
    v_team = await publish(store, Scope.team("web"), loras[2], tmp_path)
    registry = AdapterRegistry(store, lambda: engine, capacity=2)
    assert set(await registry.refresh()) == {Scope.developer("ann"), Scope.developer("bob"), Scope.team("web")}
    before = set(await engine.loaded_adapters())

    def version_for(developer: str, team: str | None) -> str | None:
        found = registry.active_version(developer, team)
        return found.version_id if found else None

    assert version_for("ann", "web") == v_a  # her own adapter before her team's
    assert version_for("cat", "web") == v_team
    assert version_for("cat", None) is None
    base = await registry.acquire("cat", None)
    assert base.ref is None and base.version_id is None
    base.release()

    for developer, team in (("ann", None), ("bob", None)):
        lease = await registry.acquire(developer, team)
        assert lease.ref is not None
        lease.release()
    assert set(registry.loaded()) == {v_a, v_b}
    # A third scope: the least recently used idle adapter (ann's) makes room.
    lease = await registry.acquire("cat", "web")
    assert lease.version_id == v_team
    assert set(registry.loaded()) == {v_b, v_team}
    # Both slots busy: the next load waits until one is released.
    bob = await registry.acquire("bob", None)
    waiting = asyncio.create_task(registry.acquire("ann", None))
    await asyncio.sleep(1.0)
    assert not waiting.done()
    lease.release()
    ann = await asyncio.wait_for(waiting, 60)
    assert ann.version_id == v_a and set(registry.loaded()) == {v_a, v_b}
    loaded_now = set(await engine.loaded_adapters()) - before
    assert len(loaded_now) == 2
    ann.release()
    bob.release()
    await registry.close()  # unloads what it loaded
    assert not loaded_now & set(await engine.loaded_adapters())


async def test_a_swap_keeps_the_old_version_for_requests_in_flight_then_unloads_it(
    store: RolloutStore,
    engine: Engine,
    loras: list[Path],
    tmp_path: Path,
) -> None:
    scope = Scope.developer("dan")
    old = await publish(store, scope, loras[0], tmp_path)
    registry = AdapterRegistry(store, lambda: engine, capacity=2)
    changes: list[tuple[Scope, str | None]] = []
    registry.subscribe(lambda sc, v: changes.append((sc, v)))
    await registry.refresh()
    in_flight = await registry.acquire("dan", None)
    old_name = in_flight.ref.name if in_flight.ref else ""
    new = await publish(store, scope, loras[3], tmp_path)
    await registry.refresh()
    # New requests get the new version, loaded before routing; the old one stays for its request.
    after = await registry.acquire("dan", None)
    assert after.version_id == new and in_flight.version_id == old
    assert registry.loaded() == {old: 1, new: 1}
    assert old_name in await engine.loaded_adapters()
    in_flight.release()
    for _ in range(50):
        if old_name not in await engine.loaded_adapters():
            break
        await asyncio.sleep(0.1)
    assert old_name not in await engine.loaded_adapters()
    assert registry.loaded() == {new: 1}
    assert changes == [(scope, old), (scope, new)]
    after.release()
    await registry.close()
    assert not [n for n in await engine.loaded_adapters() if n.endswith(new)]
