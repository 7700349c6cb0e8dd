"""`heedful train`: collect rollouts, train each scope that has enough new ones, gate, publish.

One round for one scope: load its pending rollouts as judged groups and OPD samples (dataset.py),
start from the scope's active adapter (or a fresh LoRA), run `training.steps_per_round` GRPO-TCR
steps, then gate (finite loss, KL to the reference on held-out general code, perplexity within the
margin) and publish (publish.py): a passing adapter becomes active, a failing one is recorded rejected
with its reasons and the active one stays. Every `training.gate_check_steps` steps (and after the
last) the round measures the same gates; when a check fails it stops there and goes back to the weights
of the last check that passed, so a round that would train past the margin publishes what it had
learnt before it did. Every step's metrics are stored with the version row.

The worker shares the machine with serving: it lowers its own priority (`training.nice`) and caps
torch's threads (`training.threads`). Scopes are trained one at a time and never mixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.lifecycle import (
    ScopePurgedError,
    clean_partial,
    publish_adapter,
    purge_mark,
    resolve_adapters_root,
    trainer_workdir,
)
from kernel import paths
from kernel.fim import fim_template_for
from kernel.settings import Settings
from personalization import humaneval
from personalization.gates import (
    GateResult,
    check_gates,
    general_code_slice,
    humaneval_passes,
    kl_and_perplexity,
    perplexity,
)
from personalization.opd import build_opd_samples
from personalization.rollouts import CollectStats, RolloutCollector, settle_seconds
from personalization.trainer_lock import TrainerLock
from server.engine.machine import cpu_model
from server.engine.tokens import LocalTokenizer
from storage.adapter_files import remove_empty_scope_dir
from storage.models import RolloutStatus
from storage.repositories import (
    AdapterRepository,
    AuditRepository,
    PurgeMark,
    PurgeRepository,
    RolloutRepository,
    Scope,
    ScopeControlRepository,
    TrainingStatusRepository,
)
from storage.round_metrics import RoundMetrics, humaneval_figures
from storage.store import RolloutStore

if TYPE_CHECKING:
    from personalization.dataset import TrainingData
    from personalization.samples import Group
    from personalization.trainer import LoraTrainer

# The dataset, the judge and the trainer import torch (seconds, hundreds of MB); they are imported when a
# round trains, so a worker that waits (for rollouts, or standing by for another worker) stays light.

log = logging.getLogger(__name__)

# Held-out text for the KL and perplexity gates: enough to be stable, small enough for a CPU.
GATE_TEXTS = 6
GATE_MAX_TOKENS = 256
HUMANEVAL_SEED = 0  # the ability gate's cases are the same in every round and for every scope
# A round keeps room for its end: the adapter's HumanEval pass writes longer answers than the base's (92-100 s
# against a base pass of 54-70 s on Qwen2.5-Coder-0.5B, 2 AMD EPYC cores: two rounds ran 2 s and 14 s over
# 600 s while reserving the base's time), so the base's time is reserved with this margin, and then the save.
ADAPTER_HUMANEVAL_MARGIN = 1.6
SAVE_RESERVE_S = 5.0
PROGRESS_S = 2.0  # how often a running round's phase and step are looked at, and written when they changed
PROGRESS_BEAT_S = 60.0  # and written at least this often


@dataclass(slots=True)
class RoundResult:
    scope: Scope
    status: str  # "published", "rejected", "skipped", or "discarded" (its scope was purged while it trained)
    reason: str
    version_id: str | None = None
    metrics: RoundMetrics = field(default_factory=RoundMetrics)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": str(self.scope),
            "status": self.status,
            "reason": self.reason,
            "version": self.version_id,
            "metrics": {k: v for k, v in self.metrics.as_json().items() if k != "steps"},
        }


def lower_priority(settings: Settings) -> None:
    """Yield the CPU to serving: niceness now; torch's threads are capped when a round starts (`cap_threads`),
    so that a worker waiting for rollouts, or standing by, never loads torch."""
    try:
        current = os.nice(0)
        if settings.training.nice > current:
            os.nice(settings.training.nice - current)
    except OSError as exc:
        log.warning("could not lower the training worker's priority: %s", exc)


def cap_threads(threads: int) -> None:
    """At most `threads` torch threads for this process (`training.threads`; 0: one per core it may use)."""
    import torch

    torch.set_num_threads(threads or usable_cores())


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


async def collect(store: RolloutStore, settings: Settings) -> CollectStats:
    collector = RolloutCollector(
        rewrite_threshold=settings.feedback.survival_rewrite_threshold,
        settle_s=settle_seconds(settings.feedback.edit_snapshot_delays_s),
    )
    async with store.unit() as s:
        return await collector.collect(s)


async def pending_scopes(store: RolloutStore) -> dict[Scope, int]:
    async with store.unit() as s:
        return await RolloutRepository(s).pending_counts()


async def train_round(
    store: RolloutStore,
    settings: Settings,
    scope: Scope,
    *,
    tokenizer: LocalTokenizer,
    adapters_root: Path | None = None,
    force: bool = False,
) -> RoundResult:
    """Train one round for `scope` from its pending rollouts; publish or reject the result.

    A purge that concerns the scope once the round has started discards the round: nothing is published
    and its output folder is removed (see `adapters.lifecycle.purge_mark`).
    """
    t = settings.training
    mark = await purge_mark(store, scope)  # before any rollout is read
    async with store.unit() as s:
        pending = await RolloutRepository(s).count_pending(scope)
    if not pending:
        return RoundResult(scope, "skipped", "no pending rollouts")
    if pending < t.min_new_rollouts and not force:
        return RoundResult(
            scope,
            "skipped",
            f"{pending} new rollouts, fewer than training.min_new_rollouts = {t.min_new_rollouts}",
        )
    progress = RoundProgress(steps=t.steps_per_round)
    await _record_status(store, lambda r: r.started(scope, rollouts=pending, steps=t.steps_per_round))
    beat = asyncio.create_task(_report_progress(store, scope, progress))
    try:
        result = await _round(store, settings, scope, tokenizer, adapters_root, mark, progress)
    except BaseException as exc:
        beat.cancel()
        failure = f"{type(exc).__name__}: {exc}"
        await _record_status(store, lambda r: r.finished(scope, "failed", failure, None))
        raise
    beat.cancel()
    await _record_status(store, lambda r: r.finished(scope, result.status, result.reason, result.version_id))
    return result


@dataclass(slots=True)
class RoundProgress:
    """Where a running round is: set by the training thread, written to the store by `_report_progress`."""

    steps: int
    phase: str = "loading"
    step: int = 0


async def _report_progress(store: RolloutStore, scope: Scope, progress: RoundProgress) -> None:
    """Write the round's phase and step when they change, and at least every `PROGRESS_BEAT_S` (a round
    not heard of for `server.learning.STALE_S` counts as dead)."""
    last: tuple[str, int] | None = None
    written = time.monotonic()
    while True:
        await asyncio.sleep(PROGRESS_S)
        now = (progress.phase, progress.step)
        if now != last or time.monotonic() - written >= PROGRESS_BEAT_S:
            last, written = now, time.monotonic()
            await _record_status(store, functools.partial(_write_progress, scope=scope, at=now, steps=progress.steps))


async def _write_progress(r: TrainingStatusRepository, *, scope: Scope, at: tuple[str, int], steps: int) -> None:
    await r.progress(scope, at[0], at[1], steps)


async def _record_status(store: RolloutStore, write: Callable[[TrainingStatusRepository], Awaitable[None]]) -> None:
    """Keep the scope's training status (what `heedful/status` shows); a failure to is logged, never fatal."""
    try:
        async with store.unit() as s:
            await write(TrainingStatusRepository(s))
    except Exception as exc:
        log.warning("could not record the training status: %s", exc)


async def _round(
    store: RolloutStore,
    settings: Settings,
    scope: Scope,
    tokenizer: LocalTokenizer,
    adapters_root: Path | None,
    mark: PurgeMark,
    progress: RoundProgress,
) -> RoundResult:
    from personalization.dataset import load_training_data
    from personalization.judge import LazyScopePRM, fit_scope_prm, prm_examples

    t = settings.training
    cap_threads(t.threads)
    started = time.monotonic()
    deadline = started + t.round_budget_s
    async with store.unit() as s:
        examples = await prm_examples(s, scope)
    prm = LazyScopePRM(
        functools.partial(
            fit_scope_prm,
            settings.model_path(),
            examples,
            min_accuracy=settings.thresholds.prm_min_accuracy,
            votes=t.prm_votes,
            seed=t.seed,
        ),
        examples=len(examples),
    )
    async with store.unit() as s:
        # The PRM is fitted (if a candidate needs it) and votes on this thread: the worker serves nothing.
        data = await load_training_data(s, scope, t, tokenize=tokenizer.encode, prm=prm, eos=tokenizer.eos_token_id)
        active = await AdapterRepository(s).active(scope)
    init = Path(active.path) if active else None
    root = resolve_adapters_root(adapters_root)
    workdir = trainer_workdir(root, scope)  # in the scope's folder: a purge of the scope removes it too
    try:
        result = await asyncio.to_thread(
            _train,
            settings,
            data,
            tokenizer,
            init,
            prm.report.get("held_out_accuracy"),
            workdir / "adapter",
            progress=progress,
            deadline=deadline,
        )
    except Exception:
        purged = await _discarded(store, scope, mark, root, workdir)  # a purge may have taken `init` away
        if purged is not None:
            return purged
        raise
    trainer_dir, metrics, gate = result
    metrics.prm = prm.report
    metrics.seconds = round(time.monotonic() - started, 1)
    metrics.timing["prm_fit"] = round(prm.seconds, 1)
    if trainer_dir is None:
        await _mark(store, scope, data, RolloutStatus.TRAINED, "no signal: every group's rewards were equal")
        return RoundResult(scope, "skipped", metrics.reason or "no signal", metrics=metrics)
    assert gate is not None and metrics.steps_done is not None and metrics.gate_kl is not None
    try:
        published = await publish_adapter(
            store,
            scope,
            trainer_dir,
            step=metrics.steps_done,
            kl=metrics.gate_kl,
            metrics=metrics.as_json(),
            adapters_root=root,
            parent_id=active.id if active else None,
            gate=gate,
            purge_mark=mark,
        )
    except ScopePurgedError as exc:
        return RoundResult(scope, "discarded", str(exc), metrics=metrics)
    finally:
        await asyncio.to_thread(_remove_workdir, root, scope, workdir)
    status = "published" if gate.passed else "rejected"
    await _mark(store, scope, data, RolloutStatus.TRAINED, f"round {published.version_id}: {status}")
    return RoundResult(scope, status, gate.summary(), published.version_id, metrics)


async def _discarded(
    store: RolloutStore, scope: Scope, mark: PurgeMark, root: Path, workdir: Path
) -> RoundResult | None:
    """The result of a round whose scope was purged since `mark` (its work folder removed), else None."""
    async with store.unit() as s:
        purged = await PurgeRepository(s).purged_since(scope, mark)
    if not purged:
        return None
    await asyncio.to_thread(_remove_workdir, root, scope, workdir)
    return RoundResult(scope, "discarded", f"{', '.join(purged)} purged while the round trained: nothing published")


def _remove_workdir(root: Path, scope: Scope, workdir: Path) -> None:
    shutil.rmtree(workdir, ignore_errors=True)
    remove_empty_scope_dir(root, scope)  # after a purge, not even the scope's folder name stays


def _train(
    settings: Settings,
    data: TrainingData,
    tokenizer: LocalTokenizer,
    init: Path | None,
    prm_accuracy: float | None,
    out: Path | None = None,
    *,
    progress: RoundProgress | None = None,
    deadline: float | None = None,
) -> tuple[Path | None, RoundMetrics, Any]:
    """One round's training, gates and save: (the saved adapter folder or None, metrics, the gate verdict).

    `out` is where the adapter is saved (a round passes a folder from `trainer_workdir`); a new temporary
    folder when None. `progress` is kept up to date for `heedful/status`. With a `deadline` (a
    `time.monotonic()` value, from `training.round_budget_s`) the round takes no step that would leave too
    little time for the final gates (as long as the slowest step, gate check and HumanEval pass so far took),
    and goes to them with the weights it has."""
    from personalization.trainer import LoraTrainer, finalize_groups

    t = settings.training
    timing = Timing()
    with timing("load"):
        trainer = LoraTrainer(settings.model_path(), t, init_adapter=init)
        base_fingerprint = trainer.base_weights_checksum()
    # Group members whose stored pi_old is unusable take the policy of their first step; corrections need
    # theirs now (OPD advantages are teacher minus pi_old).
    recomputed = trainer.drop_unusable_old_logprobs([s for g in data.groups for s in g.samples])
    with timing("old_logprobs"):
        recomputed += trainer.fill_old_logprobs([c.sample for c in data.corrections])
    with timing("opd_teacher"):
        opd, opd_stats = build_opd_samples(
            data.corrections, trainer.teacher_logprobs, tokenizer.encode, max_prompt_tokens=trainer.max_prompt_tokens
        )
    groups, masked = finalize_groups(data.groups)
    metrics = RoundMetrics(
        rollouts=len(data.rollout_ids),
        groups=len(data.groups),
        groups_masked_all_equal=masked,
        demonstrations=data.demonstrations,
        judged=dict(data.judged),
        opd_samples=opd_stats.used,
        opd_dropped=opd_stats.dropped_total,
        opd_dropped_by_reason=dict(opd_stats.dropped),
        old_logprobs_recomputed=recomputed,
        timing=timing.seconds,
    )
    if not groups and not opd:
        metrics.reason = f"no signal: all {masked} groups had equal rewards and there were no corrections"
        return None, metrics, None
    losses: list[float] = []
    opd_batch = max(1, t.batch_size // 4) if opd else 0
    refresh = t.old_policy_refresh_steps
    texts = general_code_slice()[:GATE_TEXTS]
    progress = progress or RoundProgress(steps=t.steps_per_round)
    progress.phase = "measuring the base"
    with timing("gates"), trainer.autocast():
        started = time.monotonic()
        ppl_base = perplexity(trainer.model, tokenizer, texts, max_tokens=GATE_MAX_TOKENS, without_adapter=True)
        check_s = 2 * (time.monotonic() - started)  # a check runs the adapter and the reference
    he_cases: list[humaneval.InfillCase] = []
    he_base: list[bool] = []
    he_s = 0.0
    if settings.thresholds.humaneval_cases:
        with timing("humaneval"):
            he_cases, he_base, he_s = base_ability(trainer, tokenizer, settings)
    checks: list[dict[str, Any]] = []
    passed_at: tuple[int, dict[str, Any]] | None = None  # (steps done, the LoRA weights then)
    measured: tuple[float, float, GateResult] | None = None  # the gates on the current weights, if measured
    step_s = 0.0
    for step_no in range(t.steps_per_round):
        if deadline is not None and step_no:
            due_check = bool(t.gate_check_steps) and (step_no + 1) % t.gate_check_steps == 0
            if time.monotonic() + end_reserve_s(step_s, check_s, he_s, due_check=due_check) > deadline:
                metrics.stopped_budget = (
                    f"stopped after {step_no} of {t.steps_per_round} steps: training.round_budget_s = "
                    f"{t.round_budget_s:.0f} leaves no time for another step ({step_s:.0f} s) and the final gates"
                )
                break
        progress.phase, progress.step = "training", step_no + 1
        if refresh and step_no and step_no % refresh == 0:
            trainer.refresh_old_logprobs([s for g in groups for s in g.samples])
        batch: list[Group] = trainer.sample_batch(groups, t.batch_size) if groups else []
        opd_part = trainer.sample_batch(opd, opd_batch)
        step_started = time.monotonic()
        step = trainer.step(batch, opd_part)
        step["seconds"] = time.monotonic() - step_started
        step_s = max(step_s, step["seconds"])
        timing.add("steps", step["seconds"])
        losses.append(step["loss"])
        if prm_accuracy is not None:
            step["prm_accuracy"] = prm_accuracy
        metrics.steps.append({k: round(v, 6) for k, v in step.items()})
        measured = None
        if not math.isfinite(step["loss"]):
            break
        done = step_no + 1
        last = done == t.steps_per_round
        if t.gate_check_steps and (done % t.gate_check_steps == 0 or last):
            progress.phase = "checking the gates"
            check_started = time.monotonic()
            with timing("gates"):
                measured = measure_gates(trainer, tokenizer, texts, ppl_base, settings, losses)
            check_s = max(check_s, time.monotonic() - check_started)
            kl, ppl, verdict = measured
            trainer.model.train()
            checks.append({"step": done, "kl": round(kl, 6), "perplexity": round(ppl, 4), "passed": verdict.passed})
            if verdict.passed:
                if not last:
                    passed_at = (done, trainer.snapshot())
                continue
            if passed_at is not None:
                trainer.restore(passed_at[1], passed_at[0])
                losses = losses[: passed_at[0]]
                measured = None
            metrics.stopped_early = (
                f"the gates failed at step {done} (KL {kl:.4f}, perplexity {ppl:.3f} against {ppl_base:.3f}); "
                + (f"kept the weights of step {passed_at[0]}" if passed_at else "no earlier check passed")
            )
            break
    # The last check measured these very weights unless the round went back to an earlier check.
    progress.phase = "checking the gates"
    with timing("gates"):
        kl, ppl_adapter, gate = measured or measure_gates(trainer, tokenizer, texts, ppl_base, settings, losses)
    if settings.thresholds.humaneval_cases:
        progress.phase = "checking HumanEval"
        with timing("humaneval"):
            he = (he_base, adapter_ability(trainer, tokenizer, settings, he_cases))
        gate = check_gates(
            **_gate_inputs(losses, kl, ppl_base, ppl_adapter, settings),
            humaneval=he,
            humaneval_max_drop=settings.thresholds.humaneval_max_drop,
        )
        # HumanEval runs once, at the end; when the last steps cost ability, the weights of the last gate
        # check that passed are measured instead, if the round's budget still has room for it.
        room = deadline is None or time.monotonic() + end_reserve_s(0.0, check_s, he_s, due_check=False) <= deadline
        if not gate.passed and passed_at is not None and passed_at[0] < trainer.steps_done and room:
            failed_at, failure = trainer.steps_done, gate.summary()
            trainer.restore(passed_at[1], passed_at[0])
            losses = losses[: passed_at[0]]
            with timing("gates"):
                kl, ppl_adapter, _ = measure_gates(trainer, tokenizer, texts, ppl_base, settings, losses)
            with timing("humaneval"):
                he = (he_base, adapter_ability(trainer, tokenizer, settings, he_cases))
            gate = check_gates(
                **_gate_inputs(losses, kl, ppl_base, ppl_adapter, settings),
                humaneval=he,
                humaneval_max_drop=settings.thresholds.humaneval_max_drop,
            )
            metrics.stopped_early = (
                f"the ability gate failed at step {failed_at} ({failure}); measured the weights of step "
                f"{passed_at[0]}, the last gate check that passed, instead"
            )
    metrics.gate_checks = checks
    metrics.steps_done = trainer.steps_done
    metrics.final_loss = losses[-1]
    metrics.gate_kl, metrics.perplexity_base, metrics.perplexity_adapter = kl, ppl_base, ppl_adapter
    metrics.gate = gate.summary()
    metrics.base_weights_unchanged = trainer.base_weights_checksum() == base_fingerprint
    metrics.humaneval = humaneval_figures(gate.metrics)
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="heedful-train-")) / "adapter"
    progress.phase = "saving"
    trainer.save(out)
    return out, metrics, gate


def end_reserve_s(step_s: float, check_s: float, he_s: float, *, due_check: bool) -> float:
    """Seconds a round must still have to take one more step: the step (`step_s`, the slowest so far), the
    gate check it brings when one is due and the final one (`check_s` each), the adapter's HumanEval pass
    (the base's `he_s`, with `ADAPTER_HUMANEVAL_MARGIN`) and the save."""
    checks = 2 if due_check else 1
    return step_s + check_s * checks + he_s * ADAPTER_HUMANEVAL_MARGIN + SAVE_RESERVE_S


class Timing:
    """Seconds spent per phase of a round (load, old_logprobs, opd_teacher, steps, gates), summed."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + seconds, 2)

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.add(phase, time.monotonic() - started)


def measure_gates(
    trainer: LoraTrainer,
    tokenizer: LocalTokenizer,
    texts: list[str],
    ppl_base: float,
    settings: Settings,
    losses: list[float],
) -> tuple[float, float, GateResult]:
    """The publishing gates on the trainer's current weights: (KL, adapter perplexity, the verdict)."""
    trainer.model.eval()
    with trainer.autocast():
        kl, ppl = kl_and_perplexity(trainer.model, tokenizer, texts, max_tokens=GATE_MAX_TOKENS)
    return kl, ppl, check_gates(**_gate_inputs(losses, kl, ppl_base, ppl, settings))


def _gate_inputs(losses: list[float], kl: float, ppl_base: float, ppl: float, settings: Settings) -> dict[str, Any]:
    th = settings.thresholds
    return {
        "loss_values": losses,
        "kl": kl,
        "perplexity_base": ppl_base,
        "perplexity_adapter": ppl,
        "kl_max": th.kl_max,
        "perplexity_margin": th.perplexity_margin,
        "loss_max": th.loss_divergence,
    }


def base_ability(
    trainer: LoraTrainer, tokenizer: LocalTokenizer, settings: Settings
) -> tuple[list[humaneval.InfillCase], list[bool], float]:
    """The ability gate's cases, which of them the base passes, and how long one pass over them takes.

    Asked as serving asks (the model's FIM template unless `model.fim_template` says otherwise). The base's
    results are the same in every round on this machine: they are kept in the cache dir, keyed by
    everything they depend on, and measured again when any of it changes."""
    cases = humaneval.sample_cases(settings.thresholds.humaneval_cases, random.Random(HUMANEVAL_SEED))
    template = fim_template_for(settings.model.fim_template, tokenizer.vocabulary())
    cache = _base_results_path(settings.model_path(), [c.name for c in cases], template, str(trainer.compute_dtype))
    cached = _read_base_results(cache, len(cases))
    if cached is not None:
        return cases, cached[0], cached[1]
    started = time.monotonic()
    base = humaneval_passes(
        trainer.model, tokenizer, cases, template=template, without_adapter=True, autocast=trainer.autocast()
    )
    seconds = time.monotonic() - started
    _write_base_results(cache, base, seconds)
    return cases, base, seconds


def adapter_ability(
    trainer: LoraTrainer, tokenizer: LocalTokenizer, settings: Settings, cases: list[humaneval.InfillCase]
) -> list[bool]:
    """Which of the ability gate's cases the trained adapter passes."""
    template = fim_template_for(settings.model.fim_template, tokenizer.vocabulary())
    return humaneval_passes(trainer.model, tokenizer, cases, template=template, autocast=trainer.autocast())


def _base_results_path(model: Path, cases: list[str], template: str | None, dtype: str) -> Path:
    model = model.resolve()
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model.iterdir() if p.is_file())
    key = json.dumps(
        {
            "model": str(model),
            "files": files,
            "cases": cases,
            "template": template,
            "dtype": dtype,
            "cpu": cpu_model(),
            "asked": "healed",  # how the cases are prompted (humaneval_passes): results from before do not count
        },
        sort_keys=True,
    )
    return paths.cache_dir() / "humaneval-base" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _read_base_results(path: Path, count: int) -> tuple[list[bool], float] | None:
    """The cached results and the seconds their measurement took (a cache written before the seconds were
    kept is re-measured)."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    results = cached.get("results") if isinstance(cached, dict) else None
    seconds = cached.get("seconds") if isinstance(cached, dict) else None
    if (
        not isinstance(results, list)
        or len(results) != count
        or not all(isinstance(r, bool) for r in results)
        or not isinstance(seconds, int | float)
    ):
        log.warning("ignoring the unreadable cached HumanEval results of the base at %s", path)
        return None
    return results, float(seconds)


def _write_base_results(path: Path, results: list[bool], seconds: float) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps({"results": results, "seconds": round(seconds, 2)}), encoding="utf-8")
        partial.replace(path)
    except OSError as exc:  # a cache: the next round measures again
        log.warning("could not cache the base's HumanEval results at %s: %s", path, exc)


async def _mark(store: RolloutStore, scope: Scope, data: TrainingData, status: RolloutStatus, reason: str) -> None:
    async with store.unit() as s:
        await RolloutRepository(s).mark(scope, data.rollout_ids, status, reason)


async def run_worker(
    store: RolloutStore,
    settings: Settings,
    *,
    once: bool,
    scope: Scope | None,
    interval_s: float = 30.0,
    adapters_root: Path | None = None,
    force: bool = False,
) -> list[RoundResult]:
    """Collect and train until stopped (or one pass with `once`); returns the rounds run.

    Only one worker trains a store at a time (`personalization.trainer_lock`): with `once` a worker that
    finds another raises `TrainerBusy`; otherwise it stands by, checking every `interval_s`, until the
    other one stops.
    """
    lock = TrainerLock(settings.database.url)
    if once:
        lock.acquire_or_raise()
    elif not lock.try_acquire():
        # A warning: `heedful train` logs warnings only unless -v, and a worker that does nothing must say why.
        log.warning(
            "standing by: another training worker (%s) is training this store (lock %s)", lock.holder(), lock.path
        )
        while not lock.try_acquire():
            await asyncio.sleep(interval_s)
        log.warning("the other training worker stopped; this one trains the store now")
    try:
        return await _run_locked(
            store, settings, once=once, scope=scope, interval_s=interval_s, adapters_root=adapters_root, force=force
        )
    finally:
        lock.release()


async def _run_locked(
    store: RolloutStore,
    settings: Settings,
    *,
    once: bool,
    scope: Scope | None,
    interval_s: float,
    adapters_root: Path | None,
    force: bool,
) -> list[RoundResult]:
    tokenizer = LocalTokenizer(settings.model_path())
    root = resolve_adapters_root(adapters_root)
    # Safe: no other worker of this store is writing one now (the lock).
    removed = await clean_partial(store, root)
    if removed:
        log.warning("removed %d half-written adapter folder(s) left by a crash: %s", len(removed), removed)
    results: list[RoundResult] = []
    while True:
        stats = await collect(store, settings)
        if stats.rollouts:
            log.info("collected %d rollouts from %d completions", stats.rollouts, stats.completions)
        scopes = [scope] if scope is not None else list(await pending_scopes(store))
        async with store.unit() as s:
            paused = await ScopeControlRepository(s).paused()
        for sc in scopes:
            if sc in paused:
                reason = f"training is paused for {sc}: {paused[sc]} (heedful adapters resume --scope {sc})"
                results.append(RoundResult(sc, "skipped", reason))
                log.info("round for %s: skipped (%s)", sc, reason)
                continue
            result = await train_round(store, settings, sc, tokenizer=tokenizer, adapters_root=root, force=force)
            log.info("round for %s: %s (%s)", sc, result.status, result.reason)
            if result.status != "skipped":
                async with store.unit() as s:
                    await AuditRepository(s).add(
                        actor="trainer",
                        action=f"train:{result.status}",
                        scope=sc,
                        reason=result.reason,
                        detail=result.as_dict(),
                    )
            results.append(result)
        if once:
            return results
        await asyncio.sleep(interval_s)
