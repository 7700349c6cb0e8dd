"""bench.steadiness's summary of its passes, against hand-computed values."""

from __future__ import annotations

import pytest

from bench.steadiness import pass_summary


def test_pass_medians_and_the_slowest_over_the_fastest() -> None:
    # Medians: 0.25 s (odd count), 0.5 s (mean of the middle two: 0.4 and 0.6), 0.3 s.
    summary = pass_summary([[0.2, 0.25, 0.9], [0.4, 0.3, 0.6, 0.7], [0.3]])
    assert summary["pass_p50_ms"] == pytest.approx([250.0, 500.0, 300.0])
    assert summary["slowest_over_fastest"] == pytest.approx(2.0)


def test_a_steady_machine_gives_one() -> None:
    assert pass_summary([[0.3, 0.3], [0.3]])["slowest_over_fastest"] == pytest.approx(1.0)


@pytest.mark.parametrize("passes", [[], [[0.3], []]])
def test_a_pass_without_timings_is_refused(passes: list[list[float]]) -> None:
    with pytest.raises(ValueError, match="at least one timed prompt"):
        pass_summary(passes)
