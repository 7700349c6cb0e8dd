"""Rewards in {-1, 0, +1} for every candidate of a group.

* Outcome judge, the shown candidate: what the developer did with it (the collector's classification in
  `rollouts.classify`: accept +1, reject -1, accepted then heavily rewritten 0 or -1) is already on the
  rollout as `rewards[shown_index]`.
* Hindsight judge, unshown candidates: similarity to what the developer kept (`hindsight_reward`); when
  the developer changed the shown suggestion, a candidate no closer to their text than it was earns no
  more than it did.
* The PRM (`prm.PRMJudge`), for unshown candidates the hindsight judge cannot decide: a classifier head on
  the frozen base model, trained here on the scope's own outcomes (`fit_scope_prm`), m MC-dropout votes,
  majority. It is used only when its accuracy on held-out outcomes reaches
  `thresholds.prm_min_accuracy`; the accuracy is stored with each training run that needed it.
  `LazyScopePRM` fits it the first time a candidate needs it: a round where hindsight decides every
  unshown candidate (the usual case, a developer's kept text is on most rollouts) spends no time on it.

Anything no judge can decide gets 0.
"""

from __future__ import annotations

import difflib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from personalization.prm import MIN_FIT_EXAMPLES, PRMExample, PRMJudge, majority
from storage.repositories import RolloutRepository, Scope

__all__ = [
    "LazyScopePRM",
    "MaybeVote",
    "PRMJudge",
    "PRMVote",
    "ScopePRM",
    "UnshownJudge",
    "fit_scope_prm",
    "hindsight_reward",
    "majority",
    "prm_examples",
    "similarity",
]

log = logging.getLogger(__name__)

PRMVote = Callable[[str, str], int]  # (prompt, completion) -> majority vote in {-1, 0, +1}
# A vote that may have no PRM behind it (None: none fitted, or not accurate enough to be used).
MaybeVote = Callable[[str, str], int | None]


def similarity(a: str, b: str) -> float:
    """difflib's ratio on whitespace-normalised text (2 * matching characters / total); 1.0 for two blanks."""
    x, y = " ".join(a.split()), " ".join(b.split())
    if not x and not y:
        return 1.0
    return difflib.SequenceMatcher(None, x, y, autojunk=False).ratio()


def hindsight_reward(
    candidate: str,
    kept: str,
    *,
    shown: str | None = None,
    shown_reward: int | None = None,
    good: float = 0.8,
    bad: float = 0.4,
) -> int | None:
    """Judge an unshown candidate against what the developer kept.

    Similarity is `similarity` (difflib's ratio on whitespace-normalised text): it tolerates the small
    edits developers make (a renamed variable, a reordered argument) while telling apart a different
    approach. At or above `good`: +1; at or below `bad`: -1; between: None (undecided, the PRM judges it).

    When the developer changed the shown suggestion into `kept` (its outcome `shown_reward` is below +1),
    the change is the signal: a candidate no closer to `kept` than the shown one was lacks what they
    changed and earns no more than the shown one did. Without this, a preference that is a small edit
    (type hints added to a signature, quotes swapped) scores every unchanged candidate +1 for being 90 %
    similar to what the developer kept, rewarding exactly what they corrected.
    """
    ratio = similarity(candidate, kept)
    verdict = 1 if ratio >= good else -1 if ratio <= bad else None
    if shown is None or shown_reward is None or shown_reward >= 1 or verdict == -1:
        return verdict
    if ratio <= similarity(shown, kept):
        return shown_reward if verdict is None else min(verdict, shown_reward)
    return verdict


@dataclass(slots=True)
class UnshownJudge:
    """Judges unshown group members: hindsight first, then the PRM, else 0; counts which decided."""

    prm: MaybeVote | None = None
    tally: dict[str, int] = field(default_factory=dict)

    def __call__(
        self,
        prompt: str,
        text: str,
        kept: str | None,
        *,
        shown: str | None = None,
        shown_reward: int | None = None,
    ) -> int:
        """The verdict on `text`; `shown` and its outcome `shown_reward` let hindsight see what was changed."""
        if kept:
            verdict = hindsight_reward(text, kept, shown=shown, shown_reward=shown_reward)
            if verdict is not None:
                return self._count("hindsight", verdict)
        if self.prm is not None:
            vote = self.prm(prompt, text)
            if vote is not None:
                return self._count("prm", vote)
        return self._count("unjudged", 0)

    def _count(self, by: str, verdict: int) -> int:
        self.tally[by] = self.tally.get(by, 0) + 1
        return verdict


async def prm_examples(session: AsyncSession, scope: Scope, *, limit: int = 1000) -> list[PRMExample]:
    """The scope's shown completions with a decided outcome (+1 or -1), newest first: the PRM's labels."""
    return [PRMExample(c, r, label) for c, r, label in await RolloutRepository(session).outcomes(scope, limit)]


@dataclass(slots=True)
class ScopePRM:
    """The outcome of fitting the PRM for one scope: the vote function when it is good enough to use."""

    vote: PRMVote | None
    report: dict[str, Any]


def fit_scope_prm(
    model_path: Path,
    examples: list[PRMExample],
    *,
    min_accuracy: float,
    votes: int,
    seed: int = 0,
) -> ScopePRM:
    """Train a PRM head on the scope's outcomes and decide whether its votes may be used (synchronous)."""
    pos = sum(1 for e in examples if e.label == 1)
    neg = len(examples) - pos
    report: dict[str, Any] = {"examples": len(examples), "positives": pos, "negatives": neg, "used": False}
    if len(examples) < MIN_FIT_EXAMPLES or pos < 2 or neg < 2:
        report["reason"] = (
            f"too few outcomes to train the PRM ({pos} accepted, {neg} rejected; needs {MIN_FIT_EXAMPLES} "
            "with at least 2 of each)"
        )
        return ScopePRM(None, report)
    judge = PRMJudge(model_path, seed=seed)
    fitted = judge.fit(examples, m=votes)
    accuracy = fitted.held_out_accuracy
    report.update(
        held_out_accuracy=accuracy,
        train_accuracy=fitted.train_accuracy,
        held_out=fitted.held_out_count,
        seconds=round(fitted.seconds, 1),
    )
    if accuracy is None or accuracy < min_accuracy:
        report["reason"] = f"held-out accuracy {accuracy} below thresholds.prm_min_accuracy = {min_accuracy}"
        return ScopePRM(None, report)
    report["used"] = True
    report["reason"] = f"held-out accuracy {accuracy:.2f} >= {min_accuracy}"

    def vote(prompt: str, completion: str) -> int:
        verdict, _ = judge.judge(prompt, completion, votes)
        return verdict

    return ScopePRM(vote, report)


@dataclass(slots=True)
class LazyScopePRM:
    """`fit_scope_prm` run on the first vote asked for, once; `report` says whether and how it was fitted.

    Fitting costs a pass of the base model over every outcome of the scope (half a minute for the code model
    on two cores), while hindsight decides every unshown candidate whose rollout has kept text.
    """

    fit: Callable[[], ScopePRM]
    examples: int = 0  # outcomes the fit would train on, reported either way
    fitted: ScopePRM | None = None
    seconds: float = 0.0

    def __call__(self, prompt: str, completion: str) -> int | None:
        if self.fitted is None:
            started = time.monotonic()
            self.fitted = self.fit()
            self.seconds = time.monotonic() - started
        return None if self.fitted.vote is None else self.fitted.vote(prompt, completion)

    @property
    def report(self) -> dict[str, Any]:
        if self.fitted is None:
            return {
                "examples": self.examples,
                "used": False,
                "reason": "not fitted: hindsight judged every unshown candidate",
            }
        return self.fitted.report
