"""How steady this machine's engine speed is: the same prompt lengths read again and again, pass by pass.

A latency figure, and a ratio between two cases run one after the other, mean something only where the
machine runs at one speed for the length of the run. Some virtual machines do not: their speed steps
between two levels every few seconds (a neighbour on the same host), and every case of `bench.latency`
then mixes both in proportions of its own. Run this first, on a quiet machine, to know.

The embedded engine (the default model, the default settings, its prefix cache off so that no pass reuses
another's work) reads `--lengths` prompts of consecutive lengths from `--tokens` on (random token ids, one
new token each), and the very same lengths again in every later pass. Each pass's median is printed, and
the slowest pass's median over the fastest's: near 1.0 the machine is steady; 1.5 or more and the
machine's own steps are bigger than most effects a latency bench looks for. A pass slower only the first
time its lengths are read would be kernels set up per prompt shape; passes that alternate between two
levels are the machine.

On such a machine two engine variants cannot be compared one after the other, but they can side by side:
with `--against "section.key=value,..."` (settings, TOML values, as bench.quality's `--set`) and/or
`--against-env NAME=VALUE` (the environment its engine processes start with, e.g. an `LD_PRELOAD`), a
second embedded engine B starts beside the default one A in the same process, and every prompt is read by
both, one after the other (which one first alternates from prompt to prompt, `--gap` seconds before each
request so that neither's OpenMP threads still spin in the other's turn). Only one engine works at a
time, so each has both cores, and a step of the machine's speed falls on both engines of a pair: the
median of the per-pair ratios B/A is the comparison, whatever the machine does. `--new-tokens` times
decoding too (default 1: reading only).

    .venv/bin/python -m bench.steadiness [--passes 6] [--lengths 40] [--tokens 300] [--new-tokens 1]
        [--against "section.key=value,..."] [--against-env NAME=VALUE ...] [--gap 0.3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from typing import Any

from bench.lsp import BenchError, parse_overrides, report_or_exit
from server.engine.machine import cpu_model

# Prompt token ids are drawn from here: ordinary tokens of any model Heedful serves (no special ones).
FIRST_ID, LAST_ID = 1000, 20000


def pass_summary(pass_seconds: list[list[float]]) -> dict[str, Any]:
    """Per-pass medians (ms), and the slowest pass's median over the fastest's."""
    if not pass_seconds or any(not p for p in pass_seconds):
        raise ValueError("every pass needs at least one timed prompt")
    medians = [statistics.median(p) * 1000 for p in pass_seconds]
    return {"pass_p50_ms": medians, "slowest_over_fastest": max(medians) / min(medians)}


def paired_summary(a: list[list[float]], b: list[list[float]]) -> dict[str, Any]:
    """Engine B against engine A on the same prompts, pair by pair: each pass's medians (ms) and median
    ratio B/A over its pairs, the median ratio over every pair, and A's slowest pass over its fastest."""
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b, strict=True)):
        raise ValueError("engines A and B need the same number of timed prompts in every pass")
    ratios = [[tb / ta for ta, tb in zip(x, y, strict=True)] for x, y in zip(a, b, strict=True)]
    return {
        **pass_summary(a),
        "b_pass_p50_ms": pass_summary(b)["pass_p50_ms"],
        "pass_ratio_b_over_a": [statistics.median(r) for r in ratios],
        "ratio_b_over_a": statistics.median([r for pass_ratios in ratios for r in pass_ratios]),
    }


def parse_env(pairs: list[str]) -> dict[str, str]:
    """`--against-env NAME=VALUE` pairs as a mapping; raises ValueError naming the bad pair."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--against-env {pair!r} is not NAME=VALUE (e.g. LD_PRELOAD=/path/libiomp5.so)")
        env[name.strip()] = value
    return env


async def _start(settings: Any, env: dict[str, str]) -> Any:
    """An embedded engine whose processes start with `env` over this process's environment."""
    from server.engine import EngineError
    from server.engine.embedded import EmbeddedEngine

    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # vLLM's engine processes are spawned now, and take the environment as it is
    try:
        engine = EmbeddedEngine(settings)
        await engine.start()
    except EngineError as exc:
        raise BenchError(f"the embedded engine did not start: {exc}") from None
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return engine


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernel.settings import SettingsError, layer_sections, resolve

    resolved = resolve(None)
    settings = resolved.settings
    settings.engine.enable_prefix_caching = False
    if args.tokens + args.lengths + args.new_tokens > settings.model.max_model_len:
        raise BenchError(
            f"--tokens {args.tokens} + --lengths {args.lengths} + --new-tokens {args.new_tokens} exceed "
            f"model.max_model_len {settings.model.max_model_len}: ask for shorter prompts"
        )
    paired = args.against is not None or bool(args.against_env)
    names = ["A", "B"] if paired else ["A"]
    variants: dict[str, tuple[Any, dict[str, str]]] = {"A": (settings, {})}
    if paired:
        try:
            against = layer_sections(resolved, parse_overrides(args.against or "", "--against"), "--against")
            env = parse_env(args.against_env)
        except (ValueError, SettingsError) as exc:
            raise BenchError(str(exc)) from None
        variants["B"] = (against.settings, env)
    engines: dict[str, Any] = {}
    rng = random.Random(0)
    lengths = list(range(args.tokens, args.tokens + args.lengths))
    passes: dict[str, list[list[float]]] = {name: [] for name in names}
    try:
        for name in names:
            engines[name] = await _start(*variants[name])
            await engines[name].generate([FIRST_ID] * args.tokens, max_tokens=1)  # untimed: its first prompt
        for k in range(args.passes):
            seconds: dict[str, list[float]] = {name: [] for name in names}
            for i, n in enumerate(lengths):
                ids = [rng.randrange(FIRST_ID, LAST_ID) for _ in range(n)]
                for name in names if i % 2 == 0 else names[::-1]:
                    if paired:
                        await asyncio.sleep(args.gap)
                    start = time.perf_counter()
                    await engines[name].generate(ids, max_tokens=args.new_tokens, temperature=0.0)
                    seconds[name].append(time.perf_counter() - start)
            for name in names:
                passes[name].append(seconds[name])
            line = ", ".join(f"{name} p50 {statistics.median(seconds[name]) * 1000:.0f} ms" for name in names)
            print(f"[bench.steadiness] pass {k + 1}: {line}", flush=True)
    finally:
        for engine in engines.values():
            await engine.close()
    report: dict[str, Any] = {
        "cpu": cpu_model(),
        "passes": args.passes,
        "lengths": [lengths[0], lengths[-1]],
        "new_tokens": args.new_tokens,
    }
    if not paired:
        return report | pass_summary(passes["A"])
    return (
        report
        | {"against": args.against or "", "against_env": args.against_env}
        | paired_summary(passes["A"], passes["B"])
    )


def print_table(r: dict[str, Any]) -> None:
    lo, hi = r["lengths"]
    print(
        f"engine steadiness: {r['passes']} passes over prompts of {lo}-{hi} tokens (prefix cache off, "
        f"{r['new_tokens']} new token{'s' if r['new_tokens'] > 1 else ''}), CPU: {r['cpu']}"
    )
    if "ratio_b_over_a" in r:
        b = ", ".join(filter(None, [r["against"], *r["against_env"]]))
        print(f"A: the default settings; B: {b}")
        print("A pass p50 ms: " + ", ".join(f"{m:.0f}" for m in r["pass_p50_ms"]))
        print("B pass p50 ms: " + ", ".join(f"{m:.0f}" for m in r["b_pass_p50_ms"]))
        print("B / A per pass (median over its pairs): " + ", ".join(f"{x:.3f}" for x in r["pass_ratio_b_over_a"]))
        print(f"B / A over every pair (median): {r['ratio_b_over_a']:.3f}")
        print(f"A's slowest pass / fastest pass (p50): {r['slowest_over_fastest']:.2f}")
        return
    print("pass p50 ms: " + ", ".join(f"{m:.0f}" for m in r["pass_p50_ms"]))
    print(f"slowest pass / fastest pass (p50): {r['slowest_over_fastest']:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=6, help="passes over the same lengths (default 6)")
    parser.add_argument("--lengths", type=int, default=40, help="prompts per pass, one per length (default 40)")
    parser.add_argument("--tokens", type=int, default=300, help="the shortest prompt's tokens (default 300)")
    parser.add_argument("--new-tokens", type=int, default=1, help="new tokens per prompt (default 1: reading only)")
    parser.add_argument(
        "--against",
        metavar="SETTINGS",
        help='engine B: "section.key=value,..." over the defaults (TOML values; "" for the defaults)',
    )
    parser.add_argument(
        "--against-env",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="engine B's processes start with this in their environment (repeatable)",
    )
    parser.add_argument("--gap", type=float, default=0.3, help="seconds before each paired request (default 0.3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.passes < 2 or args.lengths < 1 or args.tokens < 1 or args.new_tokens < 1 or args.gap < 0:
        parser.error("--passes must be at least 2, --lengths, --tokens and --new-tokens at least 1, --gap >= 0")
    await report_or_exit("bench.steadiness", run(args), args.json, print_table)


if __name__ == "__main__":
    asyncio.run(main())
