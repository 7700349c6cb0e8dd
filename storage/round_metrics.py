"""What a training round measured: the typed record the worker fills, `heedful train` prints, and every
adapter version keeps as JSON (`AdapterVersion.metrics`), read back by the guards, the store's overview,
the report and the evaluation.

The JSON keeps the shape it always had: one key per field set (a round that trained nothing has no
`steps_done`; `stopped_early` only when it stopped early), the HumanEval figures as `humaneval_*` keys
beside the others. `from_json` reads any row, of any age: a missing or malformed key is its default.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

HUMANEVAL_PREFIX = "humaneval_"


@dataclass(slots=True)
class RoundMetrics:
    rollouts: int = 0  # rollouts the round read
    groups: int = 0  # GRPO groups built from them
    groups_masked_all_equal: int = 0  # groups whose members all earned the same reward (no signal)
    demonstrations: int = 0  # kept texts joined to their group as demonstrations
    judged: dict[str, int] = field(default_factory=dict)  # unshown candidates by the judge that scored them
    opd_samples: int = 0  # corrections distilled (on-policy distillation)
    opd_dropped: int = 0
    opd_dropped_by_reason: dict[str, int] = field(default_factory=dict)
    old_logprobs_recomputed: int = 0
    steps: list[dict[str, float]] = field(default_factory=list)  # per optimisation step: loss, KL, seconds...
    timing: dict[str, float] = field(default_factory=dict)  # seconds per phase of the round
    reason: str | None = None  # why the round trained nothing
    stopped_budget: str | None = None  # why it took no more steps (training.round_budget_s)
    stopped_early: str | None = None  # why it went back to an earlier gate check
    gate_checks: list[dict[str, Any]] = field(default_factory=list)
    steps_done: int | None = None
    final_loss: float | None = None
    gate_kl: float | None = None
    perplexity_base: float | None = None
    perplexity_adapter: float | None = None
    gate: Any = None  # the gate verdict: its summary from the worker, the full verdict once published
    base_weights_unchanged: bool | None = None
    humaneval: dict[str, float] = field(default_factory=dict)  # base, adapter, cases, lost, gained
    prm: dict[str, Any] | None = None  # whether the PRM was fitted, and its accuracy
    seconds: float | None = None  # the whole round

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "humaneval":
                out.update({HUMANEVAL_PREFIX + k: v for k, v in value.items()})
            elif value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, data: Any) -> RoundMetrics:
        """The record of a stored or printed metrics object; what is missing or not of its type is the
        default (rows written by older versions, or by an admin's `heedful adapters publish`)."""
        m = cls()
        if not isinstance(data, dict):
            return m
        for f in fields(cls):
            if f.name == "humaneval":
                m.humaneval = {
                    k[len(HUMANEVAL_PREFIX) :]: float(v)
                    for k, v in data.items()
                    if k.startswith(HUMANEVAL_PREFIX) and _number(v) is not None
                }
                continue
            if f.name not in data:
                continue
            value, default = data[f.name], getattr(m, f.name)
            if f.name == "gate":
                m.gate = value
            elif isinstance(default, list):
                setattr(m, f.name, [x for x in value if isinstance(x, dict)] if isinstance(value, list) else [])
            elif isinstance(default, dict) or f.name == "prm":
                setattr(m, f.name, dict(value) if isinstance(value, dict) else default)
            elif f.name in ("reason", "stopped_budget", "stopped_early"):
                setattr(m, f.name, value if isinstance(value, str) else None)
            elif f.name == "base_weights_unchanged":
                m.base_weights_unchanged = value if isinstance(value, bool) else None
            elif f.name == "steps_done":
                m.steps_done = int(value) if _number(value) is not None else None
            elif isinstance(default, int):
                setattr(m, f.name, int(value) if _number(value) is not None else default)
            else:
                setattr(m, f.name, _number(value))
        return m


def humaneval_figures(gate_metrics: Mapping[str, float]) -> dict[str, float]:
    """The HumanEval figures among a gate verdict's metrics (`humaneval_base` -> `base`, ...)."""
    return {k[len(HUMANEVAL_PREFIX) :]: v for k, v in gate_metrics.items() if k.startswith(HUMANEVAL_PREFIX)}


def _number(value: Any) -> float | None:
    """A stored number: non-finite floats come back as the strings "nan", "inf" (`publish` stores them
    so); those and anything else that is not a number read as None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
