"""The embedded vLLM engine on the real small model: completions, candidate groups with log-probs that
match a Hugging Face forward pass, LoRA adapters (one changes the output, two serve at once), errors."""

from __future__ import annotations

import ast
import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from kernel.settings import Settings
from server.engine import AdapterError, AdapterRef, Engine, EngineError
from server.engine.embedded import EmbeddedEngine, cpu_bind_spec
from server.engine.tokens import LocalTokenizer
from tests.conftest import hf_token_logprobs, make_lora_adapter, peft_token_logprobs

pytestmark = pytest.mark.engine

# vLLM computes in bfloat16, the reference in float32: per-token log-probs differ by rounding. Measured
# on SmolLM2-135M: mean absolute difference 0.02-0.05 nats per token, the largest single token 0.15.
MEAN_TOL = 0.1
MAX_TOL = 0.5

FUNCTION_STOPS = ["\n\n", "\ndef ", "\nclass "]


async def test_completes_fibonacci_into_python_that_parses(embedded_engine: EmbeddedEngine) -> None:
    prompt = "def fibonacci(n):"
    gen = await embedded_engine.generate(prompt, max_tokens=64, temperature=0.0, stop=FUNCTION_STOPS)
    (cand,) = gen.candidates
    code = prompt + cand.text
    ast.parse(code)  # raises SyntaxError if the completion is not Python
    assert "return" in cand.text
    assert cand.finish_reason == "stop"
    assert gen.timing.total_s > 0
    assert gen.prompt_token_ids == embedded_engine.tokenize(prompt)


async def test_greedy_is_deterministic(embedded_engine: EmbeddedEngine) -> None:
    a = await embedded_engine.generate("import os\n\ndef list_files(path):", max_tokens=24)
    b = await embedded_engine.generate("import os\n\ndef list_files(path):", max_tokens=24)
    assert a.candidates[0].token_ids == b.candidates[0].token_ids


async def assert_base_unaffected_by_full_lora_slots(engine: Engine, adapters: list[AdapterRef], hf_model: Any) -> None:
    """With every LoRA slot of the engine holding an adapter, a base-model request batched together with
    adapter requests is still computed on the base weights (vLLM's CPU kernels used the last slot's
    adapter for it; server/engine/vllm_fixes.py corrects that).

    Judged by log-probs against float32 references, not by tokens: the embedded engine packs its weights
    for AMX (merged serving rewrites them in place), and those kernels round differently for a batch of
    five rows than for one, so a greedy near-tie may flip between a request alone and in a batch."""
    from peft import PeftModel

    prompt = "def parse_args(argv):"
    for ref in adapters:
        await engine.load_adapter(ref)
    served = []
    try:
        for ref in adapters:  # each one takes a slot when a request first uses it
            await engine.generate(prompt, max_tokens=2, adapter=ref)
        for _ in range(3):
            *_, batched = await asyncio.gather(
                *(engine.generate(prompt, max_tokens=8, adapter=ref) for ref in adapters),
                engine.generate(prompt, max_tokens=8),
            )
            served.append(batched)
    finally:
        for ref in adapters:
            await engine.unload_adapter(ref)
    peft_model = PeftModel.from_pretrained(hf_model, str(adapters[0].path), adapter_name=adapters[0].name)
    for ref in adapters[1:]:
        peft_model.load_adapter(str(ref.path), adapter_name=ref.name)
    try:
        for gen in served:
            own = assert_logprobs_match(gen.candidates[0].logprobs, peft_token_logprobs(peft_model, None, gen))
            for ref in adapters:
                lp = peft_token_logprobs(peft_model, ref.name, gen)
                wrong = sum(abs(a - b) for a, b in zip(gen.candidates[0].logprobs, lp, strict=True)) / len(lp)
                assert wrong > 3 * own["mean"], f"the base request matches adapter {ref.name} ({wrong:.3f})"
    finally:
        peft_model.unload()


def assert_logprobs_match(engine_lp: list[float], reference_lp: list[float]) -> dict[str, float]:
    assert len(engine_lp) == len(reference_lp)
    diffs = [abs(a - b) for a, b in zip(engine_lp, reference_lp, strict=True)]
    stats = {"mean": sum(diffs) / len(diffs), "max": max(diffs)}
    assert stats["mean"] < MEAN_TOL, stats
    assert stats["max"] < MAX_TOL, stats
    return stats


async def test_group_candidates_carry_token_ids_and_logprobs_matching_hf(
    embedded_engine: EmbeddedEngine, hf_model: Any
) -> None:
    prompt = "def read_lines(path):\n    "
    gen = await embedded_engine.generate(prompt, n=4, max_tokens=16, temperature=1.0, seed=7)
    assert len(gen.candidates) == 4
    assert len({tuple(c.token_ids) for c in gen.candidates}) > 1, "sampling at T=1 should give different candidates"
    all_stats = []
    for cand in gen.candidates:
        assert cand.token_ids, "every candidate has tokens"
        assert len(cand.logprobs) == len(cand.token_ids)
        assert all(lp <= 0.0 for lp in cand.logprobs)
        assert embedded_engine.detokenize(cand.token_ids).startswith(cand.text.rstrip("\n")[:8])
        reference = hf_token_logprobs(hf_model, gen.prompt_token_ids, cand.token_ids)
        all_stats.append(assert_logprobs_match(cand.logprobs, reference))
    print("logprob |vLLM - HF|:", json.dumps(all_stats))


async def test_seeded_groups_are_reproducible(embedded_engine: EmbeddedEngine) -> None:
    """A seeded group's candidates run one by one, each the lone request of its own seed: sent at once,
    vLLM could schedule them over two steps one run and in one the next, and a near tie then sampled
    another token (1 run in 60 did so on an Intel Xeon before they ran one by one)."""
    kwargs: dict[str, Any] = {"n": 4, "max_tokens": 12, "temperature": 1.0, "seed": 11}
    a = await embedded_engine.generate("class Config:", **kwargs)
    b = await embedded_engine.generate("class Config:", **kwargs)
    assert [c.token_ids for c in a.candidates] == [c.token_ids for c in b.candidates]
    assert len({tuple(c.token_ids) for c in a.candidates}) > 1, "each candidate has a seed of its own"
    for i, cand in enumerate(a.candidates):
        alone = await embedded_engine.generate("class Config:", max_tokens=12, temperature=1.0, seed=11 + i)
        assert alone.candidates[0].token_ids == cand.token_ids
    with pytest.raises(TimeoutError):
        await embedded_engine.generate("class Config:", **kwargs, deadline_s=0.001)


async def test_lora_adapter_changes_output_and_two_serve_at_once(
    embedded_engine: EmbeddedEngine, lora_adapters: tuple[Path, Path], hf_model: Any
) -> None:
    path_a, path_b = lora_adapters
    a = AdapterRef("test-adapter-a", 101, path_a)
    b = AdapterRef("test-adapter-b", 102, path_b)
    prompt = "def parse_args(argv):"
    base = await embedded_engine.generate(prompt, max_tokens=16)
    await embedded_engine.load_adapter(a)
    await embedded_engine.load_adapter(b)
    await embedded_engine.load_adapter(a)  # same name, same weights: a no-op
    assert {"test-adapter-a", "test-adapter-b"} <= set(await embedded_engine.loaded_adapters())
    alone_a = await embedded_engine.generate(prompt, max_tokens=16, adapter=a)
    alone_b = await embedded_engine.generate(prompt, max_tokens=16, adapter=b)
    assert alone_a.adapter == "test-adapter-a"
    assert alone_a.candidates[0].token_ids != base.candidates[0].token_ids
    assert alone_b.candidates[0].token_ids != alone_a.candidates[0].token_ids
    # Both adapters and the base model in one batch. Batched bf16 kernels may round differently from
    # single requests, so greedy tokens can diverge late; what must hold is that each request ran on its
    # own weights: its log-probs match peft's forward pass with that adapter, and not with the other.
    together = await asyncio.gather(
        embedded_engine.generate(prompt, max_tokens=16, adapter=a),
        embedded_engine.generate(prompt, max_tokens=16, adapter=b),
        embedded_engine.generate(prompt, max_tokens=16),
    )
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(hf_model, str(path_a), adapter_name="a")
    peft_model.load_adapter(str(path_b), adapter_name="b")
    try:

        def reference(which: str | None, gen: Any) -> list[float]:
            return peft_token_logprobs(peft_model, which, gen)

        for gen, own, other in ((together[0], "a", "b"), (together[1], "b", "a"), (together[2], None, "a")):
            stats = assert_logprobs_match(gen.candidates[0].logprobs, reference(own, gen))
            wrong = reference(other, gen)
            wrong_mean = sum(abs(x - y) for x, y in zip(gen.candidates[0].logprobs, wrong, strict=True)) / len(wrong)
            print(f"batched request on {own or 'base'}: |vLLM - own| {stats}, |vLLM - {other}| mean {wrong_mean:.3f}")
            assert wrong_mean > 3 * stats["mean"] and wrong_mean > 3 * MEAN_TOL
        stats_alone = assert_logprobs_match(alone_a.candidates[0].logprobs, reference("a", alone_a))
        print("adapter logprob |vLLM - peft| (single request):", stats_alone)
    finally:
        peft_model.unload()
    await embedded_engine.unload_adapter(b)
    assert "test-adapter-b" not in await embedded_engine.loaded_adapters()
    with pytest.raises(AdapterError, match="is not loaded"):
        await embedded_engine.generate(prompt, max_tokens=4, adapter=b)
    await embedded_engine.unload_adapter(a)


async def test_adapter_names_are_never_reused_for_other_weights(
    embedded_engine: EmbeddedEngine, lora_adapters: tuple[Path, Path]
) -> None:
    path_a, path_b = lora_adapters
    first = AdapterRef("test-reuse", 201, path_a)
    await embedded_engine.load_adapter(first)
    try:
        with pytest.raises(AdapterError, match="already loaded"):
            await embedded_engine.load_adapter(AdapterRef("test-reuse", 202, path_b))
        with pytest.raises(AdapterError, match="lora_id 201 is in use"):
            await embedded_engine.load_adapter(AdapterRef("test-other", 201, path_b))
        with pytest.raises(AdapterError, match="other weights"):
            await embedded_engine.generate("x = ", max_tokens=2, adapter=AdapterRef("test-reuse", 201, path_b))
    finally:
        await embedded_engine.unload_adapter(first)


async def test_corrupt_adapter_is_refused_and_serving_continues(
    embedded_engine: EmbeddedEngine, lora_adapters: tuple[Path, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(lora_adapters[0], broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterError, match="adapter_model.safetensors is truncated"):
        await embedded_engine.load_adapter(AdapterRef("test-broken", 301, broken))
    with pytest.raises(AdapterError, match="does not exist"):
        await embedded_engine.load_adapter(AdapterRef("test-missing", 302, tmp_path / "nowhere"))
    assert "test-broken" not in await embedded_engine.loaded_adapters()
    gen = await embedded_engine.generate("def add(a, b):", max_tokens=8)
    assert gen.candidates[0].token_ids


async def test_prompt_errors(embedded_engine: EmbeddedEngine) -> None:
    with pytest.raises(EngineError, match="prompt is empty"):
        await embedded_engine.generate("", max_tokens=4)
    with pytest.raises(EngineError, match="exceeds model.max_model_len 2048"):
        await embedded_engine.generate([42] * 2040, max_tokens=16)


async def test_missing_model_is_reported_with_the_fix(tmp_path: Path) -> None:
    s = Settings()
    s.model.path = str(tmp_path / "no-model")
    engine = EmbeddedEngine(s)
    with pytest.raises(EngineError, match=r"no-model does not exist"):
        await engine.start()
    (tmp_path / "no-model").mkdir()
    (tmp_path / "no-model" / "config.json").write_text("{not json")
    with pytest.raises(EngineError, match=r"config.json is not readable JSON"):
        await engine.start()


def test_cpu_bind_spec() -> None:
    assert cpu_bind_spec("off") is None
    assert cpu_bind_spec("0-3") == "0-3"
    auto = cpu_bind_spec("auto")
    assert auto is not None and auto[0].isdigit()


async def test_base_requests_stay_base_when_every_lora_slot_is_taken(
    embedded_engine: EmbeddedEngine, engine_settings: Settings, small_model: Path, tmp_path: Path, hf_model: Any
) -> None:
    n = engine_settings.engine.max_loras
    refs = [
        AdapterRef(f"slot-{i}", 100 + i, make_lora_adapter(small_model, tmp_path / f"slot-{i}", seed=40 + i))
        for i in range(n)
    ]
    await assert_base_unaffected_by_full_lora_slots(embedded_engine, refs, hf_model)


async def test_a_deadline_answers_with_the_text_so_far_and_the_engine_keeps_serving(
    embedded_engine: EmbeddedEngine,
) -> None:
    prompt = "import os\n\n\ndef walk_tree(root):\n    "
    whole = await embedded_engine.generate(prompt, max_tokens=400, temperature=0.0)
    assert whole.candidates[0].finish_reason in ("stop", "length")
    if len(whole.candidates[0].token_ids) < 40:
        pytest.skip(f"the model stopped after {len(whole.candidates[0].token_ids)} tokens: nothing to cut")
    # A third of the whole answer's time: past the first token of a short prompt, well before the end.
    deadline = whole.timing.total_s / 3
    cut = await embedded_engine.generate(prompt, max_tokens=400, temperature=0.0, deadline_s=deadline)
    (cand,) = cut.candidates
    assert cand.finish_reason == "deadline"
    assert 0 < len(cand.token_ids) < len(whole.candidates[0].token_ids)
    # Greedy: the cut answer is the start of the whole one, token for token.
    assert cand.token_ids == whole.candidates[0].token_ids[: len(cand.token_ids)]
    assert whole.candidates[0].text.startswith(cand.text)
    # Nothing generated by the deadline: TimeoutError, and the next request is served as before.
    with pytest.raises(TimeoutError, match="within its deadline"):
        await embedded_engine.generate(prompt, max_tokens=8, deadline_s=0.0)
    with pytest.raises(TimeoutError):  # several candidates come whole or not at all
        await embedded_engine.generate(prompt, n=2, max_tokens=400, temperature=1.0, deadline_s=0.05)
    again = await embedded_engine.generate(prompt, max_tokens=8, temperature=0.0)
    assert again.candidates[0].token_ids == whole.candidates[0].token_ids[:8]


async def test_a_repeated_prompt_is_read_again_only_past_its_last_full_cache_block(
    embedded_engine: EmbeddedEngine, engine_settings: Settings
) -> None:
    """`engine.block_size` (32) is the unit the prefix cache keeps: asked again, a 100-token prompt reuses
    its first 96 tokens (three full blocks) and reads only the last 4 again, where vLLM's CPU default of
    128-token blocks would read all 100."""
    ids = embedded_engine.tokenize("import os\n" + "".join(f"value_{k} = os.getenv('V{k}')\n" for k in range(40)))
    ids = ids[:100]
    await embedded_engine.generate(ids, max_tokens=2, temperature=0.0)
    again = await embedded_engine.generate(ids, max_tokens=2, temperature=0.0)
    assert engine_settings.engine.block_size == 32
    assert again.timing.cached_tokens == 96


async def test_a_text_read_in_pieces_is_held_for_the_longer_prompts_that_start_with_it(
    embedded_engine: EmbeddedEngine, engine_settings: Settings
) -> None:
    """What `completion.warm_context` relies on: the text before a cursor, encoded by the server's own
    tokenizer and read 64 tokens at a time (requests of one new token each), is in the prefix cache for the
    fill-in-the-middle prompt sent as text later: the engine reads only what follows it (and the partial
    block it ends in)."""
    tokenizer = LocalTokenizer(engine_settings.model_path())
    head = "<fim_prefix># file: table.py\n" + "".join(f"cell_{i} = rows[{i}] * {i} + {i % 7}\n" for i in range(60))
    ids, ends = tokenizer.encode_with_ends(head)
    assert ids == embedded_engine.tokenize(head) and ends[-1] == len(head) and len(ids) > 600
    for end in range(64, len(ids) + 64, 64):
        piece = await embedded_engine.generate(ids[: min(end, len(ids))], max_tokens=1, temperature=0.0)
        assert piece.timing.cached_tokens == end - 64  # each piece reads only its own 64 tokens
    gen = await embedded_engine.generate(head + "cell_60 = <fim_suffix>\n<fim_middle>", max_tokens=1, temperature=0.0)
    prompt = gen.prompt_token_ids
    shared = next((i for i, (a, b) in enumerate(zip(ids, prompt, strict=False)) if a != b), len(ids))
    assert shared >= len(ids) - 1  # the text after it changes at most the last token of the head
    assert gen.timing.cached_tokens == shared // 32 * 32


async def test_a_single_candidate_reports_its_first_token_time_and_cached_tokens(
    embedded_engine: EmbeddedEngine,
) -> None:
    gen = await embedded_engine.generate("def add(a, b):", max_tokens=8, temperature=0.0)
    t = gen.timing
    assert t.alone  # nothing else was running in the engine
    assert t.first_token_s is not None and 0 < t.first_token_s <= t.total_s
    assert t.cached_tokens is not None and 0 <= t.cached_tokens <= len(gen.prompt_token_ids)
    group = await embedded_engine.generate("def add(a, b):", n=2, max_tokens=8, temperature=1.0)
    assert group.timing.first_token_s is None  # several candidates are not streamed
