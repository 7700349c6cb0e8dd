"""Splitting a step into micro-batches bounds the trainer's memory and changes nothing it learns.

Two trainers on the real model with the same seed take one step on the same groups, one in a single
pass and one in micro-batches of a few samples: the step's gradients and metrics are the same up to
float32 summation order (a tolerance derived from the accumulation lengths, see `summation_tolerance`).
(The gradients are compared; Adam's first update is close to lr * sign(gradient) and so magnifies
summation-order noise where a gradient is about zero.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from personalization.trainer import Group, LoraTrainer, Sample
from server.settings import TrainingSettings


def groups() -> list[Group]:
    prompt = list(range(200, 260))  # 60 prompt tokens
    responses = [[300, 301, 302], [310, 311], [320, 321, 322, 323], [330], [340, 341]]
    first = Group(
        [Sample(prompt, r, None, reward=float(i % 2)) for i, r in enumerate(responses[:3])], [1.0, -0.5, -0.5]
    )
    second = Group([Sample(prompt[:20], r, None) for r in responses[3:]], [0.7, -0.7])
    return [first, second]


def lora_state(trainer: LoraTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}


def lora_grads(trainer: LoraTrainer) -> dict[str, torch.Tensor]:
    return {k: v.grad.clone() for k, v in trainer.model.named_parameters() if v.requires_grad and v.grad is not None}


def summation_tolerance(grad: torch.Tensor, config: Any) -> float:
    """How far two float32 computations of the same gradient may differ when only the summation order does.

    A float32 sum of K terms computed in another order differs by at most about K * u * sum|terms|
    (u = 2**-24, the unit roundoff). Micro-batches change the matmul shapes (rows are padded to the
    longest in their run), so every accumulation in the forward and backward pass may be ordered
    differently: the longest is over the MLP's inner width K, and the error adds up over the L layers the
    gradient flows back through. Bounded by |terms| <= max|grad|, that is L * K * u * max|grad| per tensor:
    30 * 1536 * 2**-24 = 2.7e-3 of the largest element for SmolLM2-135M. (Measured here: up to 1.3e-4 on
    an AMD EPYC; 1.5e-7 absolute broke a fixed atol of 1e-7 there.) A wrong micro-batch weighting moves
    the gradient by a sizeable share of itself, far beyond this.
    """
    inner = max(int(config.hidden_size), int(getattr(config, "intermediate_size", 0) or 0))
    return float(config.num_hidden_layers * inner * 2**-24 * grad.abs().max().item())


def test_micro_batches_give_the_same_step_as_one_pass(small_model: Path) -> None:
    settings = TrainingSettings(lora_dropout=0.0, learning_rate=1e-3, compute_dtype="float32")
    whole = LoraTrainer(small_model, dataclasses.replace(settings, micro_batch_tokens=1_000_000))
    split = LoraTrainer(small_model, dataclasses.replace(settings, micro_batch_tokens=130))
    data_a, data_b = groups(), groups()
    samples_b = [s for g in data_b for s in g.samples]
    # rows of 63, 62, 64, 21 and 22 tokens; a run is as wide as its longest row
    assert [len(run) for run in split.micro_batches(samples_b)] == [2, 2, 1]
    assert len(whole.micro_batches(samples_b)) == 1
    for trainer, data in ((whole, data_a), (split, data_b)):
        trainer.fill_old_logprobs([s for g in data for s in g.samples])
    before = lora_state(whole)
    m_whole = whole.step(data_a)
    m_split = split.step(data_b)
    after_whole = lora_state(whole)
    assert any(not torch.equal(before[k], after_whole[k]) for k in before)  # the step did move the adapter
    grads_whole, grads_split = lora_grads(whole), lora_grads(split)  # the step's (clipped) gradients stay in .grad
    assert grads_whole.keys() == grads_split.keys() == before.keys()
    config = whole.model.config
    for key, value in grads_whole.items():
        torch.testing.assert_close(grads_split[key], value, rtol=1e-3, atol=summation_tolerance(value, config))
    for key in ("loss", "mean_kl", "mean_ratio", "clip_fraction", "valid_tokens", "tokens", "advantage_abs_mean"):
        assert m_split[key] == pytest.approx(m_whole[key], rel=1e-4, abs=1e-6), key
    assert m_whole["valid_tokens"] == m_whole["tokens"] == 12
