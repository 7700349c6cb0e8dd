"""Credit where the edit is: which response tokens depart from the kept text, and where an advantage lands.

Token ids here are small integers written out by hand; every expected mask is read off the diff by eye.
"""

from __future__ import annotations

from kernel.settings import TrainingSettings
from personalization.dataset import TrainingData, build_group, departing_tokens, kept_ends
from personalization.judge import UnshownJudge
from personalization.trainer import token_advantages
from storage.models import Candidate, Completion, Rollout


def test_a_replaced_token_departs_and_the_rest_is_kept() -> None:
    # response  1 2 3 4 ; kept  1 2 9 4 : token 3 was replaced by 9
    assert departing_tokens([1, 2, 3, 4], [1, 2, 9, 4]) == [False, False, True, False]


def test_deleted_tokens_depart() -> None:
    # the developer deleted 3 and 4
    assert departing_tokens([1, 2, 3, 4, 5], [1, 2, 5]) == [False, False, True, True, False]


def test_an_insertion_marks_the_token_the_model_wrote_in_its_place() -> None:
    # kept inserts 7 8 between 2 and 3 (type hints added inside a signature): the model wrote 3 there
    assert departing_tokens([1, 2, 3, 4], [1, 2, 7, 8, 3, 4]) == [False, False, True, False]


def test_text_appended_after_the_end_marks_nothing() -> None:
    # the developer kept all of it and typed more after it: no token of the response was wrong
    assert departing_tokens([1, 2, 3], [1, 2, 3, 4, 5]) is None


def test_the_kept_text_itself_departs_nowhere_and_unknown_kept_text_gives_none() -> None:
    assert departing_tokens([1, 2, 3], [1, 2, 3]) is None
    assert departing_tokens([1, 2, 3], []) is None
    assert departing_tokens([], [1]) is None


def test_a_rewrite_departs_everywhere() -> None:
    assert departing_tokens([1, 2, 3], [7, 8, 9]) == [True, True, True]


def test_sequence_credit_broadcasts_the_advantage() -> None:
    mask = [False, True, False]
    assert token_advantages(-0.5, mask, 3, "sequence") == [-0.5, -0.5, -0.5]
    assert token_advantages(0.5, mask, 3, "sequence") == [0.5, 0.5, 0.5]


def test_edit_credit_puts_a_negative_advantage_on_departing_tokens_only() -> None:
    assert token_advantages(-0.5, [False, True, False], 3, "edit") == [0.0, -0.5, 0.0]


def test_edit_credit_keeps_a_positive_advantage_on_every_token() -> None:
    assert token_advantages(1.5, [False, True, False], 3, "edit") == [1.5, 1.5, 1.5]


def test_edit_credit_falls_back_to_the_whole_sequence_without_a_usable_mask() -> None:
    assert token_advantages(-1.0, None, 2, "edit") == [-1.0, -1.0]
    assert token_advantages(-1.0, [False, False], 2, "edit") == [-1.0, -1.0]
    assert token_advantages(-1.0, [True], 2, "edit") == [-1.0, -1.0]  # a mask of another length


EOS = 0


def chars(text: str) -> list[int]:
    """One token per character: its code point (never EOS)."""
    return [ord(ch) for ch in text]


def test_kept_text_ends_where_the_developer_cut_the_suggestion_short_or_where_it_ended() -> None:
    two_lines = "total = 0\n    for x in items:"
    assert kept_ends(two_lines, chars(two_lines), "total = 0", EOS)  # cut to its first line
    assert not kept_ends(two_lines, chars(two_lines), two_lines, EOS)  # kept whole: it went on, as cut
    assert not kept_ends(two_lines, chars(two_lines), "total: int = 0\n    for x in items:", EOS)  # rewritten
    assert not kept_ends(two_lines, chars(two_lines), "total = 0\n    for x in items:\n        total += x", EOS)
    assert kept_ends("x)", [*chars("x)"), EOS], "x: int)", EOS)  # the model had stopped: so does the kept text
    assert not kept_ends(two_lines, chars(two_lines), "", EOS)  # nothing kept: no response to end
    assert not kept_ends(two_lines, chars(two_lines), "total = 0", None)  # a tokenizer without an end token
    assert not kept_ends(None, [], "total = 0", EOS)


def test_a_suggestion_cut_to_its_first_line_teaches_the_stop_after_it() -> None:
    shown = "    a = 1\n    b = 2"  # the healed indentation, then what was shown
    comp = Completion(
        id="c1",
        prompt="def f():\n",
        prompt_token_ids=[7, 8],
        shown_index=0,
        candidates=[
            Candidate(index=0, text=shown, token_ids=chars(shown), logprobs=[-0.5] * len(shown), finish_reason="length")
        ],
    )
    rollout = Rollout(completion_id="c1", next_state="a = 1", rewards=[-1])
    data = TrainingData()
    group = build_group(rollout, comp, TrainingSettings(), tokenize=chars, judge=UnshownJudge(), data=data, eos=EOS)
    assert group is not None and data.demonstrations == 1
    shown_sample, demo = group.samples
    assert demo.demonstration and demo.response_ids == [*chars("    a = 1"), EOS]
    # The shown suggestion departs from the kept text from its line break on: the second line (and no EOS).
    assert shown_sample.departs == [False] * len("    a = 1") + [True] * len("\n    b = 2")
    # Without an end token (or kept whole) the demonstration is the kept text alone, as before.
    rollout_whole = Rollout(completion_id="c1", next_state="a = 1\n    b = 3", rewards=[-1])
    whole = build_group(
        rollout_whole, comp, TrainingSettings(), tokenize=chars, judge=UnshownJudge(), data=data, eos=EOS
    )
    assert whole is not None and whole.samples[-1].response_ids == chars("    a = 1\n    b = 3")
