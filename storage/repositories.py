"""Every query of the rollout store. Repositories take an open `AsyncSession` and never commit: the
caller (the batching writer, or a service's unit of work) owns the transaction.

Scope isolation: every rollout and adapter query takes a `Scope` and filters on both its kind and id,
so a query for one team's rollouts cannot return another's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, and_, delete, exists, false, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from storage.db import StoreError
from storage.models import (
    ACCEPT_KINDS,
    AdapterStatus,
    AdapterVersion,
    AuditEntry,
    Candidate,
    Completion,
    CompletionMode,
    Developer,
    Document,
    Event,
    EventKind,
    LspSession,
    Rollout,
    RolloutStatus,
    ScopeControl,
    ScopeKind,
    Team,
    TrainingStatus,
    as_utc,
    utcnow,
)

KEEP_ADAPTERS = 10
_Row = TypeVar("_Row")


async def _get(session: AsyncSession, model: type[_Row], key: str) -> _Row | None:
    """`session.get` that keeps what it found for the rest of the unit of work.

    The identity map holds rows weakly, so a batch of events on one session would otherwise load the
    same session and completion rows again for every event.
    """
    cache: dict[tuple[type[Any], str], Any] = session.info.setdefault("heedful_rows", {})
    row: _Row | None = cache.get((model, key))
    if row is None:
        row = await session.get(model, key)
        if row is not None:
            cache[(model, key)] = row
    return row


@dataclass(slots=True, frozen=True)
class Scope:
    """Whose adapter and rollouts: one developer, or one team."""

    kind: ScopeKind
    id: str

    @classmethod
    def developer(cls, developer_id: str) -> Scope:
        return cls(ScopeKind.DEVELOPER, developer_id)

    @classmethod
    def team(cls, team_id: str) -> Scope:
        return cls(ScopeKind.TEAM, team_id)

    @classmethod
    def parse(cls, text: str) -> Scope:
        kind, sep, ident = text.partition(":")
        if not sep or not ident or kind not in ("developer", "team"):
            raise StoreError(f"scope {text!r} is not valid: write developer:<id> or team:<name>")
        return cls(ScopeKind(kind), ident)

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.id}"


class Repository:
    """Queries on one open session (a unit of work); repositories never commit."""

    def __init__(self, session: AsyncSession) -> None:
        self.s = session


def of_scope(model: Any, scope: Scope) -> ColumnElement[bool]:
    """The rows of `model` (a table with `scope_kind` and `scope_id` columns) that belong to `scope`."""
    return and_(model.scope_kind == scope.kind, model.scope_id == scope.id)


def completions_of(scope: Scope) -> ColumnElement[bool]:
    """The completions a scope's adapter learns from and serves: its developer's, or its team's."""
    if scope.kind == ScopeKind.DEVELOPER:
        return Completion.developer_id == scope.id
    return Completion.team_id == scope.id


def of_scopes(model: Any, scopes: Iterable[Scope]) -> ColumnElement[bool]:
    """The rows of `model` that belong to any of `scopes`."""
    return or_(*(of_scope(model, sc) for sc in scopes))


class IdentityRepository(Repository):
    async def ensure_team(self, team_id: str) -> Team:
        team = await self.s.get(Team, team_id)
        if team is None:
            team = Team(id=team_id)
            self.s.add(team)
            await self.s.flush()
        return team

    async def ensure_developer(self, developer_id: str, team_id: str | None = None) -> Developer:
        if team_id:
            await self.ensure_team(team_id)
        dev = await self.s.get(Developer, developer_id)
        if dev is None:
            dev = Developer(id=developer_id, team_id=team_id)
            self.s.add(dev)
            await self.s.flush()
        elif team_id and dev.team_id != team_id:
            dev.team_id = team_id
        return dev

    async def developer(self, developer_id: str) -> Developer | None:
        return await self.s.get(Developer, developer_id)

    async def teams(self) -> list[str]:
        return list(await self.s.scalars(select(Team.id).order_by(Team.id)))

    async def developers_of_team(self, team_id: str) -> list[str]:
        rows = await self.s.scalars(select(Developer.id).where(Developer.team_id == team_id).order_by(Developer.id))
        return list(rows)


class SessionRepository(Repository):
    async def start(
        self,
        *,
        session_id: str,
        developer_id: str,
        team_id: str | None,
        client_name: str | None,
        client_version: str | None,
        at: datetime | None = None,
    ) -> LspSession:
        await IdentityRepository(self.s).ensure_developer(developer_id, team_id)
        existing = await self.s.get(LspSession, session_id)
        if existing is not None:
            if existing.developer_id != developer_id:
                raise StoreError(
                    f"session {session_id!r} belongs to another developer: pick a new sessionId for this connection"
                )
            existing.ended_at = None  # a reconnect resumes the session
            return existing
        row = LspSession(
            id=session_id,
            developer_id=developer_id,
            team_id=team_id,
            client_name=client_name,
            client_version=client_version,
            started_at=at or utcnow(),
        )
        self.s.add(row)
        await self.s.flush()
        return row

    async def end(self, session_id: str, at: datetime | None = None) -> None:
        row = await self.require(session_id)
        row.ended_at = at or utcnow()

    async def get(self, session_id: str) -> LspSession | None:
        return await self.s.get(LspSession, session_id)

    async def require(self, session_id: str) -> LspSession:
        row = await _get(self.s, LspSession, session_id)
        if row is None:
            raise StoreError(
                f"session {session_id!r} is unknown: a session is recorded when its connection initializes"
            )
        return row


class DocumentRepository(Repository):
    async def record(self, *, session_id: str, uri: str, language_id: str | None, version: int) -> Document:
        await SessionRepository(self.s).require(session_id)
        row = Document(session_id=session_id, uri=uri, language_id=language_id, version=version)
        self.s.add(row)
        await self.s.flush()
        return row

    async def latest(self, session_id: str, uri: str) -> Document | None:
        stmt = (
            select(Document)
            .where(Document.session_id == session_id, Document.uri == uri)
            .order_by(Document.id.desc())
            .limit(1)
        )
        return (await self.s.scalars(stmt)).first()


class CompletionRepository(Repository):
    async def add(self, row: Completion, candidates: Sequence[Candidate]) -> Completion:
        sess = await SessionRepository(self.s).require(row.session_id)
        if sess.developer_id != row.developer_id:
            raise StoreError(
                f"completion {row.id!r} names developer {row.developer_id!r} but session {row.session_id!r} "
                f"belongs to {sess.developer_id!r}"
            )
        if row.shown_index is not None and not 0 <= row.shown_index < max(1, len(candidates)):
            raise StoreError(f"completion {row.id!r} shows candidate {row.shown_index} of a group of {len(candidates)}")
        row.candidates = list(candidates)
        self.s.add(row)
        await self.s.flush()
        return row

    async def add_candidates(self, completion_id: str, candidates: Sequence[Candidate]) -> int:
        """Append group members sampled after the shown one; their indices follow the existing ones."""
        row = await self.require(completion_id)
        start = len(row.candidates)
        for i, cand in enumerate(candidates):
            cand.index = start + i
            row.candidates.append(cand)
        await self.s.flush()
        return len(row.candidates)

    async def get(self, completion_id: str) -> Completion | None:
        return await self.s.get(Completion, completion_id)

    async def require(self, completion_id: str) -> Completion:
        row = await _get(self.s, Completion, completion_id)
        if row is None:
            raise StoreError(f"completion {completion_id!r} is unknown: use the completionId of a served item")
        return row

    async def for_session(self, session_id: str) -> list[Completion]:
        stmt = select(Completion).where(Completion.session_id == session_id).order_by(Completion.created_at)
        return list(await self.s.scalars(stmt))

    async def latest_for_session(self, session_id: str) -> Completion | None:
        stmt = (
            select(Completion)
            .where(Completion.session_id == session_id)
            .order_by(Completion.created_at.desc(), Completion.id.desc())
            .limit(1)
        )
        return (await self.s.scalars(stmt)).first()

    async def for_developer(self, developer_id: str) -> list[Completion]:
        stmt = select(Completion).where(Completion.developer_id == developer_id).order_by(Completion.created_at)
        return list(await self.s.scalars(stmt))

    async def by_ids(self, ids: Sequence[str]) -> dict[str, Completion]:
        return {c.id: c for c in await self.s.scalars(select(Completion).where(Completion.id.in_(list(ids))))}

    async def final_without_rollout(self, settled_before: datetime, limit: int) -> list[Completion]:
        """The oldest completions that have no rollout yet and are final: their session ended, or they
        were made before `settled_before` (their last edit snapshot is due)."""
        has_rollout = exists().where(Rollout.completion_id == Completion.id)
        stmt = (
            select(Completion)
            .join(LspSession, LspSession.id == Completion.session_id)
            .where(~has_rollout, or_(LspSession.ended_at.is_not(None), Completion.created_at <= settled_before))
            .order_by(Completion.created_at)
            .limit(limit)
        )
        return list(await self.s.scalars(stmt))

    async def newest_ids(
        self, scope: Scope, *, version: str | None, before: datetime | None, after: datetime | None, limit: int
    ) -> list[str]:
        """Ids of the scope's newest completions (served by adapter `version` when given, made in
        [`after`, `before`) when given), newest first."""
        stmt = select(Completion.id).where(completions_of(scope))
        if version is not None:
            stmt = stmt.where(Completion.adapter_version == version)
        if before is not None:
            stmt = stmt.where(Completion.created_at < before)
        if after is not None:
            stmt = stmt.where(Completion.created_at >= after)
        return list(await self.s.scalars(stmt.order_by(Completion.created_at.desc()).limit(limit)))

    async def keep_outcomes(self, developer_id: str, limit: int) -> list[tuple[str, float]]:
        """(shown text, share kept) of the developer's newest shown completions with an outcome, oldest first:
        an accept keeps the share of the suggestion it took (all of it, or a partial accept's part) times the
        share of that which survived its last edit snapshot (all of it before its first snapshot); a reject
        keeps nothing. Undecided ones are left out."""
        stmt = (
            select(Completion.id, Candidate.text)
            .join(Candidate, and_(Candidate.completion_id == Completion.id, Candidate.index == Completion.shown_index))
            .where(Completion.developer_id == developer_id, Completion.shown_index.is_not(None))
            .order_by(Completion.created_at.desc(), Completion.id.desc())
            .limit(limit * 2)  # most shown completions are decided; the undecided ones are skipped
        )
        shown = [(cid, text) for cid, text in await self.s.execute(stmt)]
        if not shown:
            return []
        events = select(
            Event.completion_id, Event.kind, Event.survival_ratio, Event.delay_s, Event.accepted_length
        ).where(
            Event.completion_id.in_([cid for cid, _ in shown]),
            Event.kind.in_([EventKind.ACCEPTED, EventKind.PARTIAL_ACCEPT, EventKind.REJECTED, EventKind.EDIT_SNAPSHOT]),
        )
        accepted: dict[str, int] = {}  # completion id -> the most characters an accept took
        rejected: set[str] = set()
        last_snapshot: dict[str, tuple[float, float]] = {}  # completion id -> (delay, survival) of the latest
        lengths = {cid: len(text.lstrip(" \t")) for cid, text in shown}  # the stored text has the healed blanks
        for cid, kind, survival, delay, length in await self.s.execute(events):
            if cid is None:
                continue
            if kind in ACCEPT_KINDS:
                taken = lengths[cid] if length is None else length
                accepted[cid] = max(accepted.get(cid, 0), taken)
            elif kind == EventKind.REJECTED:
                rejected.add(cid)
            elif survival is not None and (cid not in last_snapshot or (delay or 0.0) >= last_snapshot[cid][0]):
                last_snapshot[cid] = (delay or 0.0, float(survival))
        out: list[tuple[str, float]] = []
        for cid, text in shown:
            if cid in accepted:
                share = min(1.0, accepted[cid] / lengths[cid]) if lengths[cid] else 1.0
                out.append((text, share * last_snapshot.get(cid, (0.0, 1.0))[1]))
            elif cid in rejected:
                out.append((text, 0.0))
            if len(out) >= limit:
                break
        return out[::-1]

    async def silent(self, developer_id: str) -> list[tuple[str | None, datetime]]:
        """(uri, time of the request) of the developer's completions the show policy held back (none shown)."""
        stmt = select(Completion.uri, Completion.created_at).where(
            Completion.developer_id == developer_id, Completion.shown_index.is_(None)
        )
        return [(uri, as_utc(at)) for uri, at in await self.s.execute(stmt.order_by(Completion.created_at))]

    async def latencies(self, scope: Scope, version: str, since: datetime) -> list[float]:
        """Latencies (ms) of the scope's completions served by adapter `version` since `since`."""
        stmt = select(Completion.latency_ms).where(
            completions_of(scope),
            Completion.adapter_version == version,
            Completion.created_at >= since,
            Completion.latency_ms.is_not(None),
        )
        return [float(x) for x in await self.s.scalars(stmt) if x is not None]


DISTINCT_SCAN = 20  # EventRepository.latest_corrections reads up to this many times the corrections it keeps


class EventRepository(Repository):
    async def add(self, row: Event) -> Event:
        sess = await SessionRepository(self.s).require(row.session_id)
        if row.completion_id is not None:
            completion = await CompletionRepository(self.s).require(row.completion_id)
            if completion.developer_id != sess.developer_id:
                raise StoreError(
                    f"event on completion {row.completion_id!r} comes from session {row.session_id!r} of another "
                    "developer: feedback can only be given on one's own completions"
                )
        elif row.kind != EventKind.CORRECTION:
            raise StoreError(f"a {row.kind.value!r} event needs the completionId it is about")
        self.s.add(row)  # flushed with the rest of the unit of work: one INSERT round per batch
        return row

    async def for_completion(self, completion_id: str) -> list[Event]:
        stmt = select(Event).where(Event.completion_id == completion_id).order_by(Event.id)
        return list(await self.s.scalars(stmt))

    async def for_session(self, session_id: str) -> list[Event]:
        return list(await self.s.scalars(select(Event).where(Event.session_id == session_id).order_by(Event.id)))

    async def for_completions(self, completion_ids: Sequence[str]) -> list[Event]:
        """The events on any of the completions, in the order they were recorded."""
        stmt = select(Event).where(Event.completion_id.in_(list(completion_ids))).order_by(Event.id)
        return list(await self.s.scalars(stmt))

    async def corrections_on(self, completion_ids: Sequence[str]) -> dict[str, str]:
        """Completion id -> the text of the latest correction given on it (for those that have one)."""
        stmt = (
            select(Event)
            .where(Event.completion_id.in_(list(completion_ids)), Event.kind == EventKind.CORRECTION)
            .order_by(Event.id)
        )
        return {e.completion_id: e.text for e in await self.s.scalars(stmt) if e.completion_id and e.text}

    async def outcome_kinds(
        self, completion_ids: Sequence[str], kinds: Sequence[EventKind]
    ) -> list[tuple[str, EventKind]]:
        """(completion id, kind) of every event of one of `kinds` on any of the completions."""
        if not completion_ids:
            return []
        stmt = select(Event.completion_id, Event.kind).where(
            Event.completion_id.in_(list(completion_ids)), Event.kind.in_(list(kinds))
        )
        return [(cid, kind) for cid, kind in await self.s.execute(stmt) if cid is not None]

    async def latest_corrections(self, developer_id: str, limit: int) -> list[str]:
        """The developer's last `limit` different correction texts, oldest first.

        A developer who types the same correction every time ("add type hints") has one thing to say:
        repeats (same words, any case and spacing) count once, at their newest place, so older different
        corrections keep their room. At most `DISTINCT_SCAN` times `limit` recent corrections are read.
        """
        stmt = (
            select(Event.text)
            .join(LspSession, LspSession.id == Event.session_id)
            .where(LspSession.developer_id == developer_id, Event.kind == EventKind.CORRECTION, Event.text.is_not(None))
            .order_by(Event.id.desc())
            .limit(limit * DISTINCT_SCAN)
        )
        seen: set[str] = set()
        newest_first: list[str] = []
        for text in await self.s.scalars(stmt):
            key = " ".join((text or "").split()).casefold()
            if text and key and key not in seen:
                seen.add(key)
                newest_first.append(text)
            if len(newest_first) == limit:
                break
        return newest_first[::-1]

    async def counts_by_kind(self) -> dict[str, int]:
        rows = await self.s.execute(select(Event.kind, func.count()).group_by(Event.kind))
        counts = {kind.value: 0 for kind in EventKind}
        counts.update({kind.value: int(n) for kind, n in rows.all()})
        return counts


class RolloutRepository(Repository):
    async def add(
        self,
        scope: Scope,
        *,
        context: str,
        response: str,
        next_state: str | None,
        signal: str | None,
        rewards: list[Any],
        judge_votes: list[Any] | None = None,
        completion_id: str | None = None,
        developer_id: str | None = None,
    ) -> Rollout:
        if completion_id is not None:
            completion = await CompletionRepository(self.s).require(completion_id)
            developer_id = developer_id or completion.developer_id
            owner_ok = (scope.kind == ScopeKind.DEVELOPER and completion.developer_id == scope.id) or (
                scope.kind == ScopeKind.TEAM and completion.team_id == scope.id
            )
            if not owner_ok:
                raise StoreError(f"completion {completion_id!r} is not in scope {scope}: scopes never mix")
        row = Rollout(
            scope_kind=scope.kind,
            scope_id=scope.id,
            context=context,
            response=response,
            next_state=next_state,
            signal=signal,
            rewards=rewards,
            judge_votes=judge_votes or [],
            completion_id=completion_id,
            developer_id=developer_id,
        )
        self.s.add(row)
        await self.s.flush()
        return row

    async def pending(self, scope: Scope, limit: int | None = None) -> list[Rollout]:
        """The scope's rollouts not trained on yet, oldest first."""
        stmt = (
            select(Rollout)
            .where(of_scope(Rollout, scope), Rollout.status == RolloutStatus.PENDING)
            .order_by(Rollout.created_at, Rollout.id)
        )
        if limit is not None:
            stmt = stmt.limit(limit)
        return list(await self.s.scalars(stmt))

    async def pending_counts(self) -> dict[Scope, int]:
        """Every scope that has rollouts not trained on yet, with how many."""
        stmt = (
            select(Rollout.scope_kind, Rollout.scope_id, func.count())
            .where(Rollout.status == RolloutStatus.PENDING)
            .group_by(Rollout.scope_kind, Rollout.scope_id)
        )
        return {Scope(kind, sid): int(n) for kind, sid, n in await self.s.execute(stmt)}

    async def count_pending(self, scope: Scope) -> int:
        stmt = select(func.count()).where(of_scope(Rollout, scope), Rollout.status == RolloutStatus.PENDING)
        return int(await self.s.scalar(stmt) or 0)

    async def outcomes(self, scope: Scope, limit: int) -> list[tuple[str, str, int]]:
        """(context, shown response, outcome) of the scope's newest rollouts whose outcome is +1 or -1."""
        stmt = (
            select(Rollout.context, Rollout.response, Rollout.rewards)
            .where(of_scope(Rollout, scope), Rollout.response != "")
            .order_by(Rollout.created_at.desc(), Rollout.id.desc())
            .limit(limit * 4)  # most have a decided outcome; undecided ones (0, no signal) are skipped
        )
        out: list[tuple[str, str, int]] = []
        for context, response, rewards in await self.s.execute(stmt):
            outcome = next((r for r in rewards or [] if r is not None), None)  # only the shown one is set
            if outcome in (1, -1) and response.strip():
                out.append((context, response, int(outcome)))
                if len(out) >= limit:
                    break
        return out

    async def in_scope(self, scope: Scope) -> list[Rollout]:
        stmt = select(Rollout).where(of_scope(Rollout, scope))
        return list(await self.s.scalars(stmt.order_by(Rollout.id)))

    async def mark(self, scope: Scope, ids: Sequence[int], status: RolloutStatus, reason: str | None = None) -> int:
        """Set the status of rollouts of `scope`; ids of other scopes are left alone (and not counted)."""
        values: dict[str, Any] = {"status": status, "reason": reason}
        if status == RolloutStatus.TRAINED:
            values["trained_at"] = utcnow()
        result = await self.s.execute(
            update(Rollout).where(Rollout.id.in_(list(ids)), of_scope(Rollout, scope)).values(**values)
        )
        return int(result.rowcount)  # type: ignore[attr-defined]

    async def counts_by_status(self, scope: Scope | None = None) -> dict[str, int]:
        stmt = select(Rollout.status, func.count()).group_by(Rollout.status)
        if scope is not None:
            stmt = stmt.where(of_scope(Rollout, scope))
        counts = {status.value: 0 for status in RolloutStatus}
        counts.update({status.value: int(n) for status, n in (await self.s.execute(stmt)).all()})
        return counts

    async def for_developer(self, developer_id: str) -> list[Rollout]:
        stmt = select(Rollout).where(Rollout.developer_id == developer_id).order_by(Rollout.id)
        return list(await self.s.scalars(stmt))


class ScopeControlRepository(Repository):
    async def _row(self, scope: Scope) -> ScopeControl:
        row = await self.s.get(ScopeControl, (scope.kind, scope.id))
        if row is None:
            row = ScopeControl(scope_kind=scope.kind, scope_id=scope.id, training_paused=False, recording_paused=False)
            self.s.add(row)
        return row

    async def set_training_paused(self, scope: Scope, paused: bool, reason: str | None) -> ScopeControl:
        row = await self._row(scope)
        row.training_paused = paused
        row.reason = reason
        row.updated_at = utcnow()
        await self.s.flush()
        return row

    async def set_recording_paused(self, scope: Scope, paused: bool) -> ScopeControl:
        row = await self._row(scope)
        row.recording_paused = paused
        row.updated_at = utcnow()
        await self.s.flush()
        return row

    async def get(self, scope: Scope) -> ScopeControl | None:
        return await self.s.get(ScopeControl, (scope.kind, scope.id))

    async def recording_paused(self) -> set[Scope]:
        """Scopes whose developer paused recording."""
        rows = await self.s.scalars(select(ScopeControl).where(ScopeControl.recording_paused.is_(True)))
        return {Scope(r.scope_kind, r.scope_id) for r in rows}

    async def paused(self) -> dict[Scope, str]:
        """Scopes whose training is paused, with the reason."""
        rows = await self.s.scalars(select(ScopeControl).where(ScopeControl.training_paused.is_(True)))
        return {Scope(r.scope_kind, r.scope_id): r.reason or "" for r in rows}


class TrainingStatusRepository(Repository):
    """The training worker's progress per scope (`TrainingStatus`): written by the worker, read by serving."""

    async def _row(self, scope: Scope) -> TrainingStatus:
        row = await self.s.get(TrainingStatus, (scope.kind, scope.id))
        if row is None:
            row = TrainingStatus(scope_kind=scope.kind, scope_id=scope.id)
            self.s.add(row)
        return row

    async def started(self, scope: Scope, *, rollouts: int, steps: int) -> None:
        row = await self._row(scope)
        now = utcnow()
        row.phase, row.step, row.steps, row.rollouts = "loading", 0, steps, rollouts
        row.started_at = row.updated_at = now
        await self.s.flush()

    async def progress(self, scope: Scope, phase: str, step: int, steps: int) -> None:
        """The running round's phase and step. Updates only: a scope purged while its round ran stays gone."""
        await self.s.execute(
            update(TrainingStatus)
            .where(of_scope(TrainingStatus, scope))
            .values(phase=phase, step=step, steps=steps, updated_at=utcnow())
        )

    async def finished(self, scope: Scope, status: str, reason: str, version: str | None) -> None:
        """How the round ended; the scope is between rounds again. Updates only, as `progress`."""
        now = utcnow()
        await self.s.execute(
            update(TrainingStatus)
            .where(of_scope(TrainingStatus, scope))
            .values(
                phase=None,
                step=None,
                steps=None,
                rollouts=None,
                started_at=None,
                updated_at=now,
                last_status=status,
                last_reason=reason,
                last_version=version,
                last_finished_at=now,
            )
        )

    async def running(self, since: datetime) -> int:
        """How many scopes have a round that runs: started, and its worker wrote progress since `since`."""
        count = await self.s.scalar(
            select(func.count())
            .select_from(TrainingStatus)
            .where(TrainingStatus.phase.is_not(None), TrainingStatus.updated_at >= since)
        )
        return int(count or 0)

    async def of(self, scopes: Sequence[Scope]) -> dict[Scope, TrainingStatus]:
        if not scopes:
            return {}
        wanted = of_scopes(TrainingStatus, scopes)
        rows = await self.s.scalars(select(TrainingStatus).where(wanted))
        return {Scope(r.scope_kind, r.scope_id): r for r in rows}


class AdapterRepository(Repository):
    async def add_candidate(
        self,
        scope: Scope,
        *,
        path: str,
        step: int,
        kl: float | None,
        metrics: dict[str, Any],
        version_id: str | None = None,
        parent_id: str | None = None,
    ) -> AdapterVersion:
        row = AdapterVersion(
            scope_kind=scope.kind, scope_id=scope.id, path=path, step=step, kl=kl, metrics=metrics, parent_id=parent_id
        )
        if version_id:
            row.id = version_id
        self.s.add(row)
        await self.s.flush()
        return row

    async def get(self, version_id: str) -> AdapterVersion | None:
        return await self.s.get(AdapterVersion, version_id)

    async def require(self, scope: Scope, version_id: str) -> AdapterVersion:
        row = await self.s.get(AdapterVersion, version_id)
        if row is None or row.scope_kind != scope.kind or row.scope_id != scope.id:
            raise StoreError(
                f"adapter version {version_id!r} does not exist in scope {scope}: see heedful adapters list"
            )
        return row

    async def active(self, scope: Scope) -> AdapterVersion | None:
        stmt = select(AdapterVersion).where(
            of_scope(AdapterVersion, scope),
            AdapterVersion.status == AdapterStatus.ACTIVE,
        )
        return (await self.s.scalars(stmt)).first()

    async def all_active(self) -> list[AdapterVersion]:
        """Every scope's active version (what serving routes to)."""
        stmt = select(AdapterVersion).where(AdapterVersion.status == AdapterStatus.ACTIVE)
        return list(await self.s.scalars(stmt))

    async def scopes(self) -> list[Scope]:
        """Every scope that has an adapter version."""
        rows = await self.s.execute(select(AdapterVersion.scope_kind, AdapterVersion.scope_id).distinct())
        return [Scope(kind, ident) for kind, ident in rows]

    async def newest_measured(self, scope: Scope) -> AdapterVersion | None:
        """The scope's newest version with a measured KL (any status: a rejected candidate counts)."""
        stmt = (
            select(AdapterVersion)
            .where(
                of_scope(AdapterVersion, scope),
                AdapterVersion.kl.is_not(None),
            )
            .order_by(AdapterVersion.created_at.desc(), AdapterVersion.id)
            .limit(1)
        )
        return (await self.s.scalars(stmt)).first()

    async def versions(self, scope: Scope | None = None) -> list[AdapterVersion]:
        stmt = select(AdapterVersion).order_by(AdapterVersion.created_at.desc(), AdapterVersion.id)
        if scope is not None:
            stmt = stmt.where(of_scope(AdapterVersion, scope))
        return list(await self.s.scalars(stmt))

    async def activate(self, scope: Scope, version_id: str) -> AdapterVersion:
        """Make `version_id` the scope's one active adapter; the previous one is retired (same transaction)."""
        row = await self.require(scope, version_id)
        if row.status == AdapterStatus.REJECTED:
            raise StoreError(f"adapter version {version_id!r} was rejected ({row.reason}): it cannot be activated")
        await self.s.execute(
            update(AdapterVersion)
            .where(
                of_scope(AdapterVersion, scope),
                AdapterVersion.status == AdapterStatus.ACTIVE,
                AdapterVersion.id != version_id,
            )
            .values(status=AdapterStatus.RETIRED)
        )
        row.status = AdapterStatus.ACTIVE
        row.activated_at = utcnow()
        await self.s.flush()
        return row

    async def reject(self, scope: Scope, version_id: str, reason: str) -> AdapterVersion:
        row = await self.require(scope, version_id)
        row.status = AdapterStatus.REJECTED
        row.reason = reason
        return row

    async def rollback(self, scope: Scope, to: str | None = None, reason: str = "") -> AdapterVersion | None:
        """Take the active version out of serving: activate `to`, else the most recently active version
        before it that was not itself rolled back.

        The version taken out is marked `rolled_back` with `reason`, so a later rollback never returns
        to it (an explicit `to` can). Returns the now-active version, or None when there was nothing to go
        back to (serving falls back to the team's adapter or the base model).
        """
        current = await self.active(scope)
        if to is None and current is None:
            raise StoreError(f"scope {scope} has no active adapter to roll back")
        if to is not None:
            target: AdapterVersion | None = await self.activate(scope, to)
        else:
            assert current is not None
            stmt = (
                select(AdapterVersion)
                .where(
                    of_scope(AdapterVersion, scope),
                    AdapterVersion.status == AdapterStatus.RETIRED,
                    AdapterVersion.activated_at.is_not(None),
                    AdapterVersion.activated_at < current.activated_at,
                )
                .order_by(AdapterVersion.activated_at.desc())
                .limit(1)
            )
            previous = (await self.s.scalars(stmt)).first()
            target = await self.activate(scope, previous.id) if previous is not None else None
        if current is not None and (target is None or current.id != target.id):
            current.status = AdapterStatus.ROLLED_BACK
            current.reason = reason or "rolled back"
        await self.s.flush()
        return target

    async def prune(self, scope: Scope, keep: int = KEEP_ADAPTERS) -> list[str]:
        """Delete all but the newest `keep` versions of a scope (never the active one); return their paths."""
        rows = await self.versions(scope)
        doomed = [r for r in rows[keep:] if r.status != AdapterStatus.ACTIVE]
        if not doomed:
            return []
        ids = [r.id for r in doomed]
        await self.s.execute(update(AdapterVersion).where(AdapterVersion.parent_id.in_(ids)).values(parent_id=None))
        await self.s.execute(delete(AdapterVersion).where(AdapterVersion.id.in_(ids)))
        return [r.path for r in doomed]

    async def counts_by_scope(self) -> dict[str, dict[str, int]]:
        stmt = select(AdapterVersion.scope_kind, AdapterVersion.scope_id, AdapterVersion.status, func.count()).group_by(
            AdapterVersion.scope_kind, AdapterVersion.scope_id, AdapterVersion.status
        )
        out: dict[str, dict[str, int]] = {}
        for kind, ident, status, n in (await self.s.execute(stmt)).all():
            out.setdefault(f"{kind.value}:{ident}", {})[status.value] = int(n)
        return out


class AuditRepository(Repository):
    async def add(
        self,
        *,
        actor: str,
        action: str,
        scope: Scope | None = None,
        reason: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> AuditEntry:
        row = AuditEntry(
            actor=actor,
            action=action,
            scope_kind=scope.kind.value if scope else None,
            scope_id=scope.id if scope else None,
            reason=reason,
            detail=detail or {},
        )
        self.s.add(row)
        await self.s.flush()
        return row

    async def since(self, since: datetime | None = None) -> list[AuditEntry]:
        stmt = select(AuditEntry).order_by(AuditEntry.id)
        if since is not None:
            stmt = stmt.where(AuditEntry.at >= since)
        return list(await self.s.scalars(stmt))


class StatsRepository(Repository):
    async def counts(self) -> dict[str, Any]:
        async def count(model: Any) -> int:
            return int(await self.s.scalar(select(func.count()).select_from(model)) or 0)

        return {
            "developers": await count(Developer),
            "teams": await count(Team),
            "sessions": await count(LspSession),
            "completions": await count(Completion),
            "candidates": await count(Candidate),
            "events": await EventRepository(self.s).counts_by_kind(),
            "rollouts": await RolloutRepository(self.s).counts_by_status(),
            "adapters": await AdapterRepository(self.s).counts_by_scope(),
        }


@dataclass(slots=True, frozen=True)
class CompletionFact:
    """What a report needs of one completion (no prompt or candidate text)."""

    id: str
    developer_id: str
    team_id: str | None
    arm: str | None
    adapter_version: str | None
    latency_ms: float | None
    created_at: datetime
    held_back: bool = False  # the show policy answered nothing: no candidate was shown


@dataclass(slots=True, frozen=True)
class ReportFilter:
    """Which rows a report covers: some developers (any when empty), one team, rows since a time."""

    developers: tuple[str, ...] = ()
    team: str | None = None
    since: datetime | None = None


REPORT_EVENT_KINDS = (
    EventKind.SHOWN,
    EventKind.ACCEPTED,
    EventKind.PARTIAL_ACCEPT,
    EventKind.REJECTED,
    EventKind.CORRECTION,
    EventKind.EDIT_SNAPSHOT,
)


@dataclass(slots=True, frozen=True)
class OutcomeEvent:
    """What a report needs of one feedback event (no text)."""

    completion_id: str
    kind: EventKind
    accepted_length: int | None
    delay_s: float | None
    survival_ratio: float | None


class ReportRepository(Repository):
    """The reads of `heedful report`: completions, their outcomes, adapter versions and rollbacks."""

    @staticmethod
    def _completion_filters(f: ReportFilter) -> list[Any]:
        where: list[Any] = []
        if f.developers:
            where.append(Completion.developer_id.in_(list(f.developers)))
        if f.team is not None:
            where.append(Completion.team_id == f.team)
        if f.since is not None:
            where.append(Completion.created_at >= f.since)
        return where

    async def completions(self, f: ReportFilter) -> list[CompletionFact]:
        """The filter's completions, oldest first."""
        stmt = (
            select(
                Completion.id,
                Completion.developer_id,
                Completion.team_id,
                Completion.arm,
                Completion.adapter_version,
                Completion.latency_ms,
                Completion.created_at,
                Completion.shown_index,
            )
            .where(*self._completion_filters(f))
            .order_by(Completion.created_at, Completion.id)
        )
        return [
            CompletionFact(cid, dev, team, arm, version, latency, as_utc(at), shown is None)
            for cid, dev, team, arm, version, latency, at, shown in await self.s.execute(stmt)
        ]

    async def outcome_events(self, f: ReportFilter) -> list[OutcomeEvent]:
        """Every shown, accept, partial accept, reject, correction and edit snapshot of the filter's
        completions (whatever the event's own time: an outcome belongs to its completion), oldest first."""
        stmt = (
            select(Event.completion_id, Event.kind, Event.accepted_length, Event.delay_s, Event.survival_ratio)
            .join(Completion, Completion.id == Event.completion_id)
            .where(Event.kind.in_(REPORT_EVENT_KINDS), *self._completion_filters(f))
            .order_by(Event.id)
        )
        return [
            OutcomeEvent(cid, kind, length, delay, ratio)
            for cid, kind, length, delay, ratio in await self.s.execute(stmt)
            if cid is not None
        ]

    async def scopes(self, f: ReportFilter) -> list[Scope] | None:
        """The adapter scopes the filter covers (None: every scope)."""
        if not f.developers and f.team is None:
            return None
        if f.team is None:
            return [Scope.developer(d) for d in sorted(set(f.developers))]
        members = set(await IdentityRepository(self.s).developers_of_team(f.team))
        served = select(Completion.developer_id).where(Completion.team_id == f.team).distinct()
        members.update(await self.s.scalars(served))
        if f.developers:
            members &= set(f.developers)
        return [Scope.team(f.team), *(Scope.developer(d) for d in sorted(members))]

    async def adapter_versions(self, scopes: Sequence[Scope] | None, since: datetime | None) -> list[AdapterVersion]:
        """Adapter versions of `scopes` (all when None) created since `since`, oldest first."""
        stmt = select(AdapterVersion).order_by(AdapterVersion.created_at, AdapterVersion.id)
        if scopes is not None:
            if not scopes:
                return []
            stmt = stmt.where(of_scopes(AdapterVersion, scopes))
        if since is not None:
            stmt = stmt.where(AdapterVersion.created_at >= since)
        return list(await self.s.scalars(stmt))

    async def rollbacks(self, scopes: Sequence[Scope] | None, since: datetime | None) -> list[AuditEntry]:
        """Audit entries of rollbacks in `scopes` (all when None) since `since`, oldest first."""
        stmt = select(AuditEntry).where(AuditEntry.action == "rollback").order_by(AuditEntry.at, AuditEntry.id)
        if scopes is not None:
            if not scopes:
                return []
            stmt = stmt.where(
                or_(*(and_(AuditEntry.scope_kind == sc.kind.value, AuditEntry.scope_id == sc.id) for sc in scopes))
            )
        if since is not None:
            stmt = stmt.where(AuditEntry.at >= since)
        return list(await self.s.scalars(stmt))


async def _delete_counting(session: AsyncSession, statements: Sequence[tuple[str, Any]]) -> dict[str, int]:
    """Run DELETE statements in order; return the rows each removed, by name."""
    counts: dict[str, int] = {}
    for name, stmt in statements:
        result = await session.execute(stmt)
        counts[name] = int(result.rowcount)  # type: ignore[attr-defined]
    return counts


class RetentionRepository(Repository):
    async def delete_older_than(self, cutoff: datetime) -> dict[str, int]:
        """Delete completions (with candidates and events), events, rollouts, documents and ended
        sessions older than `cutoff`. Adapters and the audit log have their own lifetimes."""
        return await _delete_counting(
            self.s,
            [
                ("rollouts", delete(Rollout).where(Rollout.created_at < cutoff)),
                ("events", delete(Event).where(Event.created_at < cutoff)),
                (
                    "candidates",
                    delete(Candidate).where(
                        Candidate.completion_id.in_(select(Completion.id).where(Completion.created_at < cutoff))
                    ),
                ),
                ("completions", delete(Completion).where(Completion.created_at < cutoff)),
                ("documents", delete(Document).where(Document.seen_at < cutoff)),
                ("sessions", delete(LspSession).where(LspSession.ended_at.is_not(None), LspSession.ended_at < cutoff)),
            ],
        )


PURGE_ACTION = "purge"
# Purges and publishes take this PostgreSQL advisory lock (any fixed 64-bit key: "heedful" in ASCII).
_PUBLISH_PURGE_LOCK = 0x68656564_66756C
PurgeMark = frozenset[int]


class PurgeRepository(Repository):
    """Purging a developer, and the tombstones that keep a purge from losing to a round already running.

    A purge's audit entry (action ``purge``, scope ``developer:<id>``) is its tombstone: the audit log is
    never pruned, and its ids only grow. A training round takes a :data:`PurgeMark` (the ids of the
    tombstones that concern its scope) when it starts; publishing, in the transaction that would activate
    its adapter, takes :meth:`lock` and asks :meth:`purged_since` with that mark. A purge takes the same lock
    before it deletes, so the two never interleave: either the purge runs first and the publish sees its
    tombstone and refuses, or the publish commits first and the purge deletes what it published.
    """

    async def lock(self) -> None:
        """Serialize this unit of work with every purge and publish until it ends; call it first.

        PostgreSQL: a transaction-scoped advisory lock (other writes are not held up). SQLite allows one
        writer at a time, and its driver starts the transaction only at the first write, so a write that
        changes nothing takes the database's write lock at once: no purge can commit between this unit's
        reads and its commit.
        """
        if self.s.get_bind().dialect.name == "postgresql":
            await self.s.execute(select(func.pg_advisory_xact_lock(_PUBLISH_PURGE_LOCK)))
        else:
            await self.s.execute(update(AuditEntry).where(false()).values(actor=AuditEntry.actor))

    def _tombstones_of(self, scope: Scope) -> Any:
        stmt = select(AuditEntry.id, AuditEntry.scope_id).where(
            AuditEntry.action == PURGE_ACTION, AuditEntry.scope_kind == ScopeKind.DEVELOPER.value
        )
        # A team's round may hold any developer's rollouts: every developer's purge concerns it.
        return stmt.where(AuditEntry.scope_id == scope.id) if scope.kind == ScopeKind.DEVELOPER else stmt

    async def mark(self, scope: Scope) -> PurgeMark:
        """The tombstones that concern ``scope`` now (take it when a round starts)."""
        return frozenset(row_id for row_id, _ in await self.s.execute(self._tombstones_of(scope)))

    async def purged_since(self, scope: Scope, mark: PurgeMark) -> list[str]:
        """The developers purged since ``mark`` was taken whose purge concerns ``scope``, sorted."""
        rows = await self.s.execute(self._tombstones_of(scope))
        return sorted({developer for row_id, developer in rows if row_id not in mark and developer is not None})

    async def developer(self, developer_id: str) -> dict[str, Any]:
        """Delete every row of a developer; return counts and the adapter paths to remove from disk."""
        scope = Scope.developer(developer_id)
        adapters = await AdapterRepository(self.s).versions(scope)
        paths = [a.path for a in adapters]
        completion_ids = select(Completion.id).where(Completion.developer_id == developer_id)
        session_ids = select(LspSession.id).where(LspSession.developer_id == developer_id)
        counts = await _delete_counting(
            self.s,
            [
                (
                    "rollouts",
                    delete(Rollout).where(
                        (Rollout.developer_id == developer_id)
                        | of_scope(Rollout, Scope.developer(developer_id))
                        | Rollout.completion_id.in_(completion_ids)
                    ),
                ),
                (
                    "events",
                    delete(Event).where(Event.session_id.in_(session_ids) | Event.completion_id.in_(completion_ids)),
                ),
                ("candidates", delete(Candidate).where(Candidate.completion_id.in_(completion_ids))),
                ("completions", delete(Completion).where(Completion.developer_id == developer_id)),
                ("documents", delete(Document).where(Document.session_id.in_(session_ids))),
                ("sessions", delete(LspSession).where(LspSession.developer_id == developer_id)),
                (
                    "adapter_versions",
                    delete(AdapterVersion).where(of_scope(AdapterVersion, Scope.developer(developer_id))),
                ),
                (
                    "scope_controls",
                    delete(ScopeControl).where(of_scope(ScopeControl, Scope.developer(developer_id))),
                ),
                (
                    "training_status",
                    delete(TrainingStatus).where(of_scope(TrainingStatus, Scope.developer(developer_id))),
                ),
                ("developers", delete(Developer).where(Developer.id == developer_id)),
            ],
        )
        return {"deleted": counts, "adapter_paths": paths}


__all__ = [
    "PURGE_ACTION",
    "AdapterRepository",
    "AuditRepository",
    "CompletionFact",
    "CompletionMode",
    "CompletionRepository",
    "DocumentRepository",
    "EventRepository",
    "IdentityRepository",
    "OutcomeEvent",
    "PurgeMark",
    "PurgeRepository",
    "ReportFilter",
    "ReportRepository",
    "RetentionRepository",
    "RolloutRepository",
    "Scope",
    "SessionRepository",
    "StatsRepository",
    "TrainingStatusRepository",
]
