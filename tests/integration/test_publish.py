"""Publishing adapters against the real store (SQLite and PostgreSQL) with real peft adapters: activation
and retirement, rejection by a failed gate, keeping the last 10, verification before serving, cleaning
what a crash left, and SIGKILL at each point of a publish."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from adapters.lifecycle import (
    MANIFEST,
    CorruptAdapterError,
    PublishedFolders,
    PublishError,
    PublishResult,
    clean_partial,
    publish_adapter,
    read_manifest,
    scope_dir,
    scope_dirname,
    verify_published,
)
from kernel.settings import Settings
from personalization.gates import GateResult, check_gates
from server.engine.base import AdapterError
from server.stores import open_store
from storage.models import AdapterStatus, AdapterVersion, AuditEntry
from storage.repositories import AdapterRepository, AuditRepository, Scope
from storage.store import RolloutStore

PASS = GateResult(True, [], {"kl": 0.5})
ALICE = Scope.developer("alice@example.com")
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[RolloutStore]:
    s = Settings()
    s.database.url = database_url
    st = await open_store(s)
    yield st
    await st.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "adapters"


async def publish(
    store: RolloutStore, root: Path, source: Path, scope: Scope = ALICE, gate: GateResult | None = PASS, **kw: Any
) -> PublishResult:
    kw.setdefault("step", 10)
    kw.setdefault("kl", 0.5)
    kw.setdefault("metrics", {"loss": 0.25})
    return await publish_adapter(store, scope, source, adapters_root=root, gate=gate, **kw)


async def rows(store: RolloutStore, scope: Scope = ALICE) -> list[AdapterVersion]:
    async with store.unit() as s:
        return await AdapterRepository(s).versions(scope)


async def audit(store: RolloutStore) -> list[AuditEntry]:
    async with store.unit() as s:
        return await AuditRepository(s).since()


def version_dirs(root: Path, scope: Scope = ALICE) -> list[str]:
    d = scope_dir(root, scope)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


# --- layout and names -------------------------------------------------------------------------------


def test_scope_dirnames_are_safe_and_distinct() -> None:
    names = {scope_dirname(x) for x in ("alice", "Alice", "a/b", "a_b", "../..", "", "é")}
    assert len(names) == 7
    for name in names:
        assert "/" not in name and not name.startswith(".") and len(name) <= 64 + 13
    assert scope_dirname("alice").startswith("alice-")
    assert scope_dirname("../etc").startswith("_etc-")


# --- publish ------------------------------------------------------------------------------------


async def test_publish_activates_and_retires_the_previous(store, root, lora_adapters) -> None:
    a, b = lora_adapters
    first = await publish(store, root, a)
    assert first.status == AdapterStatus.ACTIVE and first.previous_active is None
    assert first.path == root / "developer" / scope_dirname(ALICE.id) / first.version_id
    assert len(first.version_id) == 32 and int(first.version_id, 16) >= 0
    names = sorted(p.name for p in first.path.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", MANIFEST} <= set(names)
    manifest = read_manifest(first.path)
    assert manifest["version_id"] == first.version_id
    assert manifest["scope"] == "developer:alice@example.com" and manifest["step"] == 10
    assert manifest["kl"] == 0.5 and manifest["metrics"]["loss"] == 0.25
    assert manifest["metrics"]["gate"]["passed"] is True
    src_bytes = (a / "adapter_model.safetensors").read_bytes()
    assert manifest["files"]["adapter_model.safetensors"]["size"] == len(src_bytes)
    verify_published(first.path, max_rank=16)
    assert not [p for p in scope_dir(root, ALICE).iterdir() if p.name.startswith(".tmp-")]

    second = await publish(store, root, b, parent_id=first.version_id, step=20)
    assert second.status == AdapterStatus.ACTIVE and second.previous_active == first.version_id
    verify_published(second.path)
    by_id = {r.id: r for r in await rows(store)}
    assert by_id[first.version_id].status == AdapterStatus.RETIRED
    assert by_id[second.version_id].status == AdapterStatus.ACTIVE
    assert by_id[second.version_id].parent_id == first.version_id
    assert by_id[second.version_id].path == str(second.path)
    assert by_id[second.version_id].step == 20 and by_id[second.version_id].kl == 0.5
    assert by_id[second.version_id].metrics["gate"]["passed"] is True
    entries = [e for e in await audit(store) if e.action == "publish"]
    assert [e.detail["version"] for e in entries] == [first.version_id, second.version_id]
    assert entries[1].detail["previous"] == first.version_id and entries[1].scope_id == ALICE.id
    # The retired version's files stay for rollback.
    verify_published(first.path)


async def test_failed_gate_records_rejected_and_keeps_the_previous(store, root, lora_adapters) -> None:
    a, b = lora_adapters
    good = await publish(store, root, a)
    gate = check_gates(
        loss_values=[0.3, math.nan],
        kl=7.5,
        perplexity_base=10.0,
        perplexity_adapter=10.2,
        kl_max=5.0,
        perplexity_margin=0.05,
    )
    bad = await publish(store, root, b, gate=gate, kl=7.5)
    assert bad.status == AdapterStatus.REJECTED and bad.previous_active == good.version_id
    assert bad.reasons == gate.reasons and len(bad.reasons) == 2
    by_id = {r.id: r for r in await rows(store)}
    assert by_id[good.version_id].status == AdapterStatus.ACTIVE
    rejected = by_id[bad.version_id]
    assert rejected.status == AdapterStatus.REJECTED
    assert rejected.reason is not None and "thresholds.kl_max = 5" in rejected.reason and "step 1" in rejected.reason
    # NaN metrics are stored as strings (PostgreSQL's JSON has no NaN).
    assert rejected.metrics["gate"]["loss_last"] == "nan" and rejected.kl == 7.5
    # Rejected files are kept for inspection and are complete.
    verify_published(bad.path)
    (entry,) = [e for e in await audit(store) if e.action == "reject"]
    assert entry.reason == rejected.reason and entry.detail["version"] == bad.version_id
    # A rejected version cannot be activated by mistake.
    async with store.unit() as s:
        active = await AdapterRepository(s).active(ALICE)
    assert active is not None and active.id == good.version_id


async def test_twelve_publishes_keep_ten_and_never_the_active(store, root, lora_adapters) -> None:
    a, b = lora_adapters
    results = [await publish(store, root, (a, b)[i % 2], step=i) for i in range(12)]
    kept = await rows(store)
    assert len(kept) == 10
    assert {r.id for r in kept} == {r.version_id for r in results[2:]}
    assert version_dirs(root) == sorted(r.version_id for r in results[2:])
    assert results[10].pruned == [results[0].path] and results[11].pruned == [results[1].path]
    assert not results[0].path.exists() and not results[1].path.exists()
    prunes = [e for e in await audit(store) if e.action == "prune"]
    assert [e.detail["paths"] for e in prunes] == [[str(results[0].path)], [str(results[1].path)]]

    # The active version is the oldest: eleven rejected versions after it never delete it.
    bob = Scope.team("platform")
    fail = GateResult(False, ["KL to the reference is 9 (thresholds.kl_max = 5)"], {"kl": 9.0})
    active = await publish(store, root, a, scope=bob)
    rejected = [await publish(store, root, b, scope=bob, gate=fail) for _ in range(11)]
    bob_rows = await rows(store, bob)
    assert len(bob_rows) == 11  # the newest 10 plus the active one
    assert {r.id for r in bob_rows} == {active.version_id} | {r.version_id for r in rejected[1:]}
    assert [r.status for r in bob_rows if r.id == active.version_id] == [AdapterStatus.ACTIVE]
    verify_published(active.path)
    assert version_dirs(root, bob) == sorted([active.version_id, *(r.version_id for r in rejected[1:])])
    assert not rejected[0].path.exists()
    # Alice's versions were untouched by Bob's pruning.
    assert len(await rows(store)) == 10


async def test_verify_published_catches_corruption(store, root, lora_adapters) -> None:
    a, _ = lora_adapters
    result = await publish(store, root, a)
    verify_published(result.path)

    weights = result.path / "adapter_model.safetensors"
    original = weights.read_bytes()
    with weights.open("r+b") as fh:
        fh.truncate(len(original) // 2)
    with pytest.raises(CorruptAdapterError, match=r"adapter_model.safetensors has \d+ bytes.*truncated"):
        verify_published(result.path)

    flipped = bytearray(original)
    flipped[-1] ^= 0xFF
    weights.write_bytes(bytes(flipped))
    with pytest.raises(CorruptAdapterError, match="does not match its sha256"):
        verify_published(result.path)
    weights.write_bytes(original)
    verify_published(result.path)

    manifest = result.path / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(AdapterError, match="heedful-adapter.json is not readable JSON"):
        verify_published(result.path)
    manifest.unlink()
    with pytest.raises(AdapterError, match=f"has no {MANIFEST}: the adapter was not published completely"):
        verify_published(result.path)
    with pytest.raises(AdapterError, match="does not exist"):
        verify_published(result.path.parent / uuid.uuid4().hex)

    # A folder copied under another name is refused: its manifest names another version.
    again = await publish(store, root, a)
    copy = again.path.parent / uuid.uuid4().hex
    shutil.copytree(again.path, copy)
    with pytest.raises(CorruptAdapterError, match="belongs to version"):
        verify_published(copy)


async def test_published_folders_are_hashed_once_per_state(store, root, lora_adapters) -> None:
    """The serving path's check reads a folder in full only when a file of it changed since the last
    check (size or modification time): a corruption is seen, and a steady folder costs one stat per file."""
    a, _ = lora_adapters
    result = await publish(store, root, a)
    folders = PublishedFolders()
    assert folders.check(result.path) == (None, True)
    assert folders.check(result.path) == (None, False)
    assert folders.hashed == 1

    weights = result.path / "adapter_model.safetensors"
    original = weights.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x10
    weights.write_bytes(bytes(flipped))
    error, new = folders.check(result.path)
    assert new and isinstance(error, CorruptAdapterError) and "does not match its sha256" in str(error)
    assert folders.check(result.path) == (error, False)  # reported once
    assert folders.hashed == 2

    weights.write_bytes(original)
    assert folders.check(result.path) == (None, True) and folders.hashed == 3
    (result.path / "extra.bin").write_bytes(b"x")  # a file added after publishing changes the state too
    assert folders.check(result.path)[1] and folders.hashed == 4
    folders.forget(set())
    assert folders.check(result.path)[1] and folders.hashed == 5


async def test_bad_source_or_unrecordable_row_publishes_nothing(
    store, root, lora_adapters, tmp_path, monkeypatch
) -> None:
    a, _ = lora_adapters
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PublishError, match="adapter_config.json is missing"):
        await publish(store, root, empty)
    # The parent must exist in the scope: the row is refused and the written folder removed.
    with pytest.raises(PublishError, match="does not exist in scope developer:alice@example.com"):
        await publish(store, root, a, parent_id="f" * 32)
    assert version_dirs(root) == []
    assert await rows(store) == []

    # The commit fails after the rename: the row is certainly absent, so the new folder is removed.
    async def refuse(self: AdapterRepository, *args: Any, **kwargs: Any) -> None:
        raise ConnectionResetError("database went away")

    monkeypatch.setattr(AdapterRepository, "add_candidate", refuse)
    with pytest.raises(PublishError, match="was not recorded .*database went away.*check database.url"):
        await publish(store, root, a)
    monkeypatch.undo()
    assert version_dirs(root) == []
    assert await rows(store) == []

    # An error in the middle of writing removes the temp folder; nothing is recorded.
    def boom(stage: str) -> None:
        if stage == "partial":
            raise RuntimeError("disk pulled")

    with pytest.raises(RuntimeError, match="disk pulled"):
        await publish(store, root, a, on_stage=boom)
    assert version_dirs(root) == []
    assert await rows(store) == []


async def test_clean_partial_removes_leftovers_only(store, root, lora_adapters) -> None:
    a, b = lora_adapters
    active = await publish(store, root, a)
    rejected = await publish(store, root, b, gate=GateResult(False, ["KL too high"], {}))
    sdir = scope_dir(root, ALICE)

    tmp = sdir / ".tmp-0123"
    tmp.mkdir()
    (tmp / "adapter_model.safetensors").write_bytes(b"half")
    no_manifest = sdir / uuid.uuid4().hex
    no_manifest.mkdir()
    (no_manifest / "adapter_config.json").write_text("{}")
    bad_sums = sdir / uuid.uuid4().hex
    shutil.copytree(active.path, bad_sums)
    manifest = json.loads((bad_sums / MANIFEST).read_text())
    manifest["version_id"] = bad_sums.name
    manifest["files"]["adapter_model.safetensors"]["sha256"] = "0" * 64
    (bad_sums / MANIFEST).write_text(json.dumps(manifest))
    other = sdir / "notes"  # not ours: never touched
    other.mkdir()

    # A complete folder whose row was never committed (the process died after the rename).
    def die_after_rename(stage: str) -> None:
        if stage == "after_rename":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        await publish(store, root, a, on_stage=die_after_rename)
    (orphan,) = [
        p
        for p in sdir.iterdir()
        if p.name not in {active.version_id, rejected.version_id, no_manifest.name, bad_sums.name, "notes"}
        and not p.name.startswith(".tmp-")
    ]
    verify_published(orphan)

    # A referenced folder is never touched, even when its manifest is gone.
    (rejected.path / MANIFEST).unlink()

    # Young temp and complete folders may belong to a publish in progress: kept within the grace period.
    removed = await clean_partial(store, root)
    assert sorted(removed) == sorted([no_manifest, bad_sums])
    assert tmp.exists() and orphan.exists()

    removed = await clean_partial(store, root, grace_s=0)
    assert sorted(removed) == sorted([tmp, orphan])
    assert sorted(p.name for p in sdir.iterdir()) == sorted([active.version_id, rejected.version_id, "notes"])
    verify_published(active.path)
    assert (rejected.path / "adapter_model.safetensors").exists()
    assert await clean_partial(store, root, grace_s=0) == []
    assert await clean_partial(store, root / "missing") == []


# --- SIGKILL at each point of a publish -------------------------------------------------------------


@pytest.mark.parametrize("stage", ["partial", "before_rename", "after_rename", "committed"])
async def test_sigkill_during_publish_keeps_a_servable_adapter(
    database_url: str, store, root, lora_adapters, stage: str
) -> None:
    a, b = lora_adapters
    before = await publish(store, root, a)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration.publish_child", database_url, str(root), str(b), stage, str(ALICE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != f"STAGE {stage}":
            proc.kill()
            pytest.fail(f"child said {line!r}: {proc.stderr.read() if proc.stderr else ''}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    if database_url.startswith("sqlite"):
        conn = sqlite3.connect(database_url.split("///", 1)[1])
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()

    async with store.unit() as s:
        current = await AdapterRepository(s).active(ALICE)
    assert current is not None
    verify_published(Path(current.path))  # whatever is active is complete and servable
    sdir = scope_dir(root, ALICE)
    leftovers = [p for p in sdir.iterdir() if p.name != before.version_id and p != Path(current.path)]

    if stage == "committed":
        assert current.id != before.version_id and current.step == 7
        assert leftovers == []
        assert await clean_partial(store, root, grace_s=0) == []
    else:
        assert current.id == before.version_id
        assert len(await rows(store)) == 1
        (leftover,) = leftovers
        if stage == "after_rename":
            verify_published(leftover)  # complete, but no row points to it
        else:
            assert leftover.name.startswith(".tmp-")
            if stage == "partial":
                weights = leftover / "adapter_model.safetensors"
                assert not (leftover / MANIFEST).exists()
                assert weights.stat().st_size < (b / "adapter_model.safetensors").stat().st_size
        assert await clean_partial(store, root) == []  # young: within the grace period
        assert await clean_partial(store, root, grace_s=0) == [leftover]
        assert not leftover.exists()
    verify_published(before.path)

    # The store and the folder are usable again at once.
    after = await publish(store, root, a)
    assert after.status == AdapterStatus.ACTIVE
    verify_published(after.path)
    async with store.unit() as s:
        published = list(await s.scalars(select(AuditEntry).where(AuditEntry.action == "publish")))
    assert len(published) == (3 if stage == "committed" else 2)


# --- the gates' measurements on the real model, through a published adapter --------------------------


async def test_published_adapter_loads_in_peft_and_is_measured(root, lora_adapters, small_model, tmp_path) -> None:
    # The measurements do not depend on the database: SQLite only.
    import hashlib

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from personalization.gates import general_code_slice, mean_kl, perplexity

    a, _ = lora_adapters
    settings = Settings()
    settings.database.url = f"sqlite+aiosqlite:///{tmp_path / 'heedful.db'}"
    store = await open_store(settings)
    try:
        result = await publish(store, root, a)
    finally:
        await store.close()
    sha = hashlib.sha256((a / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert read_manifest(result.path)["files"]["adapter_model.safetensors"]["sha256"] == sha

    tokenizer = AutoTokenizer.from_pretrained(str(small_model))
    base = AutoModelForCausalLM.from_pretrained(str(small_model), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(result.path))
    prompts = ["def add(a, b):\n    return", "import os\n\nfor name in os.listdir("]
    kl = mean_kl(model, tokenizer, prompts)
    assert math.isfinite(kl) and kl > 0.0  # the random adapter changes the distribution
    with model.disable_adapter():
        assert mean_kl(model, tokenizer, prompts, reference=model) == pytest.approx(0.0, abs=1e-6)
    texts = general_code_slice()[:2]  # dedent and indent, cut to 128 tokens each: the whole slice is slow on CPU
    ppl_base = perplexity(model, tokenizer, texts, without_adapter=True, max_tokens=128)
    ppl_adapter = perplexity(model, tokenizer, texts, max_tokens=128)
    assert 1.0 < ppl_base < 50.0, ppl_base  # SmolLM2 knows textwrap.dedent well
    assert math.isfinite(ppl_adapter) and ppl_adapter != ppl_base
    gate = check_gates(
        loss_values=[0.1],
        kl=kl,
        perplexity_base=ppl_base,
        perplexity_adapter=ppl_adapter,
        kl_max=5.0,
        perplexity_margin=0.05,
    )
    assert gate.metrics["perplexity_base"] == ppl_base
    print(f"kl={kl:.4f} ppl base={ppl_base:.3f} adapter={ppl_adapter:.3f} passed={gate.passed}")
