"""GRPO-TCR math: group-relative advantages, overlong length shaping and the clipped token-level loss.

This module is the single implementation of the GRPO-TCR loss the trainer optimises (an independent
reference implementation checks it). It is pure tensor arithmetic on tensors the caller already has:

* :func:`group_advantages` turns the rewards of one group of ``G`` rollouts for the same prompt into
  ``(r - mean) / (std + eps)`` (unbiased std, the torch default), with zeros when the group carries no
  comparative signal (a single rollout, or all rewards equal).
* :func:`overlong_penalty` is the overlong reward shaping: 0 up to ``l_max - l_cache`` tokens, then a
  linear ramp down to -1 at ``l_max``, and -1 beyond.
* :func:`grpo_tcr_loss` is the token-level clipped surrogate with clip-higher bounds
  ``[1 - eps_low, 1 + eps_high]`` plus ``beta`` times the k3 estimator of KL(pi_theta || pi_ref), both
  averaged over the valid (masked-in) tokens of the whole batch.
* :func:`masked_mean` is the masked average both of the above rely on, exposed for the trainer's logging.

What it must not do: no I/O, no logging, no model or tokenizer code, no optimiser steps, no settings lookups
(the trainer passes ``TrainingSettings.eps_low/eps_high/beta_kl/l_max/l_cache`` in), and no mutation of its
inputs. Gradients flow only through ``logp``; everything else is treated as a constant.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

__all__ = ["group_advantages", "grpo_tcr_loss", "masked_mean", "overlong_penalty"]


def _check_finite_non_negative(name: str, value: float, fix: str) -> None:
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}; {fix}")


def group_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages ``(r - mean(r)) / (std(r) + eps)`` of one group of ``G`` rollouts.

    ``std`` is the unbiased (Bessel-corrected) standard deviation, torch's default. A group of one rollout
    (whose unbiased std is NaN in torch) and a group whose rewards are all exactly equal carry no comparative
    signal and get exact zeros, never NaN. Integer rewards are promoted to the default float dtype. The result
    is detached: advantages are constants of the loss.

    Raises ``ValueError`` for a tensor that is not 1-D, an empty group, non-finite rewards or a negative or
    non-finite ``eps``.
    """
    _check_finite_non_negative("eps", eps, "pass a small positive constant such as 1e-6")
    if rewards.dim() != 1:
        raise ValueError(
            f"rewards must be a 1-D tensor [G] holding one group, got shape {tuple(rewards.shape)}; "
            "call group_advantages once per group (e.g. for each row of a [num_groups, G] tensor)"
        )
    if rewards.numel() == 0:
        raise ValueError("rewards is empty (G = 0); a group needs at least one rollout")
    r = rewards.detach()
    if not r.is_floating_point():
        r = r.to(torch.get_default_dtype())
    if not bool(torch.isfinite(r).all()):
        raise ValueError(f"rewards must all be finite, got {r.tolist()}; drop or re-judge the broken rollouts")
    if r.numel() == 1 or bool((r == r[0]).all()):
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + eps)


def overlong_penalty(length: int, l_max: int, l_cache: int) -> float:
    """Overlong reward shaping of a response of ``length`` tokens, in ``[-1, 0]``.

    With ``safe = l_max - l_cache``::

        length <= safe           ->  0.0
        safe < length <= l_max   ->  (safe - length) / l_cache     (linear from 0 down to -1 at l_max)
        length > l_max           -> -1.0

    ``l_cache == 0`` is a hard cutoff: lengths up to and including ``l_max`` get 0.0, longer ones -1.0 (the
    first branch applies first, so nothing is divided by zero).

    Raises ``ValueError`` naming the argument for ``length < 0``, ``l_max < 1``, ``l_cache < 0`` or
    ``l_cache >= l_max`` (the safe zone must hold at least one token); ``TypeError`` for non-integers.
    """
    length, l_max, l_cache = operator.index(length), operator.index(l_max), operator.index(l_cache)
    if length < 0:
        raise ValueError(f"length must be >= 0 tokens, got {length}; pass the response's token count")
    if l_max < 1:
        raise ValueError(f"l_max must be >= 1 token, got {l_max}; set training.l_max to a positive length")
    if l_cache < 0:
        raise ValueError(
            f"l_cache must be >= 0, got {l_cache}; set training.l_cache to 0 (hard cutoff) or a positive width"
        )
    if l_cache >= l_max:
        raise ValueError(
            f"l_cache must be smaller than l_max, got l_cache={l_cache} >= l_max={l_max}; "
            f"set training.l_cache to at most {l_max - 1} or raise training.l_max"
        )
    safe = l_max - l_cache
    if length <= safe:
        return 0.0
    if length <= l_max:
        return (safe - length) / l_cache
    return -1.0


def _weights_and_valid(mask: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
    """Float weights in ``like``'s dtype and the boolean "valid token" mask (weight != 0)."""
    if mask.dtype == torch.bool:
        valid = mask.detach()
        weights = valid.to(like.dtype)
    else:
        weights = mask.detach().to(like.dtype)
        valid = weights != 0
    return weights, valid


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """``sum(mask * values) / sum(mask)`` as a 0-dim tensor, and 0 (not NaN) when the mask sums to zero.

    ``mask`` is bool or numeric (numeric masks act as non-negative weights) and must have ``values``' shape.
    Masked-out positions never contribute, even if they hold inf or NaN, and receive zero gradient. Gradients
    flow through ``values`` only.
    """
    if values.shape != mask.shape:
        raise ValueError(
            f"values and mask must have the same shape, got values {tuple(values.shape)} and mask {tuple(mask.shape)}"
        )
    if not values.is_floating_point():
        values = values.to(torch.get_default_dtype())
    weights, valid = _weights_and_valid(mask, values)
    safe_values = torch.where(valid, values, torch.zeros_like(values))
    total = weights.sum()
    return (weights * safe_values).sum() / torch.where(total > 0, total, torch.ones_like(total))


def _check_loss_inputs(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor) -> None:
    if logp.dim() != 2:
        raise ValueError(
            f"logp must be a 2-D tensor [B, T] of per-token log-probabilities, got shape {tuple(logp.shape)}"
        )
    shape = tuple(logp.shape)
    for name, tensor in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"{name} must have the shape of logp [B, T] = {list(shape)}, got {list(tensor.shape)}; "
                "pad every per-token tensor of a batch to the same [B, T]"
            )
    if tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(
            f"advantages must have shape [B] = {list(shape[:1])} (one per sequence) or [B, T] = {list(shape)} "
            f"(token-level, for OPD), got {list(advantages.shape)}"
        )
    for name, tensor in (("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp), ("advantages", advantages)):
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise ValueError(f"mask must be bool or real-valued, got dtype {mask.dtype}")
        if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
            raise ValueError(
                "mask must hold finite values >= 0 (1 = train on the token, 0 = padding or prompt), "
                f"got min {mask.min().item()!r} and max {mask.max().item()!r}"
            )


def grpo_tcr_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    beta: float = 0.01,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO-TCR loss: token-level clipped surrogate with clip-higher plus a k3 KL penalty to the reference.

    Shapes: ``logp``, ``old_logp``, ``ref_logp`` and ``mask`` are ``[B, T]``; ``advantages`` is ``[B]``
    (broadcast over the tokens of each sequence) or ``[B, T]`` (token-level, for OPD). Per token::

        ratio = exp(logp - old_logp)
        s     = min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
        kl    = exp(ref_logp - logp) - (ref_logp - logp) - 1
        loss  = -sum(mask * s) / sum(mask) + beta * sum(mask * kl) / sum(mask)

    The sums run over the whole batch (token-level aggregation, the "T" of TCR). ``mask`` may be bool or a
    non-negative float weight (then every mean, metrics included, is weighted by it). Masked-out tokens cannot
    affect the loss, its gradient or the metrics, whatever values (even inf/NaN) the other tensors hold there.
    An all-zero mask yields a zero loss that is still attached to ``logp``'s graph, and metrics of 0.0.
    ``beta == 0`` removes the KL term entirely.

    Only ``logp`` receives gradients: ``old_logp``, ``ref_logp``, ``advantages`` and ``mask`` are detached.

    Metrics (python floats; means are masked means over the valid tokens):

    * ``loss``, ``policy_loss`` (the surrogate term ``-mean(s)``), ``kl_term`` (``beta * mean_kl``);
    * ``mean_kl``, ``mean_ratio``, ``mean_advantage``;
    * ``clip_fraction``: the share of valid tokens where the clipped term is strictly the smaller one, i.e. the
      token's gradient is cut by clipping: ``A > 0 and ratio > 1 + eps_high`` or ``A < 0 and ratio < 1 - eps_low``.
      A ratio outside the bounds on the other side (e.g. ``A < 0`` and ``ratio > 1 + eps_high``) keeps its
      unclipped term and does not count; neither do tokens with ``A == 0``;
    * ``valid_tokens``: the number of tokens with a non-zero mask.
    """
    _check_loss_inputs(logp, old_logp, ref_logp, advantages, mask)
    _check_finite_non_negative("eps_low", eps_low, "use a clip bound offset in [0, 1] such as 0.2")
    if eps_low > 1.0:
        raise ValueError(f"eps_low must be <= 1 (the lower ratio bound 1 - eps_low cannot be negative), got {eps_low}")
    _check_finite_non_negative("eps_high", eps_high, "use a clip bound offset such as 0.28")
    _check_finite_non_negative("beta", beta, "use a KL weight such as 0.01, or 0 to disable the KL term")

    weights, valid = _weights_and_valid(mask, logp)
    zeros = torch.zeros_like(logp)

    def constant(tensor: Tensor) -> Tensor:
        """Detached, in logp's dtype, and 0 at masked-out tokens so inf/NaN there cannot leak in."""
        return torch.where(valid, tensor.detach().to(logp.dtype), zeros)

    adv = advantages.unsqueeze(-1).expand_as(logp) if advantages.dim() == 1 else advantages
    adv_c, old_c, ref_c = constant(adv), constant(old_logp), constant(ref_logp)
    # Masked-out positions become 0 *before* any arithmetic, so their gradient is exactly 0, not 0 * inf = NaN.
    logp_c = torch.where(valid, logp, zeros)

    ratio = torch.exp(logp_c - old_c)
    clipped_ratio = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    surrogate = torch.minimum(ratio * adv_c, clipped_ratio * adv_c)
    log_ref_ratio = ref_c - logp_c
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0

    total = weights.sum()
    denominator = torch.where(total > 0, total, torch.ones_like(total))

    def mean(values: Tensor) -> Tensor:
        return (weights * values).sum() / denominator

    policy_loss = -mean(surrogate)
    mean_kl = mean(kl)
    # beta == 0 drops the KL term outright (so even an infinite KL cannot turn the loss into 0 * inf = NaN).
    kl_term = beta * mean_kl if beta > 0 else torch.zeros_like(mean_kl)
    loss = policy_loss + kl_term if beta > 0 else policy_loss

    with torch.no_grad():
        ratio_d = ratio.detach()
        clipped = ((adv_c > 0) & (ratio_d > 1.0 + eps_high)) | ((adv_c < 0) & (ratio_d < 1.0 - eps_low))
        metrics = {
            "loss": float(loss.detach()),
            "policy_loss": float(policy_loss.detach()),
            "kl_term": float(kl_term.detach()),
            "mean_kl": float(mean_kl.detach()),
            "mean_ratio": float(mean(ratio_d)),
            "mean_advantage": float(mean(adv_c)),
            "clip_fraction": float(mean(clipped.to(logp.dtype))),
            "valid_tokens": float(valid.sum()),
        }
    return loss, metrics
