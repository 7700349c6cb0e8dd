"""On-policy distillation: token advantages, usable hints, and which corrections are dropped."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from personalization.judge import LazyScopePRM, PRMVote, ScopePRM, UnshownJudge
from personalization.opd import (
    MAX_HINT_CHARS,
    Correction,
    build_opd_samples,
    hint_problem,
    hint_prompt,
    token_advantages,
)
from personalization.samples import Sample


def test_token_advantages_are_teacher_minus_behaviour() -> None:
    # log pi_teacher = [-0.5, -2.0, -0.1], log pi_old = [-1.0, -1.5, -0.1]
    assert token_advantages([-0.5, -2.0, -0.1], [-1.0, -1.5, -0.1]) == pytest.approx([0.5, -0.5, 0.0])


def test_token_advantages_refuse_misaligned_tokens() -> None:
    with pytest.raises(ValueError, match="same tokens, got 2 and 3"):
        token_advantages([-0.5, -2.0], [-1.0, -1.5, -0.1])


@pytest.mark.parametrize(
    ("hint", "problem"),
    [
        ("use Flask, not Django", None),
        ("   ", "empty hint"),
        ("?!", "hint has no words"),
        ("x" * (MAX_HINT_CHARS + 1), f"hint longer than {MAX_HINT_CHARS} characters"),
    ],
)
def test_hint_problem(hint: str, problem: str | None) -> None:
    assert hint_problem(hint) == problem


def _tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_hint_prompt_puts_the_correction_before_the_prompt_on_one_line() -> None:
    ids = hint_prompt("add\n type   hints", [1, 2], _tokenize)
    assert ids[-2:] == [1, 2]
    assert "".join(chr(i) for i in ids[:-2]) == "# The developer's instruction: add type hints\n"


def test_build_opd_samples_scores_usable_corrections_and_counts_the_rest() -> None:
    seen: list[list[int]] = []

    def score(sample: Sample, hinted: list[int]) -> list[float]:
        seen.append(hinted)
        # A teacher that is 0.25 nats surer of every shown token, except it returns one score too few
        # for the response [9].
        if sample.response_ids == [9]:
            return []
        return [lp + 0.25 for lp in sample.old_logprobs or []]

    good = Correction(Sample([5, 6, 7], [1, 2], [-1.0, -2.0]), "use pathlib")
    empty = Correction(Sample([5], [1], [-1.0]), " ")
    no_old = Correction(Sample([5], [1, 2], [-1.0]), "use pathlib")
    misaligned = Correction(Sample([5], [9], [-3.0]), "use pathlib")
    out, stats = build_opd_samples([good, empty, no_old, misaligned], score, _tokenize, max_prompt_tokens=2)
    assert [o.sample for o in out] == [good.sample]
    assert out[0].advantages() == pytest.approx([0.25, 0.25])
    assert stats.used == 1
    assert stats.dropped == {
        "empty hint": 1,
        "no behaviour log-probs": 1,
        "teacher scores do not align with the shown tokens": 1,
    }
    assert stats.dropped_total == 3
    # The teacher saw the hint followed by the prompt cut to its last max_prompt_tokens tokens.
    assert seen[0][-2:] == [6, 7]


def test_unshown_judge_prefers_hindsight_then_prm_and_counts() -> None:
    calls: list[str] = []

    def prm(prompt: str, text: str) -> int:
        calls.append(text)
        return -1

    judge = UnshownJudge(prm)
    assert judge("p", "return a + b", "return a + b") == 1  # hindsight decides, the PRM is not asked
    assert judge("p", "x = compute(a, b)", "y = compute(b, a) or 0") == -1  # undecided: the PRM votes
    assert judge("p", "return 1", None) == -1  # nothing kept: the PRM votes
    assert calls == ["x = compute(a, b)", "return 1"]
    assert judge.tally == {"hindsight": 1, "prm": 2}
    assert UnshownJudge(None)("p", "return 1", None) == 0


def test_the_prm_is_fitted_only_when_a_candidate_needs_it_and_once() -> None:
    fits: list[int] = []

    def fit(vote: PRMVote | None) -> Callable[[], ScopePRM]:
        def run() -> ScopePRM:
            fits.append(1)
            return ScopePRM(vote, {"examples": 12, "used": vote is not None})

        return run

    lazy = LazyScopePRM(fit(lambda prompt, text: 1), examples=12)
    judge = UnshownJudge(lazy)
    assert judge("p", "return a + b", "return a + b") == 1  # hindsight decides: nothing fitted
    assert fits == [] and lazy.report == {
        "examples": 12,
        "used": False,
        "reason": "not fitted: hindsight judged every unshown candidate",
    }
    assert judge("p", "return 1", None) == 1 and judge("p", "return 2", None) == 1
    assert fits == [1] and lazy.report == {"examples": 12, "used": True}
    # A PRM fitted but not accurate enough leaves the candidate unjudged (0), as no PRM at all does.
    unused = UnshownJudge(LazyScopePRM(fit(None)))
    assert unused("p", "return 1", None) == 0 and unused.tally == {"unjudged": 1}
