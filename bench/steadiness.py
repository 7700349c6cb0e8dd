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

    .venv/bin/python -m bench.steadiness [--passes 6] [--lengths 40] [--tokens 300] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from typing import Any

from bench.lsp import BenchError, report_or_exit
from server.engine.machine import cpu_model

# Prompt token ids are drawn from here: ordinary tokens of any model Heedful serves (no special ones).
FIRST_ID, LAST_ID = 1000, 20000


def pass_summary(pass_seconds: list[list[float]]) -> dict[str, Any]:
    """Per-pass medians (ms), and the slowest pass's median over the fastest's."""
    if not pass_seconds or any(not p for p in pass_seconds):
        raise ValueError("every pass needs at least one timed prompt")
    medians = [statistics.median(p) * 1000 for p in pass_seconds]
    return {"pass_p50_ms": medians, "slowest_over_fastest": max(medians) / min(medians)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from kernel.settings import resolve
    from server.engine import EngineError
    from server.engine.embedded import EmbeddedEngine

    settings = resolve(None).settings
    settings.engine.enable_prefix_caching = False
    if args.tokens + args.lengths >= settings.model.max_model_len:
        raise BenchError(
            f"--tokens {args.tokens} + --lengths {args.lengths} reach model.max_model_len "
            f"{settings.model.max_model_len}: ask for shorter prompts"
        )
    engine = EmbeddedEngine(settings)
    try:
        await engine.start()
    except EngineError as exc:
        raise BenchError(f"the embedded engine did not start: {exc}") from None
    rng = random.Random(0)
    lengths = list(range(args.tokens, args.tokens + args.lengths))
    passes: list[list[float]] = []
    try:
        await engine.generate([FIRST_ID] * args.tokens, max_tokens=1)  # untimed: the engine's first prompt
        for k in range(args.passes):
            seconds = []
            for n in lengths:
                ids = [rng.randrange(FIRST_ID, LAST_ID) for _ in range(n)]
                start = time.perf_counter()
                await engine.generate(ids, max_tokens=1, temperature=0.0)
                seconds.append(time.perf_counter() - start)
            passes.append(seconds)
            print(f"[bench.steadiness] pass {k + 1}: p50 {statistics.median(seconds) * 1000:.0f} ms", flush=True)
    finally:
        await engine.close()
    return {
        "cpu": cpu_model(),
        "passes": args.passes,
        "lengths": [lengths[0], lengths[-1]],
        **pass_summary(passes),
    }


def print_table(r: dict[str, Any]) -> None:
    lo, hi = r["lengths"]
    print(
        f"engine steadiness: {r['passes']} passes over prompts of {lo}-{hi} tokens (prefix cache off, one new "
        f"token), CPU: {r['cpu']}"
    )
    print("pass p50 ms: " + ", ".join(f"{m:.0f}" for m in r["pass_p50_ms"]))
    print(f"slowest pass / fastest pass (p50): {r['slowest_over_fastest']:.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=6, help="passes over the same lengths (default 6)")
    parser.add_argument("--lengths", type=int, default=40, help="prompts per pass, one per length (default 40)")
    parser.add_argument("--tokens", type=int, default=300, help="the shortest prompt's tokens (default 300)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.passes < 2 or args.lengths < 1 or args.tokens < 1:
        parser.error("--passes must be at least 2, --lengths and --tokens at least 1")
    await report_or_exit("bench.steadiness", run(args), args.json, print_table)


if __name__ == "__main__":
    asyncio.run(main())
