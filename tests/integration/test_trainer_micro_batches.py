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

from kernel.settings import TrainingSettings
from personalization.samples import Group, Sample
from personalization.trainer import LoraTrainer


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
    split = LoraTrainer(small_model, dataclasses.replace(settings, micro_batch_tokens=70))
    data_a, data_b = groups(), groups()
    samples_b = [s for g in data_b for s in g.samples]
    # a run holds each prompt once and each response padded to its prompt's longest: responses of 3, 2
    # and 4 tokens after a 60-token prompt, then 1 and 2 after a 20-token one. 60 + 2*3 = 66 fits 70,
    # 60 + 3*4 = 72 does not; 64 + (20 + 1) = 85 does not either; 20 + 2*2 = 24 does.
    assert [len(run) for run in split.micro_batches(samples_b)] == [2, 1, 2]
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


def test_shared_prompt_log_probs_are_those_of_each_whole_sequence(small_model: Path) -> None:
    """Sharing a group's prompt pass changes nothing: each response's log-probs equal those of the whole
    sequence (prompt + response) run alone through the model and its full LM head, token by token, for
    the policy and for the reference, and the gradient reaches the adapter."""
    settings = TrainingSettings(lora_dropout=0.0, compute_dtype="float32")
    trainer = LoraTrainer(small_model, settings)
    with torch.no_grad():  # make the adapter non-trivial, so that policy and reference differ
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    samples = [s for g in groups() for s in g.samples]
    policy, mask = trainer.response_logprobs(samples)
    reference = trainer.reference_logprobs(samples)
    model = trainer.model
    for i, s in enumerate(samples):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        n, p = len(s.response_ids), len(s.prompt_ids)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
            with model.disable_adapter():
                ref_logits = model(input_ids=ids).logits[0].float()
        targets = torch.tensor(s.response_ids)
        for got, full in ((policy, logits), (reference, ref_logits)):
            want = torch.log_softmax(full[p - 1 : p - 1 + n], dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(got[i, :n].detach(), want, rtol=0, atol=2e-4)
        assert float(mask[i].sum()) == n
    assert not bool(policy[mask == 0].any())
    torch.autograd.backward((policy * mask).sum())
    lora_a = [p for name, p in model.named_parameters() if "lora_A" in name]
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in lora_a)


def test_the_reference_is_the_base_model_computed_once_per_sample(small_model: Path) -> None:
    """The reference's log-probs are the base model's (adapter off), cached per sample: after steps that
    moved the adapter the cache still equals a fresh pass with the adapter disabled, and a second call
    runs no forward pass."""
    settings = TrainingSettings(lora_dropout=0.0, learning_rate=1e-2, compute_dtype="float32")
    trainer = LoraTrainer(small_model, settings)
    data = groups()
    samples = [s for g in data for s in g.samples]
    trainer.fill_old_logprobs(samples)
    first = trainer.reference_logprobs(samples)
    for _ in range(2):
        trainer.step(data)
    calls = 0
    inner = trainer.model.get_base_model().model
    original = inner.forward

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    inner.forward = counting
    try:
        again = trainer.reference_logprobs(samples)
    finally:
        inner.forward = original
    assert calls == 0
    assert torch.equal(again, first)
    fresh, mask = trainer.response_logprobs(samples, reference=True)
    torch.testing.assert_close(fresh * mask, first, rtol=0, atol=1e-5)
    policy, _ = trainer.response_logprobs(samples)
    assert float(((policy.detach() - first).abs() * mask).max()) > 1e-3  # the adapter did move: the reference did not


def test_edit_credit_moves_only_the_departing_tokens_of_a_negative_sample(small_model: Path) -> None:
    """With `credit = "edit"` a negative sample's advantage lands on its departing tokens: a step with one
    departing token differs from whole-sequence credit, and with every token departing it is the same."""
    prompt = list(range(200, 260))
    good, bad = [300, 301, 302], [310, 311, 312]

    def grads(credit: str, departs: list[bool] | None) -> dict[str, torch.Tensor]:
        settings = TrainingSettings(lora_dropout=0.0, compute_dtype="float32", credit=credit, beta_kl=0.0)
        trainer = LoraTrainer(small_model, settings)
        group = Group([Sample(prompt, good, None, 1.0), Sample(prompt, bad, None, -1.0, departs=departs)], [1.0, -1.0])
        trainer.fill_old_logprobs(group.samples)
        trainer.step([group])
        return lora_grads(trainer)

    only_last = grads("edit", [False, False, True])
    whole = grads("sequence", [False, False, True])
    nothing_departs_marked = grads("edit", [True, True, True])
    assert any(not torch.allclose(only_last[k], whole[k]) for k in whole)
    for key, value in whole.items():  # every token departing is the whole-sequence credit
        torch.testing.assert_close(nothing_departs_marked[key], value, rtol=1e-5, atol=1e-8)


def test_a_sample_without_pi_old_takes_the_policy_of_the_step_that_uses_it(small_model: Path) -> None:
    """Refreshing pi_old costs no pass: a sample whose pi_old was dropped gets the log-probs of the policy
    in the step that next uses it (ratio exactly 1 there), and keeps them for later steps."""
    settings = TrainingSettings(lora_dropout=0.0, learning_rate=1e-2, compute_dtype="float32")
    trainer = LoraTrainer(small_model, settings)
    data = groups()
    samples = [s for g in data for s in g.samples]
    for s in samples:
        s.old_logprobs = [0.0] * (len(s.response_ids) + 1)  # a stored pi_old of the wrong length
    assert trainer.drop_unusable_old_logprobs(samples) == len(samples)
    assert all(s.old_logprobs is None for s in samples)
    before, _ = trainer.response_logprobs(samples)
    first = trainer.step(data)
    assert first["mean_ratio"] == pytest.approx(1.0, abs=1e-6) and first["clip_fraction"] == 0.0
    for i, s in enumerate(samples):
        assert s.old_logprobs is not None
        torch.testing.assert_close(torch.tensor(s.old_logprobs), before[i, : len(s.response_ids)].detach())
    kept = [list(s.old_logprobs or []) for s in samples]
    second = trainer.step(data)
    assert [s.old_logprobs for s in samples] == kept  # pi_old stays until the next refresh
    assert second["mean_ratio"] != pytest.approx(1.0, abs=1e-6)  # the policy moved away from it
    trainer.refresh_old_logprobs(samples)
    assert all(s.old_logprobs is None for s in samples)
