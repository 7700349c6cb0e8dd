"""The LoRA trainer: GRPO-TCR on judged groups and on-policy distillation on corrections.

`LoraTrainer` holds the policy (the base model with a peft LoRA adapter, trainable), the frozen
reference (the same model with the adapter disabled: no second copy in memory), AdamW with a cosine
schedule and gradient clipping. `step` takes groups and OPD samples, computes per-token log-probs of
the responses under the policy and the reference, and applies `grpo_tcr_loss` (one call: group
advantages broadcast over tokens, OPD advantages per token).

Log-probs are computed for response tokens only: the base model's hidden states at those positions
go through the LM head, so the vocabulary (151k words for the default model) is never materialised
for the prompt. The candidates of a group share one forward pass over their prompt.

What it must not do: read or write the store, judge, or decide when to train (worker.py does).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from kernel.settings import TrainingSettings
from personalization.grpo import group_advantages, grpo_tcr_loss, masked_mean
from personalization.opd import OPDSample
from personalization.samples import Group, Sample

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def token_advantages(advantage: float, departs: Sequence[bool] | None, length: int, credit: str) -> list[float]:
    """The advantage of each of a response's `length` tokens.

    `sequence` credit broadcasts the sample's advantage over every token. `edit` credit does the same for
    a non-negative advantage, but puts a negative one only on the tokens that depart from the kept text
    (`departs`), so the tokens the developer kept are not pushed down with the ones they changed; with no
    departing token known it falls back to the whole sequence.
    """
    if credit == "edit" and advantage < 0 and departs is not None and len(departs) == length and any(departs):
        return [advantage if d else 0.0 for d in departs]
    return [advantage] * length


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
        self.compute_dtype = resolve_compute_dtype(settings.compute_dtype)
        if self.compute_dtype == torch.bfloat16:
            # Autocast would cast every frozen projection to bfloat16 in every pass; store them so once (the
            # matmuls see the same values, the model takes half the memory). Norms and embeddings stay float32.
            for module in base.modules():
                if isinstance(module, torch.nn.Linear):
                    module.to(torch.bfloat16)
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
        wrong = sorted({str(p.dtype) for p in params if p.dtype != torch.float32})
        if wrong:
            raise RuntimeError(f"the adapter's trainable weights must be float32 (AdamW's state), found {wrong}")
        self.optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, 0, settings.schedule_steps)
        self.steps_done = 0
        # The reference (the base with the adapter off) never changes: each sample's log-probs under it are
        # computed once per trainer, keyed by the sample object (kept alive here so its id is not reused).
        self._reference: dict[int, tuple[Sample, list[float]]] = {}

    # -- log-probs -----------------------------------------------------------------------------------

    def autocast(self) -> Any:
        """The forward passes' precision context (see `training.compute_dtype`); every pass through
        `model` runs in it (in bfloat16 the frozen projections are stored in bfloat16)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.compute_dtype == torch.bfloat16)

    def _clip_prompt(self, prompt_ids: list[int]) -> list[int]:
        return prompt_ids[-self.max_prompt_tokens :] if self.max_prompt_tokens else prompt_ids

    def response_logprobs(self, samples: Sequence[Sample], *, reference: bool = False) -> tuple[Tensor, Tensor]:
        """Per-token log-probs [B, T] of each sample's response (and the [B, T] mask of real tokens).

        Samples that share a prompt (a group's candidates, its demonstration) share its forward pass: the
        prompt runs once, its key/value cache is repeated for each response, and the responses run on top
        of it, so a group of G costs one prompt and G responses instead of G prompts. Gradients flow
        through the shared prompt's cache as they would through G copies of it.
        """
        t_max = max(len(s.response_ids) for s in samples)
        mask = torch.zeros((len(samples), t_max), dtype=torch.float32)
        for i, s in enumerate(samples):
            mask[i, : len(s.response_ids)] = 1.0
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(samples):
            by_prompt.setdefault(tuple(self._clip_prompt(s.prompt_ids)), []).append(i)
        rows: list[Tensor] = [torch.empty(0)] * len(samples)
        with contextlib.ExitStack() as stack:
            if reference:
                stack.enter_context(torch.no_grad())
                stack.enter_context(self.model.disable_adapter())
            for prompt, members in by_prompt.items():
                logps = self._shared_prompt_logprobs(list(prompt), [samples[i].response_ids for i in members])
                for i, row in zip(members, logps, strict=True):
                    rows[i] = row
        out = torch.stack([torch.nn.functional.pad(r, (0, t_max - r.shape[0])) for r in rows])
        return out, mask

    def _shared_prompt_logprobs(self, prompt: list[int], responses: Sequence[list[int]]) -> list[Tensor]:
        """Log-probs of each response's tokens after one prompt, the prompt computed once."""
        if not prompt:
            raise ValueError(
                "a training sample needs at least one prompt token (its first response token "
                "is predicted from the prompt's last state); drop samples with an empty prompt"
            )
        inner = self.model.get_base_model()
        n, width = len(responses), max(len(r) for r in responses)
        response_ids = torch.zeros((n, width), dtype=torch.long)
        response_mask = torch.zeros((n, width), dtype=torch.long)
        for j, r in enumerate(responses):
            response_ids[j, : len(r)] = torch.tensor(r)
            response_mask[j, : len(r)] = 1
        with self.autocast():
            head = inner.model(input_ids=torch.tensor([prompt]), use_cache=True)
            cache = head.past_key_values
            cache.batch_repeat_interleave(n)
            attention = torch.cat([torch.ones((n, len(prompt)), dtype=torch.long), response_mask], dim=1)
            positions = torch.arange(len(prompt), len(prompt) + width).unsqueeze(0).expand(n, -1)
            hidden = inner.model(
                input_ids=response_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            first = head.last_hidden_state[0, -1:]  # the prompt's last state predicts each response's first token
            # State t of a response predicts its token t + 1; one LM-head pass over every response's states.
            states = torch.cat([torch.cat([first, hidden[j, : len(r) - 1]]) for j, r in enumerate(responses)])
            logits = inner.lm_head(states).float()
        targets = torch.tensor([tok for r in responses for tok in r])
        picked = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        bounds = [0]
        for r in responses:
            bounds.append(bounds[-1] + len(r))
        return [picked[a:b] for a, b in itertools.pairwise(bounds)]

    @torch.no_grad()
    def fill_old_logprobs(self, samples: Sequence[Sample], batch: int = 8) -> int:
        """Compute pi_old under the current (starting) policy where the store had none usable, now
        (the OPD samples need it before their first step: their advantages are teacher minus pi_old)."""
        todo = [s for s in samples if not self._old_usable(s)]
        self.model.eval()
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            logp, mask = self.response_logprobs(chunk)
            for s, row, m in zip(chunk, logp, mask, strict=True):
                s.old_logprobs = row[m.bool()].tolist()
        self.model.train()
        return len(todo)

    def drop_unusable_old_logprobs(self, samples: Sequence[Sample]) -> int:
        """Forget the stored pi_old where it cannot serve (none, another length, a clipped prompt); each
        such sample takes the policy of the step that first uses it as pi_old (see `step`)."""
        dropped = 0
        for s in samples:
            if not self._old_usable(s):
                s.old_logprobs = None
                dropped += 1
        return dropped

    def _old_usable(self, s: Sample) -> bool:
        return (
            s.old_logprobs is not None
            and len(s.old_logprobs) == len(s.response_ids)
            and len(s.prompt_ids) <= self.max_prompt_tokens  # a clipped prompt is a different context
        )

    @torch.no_grad()
    def reference_logprobs(self, samples: Sequence[Sample]) -> Tensor:
        """Log-probs [B, T] of the samples' responses under the frozen reference, each computed once."""
        todo = [s for s in samples if self._reference.get(id(s), (None,))[0] is not s]
        if todo:
            was_training = self.model.training
            self.model.eval()  # no dropout: the reference is one fixed distribution
            logp, mask = self.response_logprobs(todo, reference=True)
            self.model.train(was_training)
            for s, row, m in zip(todo, logp, mask, strict=True):
                self._reference[id(s)] = (s, row[m.bool()].tolist())
        t_max = max(len(s.response_ids) for s in samples)
        out = torch.zeros((len(samples), t_max), dtype=torch.float32)
        for i, s in enumerate(samples):
            values = self._reference[id(s)][1]
            out[i, : len(values)] = torch.tensor(values)
        return out

    def refresh_old_logprobs(self, samples: Sequence[Sample]) -> None:
        """Start a new PPO iteration on the same data: each sample's pi_old becomes the policy of the step
        that next uses it (its ratio restarts at 1 there), at no extra forward pass."""
        for s in samples:
            s.old_logprobs = None

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
                advantages.append(token_advantages(a, s.departs, len(s.response_ids), self.settings.credit))
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
            ref_logp = self.reference_logprobs(sub)
            old = torch.zeros_like(logp)
            adv = torch.zeros_like(logp)
            for row, i in enumerate(chunk):
                s = samples[i]
                n = len(s.response_ids)
                if s.old_logprobs is None:  # first use since pi_old was refreshed: this policy is pi_old
                    s.old_logprobs = logp[row, :n].detach().tolist()
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
        """Indices of `samples` in consecutive runs whose size fits `training.micro_batch_tokens`; a single
        longer sample still gets a run of its own. A run's size is what its passes hold: each distinct
        prompt once, plus each response padded to the longest response of its prompt."""
        budget = self.settings.micro_batch_tokens
        runs: list[list[int]] = []
        current: list[int] = []
        for i in range(len(samples)):
            if current and self._run_size([samples[j] for j in [*current, i]]) > budget:
                runs.append(current)
                current = []
            current.append(i)
        if current:
            runs.append(current)
        return runs

    def _run_size(self, run: Sequence[Sample]) -> int:
        prompts: dict[tuple[int, ...], list[int]] = {}
        for s in run:
            prompts.setdefault(tuple(self._clip_prompt(s.prompt_ids)), []).append(len(s.response_ids))
        return sum(len(p) + len(lengths) * max(lengths) for p, lengths in prompts.items())

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
