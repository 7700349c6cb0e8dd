"""`heedful purge --developer` against training and publishing, on a real store (SQLite file and PostgreSQL)
with real peft adapters in a temporary data dir: a round that was running when its developer was purged
never publishes, and purge deletes only the folders Heedful wrote for that developer under the adapters
root (the version folders, what a dead publish left, the trainer's work folders), refusing any other path
a row names."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.lifecycle import (
    PublishStage,
    ScopePurgedError,
    clean_partial,
    publish_adapter,
    purge_mark,
    scope_dir,
    trainer_workdir,
    verify_published,
)
from kernel.settings import Settings
from personalization.gates import GateResult
from server.stores import open_store
from storage.repositories import AdapterRepository, PurgeRepository, Scope
from storage.store import RolloutStore, SessionStart
from tests.integration.test_publish import audit, rows

ALICE = Scope.developer("alice")
BOB = Scope.developer("bob")
WEB = Scope.team("web")
PASS = GateResult(True, [], {"kl": 0.1})


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The data dir of this test: `heedful purge` finds the adapters root there, as the worker does."""
    monkeypatch.setenv("HEEDFUL_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture
def root(data_dir: Path) -> Path:
    return data_dir / "adapters"


@pytest.fixture
async def store(database_url: str, data_dir: Path) -> AsyncIterator[RolloutStore]:
    s = Settings()
    s.database.url = database_url
    st = await open_store(s)
    await st.start_session(SessionStart("s1", "alice", "web"))
    await st.start_session(SessionStart("s2", "bob", "web"))
    yield st
    await st.close()


async def publish(store: RolloutStore, root: Path, source: Path, scope: Scope = ALICE, **kw: Any) -> Any:
    return await publish_adapter(store, scope, source, step=3, kl=0.1, metrics={}, adapters_root=root, gate=PASS, **kw)


async def test_a_purge_during_a_publish_wins(store: RolloutStore, root: Path, lora_adapters: tuple[Path, Path]) -> None:
    """The purge commits while the round's adapter is being written: the publish is refused in the
    transaction that would have activated it, its folder is removed, and nothing of alice stays on disk."""
    a, b = lora_adapters
    before = await publish(store, root, a)
    loop = asyncio.get_running_loop()
    purged: list[dict[str, Any]] = []

    def purge_now(stage: PublishStage) -> None:  # runs on the publish's writer thread
        if stage == "before_rename":
            done = asyncio.run_coroutine_threadsafe(store.purge_developer("alice", actor="cli:admin"), loop)
            purged.append(done.result(timeout=60))

    with pytest.raises(ScopePurgedError, match="developer:alice was purged .* not published"):
        await publish(store, root, b, on_stage=purge_now)
    (removed_now,) = purged  # the version before, and the folder the publish was writing
    writing = [p for p in removed_now["adapter_dirs_removed"] if Path(p).name.startswith(".tmp-")]
    assert sorted(removed_now["adapter_dirs_removed"]) == sorted([str(before.path), *writing]) and len(writing) == 1
    assert await rows(store, ALICE) == []
    assert not scope_dir(root, ALICE).exists()  # no version, no temp folder, not even alice's folder name
    actions = [e.action for e in await audit(store)]
    assert actions == ["publish", "purge"]

    # Alice comes back later: a round that starts after the purge publishes as usual.
    again = await publish(store, root, a)
    verify_published(again.path)
    assert [v.id for v in await rows(store, ALICE)] == [again.version_id]


async def test_a_purge_committed_before_the_activating_transaction_refuses_the_version(
    store: RolloutStore, root: Path, tmp_path: Path, lora_adapters: tuple[Path, Path]
) -> None:
    """The purge runs where the adapters folder is elsewhere (another host sharing the database), so the
    publish's files survive it: the transaction that would record and activate the version sees the
    tombstone, refuses, and the publish removes the folder it wrote."""
    a, _ = lora_adapters
    loop = asyncio.get_running_loop()

    def purge_now(stage: PublishStage) -> None:
        if stage == "before_rename":
            elsewhere = tmp_path / "other-host-adapters"
            done = asyncio.run_coroutine_threadsafe(
                store.purge_developer("alice", actor="cli:admin", adapters_root=elsewhere), loop
            )
            done.result(timeout=60)

    with pytest.raises(ScopePurgedError, match="developer:alice was purged"):
        await publish(store, root, a, on_stage=purge_now)
    assert await rows(store, ALICE) == []
    assert not scope_dir(root, ALICE).exists()
    assert [e.action for e in await audit(store)] == ["purge"]


async def test_a_purge_waits_for_a_publish_holding_the_lock_then_deletes_what_it_recorded(
    store: RolloutStore, root: Path
) -> None:
    """The interleaving the tombstone alone cannot stop (PostgreSQL reads committed data per statement):
    a publish's transaction holds the lock while it records and activates a version; a purge started then
    waits, and once the publish commits it deletes that version too."""
    async with store.unit() as s:
        await PurgeRepository(s).lock()
        purge = asyncio.create_task(store.purge_developer("alice", actor="cli:admin"))
        await asyncio.sleep(1.0)
        assert not purge.done()  # waiting for the lock
        repo = AdapterRepository(s)
        row = await repo.add_candidate(ALICE, path=str(scope_dir(root, ALICE) / ("b" * 32)), step=1, kl=0.0, metrics={})
        await repo.activate(ALICE, row.id)
    result = await asyncio.wait_for(purge, 60)
    assert result["deleted"]["adapter_versions"] == 1
    assert await rows(store, ALICE) == []


async def test_a_round_started_before_the_purge_never_publishes(
    store: RolloutStore, root: Path, lora_adapters: tuple[Path, Path]
) -> None:
    """The worker takes the purge mark when a round starts and publishes with it: a purge at any time
    after that refuses the round's adapter, for the purged developer's scope and for any team round (a team
    round cannot tell whether the purged developer's rollouts were in it); other developers are unaffected."""
    a, b = lora_adapters
    alice_round = await purge_mark(store, ALICE)
    bob_round = await purge_mark(store, BOB)
    team_round = await purge_mark(store, WEB)
    workdir = trainer_workdir(root, ALICE)
    workdir.mkdir(parents=True)
    (workdir / "adapter_model.safetensors").write_bytes(b"half-saved")
    await store.purge_developer("alice", actor="cli:admin", reason="left")
    assert not workdir.exists()  # the trainer's work folder of alice went with the purge

    with pytest.raises(ScopePurgedError, match="developer:alice was purged"):
        await publish(store, root, a, purge_mark=alice_round)
    with pytest.raises(ScopePurgedError, match="team:web: developer alice was purged"):
        await publish(store, root, a, scope=WEB, purge_mark=team_round)
    assert await rows(store, ALICE) == [] and await rows(store, WEB) == []
    assert not scope_dir(root, ALICE).exists() and not scope_dir(root, WEB).exists()
    bob = await publish(store, root, b, scope=BOB, purge_mark=bob_round)
    verify_published(bob.path)
    # Rounds that start after the purge are not affected by it.
    await publish(store, root, a, scope=WEB, purge_mark=await purge_mark(store, WEB))
    assert len(await rows(store, WEB)) == 1


async def test_purge_deletes_only_what_it_owns(
    store: RolloutStore, root: Path, tmp_path: Path, lora_adapters: tuple[Path, Path]
) -> None:
    """Rows of alice that point outside her folder under the adapters root (another directory, a path
    climbing out with .., a symlink, bob's version) are refused, each named with the fix, and left in place;
    everything of hers under the root goes: versions with and without rows, temp and trainer folders."""
    a, b = lora_adapters
    mine = [await publish(store, root, a), await publish(store, root, b)]
    bobs = await publish(store, root, a, scope=BOB)
    victims = []
    for name in ("victim", "victim-dotdot", "victim-linked"):
        victim = tmp_path / name
        victim.mkdir()
        (victim / "precious.txt").write_text("not an adapter")
        victims.append(victim)
    sdir = scope_dir(root, ALICE)
    link = sdir / uuid.uuid4().hex
    link.symlink_to(victims[2], target_is_directory=True)
    climbing = sdir / ".." / ".." / ".." / ".." / "victim-dotdot"
    assert climbing.resolve() == victims[1]
    outside = [str(victims[0]), str(climbing), str(link), str(bobs.path)]
    async with store.unit() as s:
        repo = AdapterRepository(s)
        for path in outside:
            await repo.add_candidate(ALICE, path=path, step=1, kl=0.0, metrics={})
    leftovers = [sdir / f".tmp-{uuid.uuid4().hex}", sdir / f".train-{uuid.uuid4().hex}", sdir / uuid.uuid4().hex]
    for d in leftovers:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"alice's weights")

    result = await store.purge_developer("alice", actor="cli:admin")

    assert result["deleted"]["adapter_versions"] == 2 + len(outside)
    refused = result["refused"]
    assert len(refused) == len(outside)
    for path in outside:
        (message,) = [m for m in refused if m.startswith(f"adapter folder {path} of developer:alice resolves to")]
        assert "left in place" in message and str(sdir) in message and "delete it by hand" in message
    for victim in victims:
        assert (victim / "precious.txt").read_text() == "not an adapter"
    verify_published(bobs.path)
    assert [v.id for v in await rows(store, BOB)] == [bobs.version_id]
    assert not sdir.exists()
    assert sorted(result["adapter_dirs_removed"]) == sorted(str(p) for p in [*(m.path for m in mine), link, *leftovers])
    (entry,) = [e for e in await audit(store) if e.action == "purge"]
    assert entry.scope_kind == "developer" and entry.scope_id == "alice"
    assert entry.detail["refused"] == refused


async def test_clean_partial_removes_the_work_folders_of_rounds_that_died(store: RolloutStore, root: Path) -> None:
    """A worker killed between saving its round's output and publishing it leaves a `.train-*` folder in the
    scope's folder: removed at the next start once it is older than the grace period, like a `.tmp-*`."""
    workdir = trainer_workdir(root, ALICE) / "adapter"
    workdir.mkdir(parents=True)
    (workdir / "adapter_model.safetensors").write_bytes(b"saved, never published")
    assert await clean_partial(store, root) == []  # young: a round may be about to publish it
    assert await clean_partial(store, root, grace_s=0) == [workdir.parent]
    assert not workdir.parent.exists()
