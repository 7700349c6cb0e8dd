"""The rollout store as the rest of Heedful uses it: open it, record what happens (through the batching
writer, redacted first), and run the admin operations (stats, retention, purge, export).

Text is redacted here, before a write is even queued, so a secret never reaches the database file,
its WAL, or a log line. When redaction changes a prompt its token ids are recomputed from the redacted
text (if a tokenizer was given) or dropped, and the completion is marked `redacted`; candidates whose
text changed get `logprobs_stale` so the trainer recomputes their log-probs.

What is kept of a session's writes is that session's `WritePolicy`, from its own resolved settings (global,
team and developer `privacy` keys): its redaction patterns, whether prompts are stored at all, and whether
recording is paused because its settings file is broken.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from storage.adapter_files import plan_scope_purge, remove_scope_files, resolve_adapters_root
from storage.db import Database, StoreError, open_database
from storage.models import AdapterStatus, Candidate, Completion, CompletionMode, Event, EventKind, utcnow
from storage.redaction import Redactor, redactor_for
from storage.repositories import (
    PURGE_ACTION,
    AdapterRepository,
    AuditRepository,
    CompletionRepository,
    DocumentRepository,
    EventRepository,
    IdentityRepository,
    PurgeRepository,
    RetentionRepository,
    RolloutRepository,
    Scope,
    SessionRepository,
    StatsRepository,
)
from storage.round_metrics import RoundMetrics
from storage.writer import BatchingWriter

log = logging.getLogger(__name__)

Tokenize = Callable[[str], list[int]]


@dataclass(slots=True)
class CandidateRecord:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    stale: bool = False  # redaction changed the text; ids and log-probs must be recomputed


def _candidate_rows(describe: str, candidates: list[CandidateRecord]) -> list[Candidate]:
    for c in candidates:
        if not c.stale and len(c.token_ids) != len(c.logprobs):
            raise StoreError(
                f"{describe}: a candidate has {len(c.token_ids)} token ids and {len(c.logprobs)} log-probs"
            )
    return [
        Candidate(
            index=i,
            text=c.text,
            token_ids=c.token_ids,
            logprobs=c.logprobs,
            finish_reason=c.finish_reason,
            logprobs_stale=c.stale,
        )
        for i, c in enumerate(candidates)
    ]


@dataclass(slots=True)
class CompletionRecord:
    id: str
    session_id: str
    developer_id: str
    prompt: str
    prompt_token_ids: list[int]
    candidates: list[CandidateRecord]
    shown_index: int | None = 0
    mode: str = "prefix"
    team_id: str | None = None
    uri: str | None = None
    line: int | None = None
    character: int | None = None
    adapter_version: str | None = None
    arm: str | None = None
    latency_ms: float | None = None
    document_id: int | None = None
    # Or the document's queued write: the writer applies in order, so its row exists by then.
    document: DocumentSeen | None = None
    created_at: datetime = field(default_factory=utcnow)
    redacted: bool = False

    def describe(self) -> str:
        return f"completion {self.id!r} of session {self.session_id!r}"

    async def apply(self, session: AsyncSession) -> str:
        try:
            mode = CompletionMode(self.mode)
        except ValueError:
            raise StoreError(f"{self.describe()}: mode {self.mode!r} is not one of 'fim', 'prefix'") from None
        row = Completion(
            id=self.id,
            session_id=self.session_id,
            developer_id=self.developer_id,
            team_id=self.team_id,
            document_id=self.document_id if self.document is None else self.document.row_id,
            uri=self.uri,
            line=self.line,
            character=self.character,
            mode=mode,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            adapter_version=self.adapter_version,
            arm=self.arm,
            latency_ms=self.latency_ms,
            shown_index=self.shown_index,
            redacted=self.redacted,
            created_at=self.created_at,
        )
        cands = _candidate_rows(self.describe(), self.candidates)
        await CompletionRepository(session).add(row, cands)
        return self.id


@dataclass(slots=True)
class GroupRecord:
    """Group members sampled after the shown candidate was answered (off the request path)."""

    completion_id: str
    candidates: list[CandidateRecord]
    session_id: str | None = None  # whose write policy applies; None: the store's default

    def describe(self) -> str:
        return f"group of {len(self.candidates)} for completion {self.completion_id!r}"

    async def apply(self, session: AsyncSession) -> int:
        rows = _candidate_rows(self.describe(), self.candidates)
        return await CompletionRepository(session).add_candidates(self.completion_id, rows)


@dataclass(slots=True)
class EventRecord:
    session_id: str
    kind: str
    completion_id: str | None = None
    accepted_length: int | None = None
    inferred: bool = False
    delay_s: float | None = None
    survival_ratio: float | None = None
    kept_text: str | None = None
    text: str | None = None
    truncated: bool = False
    created_at: datetime = field(default_factory=utcnow)

    def describe(self) -> str:
        return f"{self.kind} event on completion {self.completion_id!r} of session {self.session_id!r}"

    async def apply(self, session: AsyncSession) -> Callable[[], int]:
        try:
            kind = EventKind(self.kind)
        except ValueError:
            allowed = ", ".join(k.value for k in EventKind)
            raise StoreError(f"{self.describe()}: kind {self.kind!r} is not one of {allowed}") from None
        if self.accepted_length is not None and self.accepted_length < 0:
            raise StoreError(f"{self.describe()}: accepted length {self.accepted_length} is negative")
        if self.survival_ratio is not None and not 0.0 <= self.survival_ratio <= 1.0:
            raise StoreError(f"{self.describe()}: survival ratio {self.survival_ratio} is outside 0..1")
        row = Event(
            session_id=self.session_id,
            completion_id=self.completion_id,
            kind=kind,
            accepted_length=self.accepted_length,
            inferred=self.inferred,
            delay_s=self.delay_s,
            survival_ratio=self.survival_ratio,
            kept_text=self.kept_text,
            text=self.text,
            truncated=self.truncated,
            created_at=self.created_at,
        )
        await EventRepository(session).add(row)
        return lambda: row.id  # the id exists once the batch is flushed


@dataclass(slots=True)
class SessionStart:
    session_id: str
    developer_id: str
    team_id: str | None = None
    client_name: str | None = None
    client_version: str | None = None
    started_at: datetime = field(default_factory=utcnow)

    def describe(self) -> str:
        return f"start of session {self.session_id!r} for developer {self.developer_id!r}"

    async def apply(self, session: AsyncSession) -> str:
        await SessionRepository(session).start(
            session_id=self.session_id,
            developer_id=self.developer_id,
            team_id=self.team_id,
            client_name=self.client_name,
            client_version=self.client_version,
            at=self.started_at,
        )
        return self.session_id


@dataclass(slots=True)
class SessionEnd:
    session_id: str
    ended_at: datetime = field(default_factory=utcnow)

    def describe(self) -> str:
        return f"end of session {self.session_id!r}"

    async def apply(self, session: AsyncSession) -> None:
        await SessionRepository(session).end(self.session_id, self.ended_at)


@dataclass(slots=True)
class DocumentSeen:
    session_id: str
    uri: str
    language_id: str | None
    version: int
    row_id: int | None = None  # set when applied, for completions queued after it

    def describe(self) -> str:
        return f"document {self.uri!r} v{self.version} of session {self.session_id!r}"

    async def apply(self, session: AsyncSession) -> int:
        row = await DocumentRepository(session).record(
            session_id=self.session_id, uri=self.uri, language_id=self.language_id, version=self.version
        )
        self.row_id = row.id
        return row.id


@dataclass(frozen=True, slots=True)
class WritePolicy:
    """What the store keeps of one session's writes, from that session's resolved `privacy` settings.

    `paused` says why nothing of the session is recorded: its settings file is broken, and recording it
    under other settings (the global ones) could keep what its own file forbids, e.g. prompts a team set
    `store_prompts = false` for.
    """

    redactor: Redactor
    store_prompts: bool = True
    paused: str | None = None

    @classmethod
    def of(cls, redact_patterns: tuple[str, ...], store_prompts: bool) -> WritePolicy:
        return cls(redactor_for(redact_patterns), store_prompts)


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """What opening the store takes: plain values (from `database` and `privacy` settings, by
    `server.stores.store_options`), so storage depends on no settings type."""

    url: str = ""  # empty: the SQLite file `heedful.db` in the data dir
    busy_timeout_s: float = 5.0
    redact_patterns: tuple[str, ...] = ()
    store_prompts: bool = True
    retention_days: int = 0  # 0 keeps everything

    def policy(self) -> WritePolicy:
        """What the store keeps of a session's writes under these `privacy` values."""
        return WritePolicy.of(self.redact_patterns, self.store_prompts)


Who = tuple[str, str | None]  # (developer, team): the settings a session's policy comes from
PolicyOf = Callable[[str, str | None], None]


@dataclass(slots=True)
class _SettingsState:
    """The policy of one (developer, team): the one in force, and why their settings are broken now."""

    in_force: WritePolicy | None = None  # from the last resolution that succeeded
    broken: str | None = None  # the error of the latest resolution, None when it succeeded


class RolloutStore:
    def __init__(
        self, db: Database, redactor: Redactor, *, tokenize: Tokenize | None = None, store_prompts: bool = True
    ) -> None:
        self.db = db
        self.writer = BatchingWriter(db)
        self._tokenize = tokenize
        # Writes of sessions the store was not told about (admin tools, tests) follow the global settings.
        self.default_policy = WritePolicy(redactor, store_prompts)
        # Called at a session's start when its (developer, team) was never resolved: it resolves them and
        # reports back through `settings_resolved` / `settings_broken` (`server.runtime.Services`).
        self.resolve_settings: PolicyOf | None = None
        self._settings: dict[Who, _SettingsState] = {}
        self._sessions: dict[str, Who] = {}
        self._started_paused: set[str] = set()
        self.paused_writes = 0  # writes not recorded because their session's settings are broken

    @classmethod
    async def open(
        cls, options: StoreOptions, *, tokenize: Tokenize | None = None, apply_retention: bool = True
    ) -> RolloutStore:
        """Open (and upgrade) the database; delete rows older than `options.retention_days`."""
        db = await open_database(options.url, busy_timeout_s=options.busy_timeout_s)
        policy = options.policy()
        store = cls(db, policy.redactor, tokenize=tokenize, store_prompts=policy.store_prompts)
        if apply_retention and options.retention_days > 0:
            try:
                await store.apply_retention(options.retention_days, actor="retention:open")
            except Exception:
                await db.dispose()
                raise
        return store

    async def close(self) -> None:
        try:
            await self.writer.close()
        finally:
            await self.db.dispose()

    @asynccontextmanager
    async def unit(self) -> AsyncIterator[AsyncSession]:
        """One unit of work: a session whose transaction commits at the end (or rolls back on error)."""
        async with self.db.sessions() as session, session.begin():
            yield session

    # -- whose settings a write follows ---------------------------------------------------------------

    def settings_resolved(self, developer: str, team: str | None, policy: WritePolicy) -> None:
        """(developer, team)'s settings resolved: their sessions' writes follow `policy` from now on (a
        session paused at its start resumes)."""
        state = self._settings.setdefault((developer, team), _SettingsState())
        state.in_force, state.broken = policy, None

    def settings_broken(self, developer: str, team: str | None, reason: str) -> None:
        """(developer, team)'s settings cannot be resolved. Sessions that start now record nothing until
        they resolve again; sessions already running keep the policy in force (like their other settings)."""
        self._settings.setdefault((developer, team), _SettingsState()).broken = reason

    def policy_of(self, session_id: str | None) -> WritePolicy:
        """The policy a session's writes follow now (the default for a session the store was not told of)."""
        who = self._sessions.get(session_id) if session_id is not None else None
        state = self._settings.get(who) if who is not None else None
        if state is None:
            return self.default_policy
        assert session_id is not None
        if state.broken is None and state.in_force is not None:
            self._started_paused.discard(session_id)
            return state.in_force
        if state.in_force is None or session_id in self._started_paused:
            return WritePolicy(self.default_policy.redactor, store_prompts=False, paused=state.broken)
        return state.in_force

    def _skipped(self) -> asyncio.Future[Any]:
        """The acknowledgement of a write a paused session does not make: done, with nothing written."""
        self.paused_writes += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    # -- the language server's writes: queued, redacted, acknowledged by their futures ---------------

    def start_session(self, op: SessionStart) -> Any:
        """Record a session's start, and bind its later writes to its (developer, team)'s policy.

        The session row is written even while recording is paused: it holds who connected (ids and the
        redacted client name), nothing typed, and the session's writes need it once recording resumes.
        """
        who = (op.developer_id, op.team_id)
        self._sessions[op.session_id] = who
        if who not in self._settings and self.resolve_settings is not None:
            self.resolve_settings(*who)
        state = self._settings.get(who)
        if state is not None and state.broken is not None:
            self._started_paused.add(op.session_id)
        policy = self.policy_of(op.session_id)
        op.client_name = self._clean_short(policy, op.client_name)
        op.client_version = self._clean_short(policy, op.client_version)
        return self.writer.submit(op)

    def end_session(self, session_id: str) -> Any:
        future = self.writer.submit(SessionEnd(session_id))
        self._sessions.pop(session_id, None)
        self._started_paused.discard(session_id)
        return future

    def record_document(self, op: DocumentSeen) -> Any:
        policy = self.policy_of(op.session_id)
        if policy.paused:
            return self._skipped()
        op.uri = policy.redactor.clean(op.uri).text
        op.language_id = self._clean_short(policy, op.language_id)
        return self.writer.submit(op)

    def record_completion(self, record: CompletionRecord) -> Any:
        policy = self.policy_of(record.session_id)
        if policy.paused:
            return self._skipped()
        if not policy.store_prompts:
            # Neither the text nor its token ids (which encode the same text): training leaves it out.
            record.prompt, record.prompt_token_ids = "", []
        else:
            prompt = policy.redactor.clean(record.prompt)
            if prompt.redacted or prompt.truncated or prompt.repaired:
                record.prompt = prompt.text
                record.redacted = True
                # The old ids encode the original text, secret included: never store them.
                record.prompt_token_ids = self._tokenize(prompt.text) if self._tokenize else []
        if record.uri is not None:
            record.uri = policy.redactor.clean(record.uri).text
        if self._clean_candidates(policy, record.candidates):
            record.redacted = True
        return self.writer.submit(record)

    def record_group(self, record: GroupRecord) -> Any:
        """Append sampled group members to a recorded completion (redacted like the shown one)."""
        policy = self.policy_of(record.session_id)
        if policy.paused:
            return self._skipped()
        self._clean_candidates(policy, record.candidates)
        return self.writer.submit(record)

    def _clean_candidates(self, policy: WritePolicy, candidates: list[CandidateRecord]) -> bool:
        """Redact candidate texts in place; True when any changed (their log-probs are then stale)."""
        changed = False
        for cand in candidates:
            cleaned = policy.redactor.clean(cand.text)
            if cleaned.text != cand.text:
                cand.text = cleaned.text
                cand.token_ids = self._tokenize(cleaned.text) if self._tokenize else []
                cand.logprobs = []
                cand.stale = True
                changed = True
        return changed

    def record_event(self, record: EventRecord) -> Any:
        policy = self.policy_of(record.session_id)
        if policy.paused:
            return self._skipped()
        truncated = False
        for name in ("kept_text", "text"):
            value = getattr(record, name)
            if value is not None:
                cleaned = policy.redactor.clean(value)
                setattr(record, name, cleaned.text)
                truncated = truncated or cleaned.truncated
        record.truncated = record.truncated or truncated
        return self.writer.submit(record)

    @staticmethod
    def _clean_short(policy: WritePolicy, value: str | None) -> str | None:
        return None if value is None else policy.redactor.clean(value, limit=200).text

    # -- admin operations -------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        async with self.unit() as s:
            return await StatsRepository(s).counts()

    async def apply_retention(self, days: int, *, actor: str = "retention") -> dict[str, int]:
        if days <= 0:
            return {}
        cutoff = datetime.now(UTC) - timedelta(days=days)
        async with self.unit() as s:
            deleted = await RetentionRepository(s).delete_older_than(cutoff)
            if any(deleted.values()):
                await AuditRepository(s).add(
                    actor=actor, action="retention", reason=f"privacy.retention_days = {days}", detail=deleted
                )
        return deleted

    async def purge_developer(
        self, developer_id: str, *, actor: str, reason: str | None = None, adapters_root: Path | None = None
    ) -> dict[str, Any]:
        """Delete every row and adapter file of a developer, and record it in the audit log.

        The audit entry is the purge's tombstone (see `PurgeRepository`): a training round of this developer
        already running when it commits never publishes. On disk, everything in the developer's folder under
        `adapters_root` (default `<data dir>/adapters`) goes: versions, temp folders of a dead publish, the
        trainer's work folders. A row whose path leads anywhere else is refused, named in `refused` (and in
        the audit entry), and left in place; the rest goes on.
        """
        await self.writer.flush()  # nothing of theirs may land after the purge
        root = resolve_adapters_root(adapters_root)
        scope = Scope.developer(developer_id)
        async with self.unit() as s:
            purges = PurgeRepository(s)
            await purges.lock()  # a publish of a running round waits, then sees the tombstone
            result = await purges.developer(developer_id)
            plan = await asyncio.to_thread(plan_scope_purge, root, scope, result["adapter_paths"])
            await AuditRepository(s).add(
                actor=actor,
                action=PURGE_ACTION,
                scope=scope,
                reason=reason or "heedful purge --developer",
                detail={"developer": developer_id, "deleted": result["deleted"], "refused": plan.refused},
            )
        removed, errors = await asyncio.to_thread(remove_scope_files, plan, root, scope)
        for message in plan.refused + errors:
            log.warning("purge of %s: %s", developer_id, message)
        result["adapter_dirs_removed"] = [str(p) for p in removed]
        result["refused"] = plan.refused
        result["errors"] = errors
        return result

    async def teams(self) -> dict[str, dict[str, Any]]:
        """Every team the store knows: its developers and its team adapter versions."""
        async with self.unit() as s:
            identities, adapters = IdentityRepository(s), AdapterRepository(s)
            out: dict[str, dict[str, Any]] = {}
            for team in await identities.teams():
                versions = await adapters.versions(Scope.team(team))
                out[team] = {
                    "developers": await identities.developers_of_team(team),
                    "adapters": [
                        {
                            "id": v.id,
                            "status": v.status.value,
                            "step": v.step,
                            "kl": v.kl,
                            "at": v.created_at.isoformat(),
                        }
                        for v in versions
                    ],
                }
            return out

    async def adapter_overview(self) -> dict[str, dict[str, Any]]:
        """Per scope ("developer:<id>", "team:<name>"): the active version and its step, and the final
        training loss and KL of the latest trained version (whatever its gate verdict)."""
        async with self.unit() as s:
            versions = await AdapterRepository(s).versions()  # newest first
        out: dict[str, dict[str, Any]] = {}
        for v in versions:
            scope = f"{v.scope_kind.value}:{v.scope_id}"
            if scope not in out:  # the newest version of the scope
                out[scope] = {
                    "active_version": None,
                    "active_step": None,
                    "latest_loss": RoundMetrics.from_json(v.metrics).final_loss,
                    "latest_kl": v.kl,
                }
            if v.status == AdapterStatus.ACTIVE:
                out[scope]["active_version"], out[scope]["active_step"] = v.id, v.step
        return out

    async def session_events(self, session_id: str) -> list[dict[str, Any]]:
        """A session's events in a form two runs of the same session can be compared in: each names its
        completion by its place in the session (0, 1, ...), and leaves out ids, times and the texts the
        model wrote. Sorted, since events that arrive together may be written in either order."""
        async with self.unit() as s:
            order = {c.id: i for i, c in enumerate(await CompletionRepository(s).for_session(session_id))}
            events = await EventRepository(s).for_session(session_id)
        rows = [
            {
                "kind": e.kind.value,
                "completion": order.get(e.completion_id) if e.completion_id else None,
                "inferred": e.inferred,
                "delay_s": e.delay_s,
                "text": e.text if e.kind == EventKind.CORRECTION else None,
            }
            for e in events
        ]
        return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))

    async def session_completion_ids(self, session_id: str) -> list[str]:
        """The ids of a session's completions in the order `session_events` numbers them (0, 1, ...)."""
        async with self.unit() as s:
            return [c.id for c in await CompletionRepository(s).for_session(session_id)]

    async def audit_log(self, since: datetime | None = None) -> list[dict[str, Any]]:
        """The audit log (training, publishing, purges, retention), oldest first."""
        async with self.unit() as s:
            return [
                {
                    "at": e.at.isoformat(),
                    "actor": e.actor,
                    "action": e.action,
                    "scope": f"{e.scope_kind}:{e.scope_id}" if e.scope_kind else None,
                    "reason": e.reason,
                    "detail": e.detail,
                }
                for e in await AuditRepository(s).since(since)
            ]

    async def export_developer(self, developer_id: str) -> list[dict[str, Any]]:
        """The developer's rollouts as (context, response, feedback) triples."""
        async with self.unit() as s:
            rows = await RolloutRepository(s).for_developer(developer_id)
            return [
                {
                    "context": r.context,
                    "response": r.response,
                    "feedback": {"next_state": r.next_state, "signal": r.signal, "rewards": r.rewards},
                    "scope": f"{r.scope_kind.value}:{r.scope_id}",
                    "status": r.status.value,
                    "completion_id": r.completion_id,
                    "created_at": r.created_at.isoformat(),
                }
                for r in rows
            ]
