"""`move_spans`: where a document's warm starts are after an edit, against hand-worked line numbers."""

from __future__ import annotations

from lsp_handlers.completion import WarmSpan, move_spans


def spans(*lines: tuple[int, int]) -> list[WarmSpan]:
    return [WarmSpan(None, first, "", last) for first, last in lines]


def lines_of(kept: list[WarmSpan]) -> list[tuple[int, int]]:
    return [(s.first_line, s.last_line) for s in kept]


def test_a_line_inserted_at_the_top_moves_every_start_down_one_line() -> None:
    # "# tables\n" inserted at (0, 0): the range is (0, 0)-(0, 0), one line break; old line 0 still begins a line.
    kept = move_spans(spans((0, 40), (20, 60), (40, 80)), 0, 0, 1, last_starts_line=True)
    assert lines_of(kept) == [(1, 41), (21, 61), (41, 81)]


def test_text_typed_inside_a_line_moves_only_what_lies_below_it() -> None:
    # "x = 1\ny = 2" typed at (30, 4): one line break, the rest of line 30 follows it.
    kept = move_spans(spans((0, 40), (20, 29), (30, 50), (31, 60)), 30, 30, 1, last_starts_line=False)
    assert lines_of(kept) == [(0, 41), (20, 29), (30, 51), (32, 61)]


def test_lines_deleted_drop_the_starts_whose_line_went_and_move_those_below() -> None:
    # Lines 10-12 deleted from (9, 5) to (12, 7), nothing put there: lines 10, 11 and 12's beginnings are gone.
    kept = move_spans(spans((0, 30), (10, 30), (12, 30), (13, 30)), 9, 12, 0, last_starts_line=False)
    assert lines_of(kept) == [(0, 27), (10, 27)]


def test_whole_lines_deleted_keep_the_start_of_the_line_that_followed_them() -> None:
    # Lines 10 and 11 deleted as (10, 0)-(12, 0) -> "": old line 12 is line 10 now; the start on 11 is gone and
    # the one on 10 keeps its line number (its text is another: the next prompt's read count refuses it).
    kept = move_spans(spans((10, 20), (11, 20), (12, 20), (30, 40)), 10, 12, 0, last_starts_line=True)
    assert lines_of(kept) == [(10, 18), (10, 18), (28, 38)]
