"""Shared fixtures: the prepared models (the small one most tests run on, and the default), one embedded
engine per test session on the small model, a Hugging Face reference model on the same weights, and LoRA
adapters saved by peft."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from kernel import paths
from kernel.settings import Settings
from server.engine.embedded import EmbeddedEngine
from server.engine.remote import RemoteEngine, vllm_serve_command
from server.model_prep import DEFAULT_MODEL, ModelError, known_model, verify_model
from tests.pgserver import PostgresUnavailable, create_database, temporary_postgres
from tests.procs import free_port, wait_until_serving

# Keep torch in the test process from fighting the engine for the two cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

SMALL_MODEL = "smollm2-135m"


def prepared(name: str) -> Path:
    """The folder of a model `make setup` prepares (`heedful model prepare --model NAME`), verified."""
    path = paths.model_dir(known_model(name).title)
    try:
        verify_model(path, checksums=False)
    except ModelError as exc:
        pytest.fail(f"model {name} is not prepared ({exc}); `make test` prepares it via `make setup`")
    return path


@pytest.fixture(scope="session")
def small_model() -> Path:
    """SmolLM2-135M-Instruct: the tests about mechanics (engine, store, trainer, protocol) run on it, so
    the suite fits its time budget. What a developer meets is tested on `default_model`."""
    return prepared(SMALL_MODEL)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The model Heedful serves by default (Qwen2.5-Coder-0.5B-Instruct)."""
    return prepared(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def engine_settings(small_model: Path) -> Settings:
    s = Settings()
    s.model.path = str(small_model)
    s.engine.kv_cache_gib = 1
    # The engine tests compare its tokens and log-probs with the float weights (Hugging Face, multi-LoRA
    # against merged): they run on them. The int8 copy has tests of its own (test_int8_serving).
    s.engine.quantization = "none"
    return s


@pytest.fixture(scope="session")
async def embedded_engine(engine_settings: Settings) -> AsyncIterator[EmbeddedEngine]:
    engine = EmbeddedEngine(engine_settings)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
def vllm_server(engine_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real `vllm serve --enable-lora` on the small model for the whole session: its base URL.

    The remote-engine tests use it directly; the language-server tests point every `heedful serve`
    subprocess at it (engine.mode = "remote"), so the engine starts once, not once per server. A developer
    iterating on tests can point HEEDFUL_TEST_VLLM_URL at a `vllm serve` of the small model they keep
    running.
    """
    if os.environ.get("HEEDFUL_TEST_VLLM_URL"):
        yield os.environ["HEEDFUL_TEST_VLLM_URL"]
        return
    port = free_port()
    log_file = tmp_path_factory.mktemp("vllm-serve") / "server.log"
    env = dict(
        os.environ,
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
        VLLM_CPU_KVCACHE_SPACE=str(engine_settings.engine.kv_cache_gib),
        VLLM_LOGGING_LEVEL="WARNING",
    )
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            vllm_serve_command(engine_settings, host="127.0.0.1", port=port),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, log_file)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -15, 143):
            print(log_file.read_text(errors="replace")[-3000:])


@pytest.fixture(scope="module")
async def remote_engine(vllm_server: str, engine_settings: Settings) -> AsyncIterator[RemoteEngine]:
    s = Settings()
    s.model = engine_settings.model
    s.engine.mode = "remote"
    s.engine.url = vllm_server
    s.engine.request_timeout_s = 120.0
    engine = RemoteEngine(s, startup_timeout_s=600.0)
    await engine.start()
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
def hf_model(small_model: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(small_model), dtype=torch.float32)
    model.eval()
    return model


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def make_lora_adapter(
    base: Path, out: Path, seed: int, rank: int = 8, b_std: float = 0.3, target_modules: tuple[str, ...] = ATTENTION
) -> Path:
    """A peft LoRA adapter with random (non-zero) A and B, so it visibly changes the output (with a small
    `b_std` the model still writes code, only different code)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(target_modules),
        init_lora_weights=False,
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std)
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def lora_adapters(small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("adapters")
    yield (
        make_lora_adapter(small_model, root / "adapter-a", seed=1),
        make_lora_adapter(small_model, root / "adapter-b", seed=2),
    )


def peft_token_logprobs(peft_model: Any, adapter: str | None, gen: Any) -> list[float]:
    """The float32 peft reference for an engine generation's first candidate, under `adapter` (None: base)."""
    cand = gen.candidates[0]
    if adapter is None:
        with peft_model.disable_adapter():
            return hf_token_logprobs(peft_model, gen.prompt_token_ids, cand.token_ids)
    peft_model.set_adapter(adapter)
    return hf_token_logprobs(peft_model, gen.prompt_token_ids, cand.token_ids)


def hf_token_logprobs(model: Any, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """log p(token_t | prompt, tokens_<t) under a Hugging Face model, for comparison with an engine."""
    import torch

    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    start = len(prompt_ids) - 1
    return [float(logp[start + i, tok]) for i, tok in enumerate(token_ids)]


# --- databases ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server on a free local port for this test session; yields a base URL."""
    try:
        with temporary_postgres() as url:
            yield url
    except PostgresUnavailable as exc:
        pytest.fail(str(exc))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each kind: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'heedful.db'}"
    import uuid

    return create_database(request.getfixturevalue("postgres_server"), f"t_{uuid.uuid4().hex[:12]}")
