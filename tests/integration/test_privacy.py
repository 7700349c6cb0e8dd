"""What the store keeps of a session, wired as `heedful serve` wires it: `Services.resolve` on real settings
files (a global file and team files), the small model's real tokenizer, the real store on a real SQLite
file and a real PostgreSQL server.

Secrets are planted in every text a client sends (file name, language id, client version, the prompt and
its token ids, candidates, group members, kept text, corrections); the tests count how many of them reach
the database: every column of every row read back, token ids decoded back to text, and for SQLite the raw
bytes of the database file and its WAL. The target is 0.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from kernel.settings import SettingsError, resolve
from personalization.dataset import load_training_data
from personalization.rollouts import NO_PROMPT, RolloutCollector
from server.engine.tokens import LocalTokenizer
from server.runtime import EngineHost, RecordingPaused, Services
from server.stores import open_store
from storage.models import Base, Completion, Document, Event, EventKind, LspSession
from storage.repositories import RolloutRepository, Scope
from storage.store import CandidateRecord, CompletionRecord, DocumentSeen, EventRecord, GroupRecord, SessionStart

# One of each form the redaction must catch, with values that occur nowhere else.
SECRETS = {
    "aws access key": "AKIAQWERTYUIOPASDFGH",
    "github token": "ghp_" + "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0FeDcBa",
    "hugging face token": "hf_" + "QwErTyUiOpAsDfGhJkLzXcVbNmQwErTyUi",
    "gitlab token": "glpat-" + "Pq7_Rs8-Tu9Vw0Xy1Za2",
    "npm token": "npm_" + "Ab1Cd2Ef3Gh4Ij5Kl6Mn7Op8Qr9St0Uv1Wx2",
    "env-style password": "Tr0ub4dor-and-3",
    "secret key literal": "django-insecure-q8v!x2",
    "token literal": "tok-5f9c2e71aa",
    "password in a url": "pgS3cretPw",
    "global pattern": "ACME-314159",
    "web's pattern": "WEB-271828",
    "private's pattern": "PRV-577215",
}
S = SECRETS
TEAM_SECRET = {"web": S["web's pattern"], "private": S["private's pattern"]}
SOURCE_TEMPLATE = f"""import os

AWS_ID = "{S["aws access key"]}"
GH = "{S["github token"]}"
HF = "{S["hugging face token"]}"
GL = "{S["gitlab token"]}"
# shell: MYSQL_PASSWORD={S["env-style password"]} ./migrate.sh
SECRET_KEY = '{S["secret key literal"]}'
token = "{S["token literal"]}"
DSN = "postgres://app:{S["password in a url"]}@db/shop"
TICKETS = ["{S["global pattern"]}", "{{team_secret}}"]


def checkout(cart):
    total = 0
"""
SOURCE = SOURCE_TEMPLATE.format(team_secret="PLAIN-1")
ORDINARY = "def checkout(cart):"  # code around the secrets, which the store keeps
OTHER_TEAM_ID = "WEB-161803"  # web's pattern, typed in another team's session: not web's business


def planted_texts(session: str, team: str) -> list[str]:
    """Every client text one session sends, each with secrets (its team's pattern among them)."""
    team_secret = TEAM_SECRET[team]
    return [
        f"file:///w/{S['gitlab token']}/{session}.py",  # document uri and completion uri
        f"python {S['hugging face token']}",  # language id
        f"1.0 {S['npm token']}",  # client version
        SOURCE_TEMPLATE.format(team_secret=team_secret),  # prompt (and its token ids), kept text
        f'\n    return "{S["aws access key"]}"',  # shown candidate
        f"\n    key = '{S['github token']}'  # {team_secret}",  # group member
        f"never hardcode MYSQL_PASSWORD={S['env-style password']}",  # correction
    ]


@dataclass
class Wired:
    config: Path
    services: Services
    tokenizer: LocalTokenizer
    database_url: str


@pytest.fixture(scope="module")
def tokenizer(small_model: Path) -> LocalTokenizer:
    return LocalTokenizer(small_model)


@pytest.fixture
async def wired(
    tmp_path: Path, database_url: str, small_model: Path, tokenizer: LocalTokenizer
) -> AsyncIterator[Wired]:

    config = tmp_path / "heedful.toml"
    config.write_text(
        f'[model]\npath = "{small_model}"\n\n[database]\nurl = "{database_url}"\n\n'
        "[privacy]\nredact_patterns = ['ACME-[0-9]{6}']\n"
    )
    teams = tmp_path / "teams"
    teams.mkdir()
    (teams / "web.toml").write_text("[privacy]\nredact_patterns = ['WEB-[0-9]{6}']\n")
    (teams / "private.toml").write_text("[privacy]\nstore_prompts = false\nredact_patterns = ['PRV-[0-9]{6}']\n")
    (teams / "ops.toml").write_text("[completion]\nmax_tokens = 32\n")
    base = resolve(config)
    store = await open_store(base.settings, tokenize=tokenizer.encode)
    services = Services(config, base, EngineHost(base.settings), store, tokenizer)
    try:
        yield Wired(config, services, tokenizer, database_url)
    finally:
        await services.close()


async def run_session(wired: Wired, session: str, developer: str, team: str, *, resolve_first: bool = True) -> None:
    """What one editor session writes: start, a document, a completion with a group, an accept, a kept
    text and a correction. `resolve_first` as `initialize` does; without it the store asks `Services`."""
    store, tok = wired.services.store, wired.tokenizer
    uri, language, version, prompt, shown, member, correction = planted_texts(session, team)
    if resolve_first:
        wired.services.resolve(developer, team)
    futures = [store.start_session(SessionStart(session, developer, team, "pytest", version))]
    doc = DocumentSeen(session, uri, language, 1)
    futures.append(store.record_document(doc))
    shown_ids = tok.encode(shown)
    futures.append(
        store.record_completion(
            CompletionRecord(
                id=f"c-{session}",
                session_id=session,
                developer_id=developer,
                team_id=team,
                prompt=prompt,
                prompt_token_ids=tok.encode(prompt),  # as the engine returns them: the raw prompt's
                candidates=[CandidateRecord(shown, shown_ids, [-0.5] * len(shown_ids), "stop")],
                uri=uri,
                document=doc,
            )
        )
    )
    member_ids = tok.encode(member)
    group = GroupRecord(f"c-{session}", [CandidateRecord(member, member_ids, [-1.0] * len(member_ids))], session)
    futures.append(store.record_group(group))
    futures.append(store.record_event(EventRecord(session, "accepted", f"c-{session}")))
    futures.append(
        store.record_event(
            EventRecord(session, "edit_snapshot", f"c-{session}", delay_s=30.0, survival_ratio=0.5, kept_text=prompt)
        )
    )
    futures.append(store.record_event(EventRecord(session, "correction", f"c-{session}", text=correction)))
    futures.append(store.end_session(session))
    for fut in futures:
        await fut


async def stored_text(wired: Wired) -> str:
    """Everything the database holds, as text: every column of every row, and token ids decoded."""
    parts: list[str] = []
    async with wired.services.store.unit() as s:
        for table in Base.metadata.sorted_tables:
            for row in (await s.execute(table.select())).mappings():
                for name, value in row.items():
                    parts.append(json.dumps(value, default=str, ensure_ascii=False))
                    if name in ("prompt_token_ids", "token_ids") and value:
                        parts.append(wired.tokenizer.decode(list(value)))
    return "\n".join(parts)


def raw_sqlite_bytes(url: str) -> bytes:
    if not url.startswith("sqlite"):
        return b""
    db = Path(url.split("///", 1)[1])
    return b"".join(p.read_bytes() for p in (db, db.with_name(db.name + "-wal")) if p.exists())


def count_secrets(text: str, raw: bytes) -> dict[str, int]:
    found = {name: text.count(value) + raw.count(value.encode()) for name, value in SECRETS.items()}
    return {name: n for name, n in found.items() if n}


async def test_planted_secrets_never_reach_the_database(wired: Wired) -> None:
    await run_session(wired, "s-web", "alice", "web")  # web's pattern on top of the global one
    await run_session(wired, "s-private", "bob", "private")  # store_prompts = false
    await run_session(wired, "s-private-2", "bob", "private", resolve_first=False)  # the store asks
    await wired.services.store.writer.flush()
    sessions = (("s-web", "web"), ("s-private", "private"), ("s-private-2", "private"))
    planted = sum(t.count(v) for s, team in sessions for t in planted_texts(s, team) for v in S.values())

    text, raw = await stored_text(wired), raw_sqlite_bytes(wired.database_url)
    assert ORDINARY in text  # the search reads what was stored: the code around the secrets is there ...
    assert not raw or ORDINARY.encode() in raw  # ... in the SQLite file or its WAL too
    leaked = count_secrets(text, raw)
    print(f"planted {planted} secrets ({len(SECRETS)} kinds) in 3 sessions; stored: {sum(leaked.values())}")
    assert leaked == {}

    async with wired.services.store.unit() as s:
        rows = {c.id: c for c in await s.scalars(select(Completion))}
        docs = list(await s.scalars(select(Document)))
    web = rows["c-s-web"]
    assert "[REDACTED:custom]" in web.prompt and ORDINARY in wired.tokenizer.decode(web.prompt_token_ids)
    assert web.uri == "file:///w/[REDACTED:gitlab-token]/s-web.py" and web.redacted
    assert {d.uri for d in docs} >= {"file:///w/[REDACTED:gitlab-token]/s-web.py"}
    for cid in ("c-s-private", "c-s-private-2"):  # recorded, without the prompt's text or token ids
        assert (rows[cid].prompt, rows[cid].prompt_token_ids) == ("", [])
        assert rows[cid].candidates and rows[cid].uri == f"file:///w/[REDACTED:gitlab-token]/{cid[2:]}.py"


async def test_a_team_pattern_redacts_that_teams_sessions_only(wired: Wired) -> None:
    wired.services.resolve("alice", "web")
    wired.services.resolve("carol", "ops")
    store = wired.services.store
    for session, developer, team in (("s-web", "alice", "web"), ("s-ops", "carol", "ops")):
        await store.start_session(SessionStart(session, developer, team))
        await store.record_event(EventRecord(session, "correction", None, text=f"ticket {OTHER_TEAM_ID}"))
    async with store.unit() as s:
        texts = {e.session_id: e.text for e in await s.scalars(select(Event))}
    assert texts == {"s-web": "ticket [REDACTED:custom]", "s-ops": f"ticket {OTHER_TEAM_ID}"}


async def test_completions_without_a_prompt_are_left_out_of_training(wired: Wired) -> None:
    """They still become rollouts (the metrics count them), kept out with the reason, so they neither count
    toward `training.min_new_rollouts` nor give a group or a correction sample: the trainer cannot learn
    from a prompt it does not have."""
    await run_session(wired, "s-private", "bob", "private")
    await run_session(wired, "s-web", "alice", "web")
    settings = wired.services.base.settings
    async with wired.services.store.unit() as s:
        stats = await RolloutCollector(rewrite_threshold=0.5, settle_s=0).collect(
            s, now=datetime.now(UTC) + timedelta(seconds=1)
        )
        assert stats.completions == 2 and stats.kept_out == {NO_PROMPT: 1} and stats.trainable == 1
        assert await RolloutRepository(s).count_pending(Scope.team("private")) == 0
        assert await RolloutRepository(s).count_pending(Scope.team("web")) == 1
    data: dict[str, Any] = {}
    for scope in (Scope.team("private"), Scope.team("web")):
        async with wired.services.store.unit() as s:
            data[scope.id] = await load_training_data(s, scope, settings.training, tokenize=wired.tokenizer.encode)
    assert (len(data["private"].groups), len(data["private"].corrections)) == (0, 0)
    assert (len(data["web"].groups), len(data["web"].corrections)) == (1, 1)  # the same session, with its prompt


async def test_a_broken_team_file_pauses_recording_of_new_sessions_until_it_is_fixed(wired: Wired) -> None:
    team_file = wired.config.parent / "teams" / "private.toml"
    store = wired.services.store
    await run_session(wired, "s-before", "bob", "private")  # running before the file breaks

    team_file.write_text("[privacy]\nstore_prompts = 'no'\n")  # the admin's typo
    with pytest.raises(RecordingPaused) as info:
        wired.services.resolve("bob", "private")
    message = str(info.value)
    assert isinstance(info.value, SettingsError)
    assert str(team_file) in message and "privacy.store_prompts = 'no' is not valid: expected true or false" in message
    assert "nothing of the new sessions of developer 'bob', team 'private' is recorded until the file is fixed" in (
        message
    )
    skipped_before = store.paused_writes
    await store.start_session(SessionStart("s-during", "bob", "private"))
    during = [
        store.record_document(DocumentSeen("s-during", "file:///w/a.py", "python", 1)),
        store.record_completion(
            CompletionRecord("c-during", "s-during", "bob", SOURCE, [1, 2], [CandidateRecord("x", [3], [-1.0])])
        ),
        store.record_event(EventRecord("s-during", "correction", None, text="paused")),
    ]
    assert [await f for f in during] == [None, None, None]  # acknowledged, written nowhere
    assert store.paused_writes - skipped_before == 3
    # The session that was running keeps the settings in force when the file broke: recorded, no prompt.
    await store.record_event(EventRecord("s-before", "correction", "c-s-before", text="still recorded"))

    team_file.write_text(
        "[privacy]\nstore_prompts = false\nredact_patterns = ['PRV-[0-9]{6}']\n"
    )  # fixed: the next resolution resumes recording
    wired.services.resolve("bob", "private")
    await store.record_completion(
        CompletionRecord("c-after", "s-during", "bob", SOURCE, [1, 2], [CandidateRecord("x", [3], [-1.0])])
    )
    async with store.unit() as s:
        sessions = {x.id for x in await s.scalars(select(LspSession))}
        completions = {c.id: c.prompt for c in await s.scalars(select(Completion))}
        corrections = await s.scalars(select(Event).where(Event.kind == EventKind.CORRECTION))
        events = {(e.session_id, e.text) for e in corrections}
        documents = [d.session_id for d in await s.scalars(select(Document))]
    assert "s-during" in sessions  # who connected (no typed text): later writes of the session need the row
    assert completions == {"c-s-before": "", "c-after": ""}
    assert ("s-before", "still recorded") in events and ("s-during", "paused") not in events
    assert "s-during" not in documents
