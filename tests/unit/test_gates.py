"""Publishing gates: the pure decision on hand-computed cases, and the KL and perplexity measurements on a
tiny model whose logits are written by hand."""

from __future__ import annotations

import math
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from personalization.gates import (
    GENERAL_CODE_FUNCTIONS,
    GateResult,
    check_gates,
    general_code_slice,
    kl_and_perplexity,
    mean_kl,
    perplexity,
)

GOOD = {"loss_values": [0.5, 0.4, 0.3], "kl": 1.0, "perplexity_base": 10.0, "perplexity_adapter": 10.2}
LIMITS = {"kl_max": 5.0, "perplexity_margin": 0.05}


def gates(**over) -> GateResult:
    return check_gates(**{**GOOD, **LIMITS, **over})


def test_all_gates_pass() -> None:
    result = gates()
    assert result.passed and result.reasons == []
    assert result.metrics["kl"] == 1.0
    assert result.metrics["perplexity_limit"] == pytest.approx(10.5)
    assert result.metrics["perplexity_delta"] == pytest.approx(0.02)
    assert result.metrics["loss_last"] == 0.3
    assert result.summary() == "passed"


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_loss_fails_and_names_the_step(bad: float) -> None:
    result = gates(loss_values=[0.5, bad, 0.3])
    assert not result.passed
    assert len(result.reasons) == 1
    assert f"training loss was {bad} at step 1" in result.reasons[0]


def test_no_loss_recorded_fails() -> None:
    result = gates(loss_values=[])
    assert not result.passed and "no training loss" in result.reasons[0]


def test_loss_divergence_only_when_asked() -> None:
    assert gates(loss_values=[150.0]).passed
    result = gates(loss_values=[1.0, 150.0], loss_max=100.0)
    assert not result.passed
    assert "150 at step 1" in result.reasons[0] and "thresholds.loss_divergence = 100" in result.reasons[0]


def test_kl_just_above_the_limit_fails() -> None:
    assert gates(kl=5.0).passed
    result = gates(kl=5.01)
    assert not result.passed
    (reason,) = result.reasons
    assert "5.01" in reason and "thresholds.kl_max = 5" in reason


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_kl_fails(bad: float) -> None:
    result = gates(kl=bad)
    assert not result.passed and "thresholds.kl_max" in result.reasons[0]


def test_perplexity_exactly_at_the_margin_passes_just_above_fails() -> None:
    # 10 * (1 + 0.05) = 10.5
    assert gates(perplexity_adapter=10.5).passed
    result = gates(perplexity_adapter=10.5001)
    assert not result.passed
    (reason,) = result.reasons
    assert "10.5001" in reason and "10.5" in reason and "thresholds.perplexity_margin = 0.05" in reason
    # A better adapter always passes.
    assert gates(perplexity_adapter=3.0).passed


def test_non_finite_perplexities_fail() -> None:
    assert "perplexity with the adapter is nan" in gates(perplexity_adapter=math.nan).reasons[0]
    assert "perplexity of the base model is inf" in gates(perplexity_base=math.inf).reasons[0]


def test_every_failure_is_listed() -> None:
    result = gates(loss_values=[1.0, math.nan], kl=7.5, perplexity_adapter=12.0)
    assert not result.passed
    assert len(result.reasons) == 3
    assert "step 1" in result.reasons[0]
    assert "7.5" in result.reasons[1] and "thresholds.kl_max" in result.reasons[1]
    assert "12" in result.reasons[2] and "thresholds.perplexity_margin" in result.reasons[2]
    assert result.summary() == "; ".join(result.reasons)


def test_invalid_thresholds_raise() -> None:
    with pytest.raises(ValueError, match=r"thresholds.kl_max = 0\.0"):
        gates(kl_max=0.0)
    with pytest.raises(ValueError, match="thresholds.perplexity_margin"):
        gates(perplexity_margin=-0.1)


# --- measurements on hand-written logits ----------------------------------------------------------


class FixedLogits(torch.nn.Module):
    """A 'causal LM' over a 2-token vocabulary whose logits at each position are given by hand.

    Row t of `table` is used at position t whatever the input ids are.
    """

    def __init__(self, table: list[list[float]]) -> None:
        super().__init__()
        self.table = torch.tensor(table, dtype=torch.float32)
        self.adapter_on = True
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        self.calls += 1
        t = input_ids.shape[1]
        table = self.table if self.adapter_on else torch.zeros_like(self.table)
        return SimpleNamespace(logits=table[:t].unsqueeze(0))


class PeftLike(FixedLogits):
    """With the adapter disabled the logits are all zero (uniform): a stand-in for a peft model."""

    @contextmanager
    def disable_adapter(self):
        self.adapter_on = False
        try:
            yield
        finally:
            self.adapter_on = True


class CharTokenizer:
    def encode(self, text: str, /) -> list[int]:
        return [0 if c == "a" else 1 for c in text]


LN2 = math.log(2.0)


def kl_bernoulli(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_kl_matches_hand_computation() -> None:
    # Position 0: logits (ln 3, 0) -> p = (3/4, 1/4); position 1: (0, 0) -> p = (1/2, 1/2).
    policy = FixedLogits([[math.log(3.0), 0.0], [0.0, 0.0]])
    # Reference: uniform everywhere.
    reference = FixedLogits([[0.0, 0.0], [0.0, 0.0]])
    expected = (kl_bernoulli(0.75, 0.5) + 0.0) / 2  # = (0.75 ln 1.5 + 0.25 ln 0.5) / 2
    assert expected == pytest.approx((0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2)
    got = mean_kl(policy, CharTokenizer(), ["ab"], reference=reference)
    assert got == pytest.approx(expected, rel=1e-6)


def test_kl_is_token_weighted_over_prompts_and_uses_disable_adapter() -> None:
    model = PeftLike([[math.log(3.0), 0.0], [math.log(9.0), 0.0], [0.0, 0.0]])
    # "a" has 1 token (position 0); "abb" has 3 (positions 0, 1, 2): 4 tokens in all.
    expected = (2 * kl_bernoulli(0.75, 0.5) + kl_bernoulli(0.9, 0.5) + 0.0) / 4
    model.train()
    got = mean_kl(model, CharTokenizer(), ["a", "", "abb"])
    assert got == pytest.approx(expected, rel=1e-6)
    assert model.training, "the model's training flag is restored"
    assert model.adapter_on


def test_identical_policy_and_reference_give_zero_kl() -> None:
    table = [[1.5, -2.0], [0.3, 0.1], [-4.0, 4.0]]
    assert mean_kl(FixedLogits(table), CharTokenizer(), ["aba", "bb"], reference=FixedLogits(table)) == 0.0


def test_kl_needs_a_reference_or_a_peft_model() -> None:
    with pytest.raises(ValueError, match="disable_adapter"):
        mean_kl(FixedLogits([[0.0, 0.0]]), CharTokenizer(), ["a"])
    with pytest.raises(ValueError, match="has a token"):
        mean_kl(PeftLike([[0.0, 0.0]]), CharTokenizer(), ["", ""])


def test_perplexity_matches_hand_computation() -> None:
    # Text "aab" = ids [0, 0, 1]: position 0 predicts id 0 with p = 3/4, position 1 predicts id 1 with
    # p = 1/4 (logits (ln 3, 0)); position 2 predicts nothing.
    model = PeftLike([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    nll = (-math.log(0.75) - math.log(0.25)) / 2
    assert perplexity(model, CharTokenizer(), ["aab"]) == pytest.approx(math.exp(nll), rel=1e-6)
    # Uniform over 2 tokens: perplexity 2 exactly; texts of one token are skipped.
    assert perplexity(model, CharTokenizer(), ["aab", "b"], without_adapter=True) == pytest.approx(2.0)
    # max_tokens cuts the text: "aab" -> "aa", one prediction with p = 3/4.
    assert perplexity(model, CharTokenizer(), ["aab"], max_tokens=2) == pytest.approx(4 / 3, rel=1e-6)
    assert model.adapter_on


def test_perplexity_errors() -> None:
    with pytest.raises(ValueError, match="two tokens"):
        perplexity(FixedLogits([[0.0, 0.0]]), CharTokenizer(), ["a"])
    with pytest.raises(ValueError, match="disable_adapter"):
        perplexity(FixedLogits([[0.0, 0.0]] * 2), CharTokenizer(), ["ab"], without_adapter=True)


def test_wrong_logits_shape_is_named() -> None:
    class Flat(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return torch.zeros(input_ids.shape[1], 2)

    with pytest.raises(ValueError, match=r"expected \[1, 2, vocab\]"):
        perplexity(Flat(), CharTokenizer(), ["ab"])


# --- the general-code slice ------------------------------------------------------------------------


def test_general_code_slice_is_fixed_python_source() -> None:
    first = general_code_slice()
    assert first == general_code_slice()
    assert len(first) == len(GENERAL_CODE_FUNCTIONS)
    assert first[0].startswith("def dedent(text):")
    assert any(t.startswith("def hsv_to_rgb(") for t in first)
    for text in first:
        compile(text, "<slice>", "exec")  # each is a complete, dedented function
    assert 2_000 < sum(len(t) for t in first) < 20_000


def test_general_code_slice_names_a_missing_stdlib(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="textwrap.py is missing"):
        general_code_slice(tmp_path)


def test_humaneval_within_the_allowed_drop_passes_and_beyond_it_fails() -> None:
    # 40 cases, one case = 2.5 points. Base passes 20 (50 %).
    base = [True] * 20 + [False] * 20
    one_lost = [False] + [True] * 19 + [False] * 20  # 47.5 %: 2.5 points down
    two_lost = [False, False] + [True] * 18 + [False] * 20  # 45 %: 5 points down
    ok = gates(humaneval=(base, one_lost), humaneval_max_drop=3.0)
    assert ok.passed
    assert ok.metrics["humaneval_base"] == 50.0 and ok.metrics["humaneval_adapter"] == 47.5
    assert ok.metrics["humaneval_lost"] == 1.0 and ok.metrics["humaneval_gained"] == 0.0
    bad = gates(humaneval=(base, two_lost), humaneval_max_drop=3.0)
    assert not bad.passed
    assert "50.0 % to 45.0 % on 40 cases" in bad.reasons[0] and "thresholds.humaneval_max_drop" in bad.reasons[0]


def test_humaneval_counts_gains_against_losses() -> None:
    base = [True, True, False, False]
    swapped = [False, True, True, False]  # one lost, one gained: the same rate
    result = gates(humaneval=(base, swapped), humaneval_max_drop=0.0)
    assert result.passed
    assert result.metrics["humaneval_lost"] == 1.0 and result.metrics["humaneval_gained"] == 1.0


def test_humaneval_results_must_cover_the_same_cases() -> None:
    with pytest.raises(ValueError, match="same cases"):
        gates(humaneval=([True, False], [True]))
    with pytest.raises(ValueError, match="same cases"):
        gates(humaneval=([], []))


def test_kl_and_perplexity_in_one_pass_match_hand_computation() -> None:
    # "aab" = ids [0, 0, 1] against a uniform reference: positions 0 and 1 have p = (3/4, 1/4), position 2
    # p = (1/2, 1/2). KL over the 3 positions; perplexity over the 2 predictions (3/4 for id 0, 1/4 for 1).
    model = PeftLike([[math.log(3.0), 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    kl, ppl = kl_and_perplexity(model, CharTokenizer(), ["aab", "b"])
    assert kl == pytest.approx(2 * kl_bernoulli(0.75, 0.5) / 3, rel=1e-6)
    assert ppl == pytest.approx(math.exp((-math.log(0.75) - math.log(0.25)) / 2), rel=1e-6)
    assert model.calls == 2  # one policy and one reference pass for "aab"; "b" predicts nothing
    assert model.adapter_on
    with pytest.raises(ValueError, match="two tokens"):
        kl_and_perplexity(model, CharTokenizer(), ["a"])
    with pytest.raises(ValueError, match="disable_adapter"):
        kl_and_perplexity(FixedLogits([[0.0, 0.0]]), CharTokenizer(), ["ab"])


def test_a_round_reserves_its_end_with_a_margin_on_the_adapters_humaneval_pass_and_the_save() -> None:
    from personalization.worker import end_reserve_s

    # step 20 s + one final check 10 s + HumanEval 60 s x 1.6 + save 5 s = 131 s; with a check due, 141 s.
    assert end_reserve_s(20.0, 10.0, 60.0, due_check=False) == pytest.approx(131.0)
    assert end_reserve_s(20.0, 10.0, 60.0, due_check=True) == pytest.approx(141.0)
    # Without the ability gate (no HumanEval cases) only the step, the check and the save remain.
    assert end_reserve_s(0.0, 10.0, 0.0, due_check=False) == pytest.approx(15.0)
