"""Majority voting and MC-dropout votes of a small synthetic head (no base model)."""

from __future__ import annotations

import pytest
import torch

from personalization.prm import PRMHead, majority, mc_dropout_votes


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
