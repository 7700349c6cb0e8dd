"""The LoRA trainer: GRPO-TCR on judged groups and on-policy distillation on corrections.

`LoraTrainer` holds the policy (the base model with a peft LoRA adapter, trainable), the frozen
reference (the same model with the adapter disabled: no second copy in memory), AdamW with a cosine
schedule and gradient clipping. `step` takes groups and OPD samples, computes per-token log-probs of
the responses under the policy and the reference, and applies `grpo_tcr_loss` (one call: group
advantages broadcast over tokens, OPD advantages per token).

Log-probs are computed for response tokens only: the base model's hidden states at those positions
go through the LM head, so a 49k-word vocabulary is never materialised for the prompt.

What it must not do: read or write the store, judge, or decide when to train (worker.py does).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from personalization.grpo import group_advantages, grpo_tcr_loss, masked_mean
from personalization.opd import OPDSample
from server.settings import TrainingSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(slots=True)
class Sample:
    """One response to a prompt, as the loss sees it."""

    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float] | None  # pi_old per response token; None: computed under the starting policy
    reward: float = 0.0
    demonstration: bool = False


@dataclass(slots=True)
class Group:
    """The G samples of one prompt; their advantages are relative to each other."""

    samples: list[Sample]
    advantages: list[float] = field(default_factory=list)

    @property
    def masked(self) -> bool:
        return not any(abs(a) > 0 for a in self.advantages)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def finalize_groups(groups: Sequence[Group]) -> tuple[list[Group], int]:
    """Compute each group's advantages; return the groups that carry signal and how many were all-equal."""
    kept: list[Group] = []
    masked = 0
    for g in groups:
        rewards = torch.tensor([s.reward for s in g.samples], dtype=torch.float32)
        g.advantages = group_advantages(rewards).tolist()
        if g.masked:
            masked += 1
        else:
            kept.append(g)
    return kept, masked


def resolve_compute_dtype(name: str) -> torch.dtype:
    """`training.compute_dtype` as a torch dtype; `auto` asks the CPU whether it has bfloat16 units."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


class LoraTrainer:
    def __init__(
        self,
        model_path: Path,
        settings: TrainingSettings,
        *,
        init_adapter: Path | None = None,
        max_prompt_tokens: int | None = None,
    ) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

        self.settings = settings
        self.max_prompt_tokens = max_prompt_tokens if max_prompt_tokens is not None else settings.max_prompt_tokens
        torch.manual_seed(settings.seed)
        self._random = random.Random(settings.seed)
        base = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32)
        base.config.use_cache = False
        for p in base.parameters():
            p.requires_grad_(False)
        if init_adapter is not None:
            self.model: Any = PeftModel.from_pretrained(base, str(init_adapter), is_trainable=True)
        else:
            config = LoraConfig(
                r=settings.lora_rank,
                lora_alpha=settings.lora_alpha,
                lora_dropout=settings.lora_dropout,
                target_modules=list(settings.lora_target_modules),
                task_type="CAUSAL_LM",
            )
            self.model = get_peft_model(base, config)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, 0, settings.schedule_steps)
        self.steps_done = 0
        self.compute_dtype = resolve_compute_dtype(settings.compute_dtype)

    # -- log-probs -----------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        """The forward passes' precision context (see `training.compute_dtype`)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16)

    def _clip_prompt(self, prompt_ids: list[int]) -> list[int]:
        return prompt_ids[-self.max_prompt_tokens :] if self.max_prompt_tokens else prompt_ids

    def response_logprobs(self, samples: Sequence[Sample], *, reference: bool = False) -> tuple[Tensor, Tensor]:
        """Per-token log-probs [B, T] of each sample's response (and the [B, T] mask of real tokens)."""
        seqs = [self._clip_prompt(s.prompt_ids) + s.response_ids for s in samples]
        width = max(len(x) for x in seqs)
        t_max = max(len(s.response_ids) for s in samples)
        pad = 0
        input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, x in enumerate(seqs):
            input_ids[i, : len(x)] = torch.tensor(x)
            attention[i, : len(x)] = 1
        # Hidden state at position p predicts token p + 1: gather the states before each response token.
        rows: list[int] = []
        cols: list[int] = []
        mask = torch.zeros((len(seqs), t_max), dtype=torch.float32)
        targets = torch.zeros((len(seqs), t_max), dtype=torch.long)
        for i, s in enumerate(samples):
            start = len(seqs[i]) - len(s.response_ids)
            for t, tok in enumerate(s.response_ids):
                rows.append(i)
                cols.append(start + t - 1)
                mask[i, t] = 1.0
                targets[i, t] = tok
        inner = self.model.get_base_model()
        with self._autocast():
            if reference:
                with torch.no_grad(), self.model.disable_adapter():
                    hidden = inner.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            else:
                hidden = inner.model(input_ids=input_ids, attention_mask=attention).last_hidden_state
            picked = hidden[torch.tensor(rows), torch.tensor(cols)]  # [N, H]
            logits = inner.lm_head(picked).float()
        logp_flat = torch.log_softmax(logits, dim=-1).gather(1, targets[mask.bool()].unsqueeze(1)).squeeze(1)
        out = torch.zeros((len(seqs), t_max), dtype=torch.float32).masked_scatter(mask.bool(), logp_flat)
        return out, mask

    @torch.no_grad()
    def fill_old_logprobs(self, samples: Sequence[Sample], batch: int = 8) -> int:
        """Compute pi_old under the current (starting) policy where the store had none usable."""
        todo = [
            s
            for s in samples
            if s.old_logprobs is None
            or len(s.old_logprobs) != len(s.response_ids)
            or len(s.prompt_ids) > self.max_prompt_tokens  # a clipped prompt is a different context
        ]
        self.model.eval()
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            logp, mask = self.response_logprobs(chunk)
            for s, row, m in zip(chunk, logp, mask, strict=True):
                s.old_logprobs = row[m.bool()].tolist()
        self.model.train()
        return len(todo)

    @torch.no_grad()
    def refresh_old_logprobs(self, samples: Sequence[Sample], batch: int = 8) -> None:
        """Make the current policy pi_old for these samples (a new PPO iteration on the same data)."""
        for s in samples:
            s.old_logprobs = None
        self.fill_old_logprobs(samples, batch)

    @torch.no_grad()
    def teacher_logprobs(self, sample: Sample, hint_prompt_ids: list[int]) -> list[float]:
        """log pi(a_t | s + hint) of the sample's response tokens under the current policy."""
        self.model.eval()
        teacher = Sample(hint_prompt_ids, sample.response_ids, None)
        logp, mask = self.response_logprobs([teacher])
        self.model.train()
        return logp[0][mask[0].bool()].tolist()

    # -- one optimisation step -----------------------------------------------------------------------

    def step(self, groups: Sequence[Group], opd: Sequence[OPDSample] = ()) -> dict[str, float]:
        """One update on these groups (advantages already computed) and OPD samples."""
        samples: list[Sample] = []
        advantages: list[list[float]] = []
        for g in groups:
            for s, a in zip(g.samples, g.advantages, strict=True):
                samples.append(s)
                advantages.append([a] * len(s.response_ids))
        for o in opd:
            samples.append(o.sample)
            advantages.append(o.advantages())
        if not samples:
            raise ValueError("a training step needs at least one group with signal or one OPD sample")
        # The loss is a token mean over the whole batch: each micro-batch adds its token mean weighted by its
        # share of the batch's tokens, so the summed gradient is the whole batch's, in bounded memory.
        total_tokens = max(1, sum(len(s.response_ids) for s in samples))
        self.optimizer.zero_grad(set_to_none=True)
        metrics: dict[str, float] = {}
        adv_abs = 0.0
        for chunk in self.micro_batches(samples):
            sub = [samples[i] for i in chunk]
            logp, mask = self.response_logprobs(sub)
            ref_logp, _ = self.response_logprobs(sub, reference=True)
            old = torch.zeros_like(logp)
            adv = torch.zeros_like(logp)
            for row, i in enumerate(chunk):
                s = samples[i]
                assert s.old_logprobs is not None
                n = len(s.response_ids)
                old[row, :n] = torch.tensor(s.old_logprobs[:n])
                adv[row, :n] = torch.tensor(advantages[i][:n])
            loss, part = grpo_tcr_loss(
                logp,
                old,
                ref_logp,
                adv,
                mask,
                eps_low=self.settings.eps_low,
                eps_high=self.settings.eps_high,
                beta=self.settings.beta_kl,
            )
            weight = float(mask.sum()) / total_tokens
            torch.autograd.backward(loss * weight)
            for key, value in part.items():
                metrics[key] = metrics.get(key, 0.0) + (value if key == "valid_tokens" else value * weight)
            adv_abs += float(masked_mean(adv.abs(), mask)) * weight
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.settings.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.steps_done += 1
        metrics.update(
            step=float(self.steps_done),
            grad_norm=grad_norm if math.isfinite(grad_norm) else float("nan"),
            lr=float(self.scheduler.get_last_lr()[0]),
            samples=float(len(samples)),
            opd_samples=float(len(opd)),
            reward_mean=_mean([s.reward for g in groups for s in g.samples]),
            advantage_abs_mean=adv_abs,
            tokens=float(total_tokens),
        )
        return metrics

    def micro_batches(self, samples: Sequence[Sample]) -> list[list[int]]:
        """Indices of `samples` in consecutive runs whose padded size (count x longest) fits
        `training.micro_batch_tokens`; a single longer sample still gets a run of its own."""
        budget = self.settings.micro_batch_tokens
        runs: list[list[int]] = []
        current: list[int] = []
        longest = 0
        for i, s in enumerate(samples):
            size = len(self._clip_prompt(s.prompt_ids)) + len(s.response_ids)
            if current and (len(current) + 1) * max(longest, size) > budget:
                runs.append(current)
                current, longest = [], 0
            current.append(i)
            longest = max(longest, size)
        if current:
            runs.append(current)
        return runs

    def sample_batch(self, items: Sequence[T], size: int) -> list[T]:
        """`size` of `items` drawn without replacement by the trainer's seeded generator (all when fewer)."""
        if len(items) <= size:
            return list(items)
        return self._random.sample(list(items), size)

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the trained (LoRA) weights, to come back to with `restore`."""
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def restore(self, weights: dict[str, Tensor], steps_done: int) -> None:
        """Put back the weights `snapshot` took after `steps_done` steps (the optimiser state is not kept)."""
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in weights:
                    p.copy_(weights[n])
        self.steps_done = steps_done

    def save(self, out_dir: Path) -> Path:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out_dir))
        return out_dir

    def base_weights_checksum(self) -> float:
        """A cheap fingerprint of the frozen base weights (tests check they never move)."""
        total = 0.0
        for name, p in self.model.named_parameters():
            if "lora_" not in name:
                total += float(p.detach().double().sum())
        return total
