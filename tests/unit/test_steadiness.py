"""bench.steadiness's summary of its passes, against hand-computed values."""

from __future__ import annotations

import pytest

from bench.steadiness import paired_summary, parse_env, pass_summary


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


def test_paired_engines_are_compared_pair_by_pair() -> None:
    # Pass 1 pairs: 0.2/0.1 = 2.0, 0.3/0.3 = 1.0, 0.2/0.4 = 0.5 -> median 1.0. Pass 2: 0.5/0.5 = 1.0,
    # 1.2/0.8 = 1.5 -> median 1.25. All five ratios: 0.5, 1.0, 1.0, 1.5, 2.0 -> median 1.0.
    a = [[0.1, 0.3, 0.4], [0.5, 0.8]]
    b = [[0.2, 0.3, 0.2], [0.5, 1.2]]
    summary = paired_summary(a, b)
    assert summary["pass_p50_ms"] == pytest.approx([300.0, 650.0])
    assert summary["b_pass_p50_ms"] == pytest.approx([200.0, 850.0])
    assert summary["pass_ratio_b_over_a"] == pytest.approx([1.0, 1.25])
    assert summary["ratio_b_over_a"] == pytest.approx(1.0)
    assert summary["slowest_over_fastest"] == pytest.approx(650 / 300)


def test_a_machine_step_falls_on_both_engines_of_a_pair() -> None:
    # B is 10 % faster throughout; the machine halves its speed in pass 2: the passes' medians move, the
    # per-pair ratio does not.
    a = [[0.3, 0.3], [0.6, 0.6]]
    b = [[0.27, 0.27], [0.54, 0.54]]
    summary = paired_summary(a, b)
    assert summary["pass_ratio_b_over_a"] == pytest.approx([0.9, 0.9])
    assert summary["ratio_b_over_a"] == pytest.approx(0.9)


def test_unpaired_timings_are_refused() -> None:
    with pytest.raises(ValueError, match="same number of timed prompts"):
        paired_summary([[0.1, 0.2]], [[0.1]])


def test_engine_b_environment_pairs() -> None:
    assert parse_env(["LD_PRELOAD=/x/libiomp5.so", "KMP_BLOCKTIME=0", "EMPTY="]) == {
        "LD_PRELOAD": "/x/libiomp5.so",
        "KMP_BLOCKTIME": "0",
        "EMPTY": "",
    }
    with pytest.raises(ValueError, match="'LD_PRELOAD' is not NAME=VALUE"):
        parse_env(["LD_PRELOAD"])
