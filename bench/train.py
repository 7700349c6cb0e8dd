"""GRPO-TCR update throughput and peak memory of the LoRA trainer next to TRL's `GRPOTrainer`, same run.

Workload, identical on both sides: function starts from the standard library's sources as prompts, groups of
G = 4 sampled completions (temperature 1) of at most 32 new tokens, a rank-8 LoRA on q/k/v/o (alpha 16,
dropout 0.05), 4 prompts x 4 completions per optimisation step, AdamW at lr 3e-4, KL weight 0.01, clip
bounds [1 - 0.2, 1 + 0.28], float32 on the CPU with 2 torch threads, one warm-up step then K measured steps.
The reward is a fixed rule: +1 if the completion looks type-hinted (`->` or `name: Type`), else -1.

* Heedful: serving produces the candidates, so they are sampled once beforehand with Hugging Face
  `generate` (in a separate process), their pi_old log-probs filled, and only `LoraTrainer.step` is timed.
* TRL: `GRPOTrainer(loss_type="dapo")` samples inside its step. Its step is timed from `on_step_begin` to
  `on_step_end` and its `_generate` call (tokenise, sample, decode) separately; "update" is the step minus
  that, so the reference forward, rewards, loss, backward and optimiser step count on both sides.

Throughput is response (completion) tokens trained on per second. Each side runs in its own fresh
process so that peak RSS (`ru_maxrss`) is its own; the ratio is against TRL's update in the same run.

    .venv/bin/python -m bench.train [--steps 6] [--prompts 16] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.engine import stdlib_prompts

GROUP = 4  # CompletionSettings.group_size
PROMPTS_PER_STEP = 4
NEW_TOKENS = 32
MAX_PROMPT_TOKENS = 256  # LoraTrainer's default clip; prompts are kept below it so both sides see them whole
CONTEXT_LINES = 12
LORA_RANK = 8
LORA_ALPHA = 16.0
LORA_DROPOUT = 0.05
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
LEARNING_RATE = 3e-4
WEIGHT_DECAY = 0.01
BETA_KL = 0.01
EPS_LOW = 0.2
EPS_HIGH = 0.28
THREADS = 2
SEED = 0
RESULT_MARK = "BENCH-RESULT "
TYPE_HINT = re.compile(r"->|\b\w+: [A-Za-z_]")


def reward(text: str) -> float:
    """+1 for a completion that carries a return annotation or an annotated name, else -1."""
    return 1.0 if TYPE_HINT.search(text) else -1.0


def trl_reward(completions: list[str], **kwargs: Any) -> list[float]:
    return [reward(c) for c in completions]


def model_dir(explicit: str | None) -> Path:
    from kernel.paths import default_model_dir

    path = Path(explicit).expanduser() if explicit else default_model_dir()
    if not (path / "config.json").is_file():
        raise SystemExit(f"no Hugging Face model at {path}; run `heedful model prepare` first (or pass --model DIR)")
    return path


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def current_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Libraries print progress to stdout; the child's stdout carries only the result line."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def emit(result: dict[str, Any]) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


# -- child: the candidates, sampled once (what serving would have produced) --------------------------------


def side_rollouts(model: Path, prompt_count: int, out: Path, threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    tok = AutoTokenizer.from_pretrained(str(model))
    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    eos = lm.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    prompts = stdlib_prompts(prompt_count, CONTEXT_LINES)
    longest = max(len(tok(p)["input_ids"]) for p in prompts)
    if len(prompts) < prompt_count or longest > MAX_PROMPT_TOKENS:
        raise SystemExit(
            f"{len(prompts)} stdlib prompts of up to {longest} tokens; need {prompt_count} within {MAX_PROMPT_TOKENS}"
        )
    groups: list[dict[str, Any]] = []
    injected = 0
    start = time.perf_counter()
    with torch.no_grad():
        for prompt in prompts:
            ids = tok(prompt)["input_ids"]  # the same call TRL makes for a plain-text prompt
            out_ids = lm.generate(
                torch.tensor([ids]),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=NEW_TOKENS,
                num_return_sequences=GROUP,
                pad_token_id=tok.pad_token_id,
            )
            samples: list[dict[str, Any]] = []
            for row in out_ids[:, len(ids) :].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))  # keep the EOS, as TRL does
                response = row[:cut]
                text = tok.decode(response, skip_special_tokens=True)
                samples.append({"response_ids": response, "reward": reward(text)})
            if len({s["reward"] for s in samples}) == 1:
                # An all-equal group carries no signal and the trainer drops it; flip one so every group trains
                # (the update's cost does not depend on the reward values).
                samples[-1]["reward"] = -samples[-1]["reward"]
                injected += 1
            groups.append({"prompt": prompt, "prompt_ids": ids, "samples": samples})
    out.write_text(json.dumps({"groups": groups}))
    return {
        "side": "rollouts",
        "prompts": len(prompts),
        "generate_s": time.perf_counter() - start,
        "injected": injected,
        "positive": sum(s["reward"] > 0 for g in groups for s in g["samples"]),
        "samples": sum(len(g["samples"]) for g in groups),
    }


def load_rollouts(path: Path) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = json.loads(path.read_text())["groups"]
    return groups


# -- child: Heedful's LoraTrainer ----------------------------------------------------------------------------


def side_heedful(model: Path, rollouts: Path, steps: int, threads: int) -> dict[str, Any]:
    import torch

    from kernel.settings import TrainingSettings
    from personalization.samples import Group, Sample
    from personalization.trainer import LoraTrainer, finalize_groups

    torch.set_num_threads(threads)
    settings = TrainingSettings(
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        batch_size=PROMPTS_PER_STEP,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_ALPHA,
        lora_dropout=LORA_DROPOUT,
        lora_target_modules=list(TARGET_MODULES),
        beta_kl=BETA_KL,
        eps_low=EPS_LOW,
        eps_high=EPS_HIGH,
        seed=SEED,
    )
    trainer = LoraTrainer(model, settings, max_prompt_tokens=MAX_PROMPT_TOKENS)
    groups = [
        Group([Sample(g["prompt_ids"], s["response_ids"], None, s["reward"]) for s in g["samples"]])
        for g in load_rollouts(rollouts)
    ]
    loaded = current_rss_kib()
    start = time.perf_counter()
    trainer.fill_old_logprobs([s for g in groups for s in g.samples])
    fill_s = time.perf_counter() - start
    _, masked = finalize_groups(groups)
    if masked:
        raise SystemExit(f"{masked} groups carry no signal; the rollouts should have given each one variety")
    tokens: list[float] = []
    seq_tokens: list[int] = []
    step_s: list[float] = []
    batches: list[list[int]] = []
    for i in range(steps + 1):
        # Prompts in dataset order, 4 per step: the batches TRL forms with shuffle_dataset=False.
        index = [(i * PROMPTS_PER_STEP + j) % len(groups) for j in range(PROMPTS_PER_STEP)]
        batch = [groups[k] for k in index]
        start = time.perf_counter()
        metrics = trainer.step(batch)
        elapsed = time.perf_counter() - start
        if i > 0:  # the first step is the warm-up
            tokens.append(metrics["tokens"])
            seq_tokens.append(sum(len(s.prompt_ids) + len(s.response_ids) for g in batch for s in g.samples))
            step_s.append(elapsed)
            batches.append(index)
    return {
        "side": "heedful",
        "tokens": tokens,
        "seq_tokens": seq_tokens,
        "batches": batches,
        "step_s": step_s,
        "generate_s": [0.0] * len(step_s),
        "fill_old_logprobs_s": fill_s,
        "masked_groups": masked,
        "rss_loaded_kib": loaded,
        "peak_rss_kib": peak_rss_kib(),
        "threads": torch.get_num_threads(),
    }


# -- child: TRL's GRPOTrainer ----------------------------------------------------------------------------------


def side_trl(model: Path, rollouts: Path, steps: int, threads: int, gradient_checkpointing: bool) -> dict[str, Any]:
    # vLLM is installed in this venv (the engine), and TRL imports it whenever it is importable, although this
    # run never uses it (use_vllm=False): hide it so its ~170 MiB of imports do not count as TRL's memory.
    sys.modules["vllm"] = None  # type: ignore[assignment]
    import importlib

    import torch
    import trl
    from peft import LoraConfig
    from torch import Tensor
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.trainer.grpo_config import GRPOConfig  # `trl` itself exports lazily, which mypy cannot see
    from trl.trainer.grpo_trainer import GRPOTrainer

    dataset_cls: Any = importlib.import_module("datasets").Dataset  # `datasets` ships no type information

    torch.set_num_threads(threads)
    prompts = [g["prompt"] for g in load_rollouts(rollouts)]
    prompt_index = {p: i for i, p in enumerate(prompts)}
    tok = AutoTokenizer.from_pretrained(str(model))
    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    step_s: list[float] = []
    generate_s: list[float] = []
    tokens: list[float] = []
    seq_tokens: list[int] = []
    batches: list[list[int]] = []

    class TimedGRPOTrainer(GRPOTrainer):
        """Times the sampling inside each step and counts the completion tokens trained on."""

        def _generate(self, prompts: list[Any]) -> Any:
            start = time.perf_counter()
            out = super()._generate(prompts)
            generate_s.append(time.perf_counter() - start)
            batches.append([prompt_index[p] for p in dict.fromkeys(prompts)])
            return out

        def _generate_and_score_completions(self, inputs: list[dict[str, Tensor | Any]]) -> dict[str, Tensor | Any]:
            out = super()._generate_and_score_completions(inputs)
            tokens.append(float(out["completion_mask"].sum()))
            seq_tokens.append(int(out["prompt_mask"].sum() + out["completion_mask"].sum()))
            return out

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.start = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            step_s.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(
            output_dir=tmp,
            loss_type="dapo",
            num_generations=GROUP,
            per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,  # completions per device and step
            gradient_accumulation_steps=1,
            max_completion_length=NEW_TOKENS,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            learning_rate=LEARNING_RATE,
            weight_decay=WEIGHT_DECAY,
            max_grad_norm=1.0,
            beta=BETA_KL,
            epsilon=EPS_LOW,
            epsilon_high=EPS_HIGH,
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=gradient_checkpointing,  # TRL's default is True; Heedful does not checkpoint
            report_to=[],
            logging_steps=1,
            disable_tqdm=True,
            save_strategy="no",
            max_steps=steps + 1,
            shuffle_dataset=False,  # prompts in dataset order, so each step sees the same 4 prompts as Heedful's
            seed=SEED,
            dataloader_num_workers=0,
        )
        trainer = TimedGRPOTrainer(
            model=lm,
            reward_funcs=trl_reward,
            args=config,
            train_dataset=dataset_cls.from_dict({"prompt": prompts}),
            processing_class=tok,
            peft_config=LoraConfig(
                r=LORA_RANK,
                lora_alpha=LORA_ALPHA,
                lora_dropout=LORA_DROPOUT,
                target_modules=list(TARGET_MODULES),
                task_type="CAUSAL_LM",
            ),
            callbacks=[StepTimer()],
        )
        loaded = current_rss_kib()
        trainer.train()
    if not (len(step_s) == len(generate_s) == len(tokens) == steps + 1):
        raise SystemExit(
            f"TRL timings do not line up: {len(step_s)} steps, {len(generate_s)} generations, {len(tokens)} batches; "
            "expected one generation per optimisation step"
        )
    return {
        "side": "trl",
        "trl_version": trl.__version__,
        "tokens": tokens[1:],
        "seq_tokens": seq_tokens[1:],
        "batches": batches[1:],
        "step_s": step_s[1:],
        "generate_s": generate_s[1:],
        "gradient_checkpointing": gradient_checkpointing,
        "rss_loaded_kib": loaded,
        "peak_rss_kib": peak_rss_kib(),
        "threads": torch.get_num_threads(),
    }


# -- parent --------------------------------------------------------------------------------------------------


def run_child(args: Sequence[str]) -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.train", *args], cwd=root, capture_output=True, text=True, check=False
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.splitlines()[-40:])
        raise SystemExit(f"bench child {' '.join(args)} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_MARK) :])
    return result


def summarise(r: dict[str, Any]) -> dict[str, Any]:
    tokens, step, gen = sum(r["tokens"]), sum(r["step_s"]), sum(r["generate_s"])
    return {
        "steps": len(r["step_s"]),
        "tokens_per_step": tokens / len(r["step_s"]),
        "update_s_per_step": (step - gen) / len(r["step_s"]),
        "generate_s_per_step": gen / len(r["step_s"]),
        "update_tok_s": tokens / (step - gen),
        "step_tok_s": tokens / step,
        "seq_tokens_per_step": sum(r["seq_tokens"]) / len(r["step_s"]),
        "loaded_mib": r["rss_loaded_kib"] / 1024,
        "peak_mib": r["peak_rss_kib"] / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="measured steps per side (after one warm-up step)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--model", default=None, help="Hugging Face model folder (default: the prepared one)")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads in each side's process")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--side", choices=["rollouts", "heedful", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--rollouts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    model = model_dir(args.model)
    if args.prompts < PROMPTS_PER_STEP:
        parser.error(f"--prompts must be at least {PROMPTS_PER_STEP}")

    if args.side is not None:
        with quiet_stdout():
            if args.side == "rollouts":
                result = side_rollouts(model, args.prompts, args.rollouts, args.threads)
            elif args.side == "heedful":
                result = side_heedful(model, args.rollouts, args.steps, args.threads)
            else:
                result = side_trl(model, args.rollouts, args.steps, args.threads, args.trl_gradient_checkpointing)
        emit(result)
        return

    common = ["--model", str(model), "--steps", str(args.steps), "--prompts", str(args.prompts)]
    common += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rollouts.json"
        rollouts = run_child([*common, "--side", "rollouts", "--rollouts", str(path)])
        heedful = run_child([*common, "--side", "heedful", "--rollouts", str(path)])
        trl_args = ["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else []
        trl = run_child([*common, "--side", "trl", "--rollouts", str(path), *trl_args])
    rows = {"heedful": summarise(heedful), "trl": summarise(trl)}
    base = rows["trl"]["update_tok_s"]
    for row in rows.values():
        row["update_vs_trl_update"] = row["update_tok_s"] / base
    if args.json:
        print(json.dumps({"rollouts": rollouts, "raw": {"heedful": heedful, "trl": trl}, "results": rows}, indent=2))
        return
    print(
        f"GRPO update throughput, SmolLM2-135M float32 CPU, {args.threads} torch threads, LoRA r{LORA_RANK} q/k/v/o, "
        f"{PROMPTS_PER_STEP} prompts x {GROUP} completions (<= {NEW_TOKENS} tokens) per step, "
        f"{args.steps} steps after 1 warm-up; TRL {trl['trl_version']} GRPOTrainer(loss_type='dapo')"
        + (", gradient checkpointing" if args.trl_gradient_checkpointing else "")
    )
    print(
        f"{'side':<9}{'steps':>6}{'resp tok/step':>14}{'seq tok/step':>13}{'gen s/step':>11}{'upd s/step':>11}"
        f"{'update tok/s':>13}{'step tok/s':>11}{'RSS loaded MiB':>15}{'peak RSS MiB':>13}{'update / TRL update':>20}"
    )
    for name, r in rows.items():
        gen = f"{r['generate_s_per_step']:.2f}" if name == "trl" else "-"
        step = f"{r['step_tok_s']:.1f}" if name == "trl" else "-"
        print(
            f"{name:<9}{r['steps']:>6}{r['tokens_per_step']:>14.0f}{r['seq_tokens_per_step']:>13.0f}{gen:>11}"
            f"{r['update_s_per_step']:>11.2f}{r['update_tok_s']:>13.1f}{step:>11}{r['loaded_mib']:>15.0f}"
            f"{r['peak_mib']:>13.0f}{r['update_vs_trl_update']:>20.2f}"
        )
    same = "the same" if heedful["batches"] == trl["batches"] else "DIFFERENT"
    print(
        f"Both sides trained on {same} prompt batches. Heedful's candidates were sampled beforehand "
        f"({rollouts['samples']} over {rollouts['prompts']} prompts, {rollouts['positive']} rewarded +1, "
        f"{rollouts['injected']} all-equal groups given one flipped reward)"
    )
    print(
        f"and pi_old filled once ({heedful['fill_old_logprobs_s']:.1f} s, not counted). TRL's 'step tok/s' "
        "includes its own sampling; its 'update' is the step minus `_generate`."
    )


if __name__ == "__main__":
    main()
