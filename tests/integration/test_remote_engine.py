"""The remote engine against a real `vllm serve --enable-lora` subprocess on the small model."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import pytest

from kernel.settings import Settings
from server.engine import AdapterError, AdapterRef, EngineError
from server.engine.remote import RemoteEngine
from tests.conftest import hf_token_logprobs, make_lora_adapter
from tests.integration.test_embedded_engine import (
    FUNCTION_STOPS,
    assert_base_unaffected_by_full_lora_slots,
    assert_logprobs_match,
)
from tests.procs import free_port

pytestmark = [pytest.mark.engine, pytest.mark.remote]


async def test_remote_completes_fibonacci_into_python_that_parses(remote_engine: RemoteEngine) -> None:
    prompt = "def fibonacci(n):"
    gen = await remote_engine.generate(prompt, max_tokens=64, temperature=0.0, stop=FUNCTION_STOPS)
    (cand,) = gen.candidates
    ast.parse(prompt + cand.text)
    assert "return" in cand.text
    assert gen.prompt_token_ids == remote_engine.tokenize(prompt)


async def test_remote_group_logprobs_match_hf(remote_engine: RemoteEngine, hf_model: Any) -> None:
    gen = await remote_engine.generate("def read_lines(path):\n    ", n=4, max_tokens=16, temperature=1.0, seed=7)
    assert len(gen.candidates) == 4
    for cand in gen.candidates:
        assert cand.token_ids and len(cand.logprobs) == len(cand.token_ids)
        assert_logprobs_match(cand.logprobs, hf_token_logprobs(hf_model, gen.prompt_token_ids, cand.token_ids))


async def test_remote_adapters_load_change_output_and_unload(
    remote_engine: RemoteEngine, lora_adapters: tuple[Path, Path]
) -> None:
    a = AdapterRef("remote-a", 1, lora_adapters[0])
    b = AdapterRef("remote-b", 2, lora_adapters[1])
    prompt = "def parse_args(argv):"
    base = await remote_engine.generate(prompt, max_tokens=16)
    await remote_engine.load_adapter(a)
    await remote_engine.load_adapter(b)
    assert {"remote-a", "remote-b"} <= set(await remote_engine.loaded_adapters())
    on_a, on_b, on_base = await asyncio.gather(
        remote_engine.generate(prompt, max_tokens=16, adapter=a),
        remote_engine.generate(prompt, max_tokens=16, adapter=b),
        remote_engine.generate(prompt, max_tokens=16),
    )
    assert on_a.adapter == "remote-a"
    assert on_a.candidates[0].token_ids != base.candidates[0].token_ids
    assert on_b.candidates[0].token_ids != on_a.candidates[0].token_ids
    assert on_base.candidates[0].token_ids[:4] == base.candidates[0].token_ids[:4]
    await remote_engine.unload_adapter(a)
    assert "remote-a" not in await remote_engine.loaded_adapters()
    with pytest.raises(AdapterError, match="is not loaded"):
        await remote_engine.generate(prompt, max_tokens=4, adapter=a)
    await remote_engine.unload_adapter(b)


async def test_remote_refuses_a_missing_adapter(remote_engine: RemoteEngine, tmp_path: Path) -> None:
    # The path is checked on the server's side (it may live on another host): 404 with the reason.
    with pytest.raises(AdapterError, match="HTTP 404.*share the adapter directory with it"):
        await remote_engine.load_adapter(AdapterRef("remote-missing", 3, tmp_path / "nowhere"))
    assert "remote-missing" not in await remote_engine.loaded_adapters()


async def test_remote_wrong_model_name_is_reported(vllm_server: str, engine_settings: Settings) -> None:
    s = Settings()
    s.model.path = engine_settings.model.path
    s.model.name = "Qwen2.5-Coder-7B"
    s.engine.mode = "remote"
    s.engine.url = vllm_server
    engine = RemoteEngine(s, startup_timeout_s=600.0)
    with pytest.raises(EngineError, match="not 'Qwen2.5-Coder-7B': set model.name"):
        await engine.start()
    await engine.close()


async def test_unreachable_server_is_reported(engine_settings: Settings) -> None:
    s = Settings()
    s.model.path = engine_settings.model.path
    s.engine.mode = "remote"
    s.engine.url = f"http://127.0.0.1:{free_port()}"
    engine = RemoteEngine(s, startup_timeout_s=1.0)
    with pytest.raises(EngineError, match="did not answer within 1 s"):
        await engine.start()


async def test_remote_base_requests_stay_base_when_every_lora_slot_is_taken(
    remote_engine: RemoteEngine, engine_settings: Settings, small_model: Path, tmp_path: Path, hf_model: Any
) -> None:
    n = engine_settings.engine.max_loras
    refs = [
        AdapterRef(f"remote-slot-{i}", 200 + i, make_lora_adapter(small_model, tmp_path / f"s{i}", seed=50 + i))
        for i in range(n)
    ]
    await assert_base_unaffected_by_full_lora_slots(remote_engine, refs, hf_model)
