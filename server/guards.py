"""Guards on adapters that already serve (monitoring after publishing); the rollback they act with is the
adapter lifecycle's (`adapters.lifecycle.rollback_scope`), the same as `heedful adapters rollback`'s.

Every `thresholds.guard_interval_s` the server checks each scope's active adapter against what serving
recorded since it was activated:

* accept rate: over the latest `thresholds.accept_rate_window` completions it served that have an
  outcome (accepted, partly accepted or rejected), compared with the same number of the scope's
  completions before it was activated; a drop of more than `thresholds.accept_rate_drop` rolls it back.
* latency: once it has served for `thresholds.p99_window_s`, if the p99 latency of its completions in
  that window is above `thresholds.p99_latency_ms` (at least `MIN_LATENCY_SAMPLES` of them), it is
  rolled back.
* training loss: a version whose recorded training steps diverged (a loss that is not finite or above
  `thresholds.loss_divergence`) is rolled back.
* KL: when the scope's newest adapter measured a KL to the reference above `thresholds.kl_max`, training
  for the scope is paused (`heedful adapters resume` lifts it).

Each action is one transaction that re-checks the active version first (several servers may guard the
same store), with an audit entry saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from adapters.lifecycle import rollback_scope
from kernel.settings import ThresholdSettings
from kernel.stats import percentile
from server.background import every
from storage.models import ACCEPT_KINDS, DECISION_KINDS, AdapterVersion, as_utc
from storage.repositories import (
    AdapterRepository,
    AuditRepository,
    CompletionRepository,
    EventRepository,
    Scope,
    ScopeControlRepository,
)
from storage.round_metrics import RoundMetrics
from storage.store import RolloutStore

log = logging.getLogger(__name__)

MIN_LATENCY_SAMPLES = 20


@dataclass(slots=True)
class Finding:
    """What a guard found about one scope's active adapter."""

    scope: Scope
    version_id: str
    action: str  # "rollback" or "pause_training"
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


async def _outcomes(session: AsyncSession, completion_ids: list[str]) -> dict[str, bool]:
    """Completion id -> accepted (True) or rejected (False), for those with an outcome."""
    out: dict[str, bool] = {}
    for cid, kind in await EventRepository(session).outcome_kinds(completion_ids, sorted(DECISION_KINDS)):
        out[cid] = out.get(cid, False) or kind in ACCEPT_KINDS
    return out


async def _accept_rate(
    session: AsyncSession, scope: Scope, *, version: str | None, before: datetime | None, after: datetime | None, n: int
) -> tuple[float | None, int]:
    """Accept rate over the newest `n` completions with an outcome (served by `version` when given)."""
    ids = await CompletionRepository(session).newest_ids(
        scope, version=version, before=before, after=after, limit=n * 4
    )
    outcomes = await _outcomes(session, ids)
    decided = [outcomes[i] for i in ids if i in outcomes][:n]
    if not decided:
        return None, 0
    return sum(decided) / len(decided), len(decided)


async def check_version(
    session: AsyncSession, version: AdapterVersion, th: ThresholdSettings, *, now: datetime | None = None
) -> list[Finding]:
    """What the guards find about one active version (pure reads)."""
    now = now or datetime.now(UTC)
    scope = Scope(version.scope_kind, version.scope_id)
    activated = as_utc(version.activated_at or version.created_at)
    findings: list[Finding] = []

    losses = [s.get("loss") for s in RoundMetrics.from_json(version.metrics).steps]
    bad = [x for x in losses if isinstance(x, int | float) and (not math.isfinite(x) or x > th.loss_divergence)]
    if bad:
        findings.append(
            Finding(
                scope,
                version.id,
                "rollback",
                f"training loss diverged ({bad[0]} > thresholds.loss_divergence = {th.loss_divergence})",
                {"guard": "loss"},
            )
        )

    rate_after, n_after = await _accept_rate(
        session, scope, version=version.id, before=None, after=activated, n=th.accept_rate_window
    )
    if rate_after is not None and n_after >= th.accept_rate_window:
        rate_before, n_before = await _accept_rate(
            session, scope, version=None, before=activated, after=None, n=th.accept_rate_window
        )
        if rate_before is not None and n_before >= max(1, th.accept_rate_window // 2):
            drop = rate_before - rate_after
            if drop > th.accept_rate_drop:
                findings.append(
                    Finding(
                        scope,
                        version.id,
                        "rollback",
                        f"accept rate fell from {rate_before:.2f} to {rate_after:.2f} over {n_after} completions "
                        f"(a drop of {drop:.2f} > thresholds.accept_rate_drop = {th.accept_rate_drop})",
                        {"guard": "accept_rate", "before": rate_before, "after": rate_after, "n": n_after},
                    )
                )

    window_start = now - timedelta(seconds=th.p99_window_s)
    if activated <= window_start:
        latencies = await CompletionRepository(session).latencies(scope, version.id, window_start)
        if len(latencies) >= MIN_LATENCY_SAMPLES:
            p99 = percentile(latencies, 0.99)
            if p99 > th.p99_latency_ms:
                findings.append(
                    Finding(
                        scope,
                        version.id,
                        "rollback",
                        f"p99 latency {p99:.0f} ms over the last {th.p99_window_s:.0f} s ({len(latencies)} "
                        f"completions) is above thresholds.p99_latency_ms = {th.p99_latency_ms:.0f}",
                        {"guard": "latency", "p99_ms": p99, "n": len(latencies)},
                    )
                )
    return findings


async def check_kl(session: AsyncSession, scope: Scope, th: ThresholdSettings) -> Finding | None:
    """Pause training when the scope's newest adapter measured a KL above the limit (and no admin resumed
    training since it was made)."""
    newest = await AdapterRepository(session).newest_measured(scope)
    if newest is None or newest.kl is None or newest.kl <= th.kl_max:
        return None
    control = await ScopeControlRepository(session).get(scope)
    if control is not None and as_utc(control.updated_at) >= as_utc(newest.created_at):
        return None
    return Finding(
        scope,
        newest.id,
        "pause_training",
        f"KL to the reference {newest.kl:.2f} of version {newest.id} is above thresholds.kl_max = {th.kl_max}",
        {"guard": "kl", "kl": newest.kl},
    )


async def run_guards(store: RolloutStore, th: ThresholdSettings, *, actor: str = "guard") -> list[Finding]:
    """One pass over every scope with an adapter: act on what the guards find; return the findings acted on."""
    acted: list[Finding] = []
    async with store.unit() as s:
        repo = AdapterRepository(s)
        active = await repo.all_active()
        scopes = await repo.scopes()
        paused = await ScopeControlRepository(s).paused()
        findings: list[Finding] = []
        for version in active:
            found = await check_version(s, version, th)
            if found:
                findings.append(found[0])  # one rollback per version is enough
        for scope in sorted(scopes, key=str):
            if scope not in paused:
                kl = await check_kl(s, scope, th)
                if kl is not None:
                    findings.append(kl)
    for f in findings:
        async with store.unit() as s:
            if f.action == "rollback":
                done = await rollback_scope(
                    s, f.scope, actor=actor, reason=f.reason, expect=f.version_id, detail=f.detail
                )
                if done is None:
                    continue
            else:
                await ScopeControlRepository(s).set_training_paused(f.scope, True, f.reason)
                await AuditRepository(s).add(
                    actor=actor, action="pause_training", scope=f.scope, reason=f.reason, detail=f.detail
                )
        log.warning("guard: %s %s: %s", f.action.replace("_", " "), f.scope, f.reason)
        acted.append(f)
    return acted


class Guardian:
    """Runs the guards in the background of a server process."""

    def __init__(self, store: RolloutStore, thresholds: ThresholdSettings) -> None:
        self.store = store
        self.thresholds = thresholds
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            interval = self.thresholds.guard_interval_s
            failed = f"a guard pass failed; the next one runs in {interval:.0f} s"
            loop = every(interval, functools.partial(run_guards, self.store, self.thresholds), failed, wait_first=True)
            self._task = asyncio.create_task(loop, name="guards")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


__all__ = [
    "Finding",
    "Guardian",
    "check_kl",
    "check_version",
    "run_guards",
]
