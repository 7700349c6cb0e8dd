"""The collector's turn classification on crafted event sequences, and the hindsight judge."""

from __future__ import annotations

from personalization.judge import hindsight_reward, similarity
from personalization.rollouts import EventView, classify, scopes_of
from storage.repositories import Scope

SHOWN = "def f(x: int) -> int:"


def snap(delay: float, ratio: float, kept: str) -> EventView:
    return EventView("edit_snapshot", delay_s=delay, survival_ratio=ratio, kept_text=kept)


def test_nothing_shown_or_no_signal_is_kept_out() -> None:
    assert classify(None, [EventView("accepted")], rewrite_threshold=0.5).reason == "nothing was shown"
    for events in ([], [EventView("shown")]):
        c = classify(SHOWN, events, rewrite_threshold=0.5)
        assert (c.trainable, c.signal, c.reason) == (False, "none", "no feedback signal")


def test_accept_kept_as_is_is_positive_with_the_suggestion_as_next_state() -> None:
    c = classify(SHOWN, [EventView("shown"), EventView("accepted")], rewrite_threshold=0.5)
    assert (c.trainable, c.signal, c.reward, c.kept) == (True, "accepted", 1, SHOWN)


def test_the_last_snapshot_decides_an_accept() -> None:
    kept = "def f(x):"
    events = [EventView("accepted"), snap(120.0, 0.3, kept), snap(30.0, 0.9, SHOWN)]
    c = classify(SHOWN, events, rewrite_threshold=0.5)
    # 0.3 is below the threshold 0.5 but at least half of it (0.25): rewritten, reward 0.
    assert (c.signal, c.reward, c.kept) == ("rewritten", 0, kept)
    c = classify(SHOWN, [EventView("accepted"), snap(120.0, 0.2, "x")], rewrite_threshold=0.5)
    assert (c.signal, c.reward, c.kept) == ("rewritten", -1, "x")
    c = classify(SHOWN, [EventView("accepted"), snap(30.0, 0.5, "def f(")], rewrite_threshold=0.5)
    assert (c.signal, c.reward, c.kept) == ("rewritten", 0, "def f(")


def test_an_accept_edited_in_place_is_not_a_positive() -> None:
    shown = "def f(x):"
    hinted = "def f(x: int) -> int:"  # most of the suggestion survives, but the developer changed it
    c = classify(shown, [EventView("accepted"), snap(30.0, 0.8, hinted)], rewrite_threshold=0.5)
    assert (c.signal, c.reward, c.kept, c.reason) == ("rewritten", 0, hinted, "accepted, then edited (0.80 survived)")
    reformatted = "def f( x ):"  # whitespace only: still the suggestion
    c = classify("def f(x ):", [EventView("accepted"), snap(30.0, 0.9, reformatted)], rewrite_threshold=0.5)
    assert (c.signal, c.reward) == ("accepted", 1)


def test_partial_accept_rejects_and_corrections() -> None:
    c = classify(SHOWN, [EventView("partial_accept", accepted_length=5, kept_text="def f")], rewrite_threshold=0.5)
    assert (c.signal, c.reward, c.kept) == ("partial", 0, "def f")
    c = classify(SHOWN, [EventView("rejected", inferred=True)], rewrite_threshold=0.5)
    assert (c.signal, c.reward, c.reason, c.kept) == ("rejected", -1, "rejected (inferred)", None)
    c = classify(SHOWN, [EventView("rejected", inferred=True), EventView("rejected")], rewrite_threshold=0.5)
    assert c.reason == "rejected"
    events = [EventView("accepted"), snap(30.0, 1.0, SHOWN), EventView("correction", text="use Flask, not Django")]
    c = classify(SHOWN, events, rewrite_threshold=0.5)
    assert (c.signal, c.reward, c.correction, c.kept) == ("corrected", -1, "use Flask, not Django", SHOWN)


def test_a_reject_teaches_what_was_written_in_its_place() -> None:
    written = "def f(x: int) -> str:"
    events = [EventView("rejected", inferred=True), snap(30.0, 0.2, "def f(x: i"), snap(120.0, 0.3, written)]
    c = classify(SHOWN, events, rewrite_threshold=0.5)
    assert (c.trainable, c.signal, c.reward, c.kept) == (True, "rejected", -1, written)
    assert c.reason == "rejected (inferred), then written differently"
    # Nothing but blanks written, or the suggestion itself typed out after all: no next state.
    for kept in ("  \n", "def  f(x: int) -> int:"):
        c = classify(SHOWN, [EventView("rejected"), snap(30.0, 1.0, kept)], rewrite_threshold=0.5)
        assert (c.signal, c.reward, c.kept, c.reason) == ("rejected", -1, None, "rejected")


def test_hindsight_similarity_bands() -> None:
    assert hindsight_reward("return a + b", "return a +  b") == 1  # whitespace does not count
    assert hindsight_reward("return a + b", "raise NotImplementedError") == -1
    # "return a + b" vs "return a + c": 11 of 12 characters match on each side: ratio 22/24 >= 0.8.
    assert hindsight_reward("return a + b", "return a + c") == 1
    assert hindsight_reward("x = compute(a, b)", "y = compute(b, a) or 0") is None  # in between: the PRM decides


SHOWN_SIG = "def f(a):\n    return a"  # normalised "def f(a): return a": 18 characters
KEPT_SIG = "def f(a: int):\n    return a"  # normalised 23 characters, the shown 18 all match: ratio 36/41 = 0.878


def test_hindsight_judges_against_what_the_developer_changed() -> None:
    assert similarity(SHOWN_SIG, KEPT_SIG) == 36 / 41
    # Without the shown suggestion, a candidate identical to it is 88 % like the kept text: +1.
    assert hindsight_reward(SHOWN_SIG, KEPT_SIG) == 1
    # The developer rewrote it (outcome 0): the same text now earns what the shown one earned, not +1.
    assert hindsight_reward(SHOWN_SIG, KEPT_SIG, shown=SHOWN_SIG, shown_reward=0) == 0
    assert hindsight_reward("def f(a):  return a", KEPT_SIG, shown=SHOWN_SIG, shown_reward=0) == 0  # whitespace only
    assert hindsight_reward(SHOWN_SIG, KEPT_SIG, shown=SHOWN_SIG, shown_reward=-1) == -1
    # Closer to the kept text than the shown one was: it has the change. "def f(a: int): return a + 0" keeps all
    # 23 characters of the kept text out of 27: ratio 46/50 = 0.92 > 0.878.
    assert hindsight_reward("def f(a: int): return a + 0", KEPT_SIG, shown=SHOWN_SIG, shown_reward=0) == 1
    assert hindsight_reward(KEPT_SIG, KEPT_SIG, shown=SHOWN_SIG, shown_reward=0) == 1
    # Accepted as shown (+1): similarity alone decides, as before.
    assert hindsight_reward(SHOWN_SIG, KEPT_SIG, shown=SHOWN_SIG, shown_reward=1) == 1
    # Far off stays -1 whatever the shown one earned.
    assert hindsight_reward("pass", KEPT_SIG, shown=SHOWN_SIG, shown_reward=0) == -1
    # Undecided by similarity and no closer than the shown one: the shown one's outcome instead of the PRM.
    assert (
        hindsight_reward("x = compute(a, b)", "y = compute(b, a) or 0", shown="x = compute(a, b)", shown_reward=0) == 0
    )


def test_scopes_never_mix() -> None:
    assert scopes_of("alice", None) == [Scope.developer("alice")]
    assert scopes_of("alice", "backend") == [Scope.developer("alice"), Scope.team("backend")]
