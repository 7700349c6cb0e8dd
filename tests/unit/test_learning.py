"""What `heedful/status` says learning does: from the store's facts of a scope to the editor's state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from server.learning import STALE_S, ScopeFacts, learning_state, scope_facts
from storage.models import ScopeKind, TrainingStatus

NOW = datetime(2026, 12, 2, 22, 0, tzinfo=UTC)


def row(**values: object) -> TrainingStatus:
    base: dict[str, object] = {"scope_kind": ScopeKind.DEVELOPER, "scope_id": "ada", "updated_at": NOW}
    return TrainingStatus(**(base | values))


def test_collecting_counts_the_feedback_toward_the_next_round() -> None:
    facts = scope_facts(7, None, None, NOW)
    assert learning_state(facts, needed=16, in_server=True) == {
        "state": "collecting",
        "trainer": "in-server",
        "feedback": 7,
        "needed": 16,
    }
    assert learning_state(facts, needed=16, in_server=False)["trainer"] == "worker"


def test_a_running_round_shows_its_phase_and_step() -> None:
    status = row(phase="training", step=5, steps=24, rollouts=18, updated_at=NOW - timedelta(seconds=30))
    assert learning_state(scope_facts(0, None, status, NOW), needed=16, in_server=True) == {
        "state": "training",
        "trainer": "in-server",
        "feedback": 0,
        "needed": 16,
        "phase": "training",
        "step": 5,
        "steps": 24,
        "rollouts": 18,
    }


def test_a_round_not_heard_of_for_too_long_is_not_shown_as_training() -> None:
    stale = row(phase="training", step=5, steps=24, updated_at=NOW - timedelta(seconds=STALE_S + 1))
    facts = scope_facts(3, None, stale, NOW)
    assert facts == ScopeFacts(3)
    assert learning_state(facts, needed=16, in_server=True)["state"] == "collecting"


def test_the_last_round_and_a_pause_are_reported() -> None:
    finished = NOW - timedelta(minutes=3)
    status = row(last_status="rejected", last_reason="HumanEval 50.0 -> 45.0", last_finished_at=finished)
    state = learning_state(scope_facts(2, "KL 6.1 > 5.0", status, NOW), needed=16, in_server=True)
    assert state["state"] == "paused" and state["reason"] == "KL 6.1 > 5.0"
    assert state["lastRound"] == {
        "status": "rejected",
        "reason": "HumanEval 50.0 -> 45.0",
        "version": None,
        "finishedAt": "2026-12-02T21:57:00+00:00",
    }


def test_a_time_without_zone_from_sqlite_is_taken_as_utc() -> None:
    naive = row(phase="gates", step=24, steps=24, updated_at=(NOW - timedelta(seconds=10)).replace(tzinfo=None))
    assert scope_facts(0, None, naive, NOW).running


def test_paused_recording_is_said_beside_the_learning_state() -> None:
    facts = scope_facts(3, None, None, NOW, recording_paused=True)
    assert learning_state(facts, needed=16, in_server=True) == {
        "state": "collecting",
        "trainer": "in-server",
        "feedback": 3,
        "needed": 16,
        "recording": "paused",
    }
    running = row(phase="training", step=2, steps=24, rollouts=18)
    state = learning_state(scope_facts(0, None, running, NOW, recording_paused=True), needed=16, in_server=False)
    assert state["state"] == "training" and state["recording"] == "paused"
