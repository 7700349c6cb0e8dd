"""Merged adapter serving in the embedded engine (`engine.adapter_serving = auto`), on the real model.

When one adapter is the only thing requested, the engine folds it into its weights. These tests prove
that the merged weights serve what multi-LoRA serves for the same adapter (teacher-forced log-probs
within a stated tolerance, and greedy text), that unmerging restores the base model bit for bit, and
that switching between scopes never serves a request on another scope's weights.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel.settings import Settings
from server.engine import AdapterRef
from server.engine.embedded import EmbeddedEngine
from tests.conftest import make_lora_adapter, peft_token_logprobs

pytestmark = pytest.mark.engine

# Merged and multi-LoRA compute the same function in bfloat16 with different rounding: multi-LoRA adds
# the low-rank product to the base projection's output, merging adds it to the weights once. Measured on
# SmolLM2-135M with these adapters: mean |difference| of teacher-forced log-probs about 0.01-0.03 nats
# per token, the largest single token below 0.3 (the same order as bf16 vLLM against float32 peft).
MERGED_MEAN_TOL = 0.06
MERGED_MAX_TOL = 0.5
WINDOW_S = 0.4

PROMPTS = [
    "import os\n\n\ndef list_python_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "import json\n\n\ndef load_config(path):\n    with open(path) as fh:\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "from dataclasses import dataclass\n\n\n@dataclass\nclass Point:\n",
    "def parse_args(argv):\n    import argparse\n\n    parser = argparse.ArgumentParser()\n",
]


@pytest.fixture(scope="module")
def merge_adapters(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    root = tmp_path_factory.mktemp("merge-adapters")
    yield {
        # Attention only (the trainer's default targets: q, k, v stack into one engine projection).
        "attn": make_lora_adapter(small_model, root / "attn", seed=11, b_std=0.05),
        # Attention and MLP (gate and up stack into one projection; k untouched inside qkv).
        "mlp": make_lora_adapter(
            small_model,
            root / "mlp",
            seed=12,
            b_std=0.05,
            target_modules=("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        ),
    }


@pytest.fixture
def short_window(engine_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(engine_settings.engine, "merge_window_s", WINDOW_S)
    return WINDOW_S


def assert_base_restored(base: list[Any], again: list[Any]) -> None:
    """After unmerging, the same prompts give the very tokens and log-probs the base weights gave."""
    for a, b in zip(again, base, strict=True):
        assert a.candidates[0].token_ids == b.candidates[0].token_ids
        assert a.candidates[0].logprobs == pytest.approx(b.candidates[0].logprobs, abs=1e-6)


async def _settle(engine: EmbeddedEngine) -> None:
    """Let the window forget earlier requests."""
    await asyncio.sleep(WINDOW_S * 1.5)


async def test_this_machine_can_merge_before_any_adapter_is_requested(embedded_engine: EmbeddedEngine) -> None:
    """The engine checked every LoRA-capable projection at start: on an AMX CPU (packed tensors) and on a CPU
    without AMX (oneDNN handlers) alike, each one can be rewritten, so merging is on."""
    info = embedded_engine.info()
    assert (info.adapter_serving, info.adapter_serving_reason) == ("merged", None)
    answers = await embedded_engine._llm.collective_rpc("heedful_merge_check")
    assert answers == [None]


async def test_merged_serves_what_multi_lora_serves(
    embedded_engine: EmbeddedEngine, merge_adapters: dict[str, Path], short_window: float
) -> None:
    engine = embedded_engine
    await _settle(engine)
    base = [await engine.generate(p, max_tokens=16) for p in PROMPTS]
    assert engine.merged_adapter is None
    for lora_id, (label, path) in enumerate(merge_adapters.items(), start=601):
        ref = AdapterRef(f"test-merge-{label}", lora_id, path)
        await engine.load_adapter(ref)
        try:
            # Multi-LoRA: a base request just before each keeps two scopes in the window.
            lora = []
            for prompt in PROMPTS:
                await engine.generate(prompt, max_tokens=1)
                lora.append(await engine.generate(prompt, max_tokens=16, adapter=ref))
                assert engine.merged_adapter is None
            await _settle(engine)
            merged = [await engine.generate(p, max_tokens=16, adapter=ref) for p in PROMPTS]
            assert engine.merged_adapter == ref.name
            # The adapter changes what is served, merged or not.
            changed = sum(
                m.candidates[0].token_ids != b.candidates[0].token_ids for m, b in zip(merged, base, strict=True)
            )
            assert changed >= len(PROMPTS) // 2, f"{label}: the merged adapter changed only {changed} outputs"
            # Teacher forcing: the merged weights give multi-LoRA's own greedy tokens the same log-probs.
            diffs: list[float] = []
            for gen in lora:
                cand = gen.candidates[0]
                rescored = await engine.score(gen.prompt_token_ids, cand.token_ids, adapter=ref)
                diffs += [abs(a - b) for a, b in zip(rescored, cand.logprobs, strict=True)]
            assert engine.merged_adapter == ref.name
            mean, worst = sum(diffs) / len(diffs), max(diffs)
            same = sum(
                m.candidates[0].token_ids == g.candidates[0].token_ids for m, g in zip(merged, lora, strict=True)
            )
            print(
                f"{label}: merged vs multi-LoRA |dlogprob| mean {mean:.4f} max {worst:.4f}; greedy identical {same}/6"
            )
            assert mean <= MERGED_MEAN_TOL and worst <= MERGED_MAX_TOL
            assert same >= len(PROMPTS) // 2
        finally:
            await engine.unload_adapter(ref)
        # Unloading the merged adapter restores the base weights exactly: same greedy tokens, same log-probs.
        assert engine.merged_adapter is None
        assert_base_restored(base, [await engine.generate(p, max_tokens=16) for p in PROMPTS])


async def test_switching_scopes_never_serves_another_scopes_weights(
    embedded_engine: EmbeddedEngine, merge_adapters: dict[str, Path], hf_model: Any, short_window: float
) -> None:
    """Two developers and the base model, in bursts with pauses: the engine merges and unmerges as the
    window changes, and every request is checked against a float32 peft forward pass of its own scope."""
    from peft import PeftModel

    engine = embedded_engine
    refs = {
        "attn": AdapterRef("test-switch-attn", 701, merge_adapters["attn"]),
        "mlp": AdapterRef("test-switch-mlp", 702, merge_adapters["mlp"]),
    }
    for ref in refs.values():
        await engine.load_adapter(ref)
    states: list[str | None] = []
    served: list[tuple[str | None, Any]] = []
    rng = random.Random(5)

    async def request(scope: str | None, prompt: str) -> None:
        await asyncio.sleep(rng.random() * 0.2)
        gen = await engine.generate(prompt, max_tokens=12, adapter=refs[scope] if scope else None)
        served.append((scope, gen))
        states.append(engine.merged_adapter)

    try:
        plan: list[list[str | None]] = [
            ["attn", "attn", "attn"],  # one scope: merged
            ["attn", "mlp", "attn", "mlp"],  # a second developer arrives: unmerged, both in one batch
            ["mlp", "mlp"],  # after a pause only one: merged again, the other adapter
            ["mlp", None, "mlp"],  # the base model too
            ["attn"],
        ]
        for burst in plan:
            await _settle(engine)
            await asyncio.gather(*(request(scope, rng.choice(PROMPTS)) for scope in burst))
    finally:
        for ref in refs.values():
            await engine.unload_adapter(ref)
    assert "test-switch-attn" in states and "test-switch-mlp" in states and None in states, states

    peft_model = PeftModel.from_pretrained(hf_model, str(merge_adapters["attn"]), adapter_name="attn")
    peft_model.load_adapter(str(merge_adapters["mlp"]), adapter_name="mlp")
    try:

        def reference(scope: str | None, gen: Any) -> list[float]:
            return peft_token_logprobs(peft_model, scope, gen)

        def mean_diff(a: list[float], b: list[float]) -> float:
            return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)

        for scope, gen in served:
            own = mean_diff(gen.candidates[0].logprobs, reference(scope, gen))
            others = [
                mean_diff(gen.candidates[0].logprobs, reference(o, gen)) for o in ("attn", "mlp", None) if o != scope
            ]
            print(f"request on {scope or 'base'}: |served - own| {own:.3f}, |served - others| {min(others):.3f}")
            assert own <= 0.1, f"a request for {scope or 'the base model'} was not served on its own weights"
            assert min(others) > 2 * own
    finally:
        peft_model.unload()
