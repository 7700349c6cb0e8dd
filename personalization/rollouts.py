"""From what the store recorded to what the trainer learns from: rollouts, one per completion and scope.

A rollout is (context c, response y, next state f): the prompt, the shown candidate, and what the
developer kept there afterwards. `classify` decides from a completion's events whether a turn carries
a training signal (and which), or is kept out with the reason; it is pure, so the rules are tested on
crafted event sequences. `RolloutCollector` reads finished completions that have no rollout yet and
writes one rollout per scope they belong to (the developer's, and the team's when there is one). Scopes
are never mixed: a rollout belongs to exactly one scope and is trained only there.

Rewards here are the outcome judge's, for the shown candidate; the other group members are judged at
training time (hindsight against the kept text, then the PRM), see `judge.UnshownJudge`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from storage.models import Completion, EventKind, Rollout, RolloutStatus, ScopeKind
from storage.repositories import CompletionRepository, EventRepository, Scope

log = logging.getLogger(__name__)

# Outcome signals, in the order a later one overrides an earlier one for the shown candidate.
ACCEPTED = "accepted"
REWRITTEN = "rewritten"
PARTIAL = "partial"
REJECTED = "rejected"
CORRECTED = "corrected"
NO_SIGNAL = "none"
NO_PROMPT = "no prompt stored (privacy.store_prompts = false)"  # the reason such a rollout is kept out


@dataclass(slots=True, frozen=True)
class EventView:
    kind: str
    accepted_length: int | None = None
    inferred: bool = False
    delay_s: float | None = None
    survival_ratio: float | None = None
    kept_text: str | None = None
    text: str | None = None


@dataclass(slots=True, frozen=True)
class Classification:
    """What one turn teaches: its signal, the shown candidate's reward, the next state, a correction."""

    trainable: bool
    signal: str
    reason: str
    reward: int | None = None  # outcome reward of the shown candidate, in {-1, 0, +1}
    kept: str | None = None  # what the developer kept in place of the suggestion (the next state)
    correction: str | None = None  # an explicit correction, for on-policy distillation


def classify(shown_text: str | None, events: Sequence[EventView], *, rewrite_threshold: float) -> Classification:
    """The rules, in order:

    - no shown candidate: not trainable ("nothing was shown");
    - an explicit correction: signal `corrected`, reward -1 (the developer said the suggestion was wrong),
      the correction kept for OPD; what they kept (if they accepted first) is the next state;
    - accepted: the last edit snapshot decides. No snapshot yet, or survival at or above
      `rewrite_threshold` with the kept text equal to the suggestion up to whitespace: `accepted`, +1,
      next state = the kept text (else the suggestion itself). Survival at or above the threshold but
      the text edited: `rewritten` ("edited"), 0, next state = the kept text. Below the threshold:
      `rewritten`, 0 when at least half the threshold survived, else -1; next state = the kept text;
    - partly accepted (and not fully): `partial`, reward 0 for the whole suggestion; next state = the
      kept part (its snapshots when there are any);
    - rejected (explicitly or inferred): `rejected`, -1; next state = what the developer wrote in its
      place (the last snapshot of it, `lsp_handlers.feedback.TypedInstead`) unless that is empty or the
      suggestion itself, else none;
    - only shown, or nothing: not trainable ("no feedback signal").
    """
    if shown_text is None:
        return Classification(False, NO_SIGNAL, "nothing was shown")
    kinds = {e.kind for e in events}
    snapshots = sorted((e for e in events if e.kind == EventKind.EDIT_SNAPSHOT), key=lambda e: e.delay_s or 0.0)
    last = snapshots[-1] if snapshots else None
    corrections = [e.text for e in events if e.kind == EventKind.CORRECTION and e.text]
    if corrections:
        kept = last.kept_text if last is not None else None
        return Classification(True, CORRECTED, "explicit correction", -1, kept, corrections[-1])
    if EventKind.ACCEPTED in kinds:
        if last is None or last.survival_ratio is None:
            return Classification(True, ACCEPTED, "accepted", 1, shown_text)
        kept = last.kept_text if last.kept_text is not None else shown_text
        if last.survival_ratio >= rewrite_threshold:
            if _same_code(kept, shown_text):
                return Classification(True, ACCEPTED, "accepted", 1, kept)
            # Most of it stayed, but the developer changed it (added the type hints, renamed a name): what
            # they kept is what they wanted, the suggestion itself was not.
            reason = f"accepted, then edited ({last.survival_ratio:.2f} survived)"
            return Classification(True, REWRITTEN, reason, 0, kept)
        reward = 0 if last.survival_ratio >= rewrite_threshold / 2 else -1
        reason = f"accepted, then rewritten ({last.survival_ratio:.2f} survived)"
        return Classification(True, REWRITTEN, reason, reward, last.kept_text)
    if EventKind.PARTIAL_ACCEPT in kinds:
        part = next(e for e in reversed(events) if e.kind == EventKind.PARTIAL_ACCEPT)
        kept = last.kept_text if last is not None and last.kept_text is not None else part.kept_text
        return Classification(True, PARTIAL, "partly accepted", 0, kept)
    if EventKind.REJECTED in kinds:
        inferred = all(e.inferred for e in events if e.kind == EventKind.REJECTED)
        reason = "rejected (inferred)" if inferred else "rejected"
        written = last.kept_text if last is not None else None
        if written and written.strip() and not _same_code(written, shown_text):
            # What the developer wrote in its place instead is what they wanted there.
            return Classification(True, REJECTED, f"{reason}, then written differently", -1, written)
        return Classification(True, REJECTED, reason, -1)
    return Classification(False, NO_SIGNAL, "no feedback signal")


def _same_code(a: str, b: str) -> bool:
    """Equal up to whitespace (a reformatted suggestion is still the suggestion)."""
    return "".join(a.split()) == "".join(b.split())


@dataclass(slots=True)
class CollectStats:
    completions: int = 0
    rollouts: int = 0
    trainable: int = 0
    kept_out: dict[str, int] = field(default_factory=dict)


SETTLE_MARGIN_S = 30.0


def settle_seconds(edit_snapshot_delays_s: Sequence[float]) -> float:
    """How old a completion of a live session must be before the collector takes it: its last edit
    snapshot is due, with a margin for the snapshot's write."""
    return max(edit_snapshot_delays_s, default=0.0) + SETTLE_MARGIN_S


def scopes_of(developer_id: str, team_id: str | None) -> list[Scope]:
    scopes = [Scope.developer(developer_id)]
    if team_id:
        scopes.append(Scope.team(team_id))
    return scopes


class RolloutCollector:
    """Turns finished completions into rollouts (the collector's queries live here, with it)."""

    def __init__(self, *, rewrite_threshold: float, settle_s: float, batch: int = 500) -> None:
        self.rewrite_threshold = rewrite_threshold
        self.settle_s = settle_s  # a completion of a live session is final once its last snapshot is due
        self.batch = batch

    async def collect(self, session: AsyncSession, *, now: datetime | None = None) -> CollectStats:
        """Write rollouts for completions that are final and have none yet; one unit of work."""
        now = now or datetime.now(UTC)
        cutoff = now - timedelta(seconds=self.settle_s)
        completions = await CompletionRepository(session).final_without_rollout(cutoff, self.batch)
        stats = CollectStats(completions=len(completions))
        if not completions:
            return stats
        ids = [c.id for c in completions]
        events: dict[str, list[EventView]] = {cid: [] for cid in ids}
        for e in await EventRepository(session).for_completions(ids):
            assert e.completion_id is not None
            events[e.completion_id].append(
                EventView(
                    e.kind.value,
                    e.accepted_length,
                    e.inferred,
                    e.delay_s,
                    e.survival_ratio,
                    e.kept_text,
                    e.text,
                )
            )
        for comp in completions:
            shown = _shown_text(comp)
            verdict = classify(shown, events[comp.id], rewrite_threshold=self.rewrite_threshold)
            if verdict.trainable and not comp.prompt and not comp.prompt_token_ids:
                # `privacy.store_prompts = false`: nothing to train the response after. Kept out here, so that
                # such turns do not count toward a round's `training.min_new_rollouts` either.
                verdict = dataclasses.replace(verdict, trainable=False, reason=NO_PROMPT)
            if verdict.trainable:
                stats.trainable += 1
            else:
                stats.kept_out[verdict.reason] = stats.kept_out.get(verdict.reason, 0) + 1
            for scope in scopes_of(comp.developer_id, comp.team_id):
                session.add(_rollout(comp, scope, shown, verdict))
                stats.rollouts += 1
        await session.flush()
        return stats


def _shown_text(comp: Completion) -> str | None:
    if comp.shown_index is None or not 0 <= comp.shown_index < len(comp.candidates):
        return None
    return comp.candidates[comp.shown_index].text


def _rollout(comp: Completion, scope: Scope, shown: str | None, verdict: Classification) -> Rollout:
    rewards: list[Any] = [None] * len(comp.candidates)
    if verdict.reward is not None and comp.shown_index is not None and comp.shown_index < len(rewards):
        rewards[comp.shown_index] = verdict.reward
    return Rollout(
        completion_id=comp.id,
        developer_id=comp.developer_id,
        scope_kind=ScopeKind(scope.kind),
        scope_id=scope.id,
        context=comp.prompt,
        response=shown or "",
        next_state=verdict.kept,
        signal=verdict.signal,
        rewards=rewards,
        judge_votes=[],
        status=RolloutStatus.PENDING if verdict.trainable else RolloutStatus.DISCARDED,
        reason=verdict.reason,
    )
