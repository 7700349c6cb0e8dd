"""Single-line completion latency through `heedful serve`, base and personalized, next to raw vLLM, Hugging
Face `generate` and llama.cpp on the same weights, all in one run.

Cursors are single-line completions cut from the standard library's own sources: on a line `x = f(args)`
the arguments are removed and the cursor sits between the parentheses, as an editor leaves it after
typing `f(` with auto-closed brackets. The server completes up to `completion.single_line_max_tokens`
(16) new tokens, greedy, stopping at the line end; every peer gets the very prompt token ids the server's
engine read in its first base case (as its store recorded them), with the same limit and stop: prompts at
the context budget the server learned from its engine's speed (`completion.prefill_target_ms`, which may
move between steps during the run; `--context-tokens N` fixes it instead). Every request starts cold:
prefix caching is off in every vLLM case (the same prompts recur across cases) and llama.cpp resets its
context before each prompt.

Cases, each with p50/p95/p99 over the same requests:

- `heedful serve` (TCP, one server process), 1 session and N concurrent sessions (default 8):
  - base: developers without an adapter;
  - personalized: developers of a team whose adapter (rank 8 on q, k, v, o, the trainer's default; by
    default initialised as peft does, B = 0, so it serves the base model's tokens and the difference is
    the cost of serving an adapter, not of different output lengths) is active, with
    `engine.adapter_serving = auto` (one scope in use: merged into the weights), and again in a second
    server with `lora` (multi-LoRA, what a shared server does);
- typing: a third server with prefix caching on (the default), base and personalized: after a request
  at the cursor the developer types the call's arguments as the file has them, up to the closing
  bracket, each keystroke a new request sent when the previous one is answered (one that types what the
  suggestion shows is answered with its rest, `completion.type_through`); and three more
  servers, base only: the prompt's start not anchored (`completion.prefix_anchor_lines` = 1),
  `completion.type_through` off, and the last prompt extended by what was typed at its cursor
  (`completion.extend_prompt` on);
- raw vLLM: `EmbeddedEngine.generate` in this process, 1 stream and N concurrent;
- Hugging Face `generate` (float32, this process), 1 stream;
- llama.cpp (llama-cpp-python on the default model's original GGUF, Q4_K_M, in a subprocess), 1 stream.
  It is built once into the cache (about 9 minutes on 2 cores) with every CPU feature here (native), or
  without AVX-512/AMX on CPUs with AMX, where the native build crashed; `--no-llama-cpp` skips it.

The CPU model and llama.cpp's build flags are printed with the figures.

    .venv/bin/python -m bench.latency [--requests 40] [--sessions 8] [--typing 12] [--no-llama-cpp]
        [--typing-only] [--typing-variants default,...] [--set "section.key=value,..." ...] [--pause-ms 0]
        [--cursor-rest [didMoveCursor|documentHighlight]] [--context-tokens N] [--quantization auto|none|int8] [--json]

`--typing-only` runs the typing servers alone (a few minutes instead of half an hour); `--typing-variants`
picks which of them run. `--set` (repeatable) adds a typing server per group of settings, base developers
only, e.g. `--set "completion.warm_context=true"`. `--pause-ms` is how long the developer reads the first
suggestion at a cursor before typing: the time background work, such as `completion.warm_context`'s, has;
the first keystroke after it is timed on its own as well. `--cursor-rest` has the typing client say, right
after opening each file, that the cursor rests at the cursor's place (`heedful/didMoveCursor`, as the Neovim
and VS Code clients send it; `--cursor-rest documentHighlight`: the `textDocument/documentHighlight` JetBrains
IDEs ask through LSP4IJ), so that the server's warm reads the whole prompt there.

`--quantization` sets `engine.quantization` of every vLLM case (default `none`, the setting's default; `int8`
or `auto` serve the model's int8 (W8A8) copy on a CPU); the table says which weights served.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.engine import make_adapter as make_zero_adapter
from bench.engine import percentiles
from bench.lsp import (
    ROOT,
    STDLIB_FILES,
    BenchClient,
    BenchError,
    Request,
    bench_config,
    fill_prompts,
    learned_budgets,
    log_tail,
    overrides_arg,
    parse_overrides,
    recorded_prompts,
    report_or_exit,
    server_command,
    timed_session,
    wait_or_exit,
)
from bench.swap import TEAM, listening_port, make_adapter, publish, publish_db_ready
from lsp_handlers.auth import CURSOR_REST_SIGNALS
from server.engine.machine import cpu_model

WARMUP = 3
MAX_TOKENS = 16
STOP = ["\n"]
MERGE_WINDOW_S = 2.0
LLAMA_CPP_VERSION = "0.3.36"
Case = list[tuple[float, int]]  # (seconds, new tokens; -1: answered with nothing) per measured request
# The native build crashed at generation on the Intel machines of this kind (its AMX code paths); without
# AMX (AMD EPYC) it builds and runs with every feature the CPU has (AVX-512, VNNI, BF16). Part of the cache
# key, so each kind of CPU gets its own build.
LLAMA_CPP_NATIVE = "-DGGML_NATIVE=ON"
LLAMA_CPP_NO_AMX = "-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF"


def llama_cpp_cmake_args() -> str:
    """The CMake flags llama.cpp is built with on this machine: native unless the CPU has AMX."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    return LLAMA_CPP_NO_AMX if "amx_tile" in flags else LLAMA_CPP_NATIVE


CALL_RE = re.compile(r"^([ \t]+)([A-Za-z_][\w.]*(?:\[[^\]]*\])?\s*=\s*[A-Za-z_][\w.]*\()(.+)\)\s*$")


def single_line_requests(count: int) -> list[Request]:
    """`count` cursors inside the emptied parentheses of `x = f(args)` lines, spread over the stdlib files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    per_file: list[list[Request]] = []
    for rel in STDLIB_FILES:
        lines = (root / rel).read_text(encoding="utf-8").splitlines(keepends=True)
        found: list[tuple[int, str, int, str]] = []
        for i, line in enumerate(lines):
            m = CALL_RE.match(line)
            if m and i >= 20:
                head = m.group(1) + m.group(2)
                found.append((i, head + ")\n", len(head), m.group(3)))
        step = max(1, len(found) // max(1, count // len(STDLIB_FILES) + 1))
        chosen = []
        for i, new_line, character, args in found[step // 2 :: step]:
            text = "".join(lines[:i]) + new_line + "".join(lines[i + 1 :])
            chosen.append(Request(f"file:///bench/{rel}", text, i, character, typed=args))
        per_file.append(chosen)
    requests: list[Request] = []
    for k in range(max(len(c) for c in per_file)):
        for chosen in per_file:
            if k < len(chosen) and len(requests) < count:
                requests.append(
                    dataclasses.replace(chosen[k], uri=f"file:///bench/{len(requests):03d}/{chosen[k].uri[15:]}")
                )
    if len(requests) < count:
        raise BenchError(f"found only {len(requests)} single-line cursors in {STDLIB_FILES}; ask for fewer --requests")
    return requests


def tagged(requests: list[Request], tag: str) -> list[Request]:
    """The same cursors under URIs unique to one case, so the store tells the cases apart."""
    return [dataclasses.replace(r, uri=r.uri.replace("file:///bench/", f"file:///bench/{tag}/")) for r in requests]


# `--context-tokens N`: every server's prompt budget is N tokens, not learned from its engine.
FIXED_BUDGET: dict[str, int] = {}
# `--quantization`: engine.quantization of every engine of the run (servers and raw vLLM).
WEIGHTS: dict[str, str] = {"quantization": "none"}


def write_config(
    tmp: Path,
    name: str,
    model: Path,
    adapter_serving: str,
    *,
    prefix_caching: bool = False,
    sections: dict[str, dict[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """`sections`: settings beyond the bench's own, by section (the defaults otherwise); they win over the
    bench's."""
    config: dict[str, dict[str, Any]] = {
        "engine": {
            "adapter_serving": adapter_serving,
            "enable_prefix_caching": prefix_caching,
            "merge_window_s": MERGE_WINDOW_S,
            **WEIGHTS,
        },
        "completion": {"single_line_max_tokens": MAX_TOKENS, "timeout_ms": 120000, **FIXED_BUDGET},
    }
    for section, values in (sections or {}).items():
        config.setdefault(section, {}).update(values)
    return bench_config(tmp, name, model, config)


# ---------------------------------------------------------------------------------------------
# `heedful serve`


async def start_server(
    tmp: Path,
    name: str,
    model: Path,
    adapter: Path,
    adapter_serving: str,
    *,
    prefix_caching: bool = False,
    sections: dict[str, dict[str, Any]] | None = None,
) -> tuple[Path, Path, str, asyncio.subprocess.Process]:
    """A `heedful serve --tcp` whose store has `adapter` active for the team: (db, log, version, process).
    `sections`: settings that differ from the defaults, by section."""
    config, db = write_config(tmp, name, model, adapter_serving, prefix_caching=prefix_caching, sections=sections)
    await publish_db_ready(config, db)
    version, _ = await publish(db, adapter, tmp / f"adapters-{name}")
    log = tmp / f"serve-{name}.log"
    env = dict(os.environ, HEEDFUL_DATA_DIR=str(tmp / "data"))
    proc = await asyncio.create_subprocess_exec(
        *server_command(config, "--tcp", "--host", "127.0.0.1", "--port", "0"),
        cwd=str(ROOT), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("ab"), env=env,
    )  # fmt: skip
    return db, log, version, proc


async def stop_server(clients: list[BenchClient], proc: asyncio.subprocess.Process) -> None:
    for c in clients:
        await c.close()
    if proc.returncode is None:
        proc.terminate()
        await proc.wait()


async def serve_cases(
    tmp: Path,
    model: Path,
    adapter: Path,
    adapter_serving: str,
    requests: list[Request],
    sessions: int,
    base: bool,
    rounds: int,
) -> dict[str, Case]:
    """One `heedful serve --tcp`: (base and) personalized cases, 1 session then `sessions` at once."""
    db, log, version, proc = await start_server(tmp, adapter_serving, model, adapter, adapter_serving)
    clients: list[BenchClient] = []
    times: dict[str, Case] = {}
    try:
        port = await wait_or_exit(proc, listening_port(log), log, 600)

        async def connect(developer: str, team: str | None) -> BenchClient:
            client = BenchClient(developer, team)
            await client.lc.start_tcp("127.0.0.1", port)
            await wait_or_exit(proc, client.initialize(), log, 120)
            clients.append(client)
            return client

        first = await connect("bench-base-0", None)
        await wait_or_exit(proc, first.wait_ready(900), log, 900)
        kinds = [("base", None), ("personalized", TEAM)] if base else [("personalized", TEAM)]
        # The single-session cases alternate (base, personalized, base, ...) and pool their rounds, so a
        # drift in the machine's speed weighs on both alike.
        plan = [(1, rnd) for rnd in range(rounds)] + [(sessions, 0)]
        for n, rnd in plan:
            for kind, team in kinds:
                label = f"{kind} {adapter_serving if kind != 'base' else ''} x{n}".replace("  ", " ")
                tag = f"{label}-{rnd}".replace(" ", "-")
                group = [await connect(f"bench-{kind}-{n}-{rnd}-{k}", team) for k in range(n)]
                warm = tagged(requests[:WARMUP], f"{tag}-warm")
                measured = tagged(requests[WARMUP:], tag)
                shares = [measured[k::n] for k in range(n)]
                for k, client in enumerate(group):
                    for r in shares[k] + warm:
                        client.open(r)
                # Let the merge window forget the previous case (auto merges once one scope is left).
                await asyncio.sleep(MERGE_WINDOW_S + 0.5)
                for r in warm:
                    await group[0].inline(r)
                results = await asyncio.gather(*(timed_session(c, s) for c, s in zip(group, shares, strict=True)))
                flat = [x for session in results for x in session]
                # A request the server answered with nothing (post-processing left nothing worth showing)
                # was timed like the others but leaves no record: its token count is unknown (-1).
                answered = [r for r, _, ok in flat if ok]
                tokens = check_served(db, answered, version if team else None, label, log)
                times.setdefault(label, []).extend((t, tokens[r.uri] if ok else -1) for r, t, ok in flat)
                p50 = statistics.median(t for r, t, _ in flat)
                print(f"[bench.latency] {label} (round {rnd + 1}): p50 {p50 * 1000:.0f} ms", file=sys.stderr)
    finally:
        await stop_server(clients, proc)
    return times


UNANCHORED = "base typing, start not anchored x1"
NO_TYPE_THROUGH = "base typing, no type-through x1"
EXTENDED = "base typing, prompt extended x1"


@dataclasses.dataclass(frozen=True)
class TypingVariant:
    """A typing server: `server` names its files, `label` its base case (the default variant also has a
    personalized one), `sections` the settings it changes."""

    server: str
    label: str
    sections: dict[str, dict[str, Any]]


# Typing servers: the default, and peers of it that each change one thing (base developers only).
TYPING_VARIANTS: dict[str, TypingVariant] = {
    "default": TypingVariant("typing", "base typing x1", {}),
    "unanchored": TypingVariant("typing-unanchored", UNANCHORED, {"completion": {"prefix_anchor_lines": 1}}),
    "no-type-through": TypingVariant(
        "typing-no-type-through", NO_TYPE_THROUGH, {"completion": {"type_through": False}}
    ),
    "extended": TypingVariant("typing-extended", EXTENDED, {"completion": {"extend_prompt": True}}),
}


def set_variant(index: int, group: str) -> TypingVariant:
    """The typing server of `--set`'s `index`-th group ("section.key=value,...")."""
    return TypingVariant(f"typing-set-{index}", f"base typing, {group} x1", parse_overrides(group))


async def typing_cases(
    tmp: Path,
    model: Path,
    adapter: Path,
    requests: list[Request],
    variant: TypingVariant = TYPING_VARIANTS["default"],
    pause_s: float = 0.0,
    cursor_rest: str | None = None,
) -> tuple[dict[str, Case], dict[str, float], dict[str, float], dict[str, float]]:
    """Keystrokes with prefix caching on (the default): after a completion at the cursor, the developer
    reads it for `pause_s`, then types the call's arguments one character at a time and every keystroke asks
    again. All but the last few prompt tokens were computed for the previous keystroke, so only they are
    prefilled, if the prompt starts where it started before; and a keystroke that types what the suggestion
    shows is answered with the suggestion's rest (`completion.type_through`), without the engine.

    The default variant has base and personalized developers; the others (`TYPING_VARIANTS`: the prompt's
    first line the farthest that fits, which moves as the cursor line grows; `completion.type_through` off;
    `completion.extend_prompt` on; and `--set`'s groups) base developers only, as peers of the default.
    Returns the cases and, for each, the share of keystrokes answered from the suggestion typed through, the
    p50 of the keystrokes the engine answered, and the p50 of the first keystroke after the pause (the one a
    background read in the pause, such as `completion.warm_context`'s, may delay). With `cursor_rest` the
    client says, right after opening each file, that the cursor rests at the cursor's place, that way
    (`BenchClient.cursor`: `heedful/didMoveCursor`, as the Neovim and VS Code clients do once it has rested
    300 ms, or `textDocument/documentHighlight`, as LSP4IJ asks it)."""
    db, log, version, proc = await start_server(
        tmp, variant.server, model, adapter, "auto", prefix_caching=True, sections=variant.sections
    )
    clients: list[BenchClient] = []
    cases: dict[str, Case] = {}
    reuses: dict[str, float] = {}
    engine_p50: dict[str, float] = {}  # label -> p50 (ms) of the keystrokes not answered from the suggestion
    first_p50: dict[str, float] = {}  # label -> p50 (ms) of the first keystroke after the pause
    default = variant == TYPING_VARIANTS["default"]
    kinds = (("base", None), ("personalized", TEAM)) if default else (("base", None),)
    try:
        port = await wait_or_exit(proc, listening_port(log), log, 600)
        for kind, team in kinds:
            label = variant.label if kind == "base" else "personalized auto typing x1"
            client = BenchClient(f"bench-{variant.server}-{kind}", team, cursor_rest=cursor_rest)
            await client.lc.start_tcp("127.0.0.1", port)
            await wait_or_exit(proc, client.initialize(), log, 120)
            clients.append(client)
            await wait_or_exit(proc, client.wait_ready(900), log, 900)
            await asyncio.sleep(MERGE_WINDOW_S + 0.5)
            measured: list[tuple[Request, float]] = []
            engine_times: list[float] = []  # the keystrokes not answered from the suggestion typed through
            firsts: list[float] = []
            answered = 0  # requests the engine answered with a completion (the others leave no record)
            for r in tagged(requests, label.replace(" ", "-")):
                client.open(r)
                if cursor_rest:
                    await client.cursor(r)
                _, previous = await client.inline_answer(r)  # the cold request at the cursor: not measured
                answered += previous is not None
                await asyncio.sleep(pause_s)
                for k, char in enumerate(r.typed):
                    client.insert(r.uri, 2 + k, r.line, r.character + k, char)
                    key = dataclasses.replace(r, character=r.character + k + 1)
                    seconds, answer = await client.inline_answer(key)
                    measured.append((r, seconds))
                    if k == 0:
                        firsts.append(seconds)
                    # The same id again means the developer typed what the suggestion showed and the server
                    # answered with its rest, with no engine call and no record; anything else asked the engine.
                    if answer is None or answer != previous:
                        answered += answer is not None
                        engine_times.append(seconds)
                    previous = answer
            reuses[label] = 1 - len(engine_times) / len(measured)
            engine_p50[label] = statistics.median(engine_times) * 1000 if engine_times else float("nan")
            first_p50[label] = statistics.median(firsts) * 1000 if firsts else float("nan")
            deadline = time.monotonic() + 15  # answers come before the batching writer commits
            while True:
                with sqlite3.connect(db) as conn:
                    served = conn.execute(
                        "SELECT c.adapter_version, k.token_ids FROM completions c "
                        'JOIN candidates k ON k.completion_id = c.id AND k."index" = 0 WHERE c.uri LIKE ?',
                        (f"%/{label.replace(' ', '-')}/%",),
                    ).fetchall()
                if len(served) >= answered or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            if len(served) != answered or any(v != (version if team else None) for v, _ in served):
                raise BenchError(
                    f"{label}: {answered} answers but {len(served)} records, or a record of another adapter than "
                    f"{version if team else 'none'}:\n{log_tail(log)}"
                )
            mean_tokens = round(statistics.fmean(len(json.loads(ids)) for _, ids in served))
            cases[label] = [(seconds, mean_tokens) for _, seconds in measured]
            p50 = statistics.median(t for _, t in measured)
            print(
                f"[bench.latency] {label}: p50 {p50 * 1000:.0f} ms over {len(measured)} keystrokes, "
                f"{reuses[label]:.0%} answered from the suggestion, the others {engine_p50[label]:.0f} ms p50, "
                f"the first after the pause {first_p50[label]:.0f} ms p50",
                file=sys.stderr,
            )
    finally:
        await stop_server(clients, proc)
    return cases, reuses, engine_p50, first_p50


def served_prompts(db: Path, requests: list[Request], tag: str, fallback: list[list[int]]) -> list[list[int]]:
    """The prompt token ids the server recorded for `requests` in the case tagged `tag` (its warm-up
    requests included), in order; `fallback`'s where the server recorded none (a request answered with
    nothing)."""
    rows = recorded_prompts(db)
    out = []
    for r, ids in zip(requests, fallback, strict=True):
        recorded = rows.get(tagged([r], tag)[0].uri) or rows.get(tagged([r], f"{tag}-warm")[0].uri)
        out.append(recorded or ids)
    return out


def check_served(db: Path, measured: list[Request], version: str | None, label: str, log: Path) -> dict[str, int]:
    """Check that every measured request was served by the expected adapter version (None: the base
    model); the number of tokens the engine generated for each, by URI."""
    deadline = time.monotonic() + 15  # the server answers before its batching writer commits the record
    while True:
        with sqlite3.connect(db) as conn:
            found = conn.execute(
                "SELECT c.uri, c.adapter_version, k.token_ids FROM completions c "
                'JOIN candidates k ON k.completion_id = c.id AND k."index" = 0'
            ).fetchall()
        rows = {uri: adapter for uri, adapter, _ in found}
        missing = [r.uri for r in measured if r.uri not in rows]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    wrong = [r.uri for r in measured if r.uri in rows and rows[r.uri] != version]
    if missing or wrong:
        raise BenchError(
            f"{label}: {len(missing)} requests not served, {len(wrong)} served by another adapter than "
            f"{version or 'none'}; the server's log:\n{log_tail(log)}"
        )
    return {uri: len(json.loads(ids)) for uri, _, ids in found}


# ---------------------------------------------------------------------------------------------
# Peers on the same prompts


async def raw_vllm(prompts: list[list[int]], sessions: int) -> dict[str, Case]:
    from kernel.settings import Settings
    from server.engine.embedded import EmbeddedEngine

    settings = Settings()
    settings.engine.adapter_serving = "lora"
    settings.engine.enable_prefix_caching = False
    settings.engine.quantization = WEIGHTS["quantization"]
    engine = EmbeddedEngine(settings)
    await engine.start()
    try:

        async def one(ids: list[int]) -> tuple[float, int]:
            start = time.perf_counter()
            gen = await engine.generate(ids, max_tokens=MAX_TOKENS, temperature=0.0, stop=STOP)
            return time.perf_counter() - start, len(gen.candidates[0].token_ids)

        for ids in prompts[:WARMUP]:
            await one(ids)
        measured = prompts[WARMUP:]
        single = [await one(ids) for ids in measured]

        async def stream(share: list[list[int]]) -> Case:
            return [await one(ids) for ids in share]

        many = await asyncio.gather(*(stream(measured[k::sessions]) for k in range(sessions)))
    finally:
        await engine.close()
    return {"raw vLLM x1": single, f"raw vLLM x{sessions}": [t for s in many for t in s]}


def hf_generate(model: Path, prompts: list[list[int]]) -> Case:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    tok = AutoTokenizer.from_pretrained(str(model))
    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    times = []
    with torch.no_grad():
        for i, ids in enumerate(prompts):
            start = time.perf_counter()
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, stop_strings=STOP,
                tokenizer=tok, pad_token_id=tok.pad_token_id,
            )  # fmt: skip
            if i >= WARMUP:
                times.append((time.perf_counter() - start, int(out.shape[1]) - len(ids)))
    return times


def llama_cpp_dir() -> Path:
    """llama-cpp-python built into the cache (once): the folder to put on PYTHONPATH."""
    from kernel import paths

    cmake_args = llama_cpp_cmake_args()
    key = hashlib.sha256(f"{LLAMA_CPP_VERSION} {cmake_args}".encode()).hexdigest()[:10]
    target = paths.cache_dir() / "llama-cpp" / f"{LLAMA_CPP_VERSION}-{key}"
    if (target / "llama_cpp").is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    print(
        f"[bench.latency] building llama-cpp-python {LLAMA_CPP_VERSION} into {target} (about 9 minutes, once) ...",
        file=sys.stderr,
        flush=True,
    )
    env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-deps", "--target"]
    proc = subprocess.run(
        [*cmd, str(partial), f"llama-cpp-python=={LLAMA_CPP_VERSION}", "diskcache"],
        env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise BenchError(
            f"building llama-cpp-python {LLAMA_CPP_VERSION} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-1500:]}; it needs cmake and a C++ compiler, or run with --no-llama-cpp"
        )
    partial.rename(target)
    return target


def llama_cpp(prompts: list[list[int]]) -> Case:
    """llama.cpp in a subprocess (its own build on PYTHONPATH), same prompt ids, 2 threads."""
    from server.model_prep import default_gguf

    site = llama_cpp_dir()
    job = {"gguf": str(default_gguf()), "prompts": prompts, "max_tokens": MAX_TOKENS, "stop": STOP}
    threads = len(os.sched_getaffinity(0))
    env = dict(os.environ, PYTHONPATH=str(site), LLAMA_THREADS=str(threads))
    proc = subprocess.run(
        [sys.executable, "-m", "bench.llama_peer"], input=json.dumps(job), env=env, cwd=str(ROOT),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise BenchError(f"the llama.cpp peer failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    done = json.loads(proc.stdout)
    return [(float(t), int(n)) for t, n in zip(done["times"], done["tokens"], strict=True)][WARMUP:]


# ---------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernel import paths
    from kernel.settings import Settings, resolve
    from server.engine.embedded import has_gpu
    from server.engine.quantize import chosen_quantization
    from server.engine.tokens import LocalTokenizer

    model = paths.default_model_dir()
    if not (model / "config.json").exists():
        raise BenchError(f"the default model is not at {model}: run `heedful model prepare` (or `make setup`) first")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    n = args.sessions
    requests = single_line_requests(args.requests + WARMUP)
    times: dict[str, Case] = {}
    type_through: dict[str, float] = {}  # typing case -> share of keystrokes answered from the suggestion
    typing_engine: dict[str, float] = {}  # typing case -> p50 ms of the keystrokes the engine answered
    typing_first: dict[str, float] = {}  # typing case -> p50 ms of the first keystroke after the pause
    variants = [TYPING_VARIANTS[name] for name in args.typing_variants]
    variants += [set_variant(k, group) for k, group in enumerate(args.set)]
    with tempfile.TemporaryDirectory(prefix="heedful-bench-latency-") as tmp_name:
        tmp = Path(tmp_name)
        config, _ = write_config(tmp, "prompts", model, "auto")
        tokenizer = LocalTokenizer(model)
        settings = resolve(config).settings
        fill_prompts(requests, settings, tokenizer, single_line=True)  # every cursor is a single-line one
        if args.adapter == "zero":
            adapter = make_zero_adapter(model, tmp / "adapter")
        else:
            adapter = make_adapter(model, tmp / "adapter", seed=1)
        for mode, with_base in (("auto", True), ("lora", False)) if not args.typing_only else ():
            print(f"[bench.latency] heedful serve, adapter_serving = {mode} ...", file=sys.stderr, flush=True)
            times |= await serve_cases(
                tmp, model, adapter, mode, requests, n, with_base, args.rounds if with_base else 1
            )
        # The peers get the prompts the server built: at the budget it learned from its engine's speed.
        budgets = [] if args.typing_only else learned_budgets(tmp / "serve-auto.log")
        budget = settings.completion.context_tokens if FIXED_BUDGET else (budgets[-1] if budgets else None)
        settings.completion.context_tokens = budget or settings.completion.context_tokens
        fill_prompts(requests, settings, tokenizer, single_line=True)
        prompts = [tokenizer.encode(r.prompt) for r in requests]
        if not args.typing_only:
            # Exactly what the server's engine read for its first base case: a learned budget may move while
            # the server runs (its engine's speed sits near a step), and a peer given the last budget's
            # prompts would be timed on other prompts than the server.
            prompts = served_prompts(tmp / "auto.db", requests, "base-x1-0", prompts)
        print("[bench.latency] heedful serve, typing with prefix caching ...", file=sys.stderr, flush=True)
        typing = requests[WARMUP : WARMUP + args.typing]
        for variant in variants:
            print(f"[bench.latency] heedful serve, typing ({variant.label}) ...", file=sys.stderr, flush=True)
            cases, shares, engine_p50, first = await typing_cases(
                tmp, model, adapter, typing, variant, args.pause_ms / 1000, args.cursor_rest
            )
            times |= cases
            type_through |= shares
            typing_engine |= engine_p50
            typing_first |= first
        if not args.typing_only:
            print("[bench.latency] raw vLLM ...", file=sys.stderr, flush=True)
            times |= await raw_vllm(prompts, n)
            print("[bench.latency] Hugging Face generate ...", file=sys.stderr, flush=True)
            times["HF generate x1"] = hf_generate(model, prompts)
        if not args.no_llama_cpp and not args.typing_only:
            print("[bench.latency] llama.cpp ...", file=sys.stderr, flush=True)
            times["llama.cpp x1"] = llama_cpp(prompts)
    # The servers run with the timeout lifted, so every request is timed to its answer; this is the share
    # that would have been answered within the default `completion.timeout_ms`.
    timeout_ms = Settings().completion.timeout_ms
    figures = {
        label: {k: v * 1000 for k, v in percentiles([t for t, _ in case]).items()}
        | {
            "n": len(case),
            "tokens": statistics.fmean([n for _, n in case if n >= 0] or [0]),
            "nulls": sum(n < 0 for _, n in case),
            "within_timeout": sum(t * 1000 <= timeout_ms for t, _ in case) / len(case),
        }
        for label, case in times.items()
    }

    def ratio(a: str, b: str) -> float | None:
        return figures[a]["p50"] / figures[b]["p50"] if a in figures and b in figures else None

    return {
        "requests": args.requests,
        "sessions": n,
        "max_tokens": MAX_TOKENS,
        "cores": len(os.sched_getaffinity(0)),
        "prompt_tokens": statistics.fmean(len(p) for p in prompts),
        "context_tokens": settings.completion.context_tokens,
        "timeout_ms": timeout_ms,
        "budget": "fixed (--context-tokens)" if FIXED_BUDGET else "learned by the server (prefill_target_ms)",
        "budgets_learned": budgets,
        "cpu": cpu_model(),
        "quantization": WEIGHTS["quantization"],
        "weights": chosen_quantization(WEIGHTS["quantization"], model, gpu=has_gpu()),
        "llama_cpp_build": llama_cpp_cmake_args(),
        "results": figures,
        "typing_answered_from_suggestion": type_through,
        "typing_engine_p50_ms": typing_engine,
        "typing_first_p50_ms": typing_first,
        "typing_pause_ms": args.pause_ms,
        "typing_cursor_rest": args.cursor_rest,
        "ratios_p50": {
            "personalized (merged) / base, 1 session": ratio("personalized auto x1", "base x1"),
            f"personalized (merged) / base, {n} sessions": ratio(f"personalized auto x{n}", f"base x{n}"),
            "personalized (multi-LoRA) / base, 1 session": ratio("personalized lora x1", "base x1"),
            f"personalized (multi-LoRA) / base, {n} sessions": ratio(f"personalized lora x{n}", f"base x{n}"),
            "base / llama.cpp, 1 session": ratio("base x1", "llama.cpp x1"),
            "base / raw vLLM, 1 session": ratio("base x1", "raw vLLM x1"),
            f"base / raw vLLM, {n} sessions": ratio(f"base x{n}", f"raw vLLM x{n}"),
            "base typing / base, 1 session": ratio("base typing x1", "base x1"),
            "personalized typing / base typing": ratio("personalized auto typing x1", "base typing x1"),
            "base typing / typing, start not anchored": ratio("base typing x1", UNANCHORED),
            "base typing / typing, no type-through": ratio("base typing x1", NO_TYPE_THROUGH),
            "base typing / typing, prompt extended": ratio("base typing x1", EXTENDED),
            **{
                f"typing, {group} / base typing": ratio(f"base typing, {group} x1", "base typing x1")
                for group in args.set
            },
            "raw vLLM / llama.cpp": ratio("raw vLLM x1", "llama.cpp x1"),
            "HF generate / llama.cpp": ratio("HF generate x1", "llama.cpp x1"),
        },
    }


def print_table(r: dict[str, Any]) -> None:
    print(
        f"single-line completion latency: {r['requests']} stdlib cursors, prompts {r['prompt_tokens']:.0f} tokens on "
        f"average, up to {r['max_tokens']} new tokens, greedy, stop at the line end, {r['cores']} cores"
    )
    learned = r.get("budgets_learned") or []
    taken = f" (it took {', '.join(map(str, learned))} in turn; every peer reads the server's own prompts)"
    print(
        f"context budget {r['context_tokens']} tokens, {r['budget']}"
        + (taken if len(learned) > 1 else "")
        + "; vLLM weights: "
        + ("int8" if r.get("weights") == "int8" else "bfloat16")
        + f" (engine.quantization = {r.get('quantization')})"
    )
    print(f"CPU: {r['cpu']}; llama.cpp built with {r['llama_cpp_build']}")
    head = f"{'case':<34}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'tokens':>8}{'nulls':>7}"
    print(head + f"{'<= ' + str(r['timeout_ms']) + ' ms':>12}")
    for label, f in r["results"].items():
        print(
            f"{label:<34}{f['p50']:>9.0f}{f['p95']:>9.0f}{f['p99']:>9.0f}{f['mean']:>9.0f}{f['tokens']:>8.1f}"
            f"{f['nulls']:>7}{f['within_timeout']:>12.0%}"
        )
    print(
        "tokens: mean new tokens generated (the shown candidate's, as the server recorded them); "
        "nulls: requests answered with nothing; <= N ms: share answered within the default completion.timeout_ms"
    )
    if r["typing_answered_from_suggestion"]:
        said = r.get("typing_cursor_rest")
        rest = f"; the cursor's rest said at each file's opening ({said})" if said else ""
        print(f"typing: the developer reads each first suggestion for {r['typing_pause_ms']} ms before typing{rest}")
    for label, share in r["typing_answered_from_suggestion"].items():
        engine = r["typing_engine_p50_ms"].get(label, float("nan"))
        first = r["typing_first_p50_ms"].get(label, float("nan"))
        print(
            f"{label}: {share:.0%} of keystrokes answered from the suggestion typed through; "
            f"the others, answered by the engine: {engine:.0f} ms p50; the first after the pause {first:.0f} ms p50"
        )
    print("p50 ratios:")
    for label, value in r["ratios_p50"].items():
        if value is not None:
            print(f"  {label:<48}{value:>6.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40, help="measured requests per case (default 40)")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions (default 8)")
    parser.add_argument(
        "--adapter",
        choices=("zero", "random"),
        default="zero",
        help="zero (default): peft's initialisation, B = 0, so personalized and base serve the same tokens and "
        "the difference is the serving cost alone; random: B ~ N(0, 0.02), different code of different lengths",
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternating rounds of the single-session base/merged cases (default 2)"
    )
    parser.add_argument("--typing", type=int, default=12, help="cursors of the typing case (default 12)")
    parser.add_argument(
        "--typing-variants",
        type=_variants,
        default=list(TYPING_VARIANTS),
        metavar="NAME,...",
        help=f"the typing servers to run, of {', '.join(TYPING_VARIANTS)} (default all)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        type=overrides_arg,
        metavar="SECTION.KEY=VALUE,...",
        help="one more typing server (base developers) with these settings (repeatable: a server per group), "
        'e.g. --set "completion.warm_context=true"',
    )
    parser.add_argument(
        "--pause-ms",
        type=int,
        default=0,
        metavar="MS",
        help="how long the developer reads the first suggestion at a cursor before typing (default 0)",
    )
    parser.add_argument(
        "--cursor-rest",
        nargs="?",
        const="didMoveCursor",
        choices=CURSOR_REST_SIGNALS,
        help="typing: say the cursor rests at each cursor right after opening its file: didMoveCursor (the "
        "default: heedful/didMoveCursor) or documentHighlight (textDocument/documentHighlight, as LSP4IJ asks it)",
    )
    parser.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp peer (and its build)")
    parser.add_argument(
        "--typing-only",
        action="store_true",
        help="run the typing cases alone (their servers learn their own budget; no cold cases, no peers)",
    )
    parser.add_argument(
        "--context-tokens",
        type=int,
        help="a fixed prompt budget for every server (completion.context_tokens, prefill_target_ms = 0); "
        "default: what each server learns from its engine's speed",
    )
    parser.add_argument(
        "--quantization",
        choices=["auto", "none", "int8"],
        default="none",
        help="engine.quantization of every engine in the run (the servers' and raw vLLM's; llama.cpp keeps its "
        "Q4_K_M GGUF); default none, the setting's default",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    WEIGHTS["quantization"] = args.quantization
    if args.context_tokens is not None:
        FIXED_BUDGET.update(context_tokens=args.context_tokens, prefill_target_ms=0)
    if args.requests < args.sessions or args.sessions < 1:
        parser.error("--sessions must be at least 1 and --requests at least --sessions")
    if args.pause_ms < 0:
        parser.error(f"--pause-ms {args.pause_ms}: a pause is 0 or more milliseconds")
    await report_or_exit("bench.latency", run(args), args.json, print_table)


def _variants(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in TYPING_VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown typing variant {', '.join(unknown)}: choose among {', '.join(TYPING_VARIANTS)}"
        )
    return names


if __name__ == "__main__":
    asyncio.run(main())
