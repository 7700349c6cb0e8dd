"""The ability gate measures HumanEval infilling with the trainer's own model, as serving asks for it.

On the default model (a code model with FIM tokens): the base passes some of a fixed draw of cases by
executing its own suggestions, and a fresh adapter (LoRA B = 0, so the policy is the base) passes exactly
the same ones. A round of the real worker on the small model carries the gate's figures in its metrics.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest

from kernel.fim import fill_template, fim_template_for
from kernel.settings import Settings, TrainingSettings
from personalization import humaneval
from personalization.dataset import TrainingData
from personalization.gates import greedy_suggestions, humaneval_passes
from personalization.samples import Group, Sample
from personalization.trainer import LoraTrainer
from personalization.worker import _train
from server.engine.tokens import LocalTokenizer


def test_the_default_model_passes_humaneval_cases_and_a_fresh_adapter_changes_nothing(default_model: Path) -> None:
    tokenizer = LocalTokenizer(default_model)
    template = fim_template_for("auto", tokenizer.vocabulary())
    assert template is not None and "<|fim_prefix|>" in template
    trainer = LoraTrainer(default_model, TrainingSettings(lora_dropout=0.0, threads=2))
    cases = humaneval.sample_cases(8, random.Random(0))
    base = humaneval_passes(
        trainer.model, tokenizer, cases, template=template, without_adapter=True, autocast=trainer.autocast()
    )
    # Generation stops once every row has its first line; the same prompts 24 tokens long have the same first
    # lines, which are what runs. Prompts healed as serving heals them: the cursor's indentation comes off.
    prompts = [fill_template(template, c.prefix.rstrip(" \t"), c.suffix) for c in cases]
    stopped = greedy_suggestions(trainer.model, tokenizer, prompts, autocast=trainer.autocast())
    full = greedy_suggestions(trainer.model, tokenizer, prompts, autocast=trainer.autocast(), first_line_only=False)
    assert [humaneval.first_line(s) for s in stopped] == [humaneval.first_line(s) for s in full]
    assert stopped != full  # and it did stop: the 24-token texts go on past their first lines
    # The healed model writes the cursor's indentation itself, then the code.
    pairs = zip(cases, stopped, strict=True)
    indented = [s.startswith(c.indent) and not s[len(c.indent) :][:1].isspace() for c, s in pairs]
    assert sum(indented) >= 6
    with_adapter = humaneval_passes(trainer.model, tokenizer, cases, template=template, autocast=trainer.autocast())
    print("base:", base)
    assert len(base) == 8
    assert sum(base) >= 2  # bench.quality: about 60 % of such cases pass with this model and template
    assert with_adapter == base


def one_group_round(model: Path) -> tuple[LocalTokenizer, TrainingData, Settings]:
    """A round's data of one group (a body the developer kept, one they turned down) for `model`."""
    tokenizer = LocalTokenizer(model)
    prompt = tokenizer.encode("import os\n\n\ndef list_files(root):\n")
    good = tokenizer.encode("    return sorted(os.listdir(root))")
    bad = tokenizer.encode("    pass")
    data = TrainingData(
        rollout_ids=[1], groups=[Group([Sample(prompt, good, None, 1.0), Sample(prompt, bad, None, -1.0)])]
    )
    settings = Settings()
    settings.model.path = str(model)
    return tokenizer, data, settings


def test_a_round_reports_the_ability_gate_and_caches_the_base(
    small_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HEEDFUL_CACHE_DIR", str(tmp_path))
    tokenizer, data, settings = one_group_round(small_model)
    settings.training = dataclasses.replace(
        settings.training, steps_per_round=2, gate_check_steps=0, lora_dropout=0.0, threads=2
    )
    settings.thresholds.humaneval_cases = 6
    settings.thresholds.humaneval_max_drop = 100.0

    out, metrics, gate = _train(settings, data, tokenizer, None, None)

    assert out is not None and gate is not None and gate.passed
    assert metrics.humaneval["cases"] == 6.0
    assert 0.0 <= metrics.humaneval["adapter"] <= 100.0 and 0.0 <= metrics.humaneval["base"] <= 100.0
    assert metrics.timing["humaneval"] > 0 and metrics.timing["steps"] > 0
    assert all("seconds" in step for step in metrics.steps)
    (cached,) = (tmp_path / "humaneval-base").iterdir()
    base = json.loads(cached.read_text())
    assert len(base["results"]) == 6 and metrics.humaneval["base"] == pytest.approx(100.0 * sum(base["results"]) / 6)
    assert base["seconds"] > 0  # what the round budget reserves for the adapter's pass
    # the next round reads the base's results instead of measuring them again
    cached.write_text(json.dumps({"results": [True] * 6, "seconds": 1.0}))
    _, again, _ = _train(settings, data, tokenizer, None, None)
    assert again.humaneval["base"] == 100.0
    # a cache in the format before the seconds were kept is measured again
    cached.write_text(json.dumps([True] * 6))
    _, third, _ = _train(settings, data, tokenizer, None, None)
    assert third.humaneval["base"] == metrics.humaneval["base"]


def test_a_round_whose_last_steps_cost_ability_measures_its_last_passing_check_instead(
    default_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HumanEval runs at the end of a round only. A learning rate that wrecks the model makes the last
    # steps lose what the base passes; perplexity and KL are let through so that only HumanEval sees it.
    monkeypatch.setenv("HEEDFUL_CACHE_DIR", str(tmp_path))
    tokenizer, data, settings = one_group_round(default_model)
    settings.training = dataclasses.replace(
        settings.training, steps_per_round=3, gate_check_steps=1, learning_rate=0.05, lora_dropout=0.0, threads=2
    )
    settings.thresholds.humaneval_cases = 8
    settings.thresholds.humaneval_max_drop = 0.0
    settings.thresholds.kl_max = 1e30
    settings.thresholds.perplexity_margin = 1e30
    settings.thresholds.loss_divergence = 1e30

    out, metrics, gate = _train(settings, data, tokenizer, None, None)

    shown = ("gate_checks", "steps_done", "gate", "stopped_early")
    print("round:", json.dumps({k: metrics.as_json().get(k) for k in shown}))
    assert metrics.humaneval["base"] > 0  # something to lose
    went = re.fullmatch(
        r"the ability gate failed at step (\d+) \(.*HumanEval.*\); measured the weights of step (\d+), the last "
        r"gate check that passed, instead",
        str(metrics.stopped_early),
    )
    assert went is not None, metrics.stopped_early
    failed_at, back_to = int(went.group(1)), int(went.group(2))
    assert back_to < failed_at and back_to in [c["step"] for c in metrics.gate_checks if c["passed"]]
    assert metrics.steps_done == back_to  # the verdict and the saved adapter are that step's
    assert out is not None and gate is not None
