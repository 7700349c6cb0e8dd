"""Tables of the rollout store (SQLAlchemy 2 declarative models).

The same models serve SQLite and PostgreSQL: enums are stored as short strings with CHECK constraints,
lists (token ids, log-probs, rewards) as JSON. Schema changes go through Alembic migrations in
`storage/migrations`; never create tables from these models directly outside tests of the models.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# The longest identity strings the schema holds; the server refuses longer ones at `initialize`.
DEVELOPER_ID_CHARS = 200
TEAM_ID_CHARS = 64
SESSION_ID_CHARS = 64
CLIENT_NAME_CHARS = 200
CLIENT_VERSION_CHARS = 100


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(at: datetime) -> datetime:
    """`at` with a time zone: a naive time (SQLite returns them) is taken as UTC."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


def str_enum(cls: type[enum.Enum], name: str) -> Enum:
    # Plain strings (no CHECK constraint, so adding a value needs no migration), identical on SQLite and
    # PostgreSQL; values, not member names.
    return Enum(cls, name=name, native_enum=False, length=24, values_callable=lambda e: [m.value for m in e])


class ScopeKind(enum.StrEnum):
    DEVELOPER = "developer"
    TEAM = "team"


class CompletionMode(enum.StrEnum):
    FIM = "fim"
    PREFIX = "prefix"


class EventKind(enum.StrEnum):
    SHOWN = "shown"
    ACCEPTED = "accepted"
    PARTIAL_ACCEPT = "partial_accept"
    REJECTED = "rejected"
    EDIT_SNAPSHOT = "edit_snapshot"
    CORRECTION = "correction"


# A completion's outcome, as the guards, the report and a session's follow-up all count it: accepted (an
# accept or a partial accept), else rejected, else undecided; the accept rate is accepted / decided.
ACCEPT_KINDS = frozenset({EventKind.ACCEPTED, EventKind.PARTIAL_ACCEPT})
DECISION_KINDS = ACCEPT_KINDS | {EventKind.REJECTED}


class RolloutStatus(enum.StrEnum):
    PENDING = "pending"
    TRAINED = "trained"
    DISCARDED = "discarded"


class AdapterStatus(enum.StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"  # taken out of serving by a rollback: never chosen again by a later rollback


class Team(Base):
    __tablename__ = "teams"

    id: Mapped[str] = mapped_column(String(TEAM_ID_CHARS), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Developer(Base):
    __tablename__ = "developers"

    id: Mapped[str] = mapped_column(String(DEVELOPER_ID_CHARS), primary_key=True)
    team_id: Mapped[str | None] = mapped_column(ForeignKey("teams.id", ondelete="SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class LspSession(Base):
    """One LSP connection."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(SESSION_ID_CHARS), primary_key=True, default=new_id)
    developer_id: Mapped[str] = mapped_column(ForeignKey("developers.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str | None] = mapped_column(String(TEAM_ID_CHARS))
    client_name: Mapped[str | None] = mapped_column(String(CLIENT_NAME_CHARS))
    client_version: Mapped[str | None] = mapped_column(String(CLIENT_VERSION_CHARS))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Document(Base):
    """A document as a session saw it (one row per uri and version recorded)."""

    __tablename__ = "documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    uri: Mapped[str] = mapped_column(Text)
    language_id: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Completion(Base):
    """One completion request: the prompt, the engine's group of candidates and which one was shown."""

    __tablename__ = "completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    developer_id: Mapped[str] = mapped_column(ForeignKey("developers.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str | None] = mapped_column(String(64), index=True)
    document_id: Mapped[int | None] = mapped_column(ForeignKey("documents.id", ondelete="SET NULL"))
    uri: Mapped[str | None] = mapped_column(Text)
    line: Mapped[int | None] = mapped_column(Integer)
    character: Mapped[int | None] = mapped_column(Integer)
    mode: Mapped[CompletionMode] = mapped_column(str_enum(CompletionMode, "completion_mode"))
    prompt: Mapped[str] = mapped_column(Text)
    prompt_token_ids: Mapped[list[Any]] = mapped_column(JSON)
    adapter_version: Mapped[str | None] = mapped_column(String(64))
    arm: Mapped[str | None] = mapped_column(String(32))
    latency_ms: Mapped[float | None] = mapped_column(Float)
    shown_index: Mapped[int | None] = mapped_column(Integer)
    redacted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)

    candidates: Mapped[list[Candidate]] = relationship(
        back_populates="completion", cascade="all, delete-orphan", order_by="Candidate.index", lazy="selectin"
    )


class Candidate(Base):
    """One member of a completion's group, with pi_old's per-token log-probs."""

    __tablename__ = "candidates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    completion_id: Mapped[str] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[list[Any]] = mapped_column(JSON)
    logprobs: Mapped[list[Any]] = mapped_column(JSON)
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    # True when redaction changed the text: token ids and log-probs no longer describe it and the
    # trainer must recompute them from the redacted text.
    logprobs_stale: Mapped[bool] = mapped_column(Boolean, default=False)

    completion: Mapped[Completion] = relationship(back_populates="candidates")


class Event(Base):
    """What the developer did with a completion (or said about it)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    completion_id: Mapped[str | None] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    kind: Mapped[EventKind] = mapped_column(str_enum(EventKind, "event_kind"), index=True)
    accepted_length: Mapped[int | None] = mapped_column(Integer)
    inferred: Mapped[bool] = mapped_column(Boolean, default=False)
    delay_s: Mapped[float | None] = mapped_column(Float)
    survival_ratio: Mapped[float | None] = mapped_column(Float)
    kept_text: Mapped[str | None] = mapped_column(Text)
    text: Mapped[str | None] = mapped_column(Text)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class Rollout(Base):
    """A training unit: context, response, next-state signal, with per-candidate rewards, in one scope."""

    __tablename__ = "rollouts"
    __table_args__ = (Index("ix_rollouts_scope_status", "scope_kind", "scope_id", "status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    completion_id: Mapped[str | None] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)
    developer_id: Mapped[str | None] = mapped_column(ForeignKey("developers.id", ondelete="CASCADE"), index=True)
    scope_kind: Mapped[ScopeKind] = mapped_column(str_enum(ScopeKind, "scope_kind"))
    scope_id: Mapped[str] = mapped_column(String(200))
    context: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)
    next_state: Mapped[str | None] = mapped_column(Text)
    signal: Mapped[str | None] = mapped_column(String(32))
    rewards: Mapped[list[Any]] = mapped_column(JSON, default=list)
    judge_votes: Mapped[list[Any]] = mapped_column(JSON, default=list)
    status: Mapped[RolloutStatus] = mapped_column(
        str_enum(RolloutStatus, "rollout_status"), default=RolloutStatus.PENDING
    )
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    trained_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AdapterVersion(Base):
    """One trained adapter of a scope, and where it stands."""

    __tablename__ = "adapter_versions"
    __table_args__ = (Index("ix_adapter_versions_scope", "scope_kind", "scope_id", "status"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=new_id)
    scope_kind: Mapped[ScopeKind] = mapped_column(str_enum(ScopeKind, "scope_kind"))
    scope_id: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("adapter_versions.id", ondelete="SET NULL"))
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    step: Mapped[int] = mapped_column(Integer, default=0)
    kl: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[AdapterStatus] = mapped_column(
        str_enum(AdapterStatus, "adapter_status"), default=AdapterStatus.CANDIDATE
    )
    reason: Mapped[str | None] = mapped_column(Text)
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ScopeControl(Base):
    """Switches an admin, a guard or the developer sets on one scope: training paused (and why), and
    recording paused (the developer's sessions store nothing: no completion, event or correction)."""

    __tablename__ = "scope_controls"

    scope_kind: Mapped[ScopeKind] = mapped_column(str_enum(ScopeKind, "scope_kind"), primary_key=True)
    scope_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    training_paused: Mapped[bool] = mapped_column(Boolean, default=False)
    recording_paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TrainingStatus(Base):
    """Where the training worker stands with one scope: the round it trains now (phase, step of steps,
    refreshed while it runs) and how its last round ended. Written by `heedful train`, read by the
    server for `heedful/status`, so that a developer sees learning happen whichever machine trains."""

    __tablename__ = "training_status"

    scope_kind: Mapped[ScopeKind] = mapped_column(str_enum(ScopeKind, "scope_kind"), primary_key=True)
    scope_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    phase: Mapped[str | None] = mapped_column(String(32))  # None between rounds
    step: Mapped[int | None] = mapped_column(Integer)
    steps: Mapped[int | None] = mapped_column(Integer)
    rollouts: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_status: Mapped[str | None] = mapped_column(String(32))
    last_reason: Mapped[str | None] = mapped_column(Text)
    last_version: Mapped[str | None] = mapped_column(String(64))
    last_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """Who or what trained, published, rolled back or purged, when and why."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    scope_kind: Mapped[str | None] = mapped_column(String(16))
    scope_id: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class AccessToken(Base):
    """A developer's token for a shared `heedful serve --tcp`: whoever presents it is that developer.

    Only the token's sha256 is kept; `prefix` (its first characters) names it in listings and revocations.
    """

    __tablename__ = "access_tokens"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    developer_id: Mapped[str] = mapped_column(String(DEVELOPER_ID_CHARS), index=True)
    team_id: Mapped[str | None] = mapped_column(String(TEAM_ID_CHARS))
    label: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
