"""Nearest-rank percentiles against values counted by hand."""

from __future__ import annotations

import pytest

from kernel.stats import percentile


def test_nearest_rank_percentiles_of_ten_values() -> None:
    values = [10.0, 1.0, 9.0, 2.0, 8.0, 3.0, 7.0, 4.0, 6.0, 5.0]
    assert percentile(values, 0.5) == 5.0  # ceil(5.0) = 5th smallest
    assert percentile(values, 0.95) == 10.0  # ceil(9.5) = 10th
    assert percentile(values, 0.99) == 10.0
    assert percentile(values, 0.1) == 1.0  # ceil(1.0) = 1st
    assert percentile(values, 0.0) == 1.0
    assert percentile([4.0], 0.99) == 4.0


def test_no_values_have_no_percentile() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 0.5)
