"""`heedful report`: one self-contained HTML file about what the store holds.

What it shows, for the completions, adapters and rollbacks a `ReportFilter` selects:

* a summary table: developers, completions, accept rate, correction rate, adapter versions, rollbacks;
* accept rate and correction rate per developer and arm over time (and by completion index when the
  store spans a day or less, as an evaluation's store does);
* training curves per scope: loss, KL to the reference, reward mean, clip fraction, PRM accuracy, from
  the per-step metrics each adapter version row keeps;
* adapter versions (by status) and rollbacks on a timeline;
* completion latency percentiles (p50, p95, p99) per arm, adapter against base model.

Definitions: a completion's *outcome* is accepted (an accept or partial accept event), else rejected (a
reject event), else undecided; the accept rate is accepted / decided. The correction rate is completions
with at least one correction / all completions. Percentiles are nearest-rank.

The page needs nothing from the network: plots are inline SVG written here, styles are inline, and there
is no script. Every text that comes from the store is escaped. The same store gives the same bytes.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Any

from kernel.stats import percentile
from storage.models import ACCEPT_KINDS, AdapterStatus, AdapterVersion, AuditEntry, EventKind, as_utc
from storage.repositories import CompletionFact, OutcomeEvent, ReportFilter, ReportRepository
from storage.round_metrics import RoundMetrics
from storage.store import RolloutStore

MINUTE, HOUR, DAY = 60, 3600, 86400
# Bucket sizes for the time plots, smallest first; the first giving at most MAX_BUCKETS buckets wins.
TIME_BUCKETS: tuple[tuple[int, str], ...] = (
    (MINUTE, "minute"),
    (5 * MINUTE, "5 minutes"),
    (15 * MINUTE, "15 minutes"),
    (HOUR, "hour"),
    (6 * HOUR, "6 hours"),
    (DAY, "day"),
    (7 * DAY, "week"),
    (30 * DAY, "30 days"),
)
MAX_BUCKETS = 48
MAX_INDEX_POINTS = 40
SHORT_SPAN_S = DAY  # up to this span the rates are also plotted by completion index
TIME_TICK_STEPS = (
    MINUTE,
    5 * MINUTE,
    15 * MINUTE,
    30 * MINUTE,
    HOUR,
    3 * HOUR,
    6 * HOUR,
    12 * HOUR,
    DAY,
    2 * DAY,
    7 * DAY,
    14 * DAY,
    30 * DAY,
    91 * DAY,
    365 * DAY,
)
PERCENTILES = (("p50", 0.50), ("p95", 0.95), ("p99", 0.99))
# (data-plot name, title, step metric, y axis is a 0..1 rate)
TRAINING_METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("training-loss", "Training loss", "loss", False),
    ("training-kl", "KL to the reference", "mean_kl", False),
    ("training-reward", "Reward mean", "reward_mean", False),
    ("training-clip-fraction", "Clip fraction", "clip_fraction", True),
    ("training-prm-accuracy", "PRM accuracy (held out)", "prm_accuracy", True),
)
# Every plot a report has; the two index plots only when the completions span SHORT_SPAN_S or less.
PLOTS = (
    "accept-rate-time",
    "correction-rate-time",
    "accept-rate-index",
    "correction-rate-index",
    *(name for name, *_ in TRAINING_METRICS),
    "adapter-timeline",
    "latency-percentiles",
    "latency-p95-time",
)
INDEX_PLOTS = ("accept-rate-index", "correction-rate-index")

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
DASHES = ("", "6 3", "2 3", "8 3 2 3")
STATUS_COLORS = {
    AdapterStatus.ACTIVE: "#2ca02c",
    AdapterStatus.RETIRED: "#7f7f7f",
    AdapterStatus.CANDIDATE: "#1f77b4",
    AdapterStatus.REJECTED: "#ff7f0e",
    AdapterStatus.ROLLED_BACK: "#9467bd",
}
ROLLBACK_COLOR = "#d62728"
NO_DATA = "no data yet"
NONE = "n/a"  # a rate without a denominator, a missing value


# --------------------------------------------------------------------------------------------------
# The data


@dataclass(slots=True)
class Outcome:
    shown: bool = False
    accepted: bool = False
    rejected: bool = False
    corrected: bool = False
    accepted_length: int = 0  # characters accepted (the whole suggestion, or the part taken)
    survival: float | None = None  # share of them still there at the latest edit snapshot
    survival_delay: float = -1.0

    @property
    def decided(self) -> bool:
        return self.accepted or self.rejected

    @property
    def seen(self) -> bool:
        """Shown to the developer: the editor said so, or the developer reacted to it."""
        return self.shown or self.decided or self.corrected

    @property
    def kept_chars(self) -> int:
        """Accepted characters still in place at the latest edit snapshot (all of them before one is due)."""
        if not self.accepted:
            return 0
        return round(self.accepted_length * (1.0 if self.survival is None else self.survival))

    def add(self, e: OutcomeEvent) -> None:
        if e.kind == EventKind.SHOWN:
            self.shown = True
        elif e.kind in ACCEPT_KINDS:
            self.accepted = True
            self.accepted_length = max(self.accepted_length, e.accepted_length or 0)
        elif e.kind == EventKind.REJECTED:
            self.rejected = True
        elif e.kind == EventKind.CORRECTION:
            self.corrected = True
        elif (
            e.kind == EventKind.EDIT_SNAPSHOT
            and e.survival_ratio is not None
            and (e.delay_s or 0.0) >= self.survival_delay
        ):
            # The latest snapshot decides. A rejected suggestion's (what was written instead) counts for
            # nothing: nothing of it was accepted.
            self.survival, self.survival_delay = e.survival_ratio, e.delay_s or 0.0


@dataclass(slots=True)
class Tally:
    completions: int = 0
    decided: int = 0
    accepted: int = 0
    corrected: int = 0
    shown: int = 0
    kept_chars: int = 0

    def add(self, outcome: Outcome) -> None:
        self.completions += 1
        self.decided += outcome.decided
        self.accepted += outcome.accepted
        self.corrected += outcome.corrected
        self.shown += outcome.seen
        self.kept_chars += outcome.kept_chars

    @property
    def kept_per_shown(self) -> float | None:
        """Accepted characters still in place per shown suggestion: the headline, as raw accept rate rewards
        short, trivial suggestions."""
        return self.kept_chars / self.shown if self.shown else None

    @property
    def accept_rate(self) -> float | None:
        return self.accepted / self.decided if self.decided else None

    @property
    def correction_rate(self) -> float | None:
        return self.corrected / self.completions if self.completions else None


@dataclass(slots=True)
class ReportData:
    filter: ReportFilter
    completions: list[CompletionFact]  # served: a suggestion was shown
    outcomes: dict[str, Outcome]
    versions: list[AdapterVersion]
    rollbacks: list[AuditEntry]
    held_back: list[CompletionFact] = field(default_factory=list)  # the show policy answered nothing

    def outcome(self, completion_id: str) -> Outcome:
        return self.outcomes.get(completion_id) or Outcome()


async def load_report(store: RolloutStore, f: ReportFilter) -> ReportData:
    """Read what the report shows, in one transaction."""
    async with store.unit() as s:
        repo = ReportRepository(s)
        completions = await repo.completions(f)
        outcomes: dict[str, Outcome] = {}
        for event in await repo.outcome_events(f):
            outcomes.setdefault(event.completion_id, Outcome()).add(event)
        for o in outcomes.values():
            o.rejected = o.rejected and not o.accepted  # an accept counts, whatever was inferred before
        scopes = await repo.scopes(f)
        versions = await repo.adapter_versions(scopes, f.since)
        rollbacks = await repo.rollbacks(scopes, f.since)
    served = [c for c in completions if not c.held_back]
    return ReportData(f, served, outcomes, versions, rollbacks, [c for c in completions if c.held_back])


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None  # publish stores a non-finite value as the string "nan" / "inf"
    return float(value) if math.isfinite(value) else None


def _epoch(at: datetime) -> float:
    return as_utc(at).timestamp()


def _when(seconds: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime(fmt)


def _pct(rate: float | None) -> str:
    return NONE if rate is None else f"{100 * rate:.1f}%"


def _arm(arm: str | None) -> str:
    return arm if arm else "(no arm)"


def _series_key(c: CompletionFact) -> tuple[str, str]:
    return (c.developer_id, _arm(c.arm))


def _series_label(key: tuple[str, str]) -> str:
    return f"{key[0]} · {key[1]}"


def _scope_label(v: AdapterVersion) -> str:
    return f"{v.scope_kind.value}:{v.scope_id}"


# --------------------------------------------------------------------------------------------------
# SVG plots


@dataclass(slots=True, frozen=True)
class Series:
    label: str
    points: tuple[tuple[float, float], ...]


@dataclass(slots=True, frozen=True)
class Axis:
    label: str
    kind: str = "number"  # "number", "count" (whole numbers), "time" (epoch seconds), "rate" (0..1, as percent)


WIDTH = 900
LEFT, RIGHT_LEGEND, TOP, BOTTOM = 70, 210, 20, 48
LEGEND_ROW = 18
LANE_LABEL = 30  # characters of a scope shown beside its timeline lane


def _style(i: int) -> tuple[str, str]:
    return PALETTE[i % len(PALETTE)], DASHES[(i // len(PALETTE)) % len(DASHES)]


def _nice_step(span: float, max_ticks: int) -> float:
    raw = span / max(1, max_ticks)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if raw <= m * magnitude:
            return m * magnitude
    return 10.0 * magnitude


def _decimals(step: float) -> int:
    d = 0
    while d < 8 and abs(round(step * 10**d) - step * 10**d) > 1e-9:
        d += 1
    return d


def _number_ticks(
    lo: float, hi: float, max_ticks: int = 6, *, whole: bool = False
) -> tuple[float, float, list[tuple[float, str]]]:
    """A domain widened to nice bounds, and its ticks with labels (`whole`: ticks on whole numbers)."""
    if hi - lo < 1e-12:
        pad = 1.0 if whole else abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    step = _nice_step(hi - lo, max_ticks)
    if whole:
        step = float(max(1, math.ceil(step)))
    lo, hi = math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step
    d = _decimals(step)
    ticks = []
    n = round((hi - lo) / step)
    for i in range(n + 1):
        v = lo + i * step
        ticks.append((v, f"{v:.{d}f}" if abs(v) > step * 1e-6 else f"{0:.{d}f}"))
    return lo, hi, ticks


def _time_ticks(lo: float, hi: float, max_ticks: int = 6) -> tuple[float, float, list[tuple[float, str]]]:
    """A time domain widened to whole tick steps (so there are always ticks), and its ticks."""
    step = next((s for s in TIME_TICK_STEPS if (hi - lo) / s <= max_ticks), TIME_TICK_STEPS[-1])
    start, end = math.floor(lo / step) * step, math.ceil(hi / step) * step
    if end <= start:
        end = start + step
    fmt = "%Y-%m-%d" if step >= DAY else ("%H:%M" if _when(start, "%F") == _when(end, "%F") else "%m-%d %H:%M")
    ticks = [(float(t), _when(t, fmt)) for t in range(int(start), int(end) + 1, step)]
    return float(start), float(end), ticks


def _ticks(axis: Axis, lo: float, hi: float) -> tuple[float, float, list[tuple[float, str]]]:
    if axis.kind == "time":
        return _time_ticks(lo, hi)
    if axis.kind == "rate":
        return 0.0, 1.0, [(v / 4, f"{25 * v}%") for v in range(5)]
    return _number_ticks(lo, hi, whole=axis.kind == "count")


def _open_svg(name: str, title: str, height: int) -> list[str]:
    return [
        f'<svg data-plot="{escape(name)}" class="plot" xmlns="http://www.w3.org/2000/svg" '
        f'viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" role="img">',
        f"<title>{escape(title)}</title>",
        f'<rect class="frame" x="0" y="0" width="{WIDTH}" height="{height}"/>',
    ]


def empty_panel(name: str, title: str, why: str = NO_DATA) -> str:
    """A plot with nothing to draw: its frame and a readable sentence."""
    height = 120
    parts = _open_svg(name, title, height)
    parts.append(f'<text class="empty" x="{WIDTH / 2:.0f}" y="{height / 2 + 5:.0f}" text-anchor="middle">')
    parts.append(f"{escape(title)}: {escape(why)}</text></svg>")
    return "\n".join(parts)


def _legend(parts: list[str], entries: Sequence[tuple[str, str, str, str]], x0: float) -> None:
    """Legend rows: (label, colour, dash, shape) with shape "line", "dot" or "triangle"."""
    for i, (label, color, dash, shape) in enumerate(entries):
        y = TOP + 8 + i * LEGEND_ROW
        shown = _short(label, 26)
        parts.append(f'<g class="legend-item"><title>{escape(label)}</title>')
        if shape == "line":
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(
                f'<line x1="{x0:.0f}" y1="{y}" x2="{x0 + 22:.0f}" y2="{y}" stroke="{color}" '
                f'stroke-width="2.5"{dash_attr}/>'
            )
        elif shape == "triangle":
            parts.append(f'<path d="{_triangle(x0 + 11, y)}" fill="{color}"/>')
        else:
            parts.append(f'<circle cx="{x0 + 11:.0f}" cy="{y}" r="5" fill="{color}"/>')
        parts.append(f'<text x="{x0 + 30:.0f}" y="{y + 4}">{escape(shown)}</text></g>')


def _short(text: str, limit: int) -> str:
    """`text` cut to `limit` characters (the full text goes in a <title>)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _triangle(x: float, y: float, r: float = 6) -> str:
    return f"M{x - r:.1f},{y - r:.1f} L{x + r:.1f},{y - r:.1f} L{x:.1f},{y + r:.1f} Z"


@dataclass(slots=True)
class _Frame:
    """Plot area geometry and the scales of one chart."""

    height: int
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    left: float = LEFT
    pad: float = 0.0  # keeps markers at the ends of the x domain off the axis

    @property
    def right(self) -> float:
        return WIDTH - RIGHT_LEGEND

    @property
    def bottom(self) -> float:
        return self.height - BOTTOM

    def x(self, v: float) -> float:
        width = self.right - self.left - 2 * self.pad
        return self.left + self.pad + (v - self.x_lo) / (self.x_hi - self.x_lo) * width

    def y(self, v: float) -> float:
        return self.bottom - (v - self.y_lo) / (self.y_hi - self.y_lo) * (self.bottom - TOP)

    def axes(self, parts: list[str], x_axis: Axis, y_axis: Axis, *, x_grid: bool = True) -> None:
        for v, label in self.y_ticks:
            y = self.y(v)
            parts.append(f'<line class="grid" x1="{self.left:.0f}" y1="{y:.1f}" x2="{self.right:.0f}" y2="{y:.1f}"/>')
            parts.append(
                f'<text class="tick" x="{self.left - 6:.0f}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>'
            )
        for v, label in self.x_ticks:
            x = self.x(v)
            if x_grid:
                parts.append(f'<line class="grid" x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{self.bottom:.0f}"/>')
            parts.append(
                f'<line class="axis" x1="{x:.1f}" y1="{self.bottom:.0f}" x2="{x:.1f}" y2="{self.bottom + 5:.0f}"/>'
            )
            parts.append(
                f'<text class="tick" x="{x:.1f}" y="{self.bottom + 18:.0f}" text-anchor="middle">{escape(label)}</text>'
            )
        parts.append(
            f'<line class="axis" x1="{self.left:.0f}" y1="{TOP}" x2="{self.left:.0f}" y2="{self.bottom:.0f}"/>'
        )
        parts.append(
            f'<line class="axis" x1="{self.left:.0f}" y1="{self.bottom:.0f}" '
            f'x2="{self.right:.0f}" y2="{self.bottom:.0f}"/>'
        )
        mid_x, mid_y = (self.left + self.right) / 2, (TOP + self.bottom) / 2
        parts.append(
            f'<text class="axis-label" x="{mid_x:.0f}" y="{self.height - 8}" text-anchor="middle">'
            f"{escape(x_axis.label)}</text>"
        )
        parts.append(
            f'<text class="axis-label" x="16" y="{mid_y:.0f}" text-anchor="middle" '
            f'transform="rotate(-90 16 {mid_y:.0f})">{escape(y_axis.label)}</text>'
        )


def _height(rows: int) -> int:
    return max(300, TOP + BOTTOM + 16 + rows * LEGEND_ROW)


def _point_text(axis: Axis, v: float) -> str:
    if axis.kind == "time":
        return _when(v)
    if axis.kind == "rate":
        return _pct(v)
    return f"{v:.6g}"


def line_chart(
    name: str,
    title: str,
    series: Sequence[Series],
    *,
    x_axis: Axis,
    y_axis: Axis,
    break_over: float | None = None,
) -> str:
    """A line chart: one line per series (broken where consecutive x differ by more than `break_over`),
    with axes, ticks, grid and a legend; a "no data yet" panel when there is no point."""
    # A series keeps its colour by its place in `series`, so the plots of one report agree on colours.
    drawn = [(i, s) for i, s in enumerate(series) if s.points]
    if not drawn:
        return empty_panel(name, title)
    xs = [x for _, s in drawn for x, _ in s.points]
    ys = [y for _, s in drawn for _, y in s.points]
    height = _height(len(drawn))
    x_lo, x_hi, x_ticks = _ticks(x_axis, min(xs), max(xs))
    y_lo, y_hi, y_ticks = _ticks(y_axis, min(ys), max(ys))
    frame = _Frame(height, x_lo, x_hi, y_lo, y_hi, x_ticks, y_ticks, pad=10.0)
    parts = _open_svg(name, title, height)
    frame.axes(parts, x_axis, y_axis)
    for i, s in drawn:
        color, dash = _style(i)
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<g class="series"><title>{escape(s.label)}</title>')
        segment: list[str] = []
        previous: float | None = None
        for x, y in s.points:
            if previous is not None and break_over is not None and x - previous > break_over:
                parts.append(_polyline(segment, color, dash_attr))
                segment = []
            segment.append(f"{frame.x(x):.1f},{frame.y(y):.1f}")
            previous = x
        parts.append(_polyline(segment, color, dash_attr))
        if len(s.points) <= 120:
            for x, y in s.points:
                parts.append(
                    f'<circle cx="{frame.x(x):.1f}" cy="{frame.y(y):.1f}" r="3" fill="{color}">'
                    f"<title>{escape(s.label)}: {escape(_point_text(x_axis, x))}, "
                    f"{escape(_point_text(y_axis, y))}</title></circle>"
                )
        parts.append("</g>")
    _legend(parts, [(s.label, *_style(i), "line") for i, s in drawn], frame.right + 16)
    parts.append("</svg>")
    return "\n".join(parts)


def _polyline(points: list[str], color: str, dash_attr: str) -> str:
    return f'<polyline points="{" ".join(points)}" fill="none" stroke="{color}" stroke-width="2"{dash_attr}/>'


def bar_chart(
    name: str, title: str, groups: Sequence[tuple[str, Sequence[float]]], bars: Sequence[str], *, y_axis: Axis
) -> str:
    """Grouped bars: for each group (label, one value per bar name), with axes, ticks and a legend."""
    if not groups:
        return empty_panel(name, title)
    height = _height(len(bars))
    top_value = max(v for _, values in groups for v in values)
    y_lo, y_hi, y_ticks = _number_ticks(0.0, max(top_value, 1e-9))
    frame = _Frame(height, 0.0, float(len(groups)), y_lo, y_hi, [], y_ticks)
    parts = _open_svg(name, title, height)
    frame.axes(parts, Axis(""), y_axis, x_grid=False)
    slot = (frame.right - frame.left) / len(groups)
    bar_w = slot * 0.8 / len(bars)
    for gi, (label, values) in enumerate(groups):
        x0 = frame.left + gi * slot + slot * 0.1
        parts.append(f'<g class="bar-group"><title>{escape(label)}</title>')
        for bi, v in enumerate(values):
            y = frame.y(v)
            parts.append(
                f'<rect x="{x0 + bi * bar_w:.1f}" y="{y:.1f}" width="{bar_w * 0.9:.1f}" '
                f'height="{frame.bottom - y:.1f}" fill="{_style(bi)[0]}">'
                f"<title>{escape(label)}: {escape(bars[bi])} {v:.1f}</title></rect>"
            )
        shown = _short(label, 30)
        parts.append(
            f'<text class="tick" x="{frame.left + (gi + 0.5) * slot:.1f}" y="{frame.bottom + 18:.0f}" '
            f'text-anchor="middle">{escape(shown)}</text></g>'
        )
    _legend(parts, [(b, _style(i)[0], "", "dot") for i, b in enumerate(bars)], frame.right + 16)
    parts.append("</svg>")
    return "\n".join(parts)


def adapter_timeline(name: str, title: str, versions: Sequence[AdapterVersion], rollbacks: Sequence[AuditEntry]) -> str:
    """One lane per scope: each version at its creation time, coloured by status (a ring when it was
    activated later), each rollback as a red triangle with its reason."""
    if not versions and not rollbacks:
        return empty_panel(name, title)
    lanes = sorted({_scope_label(v) for v in versions} | {f"{r.scope_kind}:{r.scope_id}" for r in rollbacks})
    times = [_epoch(v.created_at) for v in versions] + [_epoch(v.activated_at) for v in versions if v.activated_at]
    times += [_epoch(r.at) for r in rollbacks]
    lane_h = 34
    height = max(_height(len(STATUS_COLORS) + 1), TOP + BOTTOM + lane_h * len(lanes))
    x_lo, x_hi, x_ticks = _time_ticks(min(times), max(times))
    left = min(240, max(LEFT, 16 + 7 * max(len(_short(lane, LANE_LABEL)) for lane in lanes)))
    frame = _Frame(height, x_lo, x_hi, 0.0, 1.0, x_ticks, [], left=left, pad=10.0)
    parts = _open_svg(name, title, height)
    frame.axes(parts, Axis("time (UTC)", "time"), Axis(""))
    lane_of = {lane: i for i, lane in enumerate(lanes)}

    def lane_y(lane: str) -> float:
        return TOP + lane_h * (lane_of[lane] + 0.5)

    for lane in lanes:
        y = lane_y(lane)
        parts.append(f'<line class="lane" x1="{left}" y1="{y:.1f}" x2="{frame.right:.0f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="tick" x="{left - 6}" y="{y + 4:.1f}" text-anchor="end"><title>{escape(lane)}</title>'
            f"{escape(_short(lane, LANE_LABEL))}</text>"
        )
    for v in versions:
        y, x = lane_y(_scope_label(v)), frame.x(_epoch(v.created_at))
        kl = _finite(v.kl)
        tip = (
            f"{_scope_label(v)} version {v.id}: {v.status.value}, step {v.step}, "
            f"KL {'-' if kl is None else f'{kl:.3f}'}, created {_when(_epoch(v.created_at))}"
        )
        if v.activated_at:
            tip += f", activated {_when(_epoch(v.activated_at))}"
        if v.reason:
            tip += f" ({v.reason})"
        color = STATUS_COLORS.get(v.status, "#000000")
        parts.append(f'<g class="version"><title>{escape(tip)}</title>')
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="6" fill="{color}"/>')
        if v.activated_at and _epoch(v.activated_at) - _epoch(v.created_at) >= 1:
            ax = frame.x(_epoch(v.activated_at))
            parts.append(f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{ax:.1f}" y2="{y:.1f}" stroke="{color}"/>')
            parts.append(f'<circle cx="{ax:.1f}" cy="{y:.1f}" r="6" fill="none" stroke="{color}" stroke-width="2"/>')
        parts.append("</g>")
    for r in rollbacks:
        lane = f"{r.scope_kind}:{r.scope_id}"
        y, x = lane_y(lane), frame.x(_epoch(r.at))
        detail = r.detail or {}
        tip = (
            f"rollback of {lane} at {_when(_epoch(r.at))} by {r.actor}: {detail.get('from') or '-'} -> "
            f"{detail.get('to') or 'none'} ({r.reason or 'no reason given'})"
        )
        parts.append(
            f'<g class="rollback"><title>{escape(tip)}</title>'
            f'<line x1="{x:.1f}" y1="{y - lane_h / 2 + 2:.1f}" x2="{x:.1f}" y2="{y + lane_h / 2 - 2:.1f}" '
            f'stroke="{ROLLBACK_COLOR}" stroke-dasharray="3 2"/>'
            f'<path d="{_triangle(x, y - 10)}" fill="{ROLLBACK_COLOR}"/></g>'
        )
    legend = [(status.value, color, "", "dot") for status, color in STATUS_COLORS.items()]
    _legend(parts, [*legend, ("rollback", ROLLBACK_COLOR, "", "triangle")], frame.right + 16)
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------------
# From rows to plots


def span_of(data: ReportData) -> tuple[float, float] | None:
    if not data.completions:
        return None
    return _epoch(data.completions[0].created_at), _epoch(data.completions[-1].created_at)


def time_bucket(span_s: float) -> tuple[int, str]:
    """The bucket size (seconds, name) for completions spread over `span_s` seconds."""
    return next(((s, n) for s, n in TIME_BUCKETS if span_s / s <= MAX_BUCKETS), TIME_BUCKETS[-1])


def index_chunk(longest: int) -> int:
    """Completions per point of the index plots (1, 2, 5, 10, 20, 50, ...) for a series of `longest`."""
    size, factors = 1, itertools.cycle((2, 2.5, 2))
    while math.ceil(longest / size) > MAX_INDEX_POINTS:
        size = int(size * next(factors))
    return size


Rate = Callable[[Tally], float | None]


def _accept(t: Tally) -> float | None:
    return t.accept_rate


def _correct(t: Tally) -> float | None:
    return t.correction_rate


def _by_series(data: ReportData) -> dict[tuple[str, str], list[CompletionFact]]:
    out: dict[tuple[str, str], list[CompletionFact]] = {}
    for c in data.completions:  # oldest first
        out.setdefault(_series_key(c), []).append(c)
    return dict(sorted(out.items()))


def rate_over_time(data: ReportData, rate: Rate, bucket_s: int) -> list[Series]:
    out = []
    for key, rows in _by_series(data).items():
        tallies: dict[int, Tally] = {}
        for c in rows:
            start = int(_epoch(c.created_at) // bucket_s) * bucket_s
            tallies.setdefault(start, Tally()).add(data.outcome(c.id))
        points = [(float(t), r) for t, tally in sorted(tallies.items()) if (r := rate(tally)) is not None]
        out.append(Series(_series_label(key), tuple(points)))
    return out


def rate_by_index(data: ReportData, rate: Rate, chunk: int) -> list[Series]:
    out = []
    for key, rows in _by_series(data).items():
        points = []
        for start in range(0, len(rows), chunk):
            tally = Tally()
            for c in rows[start : start + chunk]:
                tally.add(data.outcome(c.id))
            r = rate(tally)
            if r is not None:
                points.append((float(min(start + chunk, len(rows))), r))
        out.append(Series(_series_label(key), tuple(points)))
    return out


def training_series(versions: Sequence[AdapterVersion], metric: str) -> list[Series]:
    """Per scope, the metric at every training step of its versions in order (steps counted across them)."""
    by_scope: dict[str, list[AdapterVersion]] = {}
    for v in versions:  # oldest first
        by_scope.setdefault(_scope_label(v), []).append(v)
    out = []
    for scope, rows in sorted(by_scope.items()):
        points: list[tuple[float, float]] = []
        offset = 0
        for v in rows:
            metrics = RoundMetrics.from_json(v.metrics)
            steps = metrics.steps
            fallback = _finite(metrics.prm.get("held_out_accuracy")) if metrics.prm is not None else None
            for i, step in enumerate(steps, start=1):
                value = _finite(step.get(metric))
                if value is None and metric == "prm_accuracy":
                    value = fallback
                if value is not None:
                    points.append((float(offset + i), value))
            offset += len(steps)
        out.append(Series(scope, tuple(points)))
    return out


def _latency_key(c: CompletionFact) -> str:
    return f"{_arm(c.arm)} · {'adapter' if c.adapter_version else 'base'}"


def latency_groups(data: ReportData) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for c in data.completions:
        latency = _finite(c.latency_ms)
        if latency is not None:
            out.setdefault(_latency_key(c), []).append(latency)
    return dict(sorted(out.items()))


def latency_over_time(data: ReportData, bucket_s: int) -> list[Series]:
    groups: dict[str, dict[int, list[float]]] = {}
    for c in data.completions:
        latency = _finite(c.latency_ms)
        if latency is not None:
            start = int(_epoch(c.created_at) // bucket_s) * bucket_s
            groups.setdefault(_latency_key(c), {}).setdefault(start, []).append(latency)
    return [
        Series(key, tuple((float(t), percentile(vals, 0.95)) for t, vals in sorted(buckets.items())))
        for key, buckets in sorted(groups.items())
    ]


# --------------------------------------------------------------------------------------------------
# The page


@dataclass(slots=True, frozen=True)
class Summary:
    developers: int
    completions: int
    tally: Tally
    versions: int
    by_status: dict[str, int]
    rollbacks: int


def summarize(data: ReportData) -> Summary:
    tally = Tally()
    for c in data.completions:
        tally.add(data.outcome(c.id))
    by_status: dict[str, int] = {}
    for v in data.versions:
        by_status[v.status.value] = by_status.get(v.status.value, 0) + 1
    return Summary(
        developers=len({c.developer_id for c in data.completions}),
        completions=len(data.completions),
        tally=tally,
        versions=len(data.versions),
        by_status=dict(sorted(by_status.items())),
        rollbacks=len(data.rollbacks),
    )


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 960px;
       color: #222; padding: 0 12px; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.note, p.filter { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.time { white-space: nowrap; }
th { background: #f4f4f4; }
figure { margin: 1em 0; }
figcaption { font-size: 0.85em; color: #555; }
svg.plot { max-width: 100%; height: auto; display: block; }
svg .frame { fill: #fff; stroke: #ddd; }
svg text { font-size: 12px; fill: #333; font-family: inherit; }
svg .empty { font-size: 16px; fill: #888; }
svg .grid { stroke: #eee; }
svg .axis { stroke: #555; }
svg .lane { stroke: #ccc; stroke-dasharray: 2 3; }
svg .axis-label { font-size: 12px; fill: #555; }
code { font-size: 0.9em; }
"""


def _table(headers: Sequence[str], rows: Iterable[Sequence[tuple[str, str]]], *, empty: str) -> str:
    """A table; each cell is (text, class), text already escaped."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = [
        "<tr>" + "".join(f'<td class="{cls}">{text}</td>' if cls else f"<td>{text}</td>" for text, cls in r) + "</tr>"
        for r in rows
    ]
    if not body:
        body = [f'<tr><td colspan="{len(headers)}">{escape(empty)}</td></tr>']
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _rate_cell(rate: float | None, part: int, whole: int) -> str:
    return escape(_pct(rate)) + (f" ({part} of {whole})" if whole else "")


def _kept_cell(t: Tally) -> str:
    per = t.kept_per_shown
    return NONE if per is None else f"{per:.1f} ({t.kept_chars} over {t.shown} shown)"


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>"


def _filter_text(f: ReportFilter) -> str:
    parts = [
        "developers: " + (", ".join(f.developers) if f.developers else "all"),
        "team: " + (f.team if f.team is not None else "all"),
        "since: " + (_when(_epoch(f.since)) + " UTC" if f.since is not None else "the beginning"),
    ]
    return escape(" · ".join(parts))


def _summary_section(data: ReportData, summary: Summary) -> str:
    t = summary.tally
    status_text = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in summary.by_status.items())
    rows: list[tuple[str, str, str]] = [
        ("developers", "Developers", str(summary.developers)),
        ("completions", "Completions", str(summary.completions)),
        ("held_back", "Held back by the show policy", str(len(data.held_back))),
        ("accept_rate", "Accept rate", _rate_cell(t.accept_rate, t.accepted, t.decided)),
        ("correction_rate", "Correction rate", _rate_cell(t.correction_rate, t.corrected, t.completions)),
        ("kept_chars", "Kept characters per shown suggestion", _kept_cell(t)),
        ("adapters", "Adapter versions", str(summary.versions) + (f" ({escape(status_text)})" if status_text else "")),
        ("rollbacks", "Rollbacks", str(summary.rollbacks)),
    ]
    span = span_of(data)
    if span is not None:
        rows.append(("window", "Completions from", f"{_when(span[0])} to {_when(span[1])} UTC"))
    body = "".join(f'<tr><th>{label}</th><td data-stat="{key}">{value}</td></tr>' for key, label, value in rows)
    return f'<h2 id="summary">Summary</h2><table class="summary" data-table="summary"><tbody>{body}</tbody></table>'


def _breakdown_table(data: ReportData) -> str:
    rows = []
    for key, completions in _by_series(data).items():
        t = Tally()
        for c in completions:
            t.add(data.outcome(c.id))
        latencies = [v for c in completions if (v := _finite(c.latency_ms)) is not None]
        p50 = f"{percentile(latencies, 0.5):.1f}" if latencies else NONE
        rows.append(
            [
                (escape(key[0]), ""),
                (escape(key[1]), ""),
                (str(t.completions), "num"),
                (_rate_cell(t.accept_rate, t.accepted, t.decided), "num"),
                (_rate_cell(t.correction_rate, t.corrected, t.completions), "num"),
                (_kept_cell(t), "num"),
                (p50, "num"),
            ]
        )
    headers = (
        "developer",
        "arm",
        "completions",
        "accept rate",
        "correction rate",
        "kept chars per shown",
        "p50 latency (ms)",
    )
    return _table(headers, rows, empty="no completions yet")


def _versions_table(data: ReportData) -> str:
    """Per developer and the adapter version that served them (base: none): does each version help?"""
    served: dict[tuple[str, str], Tally] = {}
    for c in data.completions:
        served.setdefault((c.developer_id, c.adapter_version or "base model"), Tally()).add(data.outcome(c.id))
    rows = [
        [
            (escape(developer), ""),
            (escape(version), ""),
            (str(t.completions), "num"),
            (_rate_cell(t.accept_rate, t.accepted, t.decided), "num"),
            (_rate_cell(t.correction_rate, t.corrected, t.completions), "num"),
            (_kept_cell(t), "num"),
        ]
        for (developer, version), t in served.items()
    ]
    headers = ("developer", "served by", "completions", "accept rate", "correction rate", "kept chars per shown")
    return _table(headers, rows, empty="no completions yet")


RATE_PLOTS: tuple[tuple[str, str, Rate], ...] = (
    ("accept-rate", "Accept rate", _accept),
    ("correction-rate", "Correction rate", _correct),
)


def _rates_section(data: ReportData) -> str:
    out = [
        '<h2 id="rates">Accept and correction rates</h2>',
        _breakdown_table(data),
        '<p class="note">By the adapter version that served each completion:</p>',
        _versions_table(data),
    ]
    span = span_of(data)
    bucket_s, bucket_name = time_bucket(span[1] - span[0] if span else 0.0)
    # (data-plot suffix, what the title adds, the series of a rate, x axis, line break, what a point is)
    views: list[tuple[str, str, Callable[[Rate], list[Series]], Axis, float | None, str]] = [
        (
            "time",
            "over time",
            lambda rate: rate_over_time(data, rate, bucket_s),
            Axis(f"time (UTC), per {bucket_name}", "time"),
            1.5 * bucket_s,
            f"one point per {bucket_name}",
        )
    ]
    if span is None or span[1] - span[0] <= SHORT_SPAN_S:
        chunk = index_chunk(max((len(rows) for rows in _by_series(data).values()), default=0))
        views.append(
            (
                "index",
                "by completion index",
                lambda rate: rate_by_index(data, rate, chunk),
                Axis("completions so far (of the developer and arm)", "count"),
                None,
                "one point for each completion" if chunk == 1 else f"one point for each {chunk} completions",
            )
        )
    for suffix, how, series_of, x_axis, break_over, point in views:
        for key, title, rate in RATE_PLOTS:
            svg = line_chart(
                f"{key}-{suffix}",
                f"{title} {how}, per developer and arm",
                series_of(rate),
                x_axis=x_axis,
                y_axis=Axis(title.lower(), "rate"),
                break_over=break_over,
            )
            out.append(_figure(svg, f"{title} {how}: {point}, one line per developer and arm."))
    if len(views) == 1:
        out.append(
            '<p class="note">The completions span more than a day: the plots by completion index are left out.</p>'
        )
    return "\n".join(out)


def _training_section(data: ReportData) -> str:
    out = ['<h2 id="training">Training</h2>']
    out.append(
        '<p class="note">Per scope, every training step of its adapter versions in order (rejected versions '
        "included); steps are counted across the versions.</p>"
    )
    for name, title, metric, is_rate in TRAINING_METRICS:
        svg = line_chart(
            name,
            f"{title} per training step",
            training_series(data.versions, metric),
            x_axis=Axis("training step (across versions)", "count"),
            y_axis=Axis(title.lower(), "rate" if is_rate else "number"),
        )
        out.append(_figure(svg, f"{title} at each step, one line per scope (step metric {metric})."))
    return "\n".join(out)


def _adapters_section(data: ReportData) -> str:
    out = ['<h2 id="adapters">Adapter versions and rollbacks</h2>']
    out.append(
        _figure(
            adapter_timeline("adapter-timeline", "Adapter versions and rollbacks", data.versions, data.rollbacks),
            "Each version at its creation time, coloured by its status now; a ring marks when it was activated. "
            "Red triangles are rollbacks.",
        )
    )
    version_rows = []
    for v in reversed(data.versions):  # newest first
        kl = _finite(v.kl)
        version_rows.append(
            [
                (escape(_scope_label(v)), ""),
                (f"<code>{escape(v.id)}</code>", ""),
                (escape(v.status.value), ""),
                (str(v.step), "num"),
                (NONE if kl is None else f"{kl:.3f}", "num"),
                (escape(_when(_epoch(v.created_at))), "time"),
                (escape(_when(_epoch(v.activated_at))) if v.activated_at else NONE, "time"),
                (escape(v.reason or ""), ""),
            ]
        )
    headers = ("scope", "version", "status", "step", "KL", "created (UTC)", "activated (UTC)", "reason")
    out.append(_table(headers, version_rows, empty="no adapter versions yet"))
    rollback_rows = []
    for r in data.rollbacks:
        detail = r.detail or {}
        rollback_rows.append(
            [
                (escape(_when(_epoch(r.at))), "time"),
                (escape(f"{r.scope_kind}:{r.scope_id}"), ""),
                (escape(r.actor), ""),
                (escape(str(detail.get("from") or NONE)), ""),
                (escape(str(detail.get("to") or "none")), ""),
                (escape(r.reason or ""), ""),
            ]
        )
    out.append(_table(("at (UTC)", "scope", "by", "from", "to", "reason"), rollback_rows, empty="no rollbacks"))
    return "\n".join(out)


def _latency_section(data: ReportData) -> str:
    out = ['<h2 id="latency">Latency</h2>']
    groups = latency_groups(data)
    bars = [name for name, _ in PERCENTILES]
    values = [(label, [percentile(v, q) for _, q in PERCENTILES]) for label, v in groups.items()]
    svg = bar_chart(
        "latency-percentiles",
        "Completion latency percentiles per arm, adapter against base model",
        values,
        bars,
        y_axis=Axis("latency (ms)"),
    )
    out.append(_figure(svg, "Nearest-rank p50, p95 and p99 of the completions' latency (ms) per arm and model."))
    rows = [
        [(escape(label), ""), (str(len(groups[label])), "num"), *((f"{v:.1f}", "num") for v in vals)]
        for label, vals in values
    ]
    out.append(_table(("arm · model", "completions", "p50 (ms)", "p95 (ms)", "p99 (ms)"), rows, empty="no latencies"))
    span = span_of(data)
    bucket_s, bucket_name = time_bucket(span[1] - span[0] if span else 0.0)
    svg = line_chart(
        "latency-p95-time",
        "p95 completion latency over time per arm and model",
        latency_over_time(data, bucket_s),
        x_axis=Axis(f"time (UTC), per {bucket_name}", "time"),
        y_axis=Axis("p95 latency (ms)"),
        break_over=1.5 * bucket_s,
    )
    out.append(_figure(svg, f"p95 latency per {bucket_name}, one line per arm and model."))
    return "\n".join(out)


async def developer_report_html(store: RolloutStore, developer: str) -> str:
    """The report of one developer alone (the editors' `heedful.report` command)."""
    return render_report(await load_report(store, ReportFilter((developer,), None, None)))


def render_report(data: ReportData) -> str:
    """The report as one HTML document (no scripts, no external resources)."""
    summary = summarize(data)
    body = [
        "<h1>Heedful report</h1>",
        f'<p class="filter">{_filter_text(data.filter)}</p>',
        '<p class="note">Accept rate: completions accepted (fully or partly) of those with an outcome (accepted '
        "or rejected). Correction rate: completions with a correction of all completions. Percentiles are "
        "nearest-rank. Times are UTC.</p>",
        _summary_section(data, summary),
        _rates_section(data),
        _training_section(data),
        _adapters_section(data),
        _latency_section(data),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        'img-src data:">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        "<title>Heedful report</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def write_report(path: Path, document: str) -> Path:
    """Write the document next to `path` first, then move it into place (a reader never sees half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(document, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
