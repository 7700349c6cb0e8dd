"""Credit where the edit is: which response tokens depart from the kept text, and where an advantage lands.

Token ids here are small integers written out by hand; every expected mask is read off the diff by eye.
"""

from __future__ import annotations

from personalization.dataset import departing_tokens
from personalization.trainer import token_advantages


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
