"""The full evaluation: every shipped persona, each arm, through `heedful serve` on the embedded defaults.

Runs `heedful eval` once per persona (a fresh store per persona under --out), then prints the table
docs/evaluation.md carries: correction rate before and after, CRR, KL of the served adapter, the
general-code perplexity delta, how many feedback turns it took and how long, per persona and arm.

    .venv/bin/python -m bench.eval [--persona NAME ...] [--arm ARM ...] [--rounds 1] [--train-prompts 24]
                                   [--held-out 18] [--steps 24] [--batch-size 4] [--max-prompt-tokens 128]
                                   [--out DIR] [--json]

Training size: 4 groups per step and prompts cut to their nearest 128 tokens (the product defaults are 8
and 256) keep a round of 24 steps within a few minutes on 2 cores.

Settings come from HEEDFUL_CONFIG (or --config) as for `heedful`; without one, the embedded defaults.
The CI test of the same command is tests/e2e/test_eval.py (few prompts, one round).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from personalization.personas import SHIPPED
from tools.evaluation import ARMS

ROOT = Path(__file__).resolve().parents[1]


def run_persona(persona: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    out = args.out / persona
    command = [sys.executable, "-m", "server.cli"]
    if args.config:
        command += ["--config", str(args.config)]
    command += [
        "eval", "--persona", persona, "--rounds", str(args.rounds), "--train-prompts", str(args.train_prompts),
        "--held-out", str(args.held_out), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
        "--max-prompt-tokens", str(args.max_prompt_tokens), "--seed", str(args.seed), "--out", str(out),
    ]  # fmt: skip
    for arm in args.arm:
        command += ["--arm", arm]
    print(f"bench.eval: {' '.join(command[3:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)  # progress streams to stderr
    if proc.returncode != 0:
        raise SystemExit(f"bench.eval: heedful eval for {persona} failed with status {proc.returncode}")
    result = json.loads(proc.stdout)
    return list(result["results"]) if "results" in result else [result]


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if digits == 3 else f"{value:.{digits}f}"
    return str(value)


def last_round(r: dict[str, Any]) -> str:
    """What the last training round made of its adapter: published, or rejected by which gate."""
    training = (r["rounds"][-1] if r["rounds"] else {}).get("training")
    if not training:
        return "-"
    m = training.get("metrics", {})
    kl, base, adapter = m.get("gate_kl"), m.get("perplexity_base"), m.get("perplexity_adapter")
    gates = f"KL {kl:.3f}, perplexity {base:.2f} -> {adapter:.2f}" if None not in (kl, base, adapter) else ""
    status = str(training.get("status"))
    if status == "rejected":
        status = "rejected by the " + ("perplexity" if "perplexity" in str(training.get("reason")) else "KL") + " gate"
    failed = [c["step"] for c in m.get("gate_checks", []) if not c.get("passed")]
    if failed and m.get("steps_done") is not None:
        # A mid-round gate check failed: the round kept the weights of the last check that passed.
        status += f" at step {m['steps_done']}, gates failed at step {failed[0]}"
    return f"{status} ({gates})" if gates else status


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| persona | arm | correction rate before | after | CRR | KL | perplexity delta | trained adapter "
        "| feedback turns | training s | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        turns = sum(v for k, v in r["feedback_events"].items() if k != "empty")
        lines.append(
            f"| {r['persona']} | {r['arm']} | {fmt(r['correction_rate_before'])} | {fmt(r['correction_rate_after'])} "
            f"| {fmt(r['crr'])} | {fmt(r['kl'], 3)} | {fmt(r['perplexity_delta'], 3)} | {last_round(r)} | {turns} "
            f"| {r['training_seconds']:.0f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [cls.name for cls in SHIPPED]
    parser.add_argument("--persona", action="append", choices=names, help="default: every shipped persona")
    parser.add_argument("--arm", action="append", choices=ARMS)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--train-prompts", type=int, default=24)
    parser.add_argument("--held-out", type=int, default=18)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4, help="training.batch_size for the runs (groups/step)")
    parser.add_argument("--max-prompt-tokens", type=int, default=128, help="training.max_prompt_tokens for the runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--out", type=Path, default=Path("/tmp/heedful-bench-eval") / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.arm = args.arm or list(ARMS)
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for persona in args.persona or names:
        rows.extend(run_persona(persona, args))
        print(table(rows), file=sys.stderr, flush=True)  # the table so far, in case a long run is cut
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    else:
        print(
            f"heedful eval, {args.rounds} round(s) of {args.train_prompts} train prompts and {args.steps} steps of "
            f"{args.batch_size} groups (prompts cut to {args.max_prompt_tokens} tokens), {args.held_out} held-out "
            f"prompts, seed {args.seed}; {time.monotonic() - started:.0f} s in all\n"
        )
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
