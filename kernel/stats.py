"""Small statistics every layer reports the same way."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of `values` (not empty): the smallest value with at least `q` of them at or
    below it."""
    if not values:
        raise ValueError("the percentile of no values is undefined")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
