"""A round that trains past the gates' margin stops and keeps the last weights that passed them.

The real model and the real trainer: one group teaches the model a nonsense line (advantage +1 on it,
-1 on ordinary code) at a high learning rate, so perplexity on held-out general code climbs step by
step. With a check after every step, the round must stop at the first failing check (in the middle
of the round, or after its last step), go back to the weights of the check before it, and end with
final gates that measure exactly those weights.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest

from kernel.settings import Settings
from personalization.dataset import TrainingData
from personalization.samples import Group, Sample
from personalization.worker import RoundProgress, _train
from server.engine.tokens import LocalTokenizer


@pytest.mark.parametrize("steps", [12, 2], ids=["mid-round", "last-step"])
def test_a_round_past_the_margin_keeps_the_last_weights_that_passed(small_model: Path, steps: int) -> None:
    tokenizer = LocalTokenizer(small_model)
    prompt = tokenizer.encode("import os\n\n\ndef list_files(root):\n    ")
    nonsense = tokenizer.encode("zq zq zq zq zq zq zq zq zq zq zq zq")
    code = tokenizer.encode("return sorted(os.listdir(root))")
    group = Group([Sample(prompt, nonsense, None, 1.0), Sample(prompt, code, None, -1.0)])
    data = TrainingData(rollout_ids=[1], groups=[group])
    settings = Settings()
    settings.model.path = str(small_model)
    settings.training = dataclasses.replace(
        settings.training,
        steps_per_round=steps,
        gate_check_steps=1,
        learning_rate=3e-3,
        old_policy_refresh_steps=1,
        lora_dropout=0.0,
        compute_dtype="float32",
        threads=2,
    )
    settings.thresholds.perplexity_margin = 0.01
    settings.thresholds.humaneval_cases = 0  # this test is about the perplexity checks (see test_ability_gate)

    out, metrics, gate = _train(settings, data, tokenizer, None, None)

    assert out is not None and gate is not None
    checks = metrics.gate_checks
    print("checks:", checks, "stopped:", metrics.stopped_early)
    passed = [c for c in checks if c["passed"]]
    failed = [c for c in checks if not c["passed"]]
    assert passed and failed, f"the run should pass early checks and fail a later one: {checks}"
    assert checks[-1] == failed[0]  # no training after the first failing check
    assert all(c["step"] < failed[0]["step"] for c in passed)
    assert len(metrics.steps) == failed[0]["step"]  # what was trained is recorded ...
    assert metrics.steps_done == passed[-1]["step"]  # ... but the weights are those of the last pass
    assert f"kept the weights of step {passed[-1]['step']}" in str(metrics.stopped_early)
    # The final gates measure the restored weights: the same perplexity the passing check saw, and a pass.
    assert round(metrics.perplexity_adapter or 0.0, 4) == passed[-1]["perplexity"]
    assert gate.passed
    assert metrics.perplexity_adapter is not None and metrics.perplexity_base is not None
    assert metrics.perplexity_adapter <= metrics.perplexity_base * 1.01


def test_a_round_out_of_time_stops_taking_steps_and_goes_to_its_final_gates(small_model: Path) -> None:
    tokenizer = LocalTokenizer(small_model)
    prompt = tokenizer.encode("import os\n\n\ndef list_files(root):\n    ")
    good = Sample(prompt, tokenizer.encode("return sorted(os.listdir(root))"), None, 1.0)
    group = Group([good, Sample(prompt, tokenizer.encode("pass"), None, -1.0)])
    settings = Settings()
    settings.model.path = str(small_model)
    settings.training = dataclasses.replace(
        settings.training, steps_per_round=24, gate_check_steps=8, lora_dropout=0.0, threads=2
    )
    settings.thresholds.humaneval_cases = 0
    progress = RoundProgress(steps=24)
    # A deadline already past: the first step always runs (a round that may not take one publishes nothing
    # new), then none fits, and the final gates measure the weights of that step.
    out, metrics, gate = _train(
        settings, TrainingData(rollout_ids=[1], groups=[group]), tokenizer, None, None,
        progress=progress, deadline=time.monotonic(),
    )  # fmt: skip
    assert out is not None and gate is not None and gate.passed
    assert metrics.steps_done == 1 and len(metrics.steps) == 1
    assert "stopped after 1 of 24 steps: training.round_budget_s = 600" in str(metrics.stopped_budget)
    assert metrics.gate_checks == [] and (metrics.perplexity_adapter or 0.0) > 0
    assert (progress.phase, progress.step) == ("saving", 1)
