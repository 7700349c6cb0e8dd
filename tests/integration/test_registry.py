"""The adapter registry against real engines (the session's vLLM server, and the embedded engine) and a
real SQLite store: scopes resolve developer -> team -> base, adapters load on first use within the
engine's slots with least-recently-used eviction of idle ones, and a swap unloads the old version after
its last request."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from adapters.lifecycle import MANIFEST, publish_adapter, rollback_scope, scope_dir
from kernel.settings import Settings
from server.engine import AdapterRef, Engine
from server.registry import AdapterRegistry, Lease
from server.stores import open_store
from storage.models import AuditEntry
from storage.repositories import AuditRepository, Scope
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
    st = await open_store(settings)
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


class GatedEngine:
    """The real engine, whose adapter loads wait until the test opens the gate: a load as slow as the test
    needs, so that something can happen in the store while it is in progress."""

    def __init__(self, engine: Engine, held: set[str] | None = None) -> None:
        self.engine = engine
        self.gate = asyncio.Event()
        self.loading = asyncio.Event()
        self.held = held  # the version ids whose loads wait for the gate (None: every version's)
        self.loads: list[str] = []  # the adapter names asked to load, in order

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    async def load_adapter(self, ref: AdapterRef) -> None:
        self.loads.append(ref.name)
        if self.held is None or any(ref.name.endswith(version) for version in self.held):
            self.loading.set()
            await self.gate.wait()
        await self.engine.load_adapter(ref)


async def test_a_version_rolled_back_while_it_loads_is_never_routed_to(
    store: RolloutStore,
    engine: Engine,
    loras: list[Path],
    tmp_path: Path,
) -> None:
    scope = Scope.developer("eve")
    old = await publish(store, scope, loras[0], tmp_path)
    gated = GatedEngine(engine)
    registry = AdapterRegistry(store, lambda: cast(Engine, gated), capacity=2)
    await registry.refresh()
    gated.gate.set()
    in_use = await registry.acquire("eve", None)  # the scope is in use: a new version is loaded before routing
    gated.gate.clear()
    gated.loading.clear()
    new = await publish(store, scope, loras[1], tmp_path)
    refreshing = asyncio.create_task(registry.refresh())
    await asyncio.wait_for(gated.loading.wait(), 30)
    async with store.unit() as s:  # an admin rolls the new version back while it loads
        rolled = await rollback_scope(s, scope, actor="test", reason="rolled back mid-load")
    assert rolled is not None and rolled.taken_out == new and rolled.active == old
    gated.gate.set()
    assert await asyncio.wait_for(refreshing, 60) == []
    version = registry.active_version("eve", None)
    assert version is not None and version.version_id == old
    lease = await registry.acquire("eve", None)
    assert lease.version_id == old and new not in registry.loaded()  # the loaded new one was unloaded again
    lease.release()
    in_use.release()
    await registry.close()


async def test_a_version_replaced_while_a_request_loads_it_is_unloaded_and_the_request_takes_the_new_one(
    store: RolloutStore,
    engine: Engine,
    loras: list[Path],
    tmp_path: Path,
) -> None:
    # A scope's first version is loaded by its first request; when the next version is published before
    # that load ends (a slow engine under load), the scope is routed straight to it and the first one
    # must not stay loaded for good once its load ends.
    scope = Scope.developer("fay")
    first = await publish(store, scope, loras[0], tmp_path)
    gated = GatedEngine(engine)
    registry = AdapterRegistry(store, lambda: cast(Engine, gated), capacity=2)
    await registry.refresh()
    before = set(await engine.loaded_adapters())
    requesting = asyncio.create_task(registry.acquire("fay", None))
    await asyncio.wait_for(gated.loading.wait(), 30)
    second = await publish(store, scope, loras[1], tmp_path)
    assert await registry.refresh() == [scope]  # routed at once: nothing of the scope was loaded yet
    gated.gate.set()
    lease = await asyncio.wait_for(requesting, 60)
    assert lease.version_id == second
    assert registry.loaded() == {second: 1}
    loaded = set(await engine.loaded_adapters()) - before
    assert [n for n in loaded if n.endswith(second)] and not [n for n in loaded if n.endswith(first)]
    lease.release()
    await registry.close()


async def test_a_rollback_to_a_version_a_request_still_loads_keeps_it_loaded_once(
    store: RolloutStore,
    engine: Engine,
    loras: list[Path],
    tmp_path: Path,
) -> None:
    # A request loads the scope's version; a new version is published meanwhile (the scope is routed to it
    # at once and the one loading is to be retired once loaded) and comes into use; then an admin rolls back
    # to the version still loading. Its load, once done, must serve the scope: not be retired, unloaded and
    # loaded a second time by the next request.
    scope = Scope.developer("gus")
    first = await publish(store, scope, loras[0], tmp_path)
    gated = GatedEngine(engine, held={first})
    registry = AdapterRegistry(store, lambda: cast(Engine, gated), capacity=3)
    await registry.refresh()
    requesting = asyncio.create_task(registry.acquire("gus", None))
    await asyncio.wait_for(gated.loading.wait(), 30)
    second = await publish(store, scope, loras[1], tmp_path)
    assert await registry.refresh() == [scope]
    on_second = await asyncio.wait_for(registry.acquire("gus", None), 60)  # loads at once: not held
    assert on_second.version_id == second
    async with store.unit() as s:
        rolled = await rollback_scope(s, scope, actor="test", reason="rolled back to the one loading")
    assert rolled is not None and rolled.taken_out == second and rolled.active == first
    refreshing = asyncio.create_task(registry.refresh())
    await asyncio.sleep(0.2)  # the refresh waits for the load of `first` in progress
    gated.gate.set()
    assert await asyncio.wait_for(refreshing, 60) == [scope]
    lease = await asyncio.wait_for(requesting, 60)
    assert lease.version_id == first
    again = await registry.acquire("gus", None)
    assert again.version_id == first
    assert len([n for n in gated.loads if n.endswith(first)]) == 1  # loaded once
    assert registry.loaded() == {first: 2, second: 1}  # `second` stays for its request in flight
    on_second.release()
    for _ in range(100):  # retired: unloaded once its last request ended
        if second not in registry.loaded():
            break
        await asyncio.sleep(0.05)
    assert registry.loaded() == {first: 2}
    lease.release()
    again.release()
    await registry.close()


async def refusals(store: RolloutStore) -> list[AuditEntry]:
    async with store.unit() as s:
        return [e for e in await AuditRepository(s).since() if e.action == "refuse_adapter"]


async def answers(engine: Engine, lease: Lease) -> bool:
    gen = await engine.generate("def add(a, b):\n    return", max_tokens=4, adapter=lease.ref)
    return bool(gen.candidates and gen.candidates[0].token_ids)


async def test_a_version_whose_weights_do_not_match_its_manifest_is_not_served(
    store: RolloutStore, engine: Engine, loras: list[Path], tmp_path: Path
) -> None:
    """One flipped byte in a published adapter's weights (its header intact, so only the manifest's
    sha256 can tell): the registry refuses that version, the previous one keeps serving, and the refusal
    is logged and audited once with the path and the fix. Repaired, the folder is checked again and served."""
    scope = Scope.developer("eve")
    good = await publish(store, scope, loras[0], tmp_path)
    registry = AdapterRegistry(store, lambda: engine, capacity=2)
    await registry.refresh()
    lease = await registry.acquire("eve", None)
    assert lease.version_id == good
    lease.release()

    bad = await publish(store, scope, loras[1], tmp_path)
    weights = scope_dir(tmp_path, scope) / bad / "adapter_model.safetensors"
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[-1] ^= 0x01
    weights.write_bytes(bytes(flipped))
    for _ in range(3):  # every poll sees the new active row; the folder is hashed, logged and audited once
        assert await registry.refresh() == []  # nothing changed in serving
    served = registry.active_version("eve", None)
    assert served is not None and served.version_id == good
    lease = await registry.acquire("eve", None)
    assert lease.version_id == good and await answers(engine, lease)
    lease.release()
    (entry,) = await refusals(store)
    assert entry.scope_kind == "developer" and entry.scope_id == "eve"
    assert entry.detail["version"] == bad and entry.detail["path"] == str(weights.parent)
    assert entry.reason is not None and "does not match its sha256" in entry.reason
    assert "heedful adapters rollback" in entry.reason

    # A scope whose only version is corrupt is served by the base model.
    lone = await publish(store, Scope.developer("fay"), loras[2], tmp_path)
    lone_weights = scope_dir(tmp_path, Scope.developer("fay")) / lone / "adapter_model.safetensors"
    lone_weights.write_bytes(lone_weights.read_bytes()[:-1] + b"\x7f")
    await registry.refresh()
    assert registry.active_version("fay", None) is None
    base = await registry.acquire("fay", None)
    assert base.ref is None and await answers(engine, base)
    assert {e.detail["version"] for e in await refusals(store)} == {bad, lone}

    # Repaired (the file changed again), the folder is checked again and the new version serves.
    weights.write_bytes(original)
    assert await registry.refresh() == [scope]
    lease = await registry.acquire("eve", None)
    assert lease.version_id == bad and await answers(engine, lease)
    lease.release()
    await registry.close()


async def test_a_published_folder_with_a_broken_safetensors_header_is_refused_and_serving_goes_on(
    store: RolloutStore, engine: Engine, loras: list[Path], tmp_path: Path
) -> None:
    """A folder whose manifest matches its files but whose weights' header lacks a tensor's byte range
    (written by hand, or by a broken tool): the registry's poll does not fail, the error names the file
    and the problem, and the version in use keeps answering."""
    scope = Scope.developer("gus")
    good = await publish(store, scope, loras[0], tmp_path)
    registry = AdapterRegistry(store, lambda: engine, capacity=2)
    await registry.refresh()
    in_use = await registry.acquire("gus", None)  # the scope is in use: the new version would be loaded at once

    broken = await publish(store, scope, loras[1], tmp_path)
    folder = scope_dir(tmp_path, scope) / broken
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    del header[next(k for k in header if k != "__metadata__")]["data_offsets"]
    raw = json.dumps(header).encode()
    weights.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + header_len :])
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][weights.name] = {
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "size": weights.stat().st_size,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest))

    await registry.refresh()  # must not raise
    assert await answers(engine, in_use) and in_use.version_id == good
    in_use.release()
    lease = await registry.acquire("gus", None)
    assert lease.version_id == good and await answers(engine, lease)
    lease.release()
    (entry,) = await refusals(store)
    assert entry.detail["version"] == broken and entry.reason is not None
    assert str(weights) in entry.reason and "has no data_offsets" in entry.reason
    await registry.close()
