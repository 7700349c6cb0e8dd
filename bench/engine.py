"""Single-line completion latency of the embedded engine next to Hugging Face `generate`, same run.

Prompts are function starts taken from the standard library's own sources (code nobody tuned to). Each
prompt is completed with 16 new tokens, greedy, by: the embedded vLLM engine (base model), the same
engine with a rank-8 LoRA adapter active, and Hugging Face `generate` on the same weights. Prints
p50/p95/p99 and the ratio of each to the embedded engine's base latency.

    .venv/bin/python -m bench.engine [--prompts 20] [--rounds 2] [--json]
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


async def bench_engine(prompts: list[str], rounds: int, max_tokens: int) -> dict[str, Any]:
    from kernel.settings import resolve
    from server.engine import AdapterRef
    from server.engine.embedded import EmbeddedEngine

    settings = resolve(None).settings
    engine = EmbeddedEngine(settings)
    await engine.start()
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapter_dir = make_adapter(settings.model_path(), Path(tmp) / "bench-adapter")
            adapter = AdapterRef("bench-adapter", 1, adapter_dir)
            await engine.load_adapter(adapter)
            for label, ref in (("engine", None), ("engine+lora", adapter)):
                await engine.generate(prompts[0], max_tokens=max_tokens, adapter=ref)  # warm-up
                times, tokens = [], []
                for _ in range(rounds):
                    for prompt in prompts:
                        start = time.perf_counter()
                        gen = await engine.generate(prompt, max_tokens=max_tokens, temperature=0.0, adapter=ref)
                        times.append(time.perf_counter() - start)
                        tokens.append(len(gen.candidates[0].token_ids))
                results[label] = {**percentiles(times), "tokens": statistics.fmean(tokens)}
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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    prompts = stdlib_prompts(args.prompts)
    results = await bench_engine(prompts, args.rounds, args.max_tokens)
    results["hf-generate"] = bench_hf(prompts, args.rounds, args.max_tokens)
    base = results["engine"]["p50"]
    if args.json:
        print(json.dumps({"prompts": len(prompts), "rounds": args.rounds, "results": results}, indent=2))
        return
    print(
        f"single-line completion latency, {len(prompts)} stdlib prompts x {args.rounds} rounds, "
        f"{args.max_tokens} new tokens, greedy, {len(os.sched_getaffinity(0))} cores"
    )
    print(f"{'peer':<14}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'tokens':>8}{'p50 / engine p50':>19}")
    for label, r in results.items():
        print(
            f"{label:<14}{r['p50'] * 1000:>9.0f}{r['p95'] * 1000:>9.0f}{r['p99'] * 1000:>9.0f}"
            f"{r['tokens']:>8.1f}{r['p50'] / base:>19.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
