"""A running `vllm serve --enable-lora` server, reached over its OpenAI-compatible HTTP API.

For installations that outgrow one machine: the server runs on GPU hosts (tensor parallel), Heedful
sends `/v1/completions` requests and manages adapters with `/v1/load_lora_adapter` and
`/v1/unload_lora_adapter` (the server needs `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). Adapter paths
are paths on the server's file system, so the adapter directory must be shared with it. The tokenizer
is read from `model.path` on this machine so that prompts are fitted to the budget locally.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

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
from server.engine.tokens import LocalTokenizer

log = logging.getLogger(__name__)


class RemoteEngine:
    """The `Engine` backed by a vLLM server's HTTP API."""

    def __init__(self, settings: Settings, *, startup_timeout_s: float | None = None) -> None:
        self._settings = settings
        self._base = settings.engine.url.rstrip("/")
        self._model_path = settings.model_path()
        self._model_name = settings.model.name or str(self._model_path)
        self._startup_timeout_s = settings.engine.startup_timeout_s if startup_timeout_s is None else startup_timeout_s
        self._client: httpx.AsyncClient | None = None
        self._tokenizer: LocalTokenizer | None = None
        self._adapters: dict[str, AdapterRef] = {}
        self._lock = asyncio.Lock()
        self._max_model_len = settings.model.max_model_len

    async def start(self) -> None:
        if self._client is not None:
            return
        headers = {"Authorization": f"Bearer {self._settings.engine.api_key}"} if self._settings.engine.api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self._base, headers=headers, timeout=self._settings.engine.request_timeout_s
        )
        self._tokenizer = LocalTokenizer(self._model_path)
        deadline = time.monotonic() + self._startup_timeout_s
        last_error = ""
        while True:
            try:
                resp = await self._client.get("/v1/models")
                if resp.status_code == 200:
                    models = [m["id"] for m in resp.json().get("data", [])]
                    if self._model_name not in models:
                        raise EngineError(
                            f"the vLLM server at {self._base} serves {models}, not {self._model_name!r}: set "
                            "model.name to the name it was started with"
                        )
                    for entry in resp.json()["data"]:
                        if entry.get("max_model_len"):
                            self._max_model_len = int(entry["max_model_len"])
                    return
                last_error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            except httpx.HTTPError as exc:
                last_error = str(exc) or type(exc).__name__
            if time.monotonic() > deadline:
                await self.close()
                raise EngineError(
                    f"the vLLM server at {self._base} did not answer within {self._startup_timeout_s:.0f} s "
                    f"({last_error}): check engine.url and that `vllm serve` is running"
                )
            await asyncio.sleep(0.5)

    def _require(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineError("the remote engine is not connected: call start() first")
        return self._client

    async def _post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        client = self._require()
        try:
            return await client.post(path, json=body)
        except httpx.TimeoutException:
            raise EngineError(
                f"the vLLM server at {self._base} did not answer {path} within "
                f"{self._settings.engine.request_timeout_s} s (engine.request_timeout_s)"
            ) from None
        except httpx.HTTPError as exc:
            raise EngineError(f"the vLLM server at {self._base} is unreachable for {path}: {exc}") from None

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
        assert self._tokenizer is not None or self._client is None
        self._require()
        assert self._tokenizer is not None
        prompt_ids = self._tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise EngineError("the prompt is empty: give at least one token of context")
        if adapter is not None and self._adapters.get(adapter.name) != adapter:
            raise AdapterError(f"adapter {adapter.name!r} is not loaded: call load_adapter() first")
        rid = request_id or f"heedful-{uuid.uuid4().hex}"
        body: dict[str, Any] = {
            "model": adapter.name if adapter else self._model_name,
            "prompt": prompt_ids,
            "n": n,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": list(stop or []),
            "logprobs": 0,
            "return_token_ids": True,
            "skip_special_tokens": True,
            "request_id": rid,
        }
        if seed is not None:
            body["seed"] = seed
        started = time.perf_counter()
        try:
            # The answer comes whole (no stream): at the deadline there is nothing to give but the wait's end.
            resp = await asyncio.wait_for(self._post("/v1/completions", body), deadline_s)
        except TimeoutError:
            await self.abort(rid)
            raise TimeoutError(f"request {rid} produced nothing within its deadline of {deadline_s} s") from None
        elapsed = time.perf_counter() - started
        if resp.status_code != 200:
            raise EngineError(
                f"the vLLM server at {self._base} refused the completion (HTTP {resp.status_code}): {resp.text[:300]}"
            )
        data = resp.json()
        candidates: list[Candidate] = []
        for choice in sorted(data["choices"], key=lambda c: c["index"]):
            token_ids = list(choice.get("token_ids") or [])
            logprobs_raw = (choice.get("logprobs") or {}).get("token_logprobs") or []
            logprobs = [float(x) if x is not None else float("nan") for x in logprobs_raw]
            if len(logprobs) != len(token_ids):
                raise EngineError(
                    f"the vLLM server returned {len(token_ids)} token ids but {len(logprobs)} log-probs: "
                    "it must support `return_token_ids` (vLLM >= 0.10)"
                )
            candidates.append(
                Candidate(
                    text=choice["text"],
                    token_ids=token_ids,
                    logprobs=logprobs,
                    finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                )
            )
        prompt_back = data["choices"][0].get("prompt_token_ids") if data["choices"] else None
        return Generation(
            candidates=candidates,
            prompt_token_ids=list(prompt_back or prompt_ids),
            adapter=adapter.name if adapter else None,
            timing=Timing(total_s=elapsed),
            request_id=rid,
        )

    async def abort(self, request_id: str) -> None:
        # The OpenAI API has no abort call; vLLM aborts a request when its HTTP connection closes,
        # which happens when the caller cancels the task awaiting `generate`.
        return None

    async def load_adapter(self, adapter: AdapterRef) -> None:
        async with self._lock:
            known = self._adapters.get(adapter.name)
            if known == adapter:
                return
            if known is not None:
                raise AdapterError(
                    f"adapter name {adapter.name!r} is already loaded from {known.path}: give new weights a new name"
                )
            if adapter.path.exists():
                # Checked here when the adapter directory is shared with the server (the usual setup).
                check_adapter_dir(adapter.path)
            resp = await self._post(
                "/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": str(adapter.path)}
            )
            if resp.status_code != 200:
                hint = ""
                if resp.status_code == 404 and '"detail":"Not Found"' in resp.text.replace(" ", ""):
                    hint = "; start the server with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora"
                elif resp.status_code == 404:
                    hint = "; the server cannot read that path: share the adapter directory with it"
                raise AdapterError(
                    f"the vLLM server at {self._base} could not load adapter {adapter.name!r} from "
                    f"{adapter.path} (HTTP {resp.status_code}): {resp.text[:300]}{hint}"
                )
            self._adapters[adapter.name] = adapter

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        async with self._lock:
            if self._adapters.get(adapter.name) != adapter:
                raise AdapterError(f"adapter {adapter.name!r} is not loaded, so it cannot be unloaded")
            resp = await self._post("/v1/unload_lora_adapter", {"lora_name": adapter.name})
            if resp.status_code != 200:
                raise AdapterError(
                    f"the vLLM server at {self._base} could not unload adapter {adapter.name!r} "
                    f"(HTTP {resp.status_code}): {resp.text[:300]}"
                )
            del self._adapters[adapter.name]

    async def loaded_adapters(self) -> list[str]:
        """Adapters the server reports (its `/v1/models` lists LoRA modules beside the base model)."""
        resp = await self._require().get("/v1/models")
        if resp.status_code != 200:
            raise EngineError(f"the vLLM server at {self._base} did not list its models (HTTP {resp.status_code})")
        return sorted(m["id"] for m in resp.json().get("data", []) if m["id"] != self._model_name)

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
            kind="remote",
            model=f"{self._model_name} at {self._base}",
            max_model_len=self._max_model_len,
            max_loras=self._settings.engine.max_loras,
            loaded_adapters=sorted(self._adapters),
        )

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()


def vllm_serve_command(settings: Settings, *, host: str, port: int, model_path: Path | None = None) -> list[str]:
    """The `vllm serve` command line matching these settings (used by tests and docs)."""
    import sys

    s = settings.engine
    model = str(model_path or settings.model_path())
    return [
        sys.executable,
        "-m",
        "server.engine.vllm_launcher",
        "serve",
        model,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        s.dtype,
        "--max-model-len",
        str(settings.model.max_model_len),
        "--max-num-seqs",
        str(s.max_num_seqs),
        "--block-size",
        str(s.block_size),
        "--enable-lora",
        "--max-loras",
        str(s.max_loras),
        "--max-lora-rank",
        str(s.max_lora_rank),
        "--max-cpu-loras",
        str(s.max_cpu_loras),
        "--seed",
        str(s.seed),
        "--disable-log-stats",
        *(["--enforce-eager"] if s.enforce_eager else []),
    ]
