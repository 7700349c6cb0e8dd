"""GRPO-TCR math (personalization.grpo) against values computed by hand, plus its edge cases and error paths.

`torch.autograd.backward(loss)` instead of `loss.backward()`: the latter is untyped and mypy --strict rejects it.
"""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

from kernel.settings import TrainingSettings
from personalization.grpo import group_advantages, grpo_tcr_loss, masked_mean, overlong_penalty

LN2 = math.log(2.0)  # 0.6931471805599453
# k3 KL terms for d = ref_logp - logp:  kl(d) = e^d - d - 1
KL_LN2 = 2.0 - LN2 - 1.0  # d = +ln 2 -> 0.3068528194400547
KL_MINUS_LN2 = 0.5 + LN2 - 1.0  # d = -ln 2 -> 0.1931471805599453


def t(values: list[float] | list[list[float]]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_hand_computed() -> None:
    # rewards [1, -1, -1, 1]: mean 0; unbiased var = (1 + 1 + 1 + 1) / (4 - 1) = 4/3; std = 1.1547005383792515
    # advantages = +-1 / (1.1547005383792515 + 1e-6) = +-0.8660246...
    adv = group_advantages(t([1.0, -1.0, -1.0, 1.0]))
    expected = 1.0 / (1.1547005383792515 + 1e-6)
    assert expected == pytest.approx(0.8660247, abs=1e-7)
    assert adv.tolist() == pytest.approx([expected, -expected, -expected, expected], rel=1e-12)
    # with eps = 0 it is exactly +-sqrt(3)/2 = +-0.8660254037844386
    assert group_advantages(t([1.0, -1.0, -1.0, 1.0]), eps=0.0).tolist() == pytest.approx(
        [0.8660254037844386, -0.8660254037844386, -0.8660254037844386, 0.8660254037844386], rel=1e-12
    )


def test_group_advantages_second_hand_example() -> None:
    # rewards [0, 1, 2]: mean 1; unbiased var = (1 + 0 + 1) / 2 = 1; std = 1 -> [-1, 0, 1] / (1 + 1e-6)
    adv = group_advantages(t([0.0, 1.0, 2.0]))
    assert adv.tolist() == pytest.approx([-1 / 1.000001, 0.0, 1 / 1.000001], rel=1e-12)
    # integer rewards ({-1, 0, +1} from the PRM) are accepted and promoted to float
    adv_int = group_advantages(torch.tensor([0, 1, 2]))
    assert adv_int.is_floating_point()
    assert adv_int.tolist() == pytest.approx([-1 / 1.000001, 0.0, 1 / 1.000001], rel=1e-6)


@pytest.mark.parametrize("value", [0.0, 1.0, -1.0, 0.1, 1e30])
def test_group_advantages_all_equal_is_exactly_zero(value: float) -> None:
    for dtype in (torch.float32, torch.float64):
        adv = group_advantages(torch.full((5,), value, dtype=dtype))
        assert torch.equal(adv, torch.zeros(5, dtype=dtype))


def test_group_of_one_is_zero_not_nan() -> None:
    # torch's unbiased std of one element is NaN (with a warning); the group of one must not get there
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adv = group_advantages(torch.tensor([3.0]))
    assert torch.equal(adv, torch.zeros(1))


def test_group_advantages_is_detached() -> None:
    rewards = torch.tensor([1.0, 0.0, -1.0], requires_grad=True)
    assert not group_advantages(rewards).requires_grad


@pytest.mark.parametrize(
    ("rewards", "eps", "needle"),
    [
        (torch.zeros(2, 2), 1e-6, "1-D"),
        (torch.zeros(0), 1e-6, "empty"),
        (torch.tensor([1.0, float("nan")]), 1e-6, "finite"),
        (torch.tensor([1.0, float("inf")]), 1e-6, "finite"),
        (torch.tensor([1.0, 0.0]), -1e-6, "eps"),
    ],
)
def test_group_advantages_rejects_bad_input(rewards: torch.Tensor, eps: float, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        group_advantages(rewards, eps=eps)


# --------------------------------------------------------------------------------------------------------------
# overlong_penalty (l_max = 512, l_cache = 100 -> safe zone ends at 412)


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (0, 0.0),
        (411, 0.0),
        (412, 0.0),  # exactly l_max - l_cache: still no penalty
        (413, -0.01),  # (412 - 413) / 100
        (462, -0.5),  # midpoint of the ramp
        (511, -0.99),
        (512, -1.0),  # exactly l_max: (412 - 512) / 100
        (513, -1.0),
        (100_000, -1.0),
    ],
)
def test_overlong_penalty_boundaries(length: int, expected: float) -> None:
    assert overlong_penalty(length, 512, 100) == pytest.approx(expected, abs=1e-12)
    assert isinstance(overlong_penalty(length, 512, 100), float)


def test_overlong_penalty_hard_cutoff_when_l_cache_is_zero() -> None:
    # `length <= l_max - l_cache` wins first: l_max itself is still allowed
    assert overlong_penalty(0, 512, 0) == 0.0
    assert overlong_penalty(512, 512, 0) == 0.0
    assert overlong_penalty(513, 512, 0) == -1.0


def test_overlong_penalty_smallest_safe_zone() -> None:
    # l_max = 2, l_cache = 1: safe = 1; length 2 -> (1 - 2) / 1 = -1
    assert overlong_penalty(1, 2, 1) == 0.0
    assert overlong_penalty(2, 2, 1) == -1.0


@pytest.mark.parametrize(
    ("length", "l_max", "l_cache", "needle"),
    [
        (-1, 512, 100, r"length must be >= 0 tokens, got -1"),
        (10, 512, -1, r"l_cache must be >= 0, got -1; set training.l_cache"),
        (10, 512, 512, r"l_cache must be smaller than l_max, got l_cache=512 >= l_max=512; .*at most 511"),
        (10, 512, 600, r"l_cache=600 >= l_max=512"),
        (10, 0, 0, r"l_max must be >= 1 token, got 0"),
    ],
)
def test_overlong_penalty_rejects_bad_arguments(length: int, l_max: int, l_cache: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        overlong_penalty(length, l_max, l_cache)


def test_overlong_penalty_rejects_non_integers() -> None:
    with pytest.raises(TypeError):
        overlong_penalty(10.5, 512, 100)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# grpo_tcr_loss


def hand_example() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 2x3 batch worked through by hand in test_loss_hand_computed."""
    ratio = t([[1.0, 1.5, 0.5], [1.1, 0.7, 1.4]])
    old_logp = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
    logp = old_logp + ratio.log()
    d = t([[0.0, LN2, -LN2], [0.0, 0.0, LN2]])  # ref_logp - logp
    ref_logp = logp + d
    advantages = t([1.0, -2.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    return logp, old_logp, ref_logp, advantages, mask


def test_loss_hand_computed() -> None:
    logp, old_logp, ref_logp, advantages, mask = hand_example()
    loss, metrics = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, mask, eps_low=0.2, eps_high=0.28, beta=0.01)
    # clip range [0.8, 1.28]
    # row 0, A = +1: ratio       [1.0,  1.5,  0.5]
    #                clip(ratio) [1.0,  1.28, 0.8]
    #                s = min     [1.0,  1.28, 0.5]   <- token 1 clipped (1.5 > 1.28, A > 0); token 2 is not (A > 0)
    # row 1, A = -2: ratio*A     [-2.2, -1.4, -2.8]
    #                clip*A      [-2.2, -1.6, -2.56]
    #                s = min     [-2.2, -1.6, -2.8]  <- token 1 clipped (0.7 < 0.8, A < 0); token 2 is not (A < 0)
    # sum(s) = 1.0 + 1.28 + 0.5 - 2.2 - 1.6 - 2.8 = -3.82 -> policy_loss = 3.82 / 6 = 0.6366666666666667
    # kl = [0, 0.3068528194400547, 0.1931471805599453, 0, 0, 0.3068528194400547], sum 0.8068528194400547
    # mean_kl = 0.8068528194400547 / 6 = 0.13447546990667578; kl_term = 0.01 * mean_kl = 0.0013447546990667578
    # loss = 0.6366666666666667 + 0.0013447546990667578 = 0.6380114213657334
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(0.6380114213657334, rel=1e-12)
    assert metrics["loss"] == pytest.approx(0.6380114213657334, rel=1e-12)
    assert metrics["policy_loss"] == pytest.approx(0.6366666666666667, rel=1e-12)
    assert metrics["mean_kl"] == pytest.approx(0.13447546990667578, rel=1e-12)
    assert metrics["kl_term"] == pytest.approx(0.0013447546990667578, rel=1e-12)
    # mean_ratio = (1.0 + 1.5 + 0.5 + 1.1 + 0.7 + 1.4) / 6 = 6.2 / 6
    assert metrics["mean_ratio"] == pytest.approx(1.0333333333333334, rel=1e-12)
    # 2 of 6 tokens clipped
    assert metrics["clip_fraction"] == pytest.approx(1 / 3, rel=1e-12)
    # mean_advantage = (3 * 1 + 3 * -2) / 6
    assert metrics["mean_advantage"] == pytest.approx(-0.5, rel=1e-12)
    assert metrics["valid_tokens"] == 6.0
    assert all(type(value) is float for value in metrics.values())
    assert {"mean_kl", "clip_fraction", "mean_ratio", "policy_loss", "kl_term"} <= metrics.keys()


def test_loss_hand_computed_with_a_masked_token() -> None:
    logp, old_logp, ref_logp, advantages, _ = hand_example()
    mask = t([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # float mask; drops row 1, token 2
    loss, metrics = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, mask)
    # sum(s) = 1.0 + 1.28 + 0.5 - 2.2 - 1.6 = -1.02 -> policy_loss = 1.02 / 5 = 0.204
    # sum(kl) = 0.3068528194400547 + 0.1931471805599453 = 0.5 -> mean_kl = 0.1; loss = 0.204 + 0.001 = 0.205
    assert loss.item() == pytest.approx(0.205, rel=1e-12)
    assert metrics["policy_loss"] == pytest.approx(0.204, rel=1e-12)
    assert metrics["mean_kl"] == pytest.approx(0.1, rel=1e-12)
    assert metrics["mean_ratio"] == pytest.approx((1.0 + 1.5 + 0.5 + 1.1 + 0.7) / 5, rel=1e-12)
    assert metrics["clip_fraction"] == pytest.approx(2 / 5, rel=1e-12)
    assert metrics["valid_tokens"] == 5.0


def test_defaults_match_training_settings() -> None:
    params = inspect.signature(grpo_tcr_loss).parameters
    defaults = TrainingSettings()
    assert params["eps_low"].default == defaults.eps_low == 0.2
    assert params["eps_high"].default == defaults.eps_high == 0.28
    assert params["beta"].default == defaults.beta_kl == 0.01


def one_token(ratio: float, advantage: float) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """Loss of a single token with the given ratio and advantage, no KL (ref_logp == logp, beta 0)."""
    old_logp = t([[-1.0]])
    logp = (old_logp + math.log(ratio)).requires_grad_(True)
    loss, metrics = grpo_tcr_loss(logp, old_logp, logp.detach(), t([advantage]), torch.ones(1, 1), beta=0.0)
    torch.autograd.backward(loss)
    assert logp.grad is not None
    return loss, metrics, logp.grad


def test_clip_high_binds_only_for_positive_advantages() -> None:
    # ratio 1.5 > 1 + 0.28
    loss, metrics, grad = one_token(1.5, 1.0)  # min(1.5, 1.28) = 1.28: clipped, no gradient
    assert loss.item() == pytest.approx(-1.28, rel=1e-12)
    assert metrics["clip_fraction"] == 1.0
    assert grad.item() == 0.0
    loss, metrics, grad = one_token(1.5, -1.0)  # min(-1.5, -1.28) = -1.5: NOT clipped, gradient -ratio*A = 1.5
    assert loss.item() == pytest.approx(1.5, rel=1e-12)
    assert metrics["clip_fraction"] == 0.0
    assert grad.item() == pytest.approx(1.5, rel=1e-12)


def test_clip_low_binds_only_for_negative_advantages() -> None:
    # ratio 0.5 < 1 - 0.2
    loss, metrics, grad = one_token(0.5, -1.0)  # min(-0.5, -0.8) = -0.8: clipped, no gradient
    assert loss.item() == pytest.approx(0.8, rel=1e-12)
    assert metrics["clip_fraction"] == 1.0
    assert grad.item() == 0.0
    loss, metrics, grad = one_token(0.5, 1.0)  # min(0.5, 0.8) = 0.5: NOT clipped, gradient -ratio*A = -0.5
    assert loss.item() == pytest.approx(-0.5, rel=1e-12)
    assert metrics["clip_fraction"] == 0.0
    assert grad.item() == pytest.approx(-0.5, rel=1e-12)


def test_clip_bounds_are_asymmetric() -> None:
    # ratio 1.25 is inside [0.8, 1.28] (clip-higher) although it would be clipped by a symmetric 0.2
    loss, metrics, _ = one_token(1.25, 1.0)
    assert loss.item() == pytest.approx(-1.25, rel=1e-12)
    assert metrics["clip_fraction"] == 0.0


def test_zero_advantage_is_never_counted_as_clipped() -> None:
    loss, metrics, grad = one_token(3.0, 0.0)
    assert loss.item() == 0.0
    assert metrics["clip_fraction"] == 0.0
    assert grad.item() == 0.0


def test_gradient_reaches_only_logp_and_matches_hand_computation() -> None:
    # 2x2, A = [1, -1], beta = 0.1, mask [[1, 1], [1, 0]] -> sum(mask) = 3
    # d loss / d logp = mask/3 * (-ratio * A * [unclipped] + beta * (1 - exp(ref_logp - logp)))
    # (0,0): ratio 1.0, inside the clip range, d = ln 2: (1/3) * (-1.0 + 0.1 * (1 - 2))      = -1.1 / 3
    # (0,1): ratio 1.5 clipped (A > 0), d = 0:           (1/3) * (0 + 0.1 * (1 - 1))         = 0
    # (1,0): ratio 1.4 unclipped (A < 0), d = -ln 2:     (1/3) * (1.4 + 0.1 * (1 - 0.5))     = 1.45 / 3
    # (1,1): masked out                                                                     = 0
    old_logp = t([[-1.0, -1.0], [-2.0, -2.0]]).requires_grad_(True)
    logp = (old_logp.detach() + t([[0.0, math.log(1.5)], [math.log(1.4), 0.0]])).requires_grad_(True)
    ref_logp = (logp.detach() + t([[LN2, 0.0], [-LN2, 0.0]])).requires_grad_(True)
    advantages = t([1.0, -1.0]).requires_grad_(True)
    mask = torch.tensor([[True, True], [True, False]])
    loss, _ = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.1)
    torch.autograd.backward(loss)
    assert logp.grad is not None
    assert logp.grad.flatten().tolist() == pytest.approx([-1.1 / 3, 0.0, 1.45 / 3, 0.0], abs=1e-12)
    assert old_logp.grad is None
    assert ref_logp.grad is None
    assert advantages.grad is None


def test_token_level_advantages_equal_broadcast_sequence_advantages() -> None:
    generator = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 5, generator=generator, dtype=torch.float64) * 0.3 - 2.0
    old_logp = logp + torch.randn(3, 5, generator=generator, dtype=torch.float64) * 0.3
    ref_logp = logp + torch.randn(3, 5, generator=generator, dtype=torch.float64) * 0.3
    mask = torch.rand(3, 5, generator=generator) > 0.3
    adv = t([0.7, -1.3, 0.0])
    logp_a = logp.clone().requires_grad_(True)
    logp_b = logp.clone().requires_grad_(True)
    loss_a, metrics_a = grpo_tcr_loss(logp_a, old_logp, ref_logp, adv, mask)
    loss_b, metrics_b = grpo_tcr_loss(logp_b, old_logp, ref_logp, adv[:, None].expand(3, 5).clone(), mask)
    torch.autograd.backward(loss_a)
    torch.autograd.backward(loss_b)
    assert loss_a.item() == loss_b.item()
    assert metrics_a == metrics_b
    assert logp_a.grad is not None and logp_b.grad is not None
    assert torch.equal(logp_a.grad, logp_b.grad)


def test_token_level_advantages_hand_computed() -> None:
    # one row, A_t = [2, -1], ratio 1 everywhere, no KL: s = [2, -1] -> loss = -(2 - 1) / 2 = -0.5
    logp = t([[-1.0, -1.0]])
    loss, metrics = grpo_tcr_loss(logp, logp, logp, t([[2.0, -1.0]]), torch.ones(1, 2))
    assert loss.item() == pytest.approx(-0.5, rel=1e-12)
    assert metrics["mean_kl"] == 0.0
    assert metrics["mean_advantage"] == pytest.approx(0.5, rel=1e-12)


def test_masked_tokens_do_not_affect_loss_gradient_or_metrics() -> None:
    generator = torch.Generator().manual_seed(1)
    logp = torch.randn(2, 4, generator=generator, dtype=torch.float64) * 0.3 - 2.0
    old_logp = logp + torch.randn(2, 4, generator=generator, dtype=torch.float64) * 0.4
    ref_logp = logp + torch.randn(2, 4, generator=generator, dtype=torch.float64) * 0.4
    adv = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False]])

    def run(lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, a: torch.Tensor):
        lp = lp.clone().requires_grad_(True)
        loss, metrics = grpo_tcr_loss(lp, old, ref, a, mask)
        torch.autograd.backward(loss)
        return loss.item(), metrics, lp.grad

    loss_1, metrics_1, grad_1 = run(logp, old_logp, ref_logp, adv)
    wild = ~mask
    garbage = [1e6, float("-inf"), float("nan"), -1e6]
    for value in garbage:
        fill = torch.full_like(logp, value)
        loss_2, metrics_2, grad_2 = run(
            torch.where(wild, fill, logp),
            torch.where(wild, -fill, old_logp),
            torch.where(wild, fill, ref_logp),
            torch.where(wild, fill, adv),
        )
        assert loss_2 == loss_1
        assert metrics_2 == metrics_1
        assert grad_2 is not None and grad_1 is not None
        assert torch.equal(grad_2, grad_1)
        assert torch.equal(grad_2[wild], torch.zeros(int(wild.sum()), dtype=torch.float64))


def test_bool_and_float_masks_agree() -> None:
    logp, old_logp, ref_logp, advantages, _ = hand_example()
    bool_mask = torch.tensor([[True, False, True], [True, True, False]])
    loss_b, metrics_b = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, bool_mask)
    loss_f, metrics_f = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, bool_mask.to(torch.float32))
    loss_i, metrics_i = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, bool_mask.to(torch.int64))
    assert loss_b.item() == loss_f.item() == loss_i.item()
    assert metrics_b == metrics_f == metrics_i


def test_all_zero_mask_gives_finite_zero_loss_with_a_graph() -> None:
    logp = torch.full((2, 3), float("nan"), dtype=torch.float64, requires_grad=True)
    old_logp = torch.full((2, 3), float("inf"), dtype=torch.float64)
    loss, metrics = grpo_tcr_loss(logp, old_logp, old_logp, t([1.0, -1.0]), torch.zeros(2, 3))
    assert torch.isfinite(loss)
    assert loss.item() == 0.0
    assert loss.requires_grad
    torch.autograd.backward(loss)
    assert logp.grad is not None
    assert torch.equal(logp.grad, torch.zeros(2, 3, dtype=torch.float64))
    assert set(metrics.values()) == {0.0}
    # the same for a bool mask and for an empty batch
    loss, metrics = grpo_tcr_loss(logp, old_logp, old_logp, t([1.0, -1.0]), torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and set(metrics.values()) == {0.0}
    empty = torch.zeros(0, 4)
    loss, metrics = grpo_tcr_loss(empty, empty, empty, torch.zeros(0), empty)
    assert loss.item() == 0.0 and set(metrics.values()) == {0.0}


def test_beta_zero_removes_the_kl_term() -> None:
    logp, old_logp, ref_logp, advantages, mask = hand_example()
    loss, metrics = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, mask, beta=0.0)
    # only the surrogate of test_loss_hand_computed is left: 3.82 / 6; mean_kl is still reported
    assert loss.item() == pytest.approx(0.6366666666666667, rel=1e-12)
    assert metrics["kl_term"] == 0.0
    assert metrics["mean_kl"] == pytest.approx(0.13447546990667578, rel=1e-12)
    # the reference policy no longer matters at all, even at an infinite KL
    far_ref = torch.full_like(ref_logp, 1e6)
    loss_far, _ = grpo_tcr_loss(logp, old_logp, far_ref, advantages, mask, beta=0.0)
    assert loss_far.item() == loss.item()


def test_beta_scales_the_kl_term_linearly() -> None:
    logp, old_logp, ref_logp, advantages, mask = hand_example()
    loss, metrics = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, mask, beta=1.0)
    # 0.6366666666666667 + 1.0 * 0.13447546990667578
    assert loss.item() == pytest.approx(0.7711421365733425, rel=1e-12)
    assert metrics["kl_term"] == pytest.approx(0.13447546990667578, rel=1e-12)


def test_float32_inputs_give_a_float32_loss() -> None:
    logp, old_logp, ref_logp, advantages, mask = (x.float() if x.is_floating_point() else x for x in hand_example())
    loss, metrics = grpo_tcr_loss(logp, old_logp, ref_logp, advantages, mask)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(0.6380114213657334, rel=1e-5)
    assert metrics["clip_fraction"] == pytest.approx(1 / 3)


def test_loss_does_not_modify_its_inputs() -> None:
    inputs = hand_example()
    copies = [x.clone() for x in inputs]
    grpo_tcr_loss(*inputs)
    for before, after in zip(copies, inputs, strict=True):
        assert torch.equal(before, after)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"old_logp": torch.zeros(2, 4)}, r"old_logp must have the shape of logp \[B, T\] = \[2, 3\], got \[2, 4\]"),
        ({"ref_logp": torch.zeros(3, 2)}, r"ref_logp must have the shape of logp \[B, T\] = \[2, 3\], got \[3, 2\]"),
        ({"mask": torch.ones(2, 3, 1)}, r"mask must have the shape of logp \[B, T\] = \[2, 3\], got \[2, 3, 1\]"),
        (
            {"advantages": torch.zeros(3)},
            r"advantages must have shape \[B\] = \[2\] .* or \[B, T\] = \[2, 3\].*got \[3\]",
        ),
        ({"advantages": torch.zeros(2, 4)}, r"advantages must have shape .*got \[2, 4\]"),
        ({"advantages": torch.zeros(2, 1)}, r"advantages must have shape .*got \[2, 1\]"),
        ({"logp": torch.zeros(6)}, r"logp must be a 2-D tensor \[B, T\].*got shape \(6,\)"),
        ({"advantages": torch.zeros(2, dtype=torch.int64)}, r"advantages must be a floating-point tensor"),
        ({"mask": -torch.ones(2, 3)}, r"mask must hold finite values >= 0"),
        ({"mask": torch.full((2, 3), float("nan"))}, r"mask must hold finite values >= 0"),
        ({"eps_low": -0.1}, r"eps_low must be a finite number >= 0, got -0.1"),
        ({"eps_low": 1.5}, r"eps_low must be <= 1"),
        ({"eps_high": float("nan")}, r"eps_high must be a finite number >= 0"),
        ({"beta": -0.01}, r"beta must be a finite number >= 0, got -0.01"),
    ],
)
def test_loss_rejects_bad_input_with_a_helpful_message(overrides: dict[str, object], needle: str) -> None:
    args: dict[str, object] = {
        "logp": torch.zeros(2, 3),
        "old_logp": torch.zeros(2, 3),
        "ref_logp": torch.zeros(2, 3),
        "advantages": torch.zeros(2),
        "mask": torch.ones(2, 3),
    }
    args.update(overrides)
    with pytest.raises(ValueError, match=needle):
        grpo_tcr_loss(**args)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------------------
# masked_mean


def test_masked_mean() -> None:
    values = t([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_mean(values, mask).item() == pytest.approx((1.0 + 2.0 + 4.0 + 6.0) / 4, rel=1e-12)
    assert masked_mean(values, torch.zeros(2, 3)).item() == 0.0
    # float weights: (1 * 1 + 3 * 4) / (1 + 3)
    weights = t([[1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    assert masked_mean(values, weights).item() == pytest.approx(13 / 4, rel=1e-12)
    with pytest.raises(ValueError, match=r"same shape, got values \(2, 3\) and mask \(3, 2\)"):
        masked_mean(values, torch.ones(3, 2))
