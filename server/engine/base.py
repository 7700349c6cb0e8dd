"""The one interface every inference engine implements, and the records it returns.

An engine turns a prompt into candidates: each with its text, token ids and the per-token log-probs of
the sampled tokens under the serving policy (pi_old for training). Log-probs are the model's raw
distribution (temperature 1, before top-p), which is what the trainer recomputes for pi_theta.
Adapters are named by `AdapterRef`; a name always stands for one set of weights (vLLM caches by name).
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast, runtime_checkable

ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


class EngineError(RuntimeError):
    """The engine could not start or could not answer; the message says why and what to do."""


class AdapterError(EngineError):
    """An adapter could not be loaded, found or unloaded."""


@dataclass(slots=True, frozen=True)
class AdapterRef:
    """One LoRA adapter as the engine knows it.

    `name` is unique for these weights and never reused for different ones; `lora_id` is the integer
    id the embedded engine needs (>= 1, also unique); `path` is a peft adapter folder.
    """

    name: str
    lora_id: int
    path: Path

    def __post_init__(self) -> None:
        if not ADAPTER_NAME_RE.match(self.name):
            raise AdapterError(
                f"adapter name {self.name!r} is not valid: use 1-128 letters, digits, '_', '.', ':', '-'"
            )
        if self.lora_id < 1:
            raise AdapterError(f"adapter {self.name!r} has lora_id {self.lora_id}: it must be >= 1")


@dataclass(slots=True)
class Candidate:
    """One sampled completion."""

    text: str
    token_ids: list[int]
    logprobs: list[float]  # one per token id: log pi_old(token | prompt, earlier tokens)
    # "stop" (stop string or end-of-text), "length", or "deadline" (cut at `generate`'s `deadline_s`:
    # the text so far)
    finish_reason: str


@dataclass(slots=True)
class Timing:
    """Seconds, measured around the engine call."""

    total_s: float
    first_token_s: float | None = None  # to the first new token (engines that stream: the embedded one)
    cached_tokens: int | None = None  # prompt tokens the engine's prefix cache already held (embedded)
    # No other request was running in the engine when this one was admitted: its first-token time is
    # what reading the prompt costs on this machine, not a wait behind someone else's request.
    alone: bool = False


@dataclass(slots=True)
class Generation:
    """The engine's answer to one request."""

    candidates: list[Candidate]
    prompt_token_ids: list[int]
    adapter: str | None
    timing: Timing
    request_id: str = ""


@dataclass(slots=True)
class EngineInfo:
    """What an engine reports about itself (for status and logs)."""

    kind: str
    model: str
    max_model_len: int
    max_loras: int
    loaded_adapters: list[str] = field(default_factory=list)
    merged_adapter: str | None = None  # folded into the weights (embedded engine, one adapter in use)
    # How adapters are served: "merged" (folded into the weights while one adapter is alone in use, else
    # multi-LoRA) or "multi-lora" (always); `adapter_serving_reason` says why merging is off where the
    # settings asked for it (`engine.adapter_serving = auto`) and this machine cannot do it.
    adapter_serving: str = "multi-lora"
    adapter_serving_reason: str | None = None
    # The served weights of the decoder projections: "none" (the engine's dtype) or "int8" (W8A8, the
    # embedded engine with `engine.quantization = int8`; `model` is then the float folder they came from).
    quantization: str = "none"


@runtime_checkable
class Engine(Protocol):
    """An inference engine with LoRA adapters. Implementations: embedded vLLM, remote vLLM server."""

    async def start(self) -> None:
        """Load the model (or connect); raises `EngineError` with the reason."""
        ...

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
        """Sample `n` candidates for `prompt` (text, or token ids from `tokenize`).

        With `seed`, a call gives the same candidates each time it runs alone in the engine and reads its
        prompt whole: another request in the batch, or a prompt the prefix cache partly holds, changes the
        arithmetic, and a near tie can then sample another token (`heedful generate` starts an embedded
        engine of its own, so its seeded answer repeats from run to run). The candidates of a seeded group
        run one after another with seeds `seed`, `seed + 1`, ... (`seeded_one_by_one`): sent at once, vLLM
        can schedule them over two steps one time and in one the next.

        `deadline_s`: seconds from the call. An engine that streams (the embedded one, for `n` = 1) answers
        then with what it has generated so far (finish reason "deadline") and stops the request; with
        nothing generated yet, or an engine that does not stream, it raises `TimeoutError`.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request that is no longer wanted (a newer keystroke replaced it)."""
        ...

    async def load_adapter(self, adapter: AdapterRef) -> None:
        """Make `adapter` ready to serve; loading the same name twice is a no-op."""
        ...

    async def unload_adapter(self, adapter: AdapterRef) -> None:
        """Free `adapter`; requests already running on it finish first (callers ensure that)."""
        ...

    async def loaded_adapters(self) -> list[str]:
        """Names of the adapters the engine holds now."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` under the served model's tokenizer, without special tokens."""
        ...

    def detokenize(self, token_ids: list[int]) -> str: ...

    def info(self) -> EngineInfo: ...

    async def close(self) -> None:
        """Stop the engine and its worker processes; safe to call twice."""
        ...


GenerateFn = TypeVar("GenerateFn", bound=Callable[..., Awaitable[Generation]])


def seeded_one_by_one(generate: GenerateFn) -> GenerateFn:
    """Makes an engine's `generate` run the `n` candidates of a seeded request one after another.

    vLLM sends the candidates of one request to its engine core one message at a time, and the core may
    start a step with only some of them: the batch, hence the arithmetic, then differs from one run to
    the next, and a candidate can sample another token at a near tie. One candidate per request, alone in
    the engine when nothing else runs, reads the same batch every time. Candidate `i` is sampled with
    vLLM's own seed for it (`seed + i`) under the group's request id (one runs at a time, so `abort`
    reaches whichever is running). Like any group, it comes whole or not at all: past `deadline_s`,
    `TimeoutError`.
    """

    @functools.wraps(generate)
    async def wrapper(self: Any, prompt: str | list[int], *, n: int = 1, **params: Any) -> Generation:
        seed = params.pop("seed", None)
        if seed is None or n <= 1:
            return await generate(self, prompt, n=n, seed=seed, **params)
        deadline_s = params.pop("deadline_s", None)
        request_id = params.pop("request_id", None) or f"heedful-{uuid.uuid4().hex}"
        started = time.perf_counter()
        parts: list[Generation] = []
        for i in range(n):
            left = None if deadline_s is None else deadline_s - (time.perf_counter() - started)
            late = TimeoutError(f"a seeded group of {n} candidates had {i} within its deadline of {deadline_s} s")
            if left is not None and left <= 0:
                raise late
            part = await generate(self, prompt, n=1, seed=seed + i, request_id=request_id, deadline_s=left, **params)
            if part.candidates[0].finish_reason == "deadline":
                raise late
            parts.append(part)
        first = parts[0]
        return Generation(
            candidates=[p.candidates[0] for p in parts],
            prompt_token_ids=first.prompt_token_ids,
            adapter=first.adapter,
            timing=Timing(
                total_s=time.perf_counter() - started,
                cached_tokens=first.timing.cached_tokens,
                alone=all(p.timing.alone for p in parts),
            ),
            request_id=request_id,
        )

    return cast(GenerateFn, wrapper)
