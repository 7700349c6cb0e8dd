"""Guards on serving adapters, on a real store (SQLite file and PostgreSQL): each one fires, rolls back
(or pauses training), and leaves an audit entry; a healthy adapter is left alone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from kernel.settings import Settings, ThresholdSettings
from personalization.worker import run_worker
from server.guards import run_guards
from server.stores import open_store
from storage.models import AdapterStatus, AuditEntry
from storage.repositories import AdapterRepository, Scope, ScopeControlRepository
from storage.store import CandidateRecord, CompletionRecord, EventRecord, RolloutStore, SessionStart
from tests.procs import run_heedful

ALICE = Scope.developer("alice")


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[RolloutStore]:
    settings = Settings()
    settings.database.url = database_url
    st = await open_store(settings)
    await st.start_session(SessionStart("s1", "alice", "web"))
    yield st
    await st.close()


def thresholds(**overrides: Any) -> ThresholdSettings:
    th = ThresholdSettings()
    th.accept_rate_window = 10
    th.accept_rate_drop = 0.15
    th.p99_latency_ms = 1000.0
    th.p99_window_s = 300.0
    for key, value in overrides.items():
        setattr(th, key, value)
    return th


async def versions(store: RolloutStore, *, active_since: timedelta, **second: Any) -> tuple[str, str]:
    """v1 served until `active_since` ago, when v2 (with `second`'s fields) replaced it."""
    async with store.unit() as s:
        repo = AdapterRepository(s)
        v1 = await repo.add_candidate(ALICE, path="/a/v1", step=10, kl=0.1, metrics={})
        await repo.activate(ALICE, v1.id)
        v1.activated_at = now() - timedelta(days=1)
        v2 = await repo.add_candidate(
            ALICE, path="/a/v2", step=20, kl=second.pop("kl", 0.2), metrics=second, parent_id=v1.id
        )
        await repo.activate(ALICE, v2.id)
        v2.activated_at = now() - active_since
        return v1.id, v2.id


async def served(
    store: RolloutStore, n: int, *, version: str | None, accepted: int, at: datetime, latency_ms: float = 500.0
) -> None:
    """`n` completions served by `version` at `at`, the first `accepted` of them accepted, the rest rejected."""
    for i in range(n):
        cid = f"c-{version}-{at.timestamp()}-{i}"
        await store.record_completion(
            CompletionRecord(
                cid, "s1", "alice", "def f(", [1, 2], [CandidateRecord("x)", [3], [-0.5], "stop")],
                team_id="web", adapter_version=version, latency_ms=latency_ms, arm="rl",
                created_at=at + timedelta(seconds=i),
            )
        )  # fmt: skip
        await store.record_event(EventRecord("s1", "accepted" if i < accepted else "rejected", cid))


async def audit(store: RolloutStore) -> list[AuditEntry]:
    from sqlalchemy import select

    async with store.unit() as s:
        return list(await s.scalars(select(AuditEntry).order_by(AuditEntry.id)))


async def status_of(store: RolloutStore, version: str) -> AdapterStatus:
    async with store.unit() as s:
        row = await AdapterRepository(s).get(version)
        assert row is not None
        return row.status


async def test_an_accept_rate_drop_rolls_back_to_the_previous_adapter(store: RolloutStore) -> None:
    v1, v2 = await versions(store, active_since=timedelta(minutes=30))
    await served(store, 10, version=v1, accepted=8, at=now() - timedelta(hours=2))
    await served(store, 10, version=v2, accepted=2, at=now() - timedelta(minutes=20))
    acted = await run_guards(store, thresholds())
    assert [(f.action, f.version_id) for f in acted] == [("rollback", v2)]
    assert "accept rate fell from 0.80 to 0.20 over 10 completions" in acted[0].reason
    assert await status_of(store, v2) == AdapterStatus.ROLLED_BACK
    assert await status_of(store, v1) == AdapterStatus.ACTIVE
    (entry,) = await audit(store)
    assert (entry.actor, entry.action, entry.scope_id) == ("guard", "rollback", "alice")
    assert entry.detail["from"] == v2 and entry.detail["to"] == v1 and entry.detail["guard"] == "accept_rate"
    # The next pass finds nothing to do: v1 has no completions of its own since it came back.
    assert await run_guards(store, thresholds()) == []


async def test_a_healthy_adapter_or_too_few_outcomes_are_left_alone(store: RolloutStore) -> None:
    v1, v2 = await versions(store, active_since=timedelta(minutes=30))
    await served(store, 10, version=v1, accepted=8, at=now() - timedelta(hours=2))
    await served(store, 9, version=v2, accepted=0, at=now() - timedelta(minutes=20))  # one short of the window
    assert await run_guards(store, thresholds()) == []
    await served(store, 1, version=v2, accepted=1, at=now() - timedelta(minutes=10))
    assert await run_guards(store, thresholds(accept_rate_drop=0.75)) == []  # 0.8 -> 0.1 is a drop of 0.7
    assert await status_of(store, v2) == AdapterStatus.ACTIVE


async def test_p99_latency_above_the_threshold_for_the_window_rolls_back(store: RolloutStore) -> None:
    v1, v2 = await versions(store, active_since=timedelta(minutes=10))
    await served(store, 25, version=v2, accepted=25, at=now() - timedelta(minutes=4), latency_ms=2500.0)
    acted = await run_guards(store, thresholds())
    assert [f.detail["guard"] for f in acted] == ["latency"]
    assert "p99 latency 2500 ms over the last 300 s (25 completions)" in acted[0].reason
    assert await status_of(store, v1) == AdapterStatus.ACTIVE


async def test_latency_is_not_judged_before_the_adapter_has_served_a_whole_window(store: RolloutStore) -> None:
    _, v2 = await versions(store, active_since=timedelta(minutes=2))
    await served(store, 25, version=v2, accepted=25, at=now() - timedelta(minutes=1), latency_ms=2500.0)
    assert await run_guards(store, thresholds()) == []


async def test_a_diverged_training_loss_rolls_back(store: RolloutStore) -> None:
    v1, v2 = await versions(store, active_since=timedelta(minutes=1), steps=[{"loss": 0.5}, {"loss": 1e9}])
    acted = await run_guards(store, thresholds())
    assert [f.detail["guard"] for f in acted] == ["loss"]
    assert "training loss diverged (1000000000.0 > thresholds.loss_divergence = 100.0)" in acted[0].reason
    assert await status_of(store, v2) == AdapterStatus.ROLLED_BACK
    assert await status_of(store, v1) == AdapterStatus.ACTIVE


async def test_kl_above_the_limit_pauses_training_until_an_admin_resumes_it(
    store: RolloutStore, database_url: str, small_model: Path, tmp_path: Path
) -> None:
    await versions(store, active_since=timedelta(minutes=1), kl=7.5)
    acted = await run_guards(store, thresholds())
    assert [(f.action, f.detail["guard"]) for f in acted] == [("pause_training", "kl")]
    assert "KL to the reference 7.50" in acted[0].reason and "thresholds.kl_max = 5.0" in acted[0].reason
    async with store.unit() as s:
        paused = await ScopeControlRepository(s).paused()
    assert list(paused) == [ALICE]
    assert await run_guards(store, thresholds()) == []  # paused once, not again every pass
    assert [e.action for e in await audit(store)] == ["pause_training"]

    settings = Settings()
    settings.database.url = database_url
    settings.model.path = str(small_model)
    (result,) = await run_worker(store, settings, once=True, scope=ALICE, adapters_root=tmp_path, force=True)
    assert result.status == "skipped" and "training is paused for developer:alice" in result.reason

    config = tmp_path / "heedful.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')
    proc = run_heedful(config, "adapters", "resume", "--scope", "developer:alice")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"scope": "developer:alice", "training_paused": False}
    async with store.unit() as s:
        assert await ScopeControlRepository(s).paused() == {}
    assert [e.action for e in await audit(store)] == ["pause_training", "resume_training"]
    assert await run_guards(store, thresholds()) == []  # the admin's resume stands until a newer adapter
