"""The rollout store against a real SQLite file and a real PostgreSQL server: every repository operation,
migrations, redaction, retention, purge, scope isolation and bad input."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update

from kernel.settings import Settings
from server.stores import open_store
from storage.adapter_files import scope_dir
from storage.db import StoreError, current_revision, head_revision, open_database, upgrade_schema
from storage.models import AdapterStatus, AdapterVersion, Completion, Event, Rollout, RolloutStatus
from storage.repositories import (
    AdapterRepository,
    AuditRepository,
    CompletionRepository,
    DocumentRepository,
    EventRepository,
    IdentityRepository,
    RolloutRepository,
    Scope,
    ScopeControlRepository,
    SessionRepository,
    TrainingStatusRepository,
)
from storage.store import (
    CandidateRecord,
    CompletionRecord,
    DocumentSeen,
    EventRecord,
    RolloutStore,
    SessionStart,
)


def settings_for(url: str) -> Settings:
    s = Settings()
    s.database.url = url
    s.privacy.redact_patterns = [r"ACME-[0-9]{6}"]
    return s


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[RolloutStore]:
    st = await open_store(settings_for(database_url), tokenize=lambda t: [ord(c) % 97 for c in t])
    yield st
    await st.close()


def completion(
    cid: str, session: str = "s1", developer: str = "alice", team: str | None = "web", **kw
) -> CompletionRecord:
    return CompletionRecord(
        id=cid,
        session_id=session,
        developer_id=developer,
        team_id=team,
        prompt=kw.pop("prompt", "def add(a, b):"),
        prompt_token_ids=[1, 2, 3],
        candidates=kw.pop(
            "candidates",
            [
                CandidateRecord("\n    return a + b", [4, 5], [-0.1, -0.2], "stop"),
                CandidateRecord("\n    return a - b", [4, 6], [-0.1, -2.0], "stop"),
            ],
        ),
        uri="file:///app.py",
        line=3,
        character=14,
        adapter_version=None,
        latency_ms=42.0,
        **kw,
    )


async def seed(store: RolloutStore, developer: str = "alice", team: str | None = "web", session: str = "s1") -> None:
    await store.start_session(SessionStart(session, developer, team, "pytest", "1.0"))


async def test_schema_is_at_head_and_matches_the_models(store: RolloutStore) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from storage.models import Base

    assert await current_revision(store.db) == head_revision() == "0006"
    async with store.db.engine.connect() as conn:
        diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
    assert diff == []


async def test_upgrade_from_the_previous_revision_keeps_data(database_url: str) -> None:
    db = await open_database(database_url, upgrade=False)
    try:
        await upgrade_schema(db, "0001")
        assert await current_revision(db) == "0001"
        async with db.engine.begin() as conn:
            await conn.execute(text("INSERT INTO developers (id, created_at) VALUES ('old', CURRENT_TIMESTAMP)"))
            await conn.execute(
                text("INSERT INTO sessions (id, developer_id, started_at) VALUES ('s-old', 'old', CURRENT_TIMESTAMP)")
            )
        await upgrade_schema(db)
        assert await current_revision(db) == "0006"
        async with db.sessions() as s, s.begin():
            assert (await SessionRepository(s).require("s-old")).developer_id == "old"
            row = await RolloutRepository(s).add(
                Scope.developer("old"), context="c", response="r", next_state=None, signal="accept", rewards=[1]
            )
            assert row.id is not None
            await ScopeControlRepository(s).set_training_paused(Scope.developer("old"), True, "KL 6.0 > 5.0")
            assert await ScopeControlRepository(s).paused() == {Scope.developer("old"): "KL 6.0 > 5.0"}
    finally:
        await db.dispose()


async def test_session_document_completion_and_every_event_kind(store: RolloutStore) -> None:
    await seed(store)
    doc_id = await store.record_document(DocumentSeen("s1", "file:///app.py", "python", 3))
    await store.record_completion(completion("c1", document_id=doc_id))
    await store.record_completion(completion("c2", shown_index=1))
    events = [
        EventRecord("s1", "shown", "c1"),
        EventRecord("s1", "accepted", "c1"),
        EventRecord("s1", "partial_accept", "c1", accepted_length=7),
        EventRecord("s1", "rejected", "c2", inferred=True),
        EventRecord("s1", "edit_snapshot", "c1", delay_s=30.0, survival_ratio=0.5, kept_text="return a + b  # sum"),
        EventRecord("s1", "correction", "c2", text="use operator.add"),
        EventRecord("s1", "correction", None, text="always add type hints"),
    ]
    ids = await asyncio.gather(*(store.record_event(e) for e in events))
    assert len(set(ids)) == len(events)
    await store.end_session("s1")
    async with store.unit() as s:
        sess = await SessionRepository(s).require("s1")
        assert sess.client_name == "pytest" and sess.ended_at is not None
        c1 = await CompletionRepository(s).require("c1")
        assert [c.index for c in c1.candidates] == [0, 1]
        assert c1.candidates[1].logprobs == [-0.1, -2.0]
        assert c1.document_id == doc_id and c1.mode.value == "prefix"
        assert (await CompletionRepository(s).latest_for_session("s1")).id in ("c1", "c2")  # type: ignore[union-attr]
        assert [c.id for c in await CompletionRepository(s).for_session("s1")] == ["c1", "c2"]
        assert [c.id for c in await CompletionRepository(s).for_developer("alice")] == ["c1", "c2"]
        kinds = [e.kind.value for e in await EventRepository(s).for_completion("c1")]
        assert kinds == ["shown", "accepted", "partial_accept", "edit_snapshot"]
        assert len(await EventRepository(s).for_session("s1")) == 7
        assert (await DocumentRepository(s).latest("s1", "file:///app.py")).version == 3  # type: ignore[union-attr]
        dev = await IdentityRepository(s).developer("alice")
        assert dev is not None and dev.team_id == "web"
        assert await IdentityRepository(s).developers_of_team("web") == ["alice"]
    stats = await store.stats()
    assert stats["completions"] == 2 and stats["candidates"] == 4 and stats["sessions"] == 1
    assert stats["events"] == {
        "shown": 1,
        "accepted": 1,
        "partial_accept": 1,
        "rejected": 1,
        "edit_snapshot": 1,
        "correction": 2,
    }


async def test_reconnecting_session_resumes_and_foreign_session_id_is_refused(store: RolloutStore) -> None:
    await seed(store)
    await store.end_session("s1")
    await seed(store)  # same id, same developer: resumes
    async with store.unit() as s:
        assert (await SessionRepository(s).require("s1")).ended_at is None
    with pytest.raises(StoreError, match="belongs to another developer"):
        await store.start_session(SessionStart("s1", "mallory"))


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (EventRecord("nope", "shown", "c1"), "session 'nope' is unknown"),
        (EventRecord("s1", "shown", "missing"), "completion 'missing' is unknown"),
        (EventRecord("s1", "liked", "c1"), "kind 'liked' is not one of shown, accepted"),
        (EventRecord("s1", "accepted", None), "needs the completionId"),
        (EventRecord("s1", "partial_accept", "c1", accepted_length=-1), "accepted length -1 is negative"),
        (EventRecord("s1", "edit_snapshot", "c1", survival_ratio=1.5), "survival ratio 1.5 is outside 0..1"),
        (EventRecord("s2", "accepted", "c1"), "of another developer"),
    ],
)
async def test_bad_events_fail_alone_with_a_clear_error(store: RolloutStore, record: EventRecord, message: str) -> None:
    await seed(store)
    await seed(store, developer="bob", session="s2")
    await store.record_completion(completion("c1"))
    good_before = store.record_event(EventRecord("s1", "shown", "c1"))
    bad = store.record_event(record)
    good_after = store.record_event(EventRecord("s1", "accepted", "c1"))
    with pytest.raises(StoreError, match=message):
        await bad
    # The batch the bad write was in still commits everything else.
    assert isinstance(await good_before, int) and isinstance(await good_after, int)
    assert (await store.stats())["events"]["shown"] == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"session": "ghost"}, "session 'ghost' is unknown"),
        ({"developer": "bob"}, "belongs to 'alice'"),
        ({"shown_index": 5}, "shows candidate 5 of a group of 2"),
        ({"mode": "magic"}, "mode 'magic' is not one of"),
        ({"candidates": [CandidateRecord("x", [1, 2], [-1.0])]}, "2 token ids and 1 log-probs"),
    ],
)
async def test_bad_completions_are_refused(store: RolloutStore, kwargs: dict[str, object], message: str) -> None:
    await seed(store)
    with pytest.raises(StoreError, match=message):
        await store.record_completion(completion("cx", **kwargs))  # type: ignore[arg-type]


async def test_duplicate_completion_id_is_refused(store: RolloutStore) -> None:
    await seed(store)
    await store.record_completion(completion("dup"))
    with pytest.raises(StoreError, match="completion 'dup' of session 's1' was refused by the database"):
        await store.record_completion(completion("dup"))


async def test_secrets_are_redacted_and_token_ids_recomputed(store: RolloutStore) -> None:
    await seed(store)
    secret = "AKIAABCDEFGHIJKLMNOP"
    rec = completion("c-secret", prompt=f'KEY = "{secret}"\npassword = "hunter22"\ndef f():')
    rec.candidates = [CandidateRecord(" return 'ACME-123456'", [9, 9], [-1.0, -1.0])]
    await store.record_completion(rec)
    await store.record_event(EventRecord("s1", "correction", "c-secret", text=f"never commit {secret}"))
    async with store.unit() as s:
        row = await CompletionRepository(s).require("c-secret")
        assert secret not in row.prompt and "[REDACTED:aws-access-key]" in row.prompt
        assert 'password = "[REDACTED:password]"' in row.prompt
        assert row.redacted is True
        assert row.prompt_token_ids == [ord(c) % 97 for c in row.prompt]
        cand = row.candidates[0]
        assert cand.text == " return '[REDACTED:custom]'" and cand.logprobs_stale is True and cand.logprobs == []
        (event,) = await EventRepository(s).for_completion("c-secret")
        assert event.text == "never commit [REDACTED:aws-access-key]"


async def test_original_secret_never_reaches_the_sqlite_file(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'h.db'}"
    st = await open_store(settings_for(url))
    secret = "ghp_" + "A1b2C3d4E5" * 4
    await st.start_session(SessionStart("s1", "alice"))
    await st.record_completion(completion("c1", prompt=f"token = '{secret}'\n"))
    await st.record_event(EventRecord("s1", "edit_snapshot", "c1", survival_ratio=1.0, kept_text=secret))
    await st.close()
    for f in tmp_path.iterdir():  # the database, and its WAL and shared-memory files if any remain
        assert secret.encode() not in f.read_bytes(), f
    assert any(f.name == "h.db" for f in tmp_path.iterdir())


async def test_unstorable_text_is_repaired_and_oversized_text_truncated(store: RolloutStore) -> None:
    from storage.redaction import MAX_TEXT_CHARS

    await seed(store)
    await store.record_completion(completion("c1", prompt="x = '\ud800'\x00 end"))
    big = "y" * (MAX_TEXT_CHARS + 5000)
    await store.record_event(EventRecord("s1", "edit_snapshot", "c1", survival_ratio=0.1, kept_text=big))
    async with store.unit() as s:
        row = await CompletionRepository(s).require("c1")
        assert row.prompt == "x = '\ufffd'\ufffd end" and row.redacted
        (event,) = await EventRepository(s).for_completion("c1")
        assert event.truncated is True
        assert len(event.kept_text or "") == MAX_TEXT_CHARS
        assert (event.kept_text or "").endswith("[TRUNCATED: 5000 more characters not stored]")


async def add_rollouts(store: RolloutStore) -> None:
    await seed(store, "alice", "web", "s1")
    await seed(store, "bob", "data", "s2")
    await store.record_completion(completion("ca", "s1", "alice", "web"))
    await store.record_completion(completion("cb", "s2", "bob", "data"))
    async with store.unit() as s:
        repo = RolloutRepository(s)
        await repo.add(
            Scope.developer("alice"),
            context="a",
            response="r",
            next_state="k",
            signal="accept",
            rewards=[1, -1],
            judge_votes=[[1, 1, 0, 1, 1]],
            completion_id="ca",
        )
        await repo.add(
            Scope.team("web"),
            context="a",
            response="r",
            next_state=None,
            signal="reject",
            rewards=[-1, 0],
            completion_id="ca",
        )
        await repo.add(
            Scope.team("data"),
            context="b",
            response="r",
            next_state=None,
            signal="accept",
            rewards=[1, 1],
            completion_id="cb",
        )


async def test_scopes_never_mix(store: RolloutStore) -> None:
    await add_rollouts(store)
    async with store.unit() as s:
        repo = RolloutRepository(s)
        web = await repo.pending(Scope.team("web"))
        data = await repo.pending(Scope.team("data"))
        assert [r.context for r in web] == ["a"] and [r.context for r in data] == ["b"]
        assert [r.rewards for r in await repo.pending(Scope.developer("alice"))] == [[1, -1]]
        assert await repo.pending(Scope.developer("bob")) == []
        # Marking another scope's ids through this scope changes nothing.
        assert await repo.mark(Scope.team("web"), [data[0].id], RolloutStatus.TRAINED) == 0
        assert await repo.mark(Scope.team("web"), [web[0].id], RolloutStatus.TRAINED) == 1
        assert await repo.counts_by_status(Scope.team("data")) == {"pending": 1, "trained": 0, "discarded": 0}
        assert (await repo.in_scope(Scope.team("web")))[0].trained_at is not None
        await repo.mark(Scope.team("data"), [data[0].id], RolloutStatus.DISCARDED, reason="no signal")
        assert (await repo.in_scope(Scope.team("data")))[0].reason == "no signal"
        with pytest.raises(StoreError, match="is not in scope team:web: scopes never mix"):
            await repo.add(
                Scope.team("web"),
                context="b",
                response="r",
                next_state=None,
                signal=None,
                rewards=[],
                completion_id="cb",
            )


def test_scope_parse() -> None:
    assert Scope.parse("team:web") == Scope.team("web")
    assert str(Scope.developer("a:b")) == "developer:a:b"
    with pytest.raises(StoreError, match="write developer:<id> or team:<name>"):
        Scope.parse("org:x")


async def test_adapter_versions_activate_rollback_reject_prune(store: RolloutStore, tmp_path: Path) -> None:
    scope = Scope.developer("alice")
    other = Scope.developer("bob")
    async with store.unit() as s:
        repo = AdapterRepository(s)
        versions: list[AdapterVersion] = []
        for step in range(12):
            v = await repo.add_candidate(
                scope,
                path=str(tmp_path / f"v{step}"),
                step=step,
                kl=0.1 * step,
                metrics={"loss": 1.0 / (step + 1)},
                parent_id=versions[-1].id if versions else None,
            )
            v.created_at = datetime.now(UTC) + timedelta(seconds=step)
            versions.append(v)
        await repo.add_candidate(other, path="/elsewhere", step=1, kl=None, metrics={})
        await repo.activate(scope, versions[0].id)
        await repo.activate(scope, versions[1].id)
        assert (await repo.active(scope)).id == versions[1].id  # type: ignore[union-attr]
        assert (await repo.get(versions[0].id)).status == AdapterStatus.RETIRED  # type: ignore[union-attr]
    async with store.unit() as s:
        repo = AdapterRepository(s)
        assert (await repo.rollback(scope, reason="accept rate fell")).id == versions[0].id  # type: ignore[union-attr]
        taken_out = await repo.get(versions[1].id)
        assert taken_out is not None and taken_out.status == AdapterStatus.ROLLED_BACK
        assert taken_out.reason == "accept rate fell"
        assert (await repo.rollback(scope, to=versions[1].id)).id == versions[1].id  # type: ignore[union-attr]
        assert (await repo.get(versions[0].id)).status == AdapterStatus.ROLLED_BACK  # type: ignore[union-attr]
        with pytest.raises(StoreError, match="does not exist in scope developer:bob"):
            await repo.activate(other, versions[2].id)
        await repo.reject(scope, versions[2].id, "KL 7.1 > 5.0")
        with pytest.raises(StoreError, match=r"was rejected \(KL 7.1 > 5.0\)"):
            await repo.activate(scope, versions[2].id)
        removed = await repo.prune(scope, keep=10)
        assert sorted(removed) == sorted([str(tmp_path / "v0")])  # v1 is active, so only v0 goes
        assert len(await repo.versions(scope)) == 11
        assert len(await repo.versions(other)) == 1
        counts = await AdapterRepository(s).counts_by_scope()
        assert counts["developer:bob"] == {"candidate": 1}
        assert counts["developer:alice"]["active"] == 1
    async with store.unit() as s:
        repo = AdapterRepository(s)
        only = Scope.team("solo")
        v = await repo.add_candidate(only, path="/solo", step=1, kl=None, metrics={})
        await repo.activate(only, v.id)
        assert await repo.rollback(only) is None  # back to the base model
        with pytest.raises(StoreError, match="has no active adapter to roll back"):
            await repo.rollback(only)


async def test_audit_log(store: RolloutStore) -> None:
    t0 = datetime.now(UTC) - timedelta(seconds=1)
    async with store.unit() as s:
        await AuditRepository(s).add(
            actor="worker", action="publish", scope=Scope.team("web"), reason="gates passed", detail={"kl": 0.3}
        )
    async with store.unit() as s:
        (entry,) = await AuditRepository(s).since(t0)
        assert (entry.actor, entry.action, entry.scope_id, entry.detail) == ("worker", "publish", "web", {"kl": 0.3})
        assert await AuditRepository(s).since(datetime.now(UTC) + timedelta(hours=1)) == []


async def test_retention_deletes_old_rows_only(store: RolloutStore) -> None:
    await add_rollouts(store)
    await store.record_event(EventRecord("s1", "shown", "ca"))
    old = datetime.now(UTC) - timedelta(days=40)
    async with store.unit() as s:
        await s.execute(update(Completion).where(Completion.developer_id == "alice").values(created_at=old))
        await s.execute(update(Rollout).where(Rollout.developer_id == "alice").values(created_at=old))
        await s.execute(update(Event).values(created_at=old))
    deleted = await store.apply_retention(30)
    assert deleted["completions"] == 1 and deleted["rollouts"] == 2 and deleted["events"] == 1
    stats = await store.stats()
    assert stats["completions"] == 1 and stats["rollouts"]["pending"] == 1
    async with store.unit() as s:
        assert [e.action for e in await AuditRepository(s).since()] == ["retention"]
    assert await store.apply_retention(0) == {}


async def test_purge_removes_every_row_and_adapter_of_one_developer(store: RolloutStore, tmp_path: Path) -> None:
    await add_rollouts(store)
    await store.record_event(EventRecord("s1", "accepted", "ca"))
    await store.record_document(DocumentSeen("s1", "file:///a.py", "python", 1))
    root = tmp_path / "adapters"
    adapter_dir = scope_dir(root, Scope.developer("alice")) / ("a" * 32)  # where publishing puts a version
    adapter_dir.mkdir(parents=True)
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"x")
    async with store.unit() as s:
        v = await AdapterRepository(s).add_candidate(
            Scope.developer("alice"), path=str(adapter_dir), step=3, kl=0.2, metrics={}
        )
        await AdapterRepository(s).activate(Scope.developer("alice"), v.id)
    result = await store.purge_developer("alice", actor="cli:test", reason="left the company", adapters_root=root)
    assert result["deleted"]["completions"] == 1 and result["deleted"]["rollouts"] == 2
    assert result["adapter_dirs_removed"] == [str(adapter_dir)] and not adapter_dir.exists()
    stats = await store.stats()
    assert stats["developers"] == 1 and stats["completions"] == 1 and stats["sessions"] == 1
    assert stats["adapters"] == {}
    async with store.unit() as s:
        assert await IdentityRepository(s).developer("alice") is None
        assert [r.context for r in await RolloutRepository(s).in_scope(Scope.team("data"))] == ["b"]
        (entry,) = await AuditRepository(s).since()
        assert entry.action == "purge" and entry.detail["developer"] == "alice" and entry.reason == "left the company"


async def test_training_status_follows_a_round_and_a_purged_scope_stays_gone(store: RolloutStore) -> None:
    alice, team = Scope.developer("alice"), Scope.team("web")
    async with store.unit() as s:
        await TrainingStatusRepository(s).started(alice, rollouts=18, steps=24)
        await TrainingStatusRepository(s).progress(alice, "training", 5, 24)
        await TrainingStatusRepository(s).progress(team, "training", 1, 24)  # no round started: nothing written
    async with store.unit() as s:
        rows = await TrainingStatusRepository(s).of([alice, team])
        assert list(rows) == [alice]
        row = rows[alice]
        assert (row.phase, row.step, row.steps, row.rollouts, row.last_status) == ("training", 5, 24, 18, None)
        assert row.started_at is not None
        await TrainingStatusRepository(s).finished(alice, "published", "all gates passed", "v1")
    async with store.unit() as s:
        row = (await TrainingStatusRepository(s).of([alice]))[alice]
        assert (row.phase, row.step, row.steps, row.rollouts, row.started_at) == (None, None, None, None, None)
        assert (row.last_status, row.last_reason, row.last_version) == ("published", "all gates passed", "v1")
        assert row.last_finished_at is not None
        await TrainingStatusRepository(s).started(alice, rollouts=16, steps=24)
    await seed(store)
    result = await store.purge_developer("alice", actor="cli:test", reason="left")
    assert result["deleted"]["training_status"] == 1
    async with store.unit() as s:  # the round that was running finishes after the purge: nothing comes back
        await TrainingStatusRepository(s).progress(alice, "training", 6, 24)
        await TrainingStatusRepository(s).finished(alice, "discarded", "purged", None)
    async with store.unit() as s:
        assert await TrainingStatusRepository(s).of([alice]) == {}


async def test_cli_stats_export_and_purge(database_url: str, tmp_path: Path) -> None:
    st = await open_store(settings_for(database_url))
    await add_rollouts(st)
    await st.close()
    config = tmp_path / "heedful.toml"
    config.write_text(f'[database]\nurl = "{database_url}"\n')

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server.cli", "--config", str(config), *args],
            capture_output=True,
            text=True,
            check=False,
        )

    stats = cli("stats", "--json")
    assert stats.returncode == 0, stats.stderr
    data = json.loads(stats.stdout)
    assert data["completions"] == 2 and data["rollouts"]["pending"] == 3
    export = cli("export", "--developer", "alice", "--format", "jsonl")
    assert export.returncode == 0, export.stderr
    triples = [json.loads(line) for line in export.stdout.splitlines()]
    assert len(triples) == 2
    assert set(triples[0]) >= {"context", "response", "feedback"}
    assert triples[0]["feedback"]["rewards"] == [1, -1]
    purge = cli("purge", "--developer", "alice")
    assert purge.returncode == 0, purge.stderr
    assert json.loads(purge.stdout)["deleted"]["developers"] == 1
    assert cli("export", "--developer", "alice").stdout == ""


async def test_opening_the_store_applies_retention(database_url: str) -> None:
    st = await open_store(settings_for(database_url))
    await add_rollouts(st)
    async with st.unit() as s:
        await s.execute(
            update(Rollout).where(Rollout.scope_id == "web").values(created_at=datetime.now(UTC) - timedelta(days=100))
        )
    await st.close()
    s2 = settings_for(database_url)
    s2.privacy.retention_days = 90
    reopened = await open_store(s2)
    try:
        assert (await reopened.stats())["rollouts"]["pending"] == 2
        async with reopened.unit() as s:
            (entry,) = await AuditRepository(s).since()
            assert entry.actor == "retention:open" and entry.detail["rollouts"] == 1
    finally:
        await reopened.close()


async def test_outcomes_pending_counts_and_latest_corrections(store: RolloutStore) -> None:
    await seed(store)
    for i in range(3):
        await store.record_completion(completion(f"c{i}"))
    await store.record_event(EventRecord("s1", "correction", "c0", text="use pathlib"))
    await store.record_event(EventRecord("s1", "correction", None, text="add type hints"))
    await store.record_event(EventRecord("s1", "correction", "c1", text="prefer f-strings"))
    alice = Scope.developer("alice")
    async with store.unit() as s:
        repo = RolloutRepository(s)
        for cid, rewards in (("c0", [1, None]), ("c1", [None, -1]), ("c2", [0, None])):
            await repo.add(
                alice,
                context=f"ctx {cid}",
                response=f"resp {cid}",
                next_state=None,
                signal="x",
                rewards=rewards,
                completion_id=cid,
            )
    async with store.unit() as s:
        repo = RolloutRepository(s)
        assert await repo.count_pending(alice) == 3
        assert await repo.count_pending(Scope.team("web")) == 0
        # Decided outcomes only (the 0 is left out), newest first.
        assert await repo.outcomes(alice, limit=10) == [("ctx c1", "resp c1", -1), ("ctx c0", "resp c0", 1)]
        assert await repo.outcomes(alice, limit=1) == [("ctx c1", "resp c1", -1)]
        events = EventRepository(s)
        assert await events.latest_corrections("alice", 2) == ["add type hints", "prefer f-strings"]
        assert await events.latest_corrections("alice", 10) == ["use pathlib", "add type hints", "prefer f-strings"]
        assert await events.latest_corrections("bob", 10) == []
    # Repeats count once, at their newest place: older different corrections keep their room.
    for note in ("Add  type hints", "add type hints", "use pathlib"):
        await store.record_event(EventRecord("s1", "correction", None, text=note))
    async with store.unit() as s:
        events = EventRepository(s)
        assert await events.latest_corrections("alice", 2) == ["add type hints", "use pathlib"]
        assert await events.latest_corrections("alice", 10) == ["prefer f-strings", "add type hints", "use pathlib"]


async def test_keep_outcomes_and_held_back_completions(store: RolloutStore) -> None:
    """What a developer's show policy starts from: each shown completion with an outcome and the share of it
    kept (what its accept took, times what of that survived its last snapshot; 0 for a reject), oldest first;
    and the completions the policy held back (none shown)."""
    await seed(store)
    await seed(store, developer="bob", session="s2")
    t0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)

    def shown(cid: str, k: int, **kw: object) -> CompletionRecord:
        cand = [CandidateRecord(f"text {cid}", [4], [-0.1], "stop")]
        return completion(cid, candidates=cand, created_at=t0 + timedelta(seconds=k), **kw)  # type: ignore[arg-type]

    for k, cid in enumerate(["c0", "c1", "c2", "c3", "c4"]):
        await store.record_completion(shown(cid, k))
    await store.record_completion(shown("c5", 5, shown_index=None))
    await store.record_completion(shown("b0", 6, session="s2", developer="bob"))
    events = [
        EventRecord("s1", "accepted", "c0", accepted_length=7),
        EventRecord("s1", "edit_snapshot", "c0", delay_s=2.0, survival_ratio=0.9),  # the last one decides
        EventRecord("s1", "edit_snapshot", "c0", delay_s=1.0, survival_ratio=0.2),
        EventRecord("s1", "partial_accept", "c1", accepted_length=3),  # 3 of the 7 characters taken
        EventRecord("s1", "edit_snapshot", "c1", delay_s=2.0, survival_ratio=0.5),  # and half of them kept
        EventRecord("s1", "rejected", "c2", inferred=True),
        EventRecord("s1", "accepted", "c3", accepted_length=7),  # no snapshot yet: all kept
        EventRecord("s1", "shown", "c4"),  # undecided: left out
        EventRecord("s2", "rejected", "b0"),
    ]
    for event in events:
        await store.record_event(event)
    async with store.unit() as s:
        repo = CompletionRepository(s)
        assert await repo.keep_outcomes("alice", 10) == [
            ("text c0", 0.9),
            ("text c1", pytest.approx(3 / 7 * 0.5)),
            ("text c2", 0.0),
            ("text c3", 1.0),
        ]
        assert await repo.keep_outcomes("alice", 2) == [("text c2", 0.0), ("text c3", 1.0)]
        assert await repo.keep_outcomes("bob", 10) == [("text b0", 0.0)]
        assert await repo.keep_outcomes("carol", 10) == []
        assert await repo.silent("alice") == [("file:///app.py", t0 + timedelta(seconds=5))]
        assert await repo.silent("bob") == []
