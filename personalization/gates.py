"""Gates a trained adapter must pass before it is published, and the two measurements they use.

Before publishing, the training loss must never have been NaN/inf, the KL of the adapted policy to the
frozen reference on held-out prompts must be <= ``thresholds.kl_max`` (5.0), and held-out perplexity on
general code must not rise by more than ``thresholds.perplexity_margin`` (0.5: a guard against collapse), and
with ``thresholds.humaneval_cases`` set the adapter must pass HumanEval infilling cases within
``thresholds.humaneval_max_drop`` points of its base (:func:`humaneval_passes`). A failed gate keeps the old
adapter (see :mod:`adapters.lifecycle`, which records the rejection).

* :func:`check_gates` is the pure decision: numbers in, a :class:`GateResult` out, every failure listed with
  the value, the threshold and the settings key that sets it.
* :func:`mean_kl` measures KL(policy || reference) per token, exactly over the vocabulary, on held-out
  prompts; with a peft model the reference is the same model with its adapter disabled.
* :func:`perplexity` measures token-level perplexity (exp of the mean negative log-likelihood).
* :func:`general_code_slice` is the fixed general-code text for the perplexity gate: functions taken from
  this Python's standard library, never from anything the adapter trained on.

What it must not do: no settings lookups (the caller passes ``ThresholdSettings`` values in), no database or
file writes, no optimiser steps, no change to the model's weights; measurements run under
``torch.no_grad`` in eval mode and restore the model's training flag afterwards.
"""

from __future__ import annotations

import ast
import math
import sysconfig
import textwrap
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from kernel.fim import fill_template, split_blanks, unheal

if TYPE_CHECKING:  # torch is imported by the measurements only: the gate decision needs no torch
    import torch
    from torch import Tensor

    from personalization.humaneval import InfillCase

__all__ = [
    "GENERAL_CODE_FUNCTIONS",
    "Encoder",
    "GateResult",
    "check_gates",
    "general_code_slice",
    "humaneval_passes",
    "kl_and_perplexity",
    "mean_kl",
    "perplexity",
]

KL_KEY = "thresholds.kl_max"
PERPLEXITY_KEY = "thresholds.perplexity_margin"
LOSS_KEY = "thresholds.loss_divergence"
HUMANEVAL_KEY = "thresholds.humaneval_max_drop"


@dataclass(slots=True)
class GateResult:
    """The verdict on one trained adapter: passed, why not, and the numbers it was judged on."""

    passed: bool
    reasons: list[str] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for logs and the audit log."""
        return "passed" if self.passed else "; ".join(self.reasons)


def _check_threshold(name: str, value: float, *, positive: bool) -> None:
    ok = math.isfinite(value) and (value > 0.0 if positive else value >= 0.0)
    if not ok:
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} = {value!r} is not a valid threshold: set it to a finite number {bound}")


def check_gates(
    *,
    loss_values: Sequence[float],
    kl: float,
    perplexity_base: float,
    perplexity_adapter: float,
    kl_max: float,
    perplexity_margin: float,
    loss_max: float | None = None,
    humaneval: tuple[Sequence[bool], Sequence[bool]] | None = None,
    humaneval_max_drop: float = 3.0,
) -> GateResult:
    """Decide whether an adapter may be published; every failing gate is listed, not just the first.

    Fails when: a training loss is NaN/inf (or above ``loss_max``, when given:
    ``thresholds.loss_divergence``); no loss was recorded; ``kl`` is non-finite or above ``kl_max``;
    either perplexity is non-finite; ``perplexity_adapter > perplexity_base * (1 + perplexity_margin)``
    (exactly at the limit passes); ``humaneval`` (which cases the base passed, which the adapter passed,
    the same cases in the same order) shows a pass rate more than ``humaneval_max_drop`` points below the
    base's. Raises ``ValueError`` for invalid thresholds (a settings bug, not a gate) and for HumanEval
    results of different lengths.
    """
    _check_threshold(KL_KEY, kl_max, positive=True)
    _check_threshold(PERPLEXITY_KEY, perplexity_margin, positive=False)
    if loss_max is not None:
        _check_threshold(LOSS_KEY, loss_max, positive=True)

    reasons: list[str] = []
    losses = [float(v) for v in loss_values]
    if not losses:
        reasons.append("no training loss was recorded: nothing was trained, so there is nothing to publish")
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            reasons.append(f"training loss was {value} at step {i}: the round diverged (lower the learning rate)")
            break
    else:
        if loss_max is not None:
            for i, value in enumerate(losses):
                if value > loss_max:
                    reasons.append(
                        f"training loss was {value:.6g} at step {i}, above {LOSS_KEY} = {loss_max:g}: "
                        "the round diverged (lower the learning rate)"
                    )
                    break

    if not math.isfinite(kl):
        reasons.append(f"KL to the reference is {kl} (must be finite and <= {KL_KEY} = {kl_max:g})")
    elif kl > kl_max:
        reasons.append(
            f"KL to the reference on held-out prompts is {kl:.6g}, above {KL_KEY} = {kl_max:g}: "
            "the adapter drifted too far from the base model (raise training.beta_kl or train fewer steps)"
        )

    limit = perplexity_base * (1.0 + perplexity_margin)
    if not math.isfinite(perplexity_base) or perplexity_base <= 0.0:
        reasons.append(
            f"general-code perplexity of the base model is {perplexity_base}: the measurement is broken "
            "(check the model and the held-out slice)"
        )
    elif not math.isfinite(perplexity_adapter):
        reasons.append(
            f"general-code perplexity with the adapter is {perplexity_adapter} "
            f"(must be finite and <= {limit:.6g}, base {perplexity_base:.6g} * (1 + {PERPLEXITY_KEY} "
            f"= {perplexity_margin:g}))"
        )
    elif perplexity_adapter > limit:
        reasons.append(
            f"general-code perplexity rose from {perplexity_base:.6g} to {perplexity_adapter:.6g} "
            f"(+{(perplexity_adapter / perplexity_base - 1.0) * 100:.2f} %), above the limit {limit:.6g} set by "
            f"{PERPLEXITY_KEY} = {perplexity_margin:g}: the adapter hurts general coding ability"
        )

    he_metrics: dict[str, float] = {}
    if humaneval is not None:
        _check_threshold(HUMANEVAL_KEY, humaneval_max_drop, positive=False)
        base_passed, adapter_passed = humaneval
        if len(base_passed) != len(adapter_passed) or not base_passed:
            raise ValueError(
                f"HumanEval results of the base ({len(base_passed)} cases) and of the adapter "
                f"({len(adapter_passed)}) must cover the same cases, at least one"
            )
        n = len(base_passed)
        base_rate = 100.0 * sum(base_passed) / n
        adapter_rate = 100.0 * sum(adapter_passed) / n
        he_metrics = {
            "humaneval_cases": float(n),
            "humaneval_base": base_rate,
            "humaneval_adapter": adapter_rate,
            "humaneval_lost": float(sum(b and not a for b, a in zip(base_passed, adapter_passed, strict=True))),
            "humaneval_gained": float(sum(a and not b for b, a in zip(base_passed, adapter_passed, strict=True))),
        }
        if base_rate - adapter_rate > humaneval_max_drop:
            reasons.append(
                f"HumanEval single-line pass rate fell from {base_rate:.1f} % to {adapter_rate:.1f} % on {n} cases "
                f"(one case is {100.0 / n:.1f} points), more than {HUMANEVAL_KEY} = {humaneval_max_drop:g} points: "
                "the adapter hurts coding ability (train fewer steps or raise training.beta_kl)"
            )

    metrics: dict[str, float] = {
        **he_metrics,
        "kl": float(kl),
        "kl_max": float(kl_max),
        "perplexity_base": float(perplexity_base),
        "perplexity_adapter": float(perplexity_adapter),
        "perplexity_limit": float(limit),
        "perplexity_margin": float(perplexity_margin),
        "loss_steps": float(len(losses)),
    }
    if perplexity_base > 0.0 and math.isfinite(perplexity_base):
        metrics["perplexity_delta"] = float(perplexity_adapter / perplexity_base - 1.0)
    if losses:
        metrics["loss_last"] = losses[-1]
    return GateResult(passed=not reasons, reasons=reasons, metrics=metrics)


# --------------------------------------------------------------------------------------------------
# Measurements


class Encoder(Protocol):
    """What the measurements need of a tokenizer: text to token ids (a Hugging Face tokenizer fits)."""

    def encode(self, text: str, /) -> list[int]: ...


@contextmanager
def _measuring(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients; the model's training flag is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    import torch

    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _logits(model: torch.nn.Module, ids: list[int], vocab: int | None = None) -> Tensor:
    """Float32 next-token logits ``[T, V]`` for one sequence."""
    import torch

    out: Any = model(input_ids=torch.tensor([ids], dtype=torch.long, device=_device(model)))
    logits = out.logits if hasattr(out, "logits") else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != (1, len(ids)):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"{type(model).__name__} returned logits of shape {shape} for {len(ids)} tokens: "
            f"expected [1, {len(ids)}, vocab] from a causal language model"
        )
    result = logits[0].to(device="cpu", dtype=torch.float32)
    if vocab is not None and result.shape[-1] != vocab:
        raise ValueError(
            f"the policy has {vocab} logits per token but the reference has {result.shape[-1]}: "
            "compare a model with its own base (same tokenizer and vocabulary)"
        )
    return result


def _token_ids(tokenizer: Encoder, text: str, max_tokens: int) -> list[int]:
    ids = [int(t) for t in tokenizer.encode(text)]
    return ids[:max_tokens]


def _check_max_tokens(max_tokens: int) -> None:
    if max_tokens < 1:
        raise ValueError(f"max_tokens = {max_tokens} must be >= 1")


def mean_kl(
    policy: torch.nn.Module,
    tokenizer: Encoder,
    prompts: Sequence[str],
    *,
    reference: torch.nn.Module | None = None,
    max_tokens: int = 512,
) -> float:
    """Mean per-token KL(policy || reference) over the tokens of held-out ``prompts``.

    At every position ``t`` of each prompt (its first ``max_tokens`` tokens) the next-token distributions
    ``p`` (policy) and ``q`` (reference) given ``prompt[:t+1]`` are compared exactly over the vocabulary:
    ``sum_v p_v (log p_v - log q_v)``; the result is the average over all positions of all prompts.

    ``reference=None`` means ``policy`` is a peft model and the reference is the same model under
    ``policy.disable_adapter()`` (the frozen base). Both models are called as ``model(input_ids=...)``
    and must return logits (or an object with ``.logits``). Empty prompts are skipped; raises
    ``ValueError`` when no prompt has a token.
    """
    import torch

    _check_max_tokens(max_tokens)
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise ValueError(
            f"{type(policy).__name__} has no disable_adapter(): pass reference= (the base model) or a peft model"
        )
    total = 0.0
    count = 0
    with _measuring(policy), _measuring(reference) if reference is not None else nullcontext():
        for text in prompts:
            ids = _token_ids(tokenizer, text, max_tokens)
            if not ids:
                continue
            p_logits = _logits(policy, ids)
            if reference is None:
                with policy.disable_adapter():  # type: ignore[operator]
                    q_logits = _logits(policy, ids, p_logits.shape[-1])
            else:
                q_logits = _logits(reference, ids, p_logits.shape[-1])
            logp = torch.log_softmax(p_logits, dim=-1)
            logq = torch.log_softmax(q_logits, dim=-1)
            p = logp.exp()
            # 0 * log 0 = 0; p > 0 with q = 0 gives +inf, as it should.
            terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
            total += float(terms.sum(dim=-1, dtype=torch.float64).sum())
            count += len(ids)
    if count == 0:
        raise ValueError(f"none of the {len(prompts)} held-out prompts has a token: KL cannot be measured")
    return total / count


def kl_and_perplexity(
    policy: torch.nn.Module, tokenizer: Encoder, texts: Sequence[str], *, max_tokens: int = 512
) -> tuple[float, float]:
    """`mean_kl` to the adapter-disabled reference and `perplexity` of a peft `policy`, on the same texts,
    from one policy pass and one reference pass per text (the two gates measured separately take three).
    Texts of fewer than two tokens are skipped; raises ``ValueError`` when none is left."""
    import torch

    _check_max_tokens(max_tokens)
    if not hasattr(policy, "disable_adapter"):
        raise ValueError(f"{type(policy).__name__} has no disable_adapter(): kl_and_perplexity needs a peft model")
    kl_total, nll = 0.0, 0.0
    positions, predicted = 0, 0
    with _measuring(policy):
        for text in texts:
            ids = _token_ids(tokenizer, text, max_tokens)
            if len(ids) < 2:
                continue
            logp = torch.log_softmax(_logits(policy, ids), dim=-1)
            with policy.disable_adapter():  # type: ignore[operator]
                logq = torch.log_softmax(_logits(policy, ids, logp.shape[-1]), dim=-1)
            p = logp.exp()
            terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
            kl_total += float(terms.sum(dim=-1, dtype=torch.float64).sum())
            positions += len(ids)
            targets = torch.tensor(ids[1:], dtype=torch.long)
            nll -= float(logp[:-1].gather(1, targets.unsqueeze(1)).squeeze(1).sum(dtype=torch.float64))
            predicted += len(ids) - 1
    if predicted == 0:
        raise ValueError(f"none of the {len(texts)} texts has two tokens: KL and perplexity cannot be measured")
    mean = nll / predicted
    try:
        ppl = math.exp(mean) if not math.isnan(mean) else math.nan
    except OverflowError:
        ppl = math.inf
    return kl_total / positions, ppl


def perplexity(
    model: torch.nn.Module,
    tokenizer: Encoder,
    texts: Sequence[str],
    *,
    max_tokens: int = 512,
    without_adapter: bool = False,
) -> float:
    """Token-level perplexity ``exp(mean NLL)`` of ``texts`` under ``model``.

    Each text is cut to its first ``max_tokens`` tokens; every token after the first is predicted from the
    ones before it, and the mean is over all predicted tokens of all texts. ``without_adapter=True``
    measures a peft model's base (under ``model.disable_adapter()``). Texts of fewer than two tokens are
    skipped; raises ``ValueError`` when none is left. Returns ``inf`` when the mean NLL overflows.
    """
    import torch

    _check_max_tokens(max_tokens)
    if without_adapter and not hasattr(model, "disable_adapter"):
        raise ValueError(f"{type(model).__name__} has no disable_adapter(): without_adapter needs a peft model")
    nll = 0.0
    count = 0
    with _measuring(model), model.disable_adapter() if without_adapter else nullcontext():  # type: ignore[operator]
        for text in texts:
            ids = _token_ids(tokenizer, text, max_tokens)
            if len(ids) < 2:
                continue
            logp = torch.log_softmax(_logits(model, ids), dim=-1)
            targets = torch.tensor(ids[1:], dtype=torch.long)
            picked = logp[:-1].gather(1, targets.unsqueeze(1)).squeeze(1)
            nll -= float(picked.sum(dtype=torch.float64))
            count += len(ids) - 1
    if count == 0:
        raise ValueError(f"none of the {len(texts)} texts has two tokens: perplexity cannot be measured")
    mean = nll / count
    if math.isnan(mean):
        return math.nan
    try:
        return math.exp(mean)
    except OverflowError:
        return math.inf


class Codec(Protocol):
    """What the HumanEval measurement needs of a tokenizer (`server.engine.tokens.LocalTokenizer` fits)."""

    def encode(self, text: str, /) -> list[int]: ...

    def decode(self, token_ids: list[int], /) -> str: ...

    @property
    def eos_token_id(self) -> int | None: ...


def humaneval_passes(
    model: Any,
    tokenizer: Codec,
    cases: Sequence[InfillCase],
    *,
    template: str | None,
    without_adapter: bool = False,
    max_new_tokens: int = 24,
    batch: int = 8,
    autocast: Any = None,
) -> list[bool]:
    """Which HumanEval infilling cases `model` completes so that the problem's tests pass.

    Each case is asked the way serving asks: the FIM `template` filled with the text before and after
    the cursor (the text before it alone when `template` is None), healed (the cursor's indentation off the
    prompt and off the front of the suggestion, as `lsp_handlers.context.heal` does), greedy decoding of at most
    `max_new_tokens`; the suggestion's first line goes in the blank and the program runs in a sandbox
    (`personalization.humaneval.passes`). `without_adapter` measures a peft model's base; `autocast` is
    the trainer's precision context (None: float32).
    """
    from personalization.humaneval import passes

    # Healed as serving heals them (`lsp_handlers.context.heal`): the cursor's indentation comes off the
    # prompt and off the front of what the model writes.
    healed = [split_blanks(c.prefix) for c in cases]
    prompts = [fill_template(template, h, c.suffix) if template else h for (h, _), c in zip(healed, cases, strict=True)]
    suggestions = greedy_suggestions(
        model,
        tokenizer,
        prompts,
        without_adapter=without_adapter,
        max_new_tokens=max_new_tokens,
        batch=batch,
        autocast=autocast,
    )
    return [
        passes(c, unheal(s, blanks, blank_line=True)[1])
        for c, (_, blanks), s in zip(cases, healed, suggestions, strict=True)
    ]


def greedy_suggestions(
    model: Any,
    tokenizer: Codec,
    prompts: Sequence[str],
    *,
    without_adapter: bool = False,
    max_new_tokens: int = 24,
    batch: int = 8,
    autocast: Any = None,
    first_line_only: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts`, batched and left-padded. `first_line_only` stops each batch once
    every row has a line break (`first_line_done`): the first lines are the same, the rest is cut short."""
    import torch

    if without_adapter and not hasattr(model, "disable_adapter"):
        raise ValueError(f"{type(model).__name__} has no disable_adapter(): without_adapter needs a peft model")
    pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    suggestions: list[str] = []
    with (
        _measuring(model),
        model.disable_adapter() if without_adapter else nullcontext(),
        autocast if autocast is not None else nullcontext(),
    ):
        for start in range(0, len(prompts), batch):
            encoded = [tokenizer.encode(p) for p in prompts[start : start + batch]]
            width = max(len(e) for e in encoded)
            input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
            attention = torch.zeros((len(encoded), width), dtype=torch.long)
            for i, ids in enumerate(encoded):
                input_ids[i, width - len(ids) :] = torch.tensor(ids)
                attention[i, width - len(ids) :] = 1
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad,
                stopping_criteria=first_line_done(tokenizer, width) if first_line_only else None,
            )
            for row in out[:, width:].tolist():
                suggestions.append(tokenizer.decode([int(t) for t in row]))
    return suggestions


def first_line_done(tokenizer: Codec, width: int) -> Any:
    """Stopping criteria for a batch of left-padded prompts `width` tokens wide: a row is done once its new
    tokens hold a line break or the end token, the batch once every row is. Only a suggestion's first line
    is scored, so decoding past it is waste (it was half a round's gate time on the default model), and
    stopping a row changes no other row's tokens: the first lines are the ones 24 tokens would give."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    eos = tokenizer.eos_token_id

    class FirstLineDone(StoppingCriteria):  # type: ignore[misc]  # transformers is untyped
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            rows = input_ids[:, width:].tolist()
            done = [(eos is not None and eos in row) or "\n" in tokenizer.decode(row) for row in rows]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([FirstLineDone()])


# --------------------------------------------------------------------------------------------------
# The held-out general-code slice

# (file in the standard library, qualified function name). Pure, self-contained functions of ordinary
# Python; about 3,400 tokens with the SmolLM2 tokenizer, each well under 512 tokens.
GENERAL_CODE_FUNCTIONS: tuple[tuple[str, str], ...] = (
    ("textwrap.py", "dedent"),
    ("textwrap.py", "indent"),
    ("textwrap.py", "shorten"),
    ("textwrap.py", "TextWrapper._handle_long_word"),
    ("string.py", "capwords"),
    ("string.py", "Template.substitute"),
    ("string.py", "Template.get_identifiers"),
    ("colorsys.py", "rgb_to_hls"),
    ("colorsys.py", "hls_to_rgb"),
    ("colorsys.py", "_v"),
    ("colorsys.py", "rgb_to_hsv"),
    ("colorsys.py", "hsv_to_rgb"),
    ("bisect.py", "insort_right"),
    ("bisect.py", "bisect_right"),
    ("heapq.py", "heappush"),
    ("heapq.py", "heappop"),
    ("heapq.py", "_siftdown"),
    ("heapq.py", "_siftup"),
    ("shlex.py", "quote"),
    ("fnmatch.py", "fnmatchcase"),
)


def _function_source(path: Path, tree: ast.Module, source: str, qualname: str) -> str | None:
    body: list[ast.stmt] = tree.body
    parts = qualname.split(".")
    for depth, name in enumerate(parts):
        last = depth == len(parts) - 1
        node = next(
            (
                n
                for n in body
                if getattr(n, "name", None) == name
                and isinstance(n, ast.FunctionDef if last else ast.ClassDef | ast.FunctionDef)
            ),
            None,
        )
        if node is None:
            return None
        if last:
            lines = source.splitlines(keepends=True)
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            end = node.end_lineno or node.lineno
            return textwrap.dedent("".join(lines[start - 1 : end]))
        body = node.body
    return None


def general_code_slice(stdlib: Path | None = None) -> list[str]:
    """The held-out general-code texts for the perplexity gate: fixed functions of the standard library.

    The functions are those of :data:`GENERAL_CODE_FUNCTIONS`, read from ``sysconfig.get_paths()["stdlib"]``
    (or ``stdlib``), each dedented; the same list on every run with the same Python. A function this
    Python lacks is skipped; raises ``FileNotFoundError`` when the standard library sources are missing.
    """
    root = Path(stdlib) if stdlib is not None else Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    parsed: dict[str, tuple[ast.Module, str]] = {}
    for filename, qualname in GENERAL_CODE_FUNCTIONS:
        path = root / filename
        if filename not in parsed:
            try:
                source = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"standard library source {path} is missing: the perplexity gate reads general code from it; "
                    "install this Python's library sources (e.g. the python3.x stdlib package)"
                ) from None
            parsed[filename] = (ast.parse(source, filename=str(path)), source)
        tree, source = parsed[filename]
        text = _function_source(path, tree, source, qualname)
        if text is not None:
            texts.append(text)
    if not texts:
        raise FileNotFoundError(f"none of the general-code functions was found under {root}")
    return texts
