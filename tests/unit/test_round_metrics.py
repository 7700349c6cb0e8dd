"""The round's metrics record: the JSON shape rows have always had, and rows of any age read back."""

from __future__ import annotations

from storage.round_metrics import RoundMetrics, humaneval_figures


def test_a_trained_round_keeps_its_json_shape_and_reads_back_equal() -> None:
    m = RoundMetrics(rollouts=24, groups=20, steps=[{"loss": 0.5}], timing={"steps": 3.0}, steps_done=1)
    m.gate_kl, m.final_loss, m.gate = 0.02, 0.5, "passed"
    m.humaneval = humaneval_figures({"humaneval_base": 70.0, "humaneval_adapter": 72.5, "kl": 0.02})
    data = m.as_json()
    assert data["humaneval_base"] == 70.0 and data["humaneval_adapter"] == 72.5 and "humaneval" not in data
    assert "reason" not in data and "stopped_early" not in data and "prm" not in data  # unset: absent
    assert data["steps_done"] == 1 and data["gate_kl"] == 0.02 and data["steps"] == [{"loss": 0.5}]
    assert RoundMetrics.from_json(data) == m


def test_a_round_that_trained_nothing_has_its_reason_and_no_step_count() -> None:
    m = RoundMetrics(rollouts=3, reason="no signal: all 3 groups had equal rewards and there were no corrections")
    data = m.as_json()
    assert data["reason"].startswith("no signal") and "steps_done" not in data and "gate_kl" not in data


def test_old_or_malformed_rows_read_as_defaults() -> None:
    assert RoundMetrics.from_json(None) == RoundMetrics()
    assert RoundMetrics.from_json([1, 2]) == RoundMetrics()
    row = {
        "final_loss": "inf",  # publish stores a non-finite float as a string
        "gate_kl": "nan",
        "steps": [{"loss": 1.0}, "garbage"],
        "rollouts": "many",
        "prm": "not fitted",
        "humaneval_base": "nan",
        "humaneval_adapter": 55.0,
        "steps_done": 7,
        "stopped_early": 3,
        "gate": {"passed": True, "reasons": []},
    }
    m = RoundMetrics.from_json(row)
    assert m.final_loss is None and m.gate_kl is None and m.rollouts == 0 and m.prm is None
    assert m.steps == [{"loss": 1.0}] and m.humaneval == {"adapter": 55.0} and m.steps_done == 7
    assert m.stopped_early is None and m.gate == {"passed": True, "reasons": []}
