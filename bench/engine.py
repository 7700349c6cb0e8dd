"""Single-line completion latency of the embedded engine next to Hugging Face `generate`, same run.

Prompts are function starts taken from the standard library's own sources (code nobody tuned to). Each
prompt is completed with 16 new tokens, greedy, by: the embedded vLLM engine (base model), the same
engine with a rank-8 LoRA adapter active, and Hugging Face `generate` on the same weights. Prints
p50/p95/p99, the engine's time to its first token (reading the prompt) and the ratio of each to the
embedded engine's base latency. `--quantization int8` (repeatable with `none`) runs the engine cases on the
model's int8 (W8A8) copy as well (`engine.quantization`), one engine after the other; the CPU model is
printed with the figures.

    .venv/bin/python -m bench.engine [--prompts 20] [--rounds 2] [--quantization none|int8 ...] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from server.engine.machine import cpu_model

STDLIB_FILES = [
    "json/decoder.py",
    "textwrap.py",
    "csv.py",
    "shlex.py",
    "fractions.py",
    "statistics.py",
    "difflib.py",
    "ipaddress.py",
    "configparser.py",
    "string.py",
]


def stdlib_prompts(count: int, context_lines: int = 30) -> list[str]:
    """Prefixes ending right after a `def ...:` line, with the lines before it as context."""
    root = Path(sysconfig.get_paths()["stdlib"])
    prompts: list[str] = []
    for rel in STDLIB_FILES:
        lines = (root / rel).read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s*def \w+\(.*\):\s*$", line) and i >= 5:
                prompts.append("\n".join(lines[max(0, i - context_lines) : i + 1]) + "\n")
                if len(prompts) % 2 == 0:
                    break  # two per file, so the set spans many files
        if len(prompts) >= count:
            break
    return prompts[:count]


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        k = (len(ordered) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    return {"p50": pct(0.50), "p95": pct(0.95), "p99": pct(0.99), "mean": statistics.fmean(ordered)}


async def bench_engine(prompts: list[str], rounds: int, max_tokens: int, quantization: str = "none") -> dict[str, Any]:
    from kernel.settings import resolve
    from server.engine import AdapterRef
    from server.engine.embedded import EmbeddedEngine

    settings = resolve(None).settings
    settings.engine.quantization = quantization
    engine = EmbeddedEngine(settings)
    await engine.start()
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapter_dir = make_adapter(settings.model_path(), Path(tmp) / "bench-adapter")
            adapter = AdapterRef("bench-adapter", 1, adapter_dir)
            await engine.load_adapter(adapter)
            name = "engine" if quantization == "none" else f"engine {quantization}"
            for label, ref in ((name, None), (f"{name}+lora", adapter)):
                await engine.generate(prompts[0], max_tokens=max_tokens, adapter=ref)  # warm-up
                times, tokens, first = [], [], []
                for _ in range(rounds):
                    for prompt in prompts:
                        start = time.perf_counter()
                        gen = await engine.generate(prompt, max_tokens=max_tokens, temperature=0.0, adapter=ref)
                        times.append(time.perf_counter() - start)
                        tokens.append(len(gen.candidates[0].token_ids))
                        if gen.timing.first_token_s is not None:
                            first.append(gen.timing.first_token_s)
                results[label] = {
                    **percentiles(times),
                    "tokens": statistics.fmean(tokens),
                    "first_token_p50": statistics.median(first) if first else None,
                }
    finally:
        await engine.close()
    return results


def make_adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    )
    peft_model.save_pretrained(str(out))
    return out


def bench_hf(prompts: list[str], rounds: int, max_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kernel.settings import resolve

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    path = str(resolve(None).settings.model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    encoded = [tok(p, return_tensors="pt", add_special_tokens=False).input_ids for p in prompts]
    with torch.no_grad():
        model.generate(encoded[0], max_new_tokens=max_tokens, do_sample=False)  # warm-up
        times, tokens = [], []
        for _ in range(rounds):
            for ids in encoded:
                start = time.perf_counter()
                out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
                times.append(time.perf_counter() - start)
                tokens.append(out.shape[1] - ids.shape[1])
    return {**percentiles(times), "tokens": statistics.fmean(tokens)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument(
        "--quantization",
        action="append",
        choices=["none", "int8"],
        help="engine.quantization of the engine cases (repeatable; default none)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    prompts = stdlib_prompts(args.prompts)
    results: dict[str, Any] = {}
    for quantization in args.quantization or ["none"]:
        results |= await bench_engine(prompts, args.rounds, args.max_tokens, quantization)
    results["hf-generate"] = bench_hf(prompts, args.rounds, args.max_tokens)
    base = next(iter(results.values()))["p50"]
    if args.json:
        report = {"cpu": cpu_model(), "prompts": len(prompts), "rounds": args.rounds, "results": results}
        print(json.dumps(report, indent=2))
        return
    print(
        f"single-line completion latency, {len(prompts)} stdlib prompts x {args.rounds} rounds, "
        f"{args.max_tokens} new tokens, greedy, {len(os.sched_getaffinity(0))} cores, CPU: {cpu_model()}"
    )
    print(f"{'peer':<18}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'first ms':>10}{'tokens':>8}{'p50 / first p50':>17}")
    for label, r in results.items():
        first = r.get("first_token_p50")
        print(
            f"{label:<18}{r['p50'] * 1000:>9.0f}{r['p95'] * 1000:>9.0f}{r['p99'] * 1000:>9.0f}"
            f"{'' if first is None else f'{first * 1000:.0f}':>10}{r['tokens']:>8.1f}{r['p50'] / base:>17.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
