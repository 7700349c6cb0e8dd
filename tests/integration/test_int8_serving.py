"""Int8 weights in the embedded engine (`engine.quantization = int8`), on the real small model.

The engine makes an int8 (W8A8) copy of the model folder once and serves it through vLLM's CPU int8
kernel. These tests prove that the copy is what `quantize_rows` makes of the float weights, that the
engine serving it computes the float model's function within a stated tolerance, and that merged adapter
serving works on it: merged and multi-LoRA serve the same function, and unmerging gives back the int8 base
bit for bit, on whatever CPU the machine has (oneDNN without AMX, packed tensors with it).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kernel.settings import Settings
from server.engine import AdapterRef
from server.engine.embedded import EmbeddedEngine
from server.engine.quantize import int8_dir_for, is_projection, quantize_rows, quantized_from
from server.model_prep import MANIFEST
from tests.conftest import hf_token_logprobs, make_lora_adapter, peft_token_logprobs
from tests.integration.test_merged_serving import PROMPTS, assert_base_restored

pytestmark = pytest.mark.engine

WINDOW_S = 0.4
# Int8 weights (one scale per row) and int8 activations (one scale per token) against the float32 model,
# teacher-forced on the int8 engine's own greedy tokens: mean |difference| of log-probs per token.
INT8_MEAN_TOL = 0.25


@pytest.fixture(scope="module")
async def int8_engine(small_model: Path) -> AsyncIterator[EmbeddedEngine]:
    s = Settings()
    s.model.path = str(small_model)
    s.engine.kv_cache_gib = 1
    s.engine.quantization = "int8"
    s.engine.merge_window_s = WINDOW_S
    engine = EmbeddedEngine(s)
    await engine.start()
    yield engine
    await engine.close()


def test_the_int8_copy_is_the_float_weights_rounded_per_row(int8_engine: EmbeddedEngine, small_model: Path) -> None:
    """The engine made the copy at start (once per model folder: it stays for later starts)."""
    from safetensors import safe_open

    folder = int8_dir_for(small_model)
    assert quantized_from(folder) == small_model
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    with safe_open(str(folder / "model.safetensors"), framework="pt") as q8:
        names = [n for n in q8.keys() if is_projection(n)]  # noqa: SIM118
        assert len(names) == manifest["projections"] == 7 * config["num_hidden_layers"]
        with safe_open(str(small_model / "model.safetensors"), framework="pt") as f32:
            for name in (names[0], names[-1]):
                q, scale = q8.get_tensor(name), q8.get_tensor(name[: -len("weight")] + "weight_scale")
                expected_q, expected_scale = quantize_rows(f32.get_tensor(name))
                assert bool((q == expected_q).all()) and bool((scale == expected_scale).all())
                error = (q.float() * scale - f32.get_tensor(name).float()).abs()
                assert bool((error <= scale / 2 + 1e-6).all())


async def test_int8_serves_the_float_model_and_can_merge(int8_engine: EmbeddedEngine, hf_model: Any) -> None:
    info = int8_engine.info()
    assert info.quantization == "int8"
    assert (info.adapter_serving, info.adapter_serving_reason) == ("merged", None)
    diffs: list[float] = []
    for prompt in PROMPTS:
        gen = await int8_engine.generate(prompt, max_tokens=16)
        cand = gen.candidates[0]
        assert cand.token_ids
        reference = hf_token_logprobs(hf_model, gen.prompt_token_ids, cand.token_ids)
        diffs += [abs(a - b) for a, b in zip(cand.logprobs, reference, strict=True)]
    mean = sum(diffs) / len(diffs)
    print(f"int8 engine vs float32 model: |dlogprob| mean {mean:.4f} max {max(diffs):.4f}")
    assert mean <= INT8_MEAN_TOL


async def test_merged_int8_serves_the_adapted_model_and_unmerges_exactly(
    int8_engine: EmbeddedEngine, small_model: Path, hf_model: Any, tmp_path: Path
) -> None:
    """Merged, the adapter and the base are quantized together; multi-LoRA adds the float adapter to the
    int8 base. Both serve the adapted model (float32 peft) within int8's tolerance, and farther from the
    base model than from it; after unmerging the engine serves its int8 base bit for bit."""
    from peft import PeftModel

    engine = int8_engine
    adapter = make_lora_adapter(small_model, tmp_path / "attn", seed=11, b_std=0.2)
    await asyncio.sleep(WINDOW_S * 1.5)
    base = [await engine.generate(p, max_tokens=16) for p in PROMPTS]
    assert engine.merged_adapter is None
    ref = AdapterRef("test-int8-merge", 801, adapter)
    await engine.load_adapter(ref)
    try:
        lora = []
        for prompt in PROMPTS:
            await engine.generate(prompt, max_tokens=1)  # the base model in the window: multi-LoRA
            lora.append(await engine.generate(prompt, max_tokens=16, adapter=ref))
            assert engine.merged_adapter is None
        await asyncio.sleep(WINDOW_S * 1.5)
        merged = [await engine.generate(p, max_tokens=16, adapter=ref) for p in PROMPTS]
        assert engine.merged_adapter == ref.name
    finally:
        await engine.unload_adapter(ref)
    assert engine.merged_adapter is None
    assert_base_restored(base, [await engine.generate(p, max_tokens=16) for p in PROMPTS])

    peft_model = PeftModel.from_pretrained(hf_model, str(adapter), adapter_name="attn")
    try:
        for label, served in (("merged", merged), ("multi-LoRA", lora)):
            own: list[float] = []
            other: list[float] = []
            for gen in served:
                cand = gen.candidates[0]
                adapted = peft_token_logprobs(peft_model, "attn", gen)
                unadapted = peft_token_logprobs(peft_model, None, gen)
                own += [abs(a - b) for a, b in zip(cand.logprobs, adapted, strict=True)]
                other += [abs(a - b) for a, b in zip(cand.logprobs, unadapted, strict=True)]
            mean_own, mean_other = sum(own) / len(own), sum(other) / len(other)
            print(f"int8 {label}: |served - adapted| {mean_own:.4f}, |served - base| {mean_other:.4f}")
            assert mean_own <= INT8_MEAN_TOL
            assert mean_other > 2 * mean_own
    finally:
        peft_model.unload()
