"""Majority voting, MC-dropout votes of a small synthetic head (no base model) and the LLM judge's answer
parsing against a scripted engine."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch

from personalization.prm import LLMJudge, PRMHead, majority, mc_dropout_votes, parse_yes_no
from server.engine.base import Candidate, Engine, EngineError, Generation, Timing


@pytest.mark.parametrize(
    ("votes", "expected"),
    [
        ([1, 1, -1, -1, 1], 1),
        ([1, -1], 0),
        ([None] * 5, 0),
        ([None, None, -1], -1),
        ([1, None, -1, None, None], 0),
        ([-1, -1, -1, 1, 1], -1),
        ([], 0),
        ([1], 1),
    ],
)
def test_majority(votes: list[int | None], expected: int) -> None:
    assert majority(votes) == expected


def test_majority_rejects_votes_that_are_not_signs() -> None:
    with pytest.raises(ValueError, match="must be"):
        majority([1, 0, -1])


def balanced_head(p: float) -> tuple[PRMHead, torch.Tensor]:
    """A head whose deterministic logit on the returned features is shifted to (almost) zero, so dropout
    noise decides the sign of each pass."""
    torch.manual_seed(0)
    head = PRMHead(16, width=8, dropout=p)
    feats = torch.randn(16)
    head.eval()
    with torch.no_grad():
        head.fc2.bias.sub_(head(feats.unsqueeze(0))[0] - 1e-4)
    return head, feats


def test_mc_dropout_votes_vary_when_dropout_is_on() -> None:
    head, feats = balanced_head(0.5)
    torch.manual_seed(1)
    votes = mc_dropout_votes(head, feats, m=64)
    assert set(votes) == {1, -1}
    assert not head.training  # the previous mode is restored


def test_votes_are_identical_without_dropout() -> None:
    torch.manual_seed(0)
    head = PRMHead(16, width=8, dropout=0.0)
    feats = torch.randn(16)
    votes = mc_dropout_votes(head, feats, m=9)
    assert len(set(votes)) == 1 and votes[0] in (-1, 1)
    with torch.no_grad():
        expected = 1 if float(head(feats.unsqueeze(0))[0]) > 0 else -1
    assert votes[0] == expected
    # Dropout on but MC sampling off: also one deterministic vote.
    head_p, feats_p = balanced_head(0.5)
    assert len(set(mc_dropout_votes(head_p, feats_p, m=9, mc_dropout=False))) == 1


def test_failed_passes_vote_none() -> None:
    head = PRMHead(4, width=4, dropout=0.1)
    assert mc_dropout_votes(head, torch.full((4,), float("nan")), m=5) == [None] * 5
    assert mc_dropout_votes(head, torch.zeros(7), m=3) == [None] * 3  # wrong width: the pass raises
    assert majority(mc_dropout_votes(head, torch.zeros(7), m=3)) == 0
    with pytest.raises(ValueError, match="m"):
        mc_dropout_votes(head, torch.zeros(4), m=0)


@pytest.mark.parametrize(
    ("answer", "vote"),
    [(" Yes", 1), ("yes.", 1), ("\nNo", -1), (" no,", -1), (" Maybe", None), ("", None), (" nope", None), ("**Yes", 1)],
)
def test_parse_yes_no(answer: str, vote: int | None) -> None:
    assert parse_yes_no(answer) == vote


class ScriptedEngine:
    """Answers every generate() with the scripted texts; records the calls."""

    def __init__(self, answers: list[str], fail: bool = False) -> None:
        self.answers = answers
        self.fail = fail
        self.calls: list[dict[str, Any]] = []

    async def generate(self, prompt: str | list[int], **kwargs: Any) -> Generation:
        self.calls.append({"prompt": prompt, **kwargs})
        if self.fail:
            raise EngineError("engine down")
        cands = [Candidate(text=a, token_ids=[], logprobs=[], finish_reason="length") for a in self.answers]
        return Generation(candidates=cands, prompt_token_ids=[], adapter=None, timing=Timing(total_s=0.0))


async def test_llm_judge_samples_m_answers_and_takes_the_majority() -> None:
    engine = ScriptedEngine([" Yes", " no", " yes", " Sure", " Yes"])
    judge = LLMJudge(cast(Engine, engine))
    verdict, votes = await judge.judge("x = 1\n", "y = 2\n", preference="Prefer snake_case.", m=5)
    assert votes == [1, -1, 1, None, 1] and verdict == 1
    (call,) = engine.calls
    assert call["n"] == 5 and call["max_tokens"] == 2 and call["temperature"] == 1.0
    assert "Prefer snake_case." in call["prompt"] and "Answer yes or no." in call["prompt"]
    assert "y = 2" in call["prompt"]


async def test_llm_judge_engine_failure_and_short_answers_are_failed_votes() -> None:
    verdict, votes = await LLMJudge(cast(Engine, ScriptedEngine([], fail=True))).judge("a", "b", m=5)
    assert (verdict, votes) == (0, [None] * 5)
    verdict, votes = await LLMJudge(cast(Engine, ScriptedEngine([" no"]))).judge("a", "b", m=3)
    assert (verdict, votes) == (-1, [-1, None, None])
