"""`move_spans` and `with_span`: where a document's warm starts are after an edit or a new warm, against hand-worked
line numbers."""

from __future__ import annotations

from lsp_handlers.completion import WarmSpan, move_spans, with_span


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


def test_a_new_warm_takes_the_place_of_the_start_on_its_line_and_the_least_used_goes_past_the_limit() -> None:
    old = [WarmSpan("v1", 0, "a", 10, used=1.0), WarmSpan("v1", 20, "b", 40, used=2.0), WarmSpan("v2", 20, "c", 30)]
    new = WarmSpan("v1", 20, "", 45, used=3.0)
    kept = with_span(old, new, 32)
    assert kept is not None and [(s.first_line, s.version, s.head) for s in kept] == [
        (0, "v1", "a"),
        (20, "v2", "c"),  # another adapter version's start on that line stays
        (20, "v1", ""),
    ]
    latest = WarmSpan("v1", 5, "", 15, used=4.0)
    fewer = with_span(kept, latest, 3)  # four starts, three kept: the one used at 1.0 goes
    assert fewer is not None and [(s.first_line, s.version) for s in fewer] == [(5, "v1"), (20, "v2"), (20, "v1")]


def test_a_warm_on_opening_leaves_a_rested_cursors_start_on_its_line_alone() -> None:
    rested = WarmSpan("v1", 0, "the whole prompt at the cursor", 60, rested=True)
    other = WarmSpan("v1", 80, "b", 120)
    opening = WarmSpan("v1", 0, "", 70)
    assert with_span([rested, other], opening, 32, opening=True) is None
    # another line, or another adapter version's start on that line: taken as any
    below = with_span([rested, other], WarmSpan("v1", 40, "", 90), 32, opening=True)
    assert below is not None and [s.first_line for s in below] == [0, 40, 80]
    version = with_span([rested], WarmSpan("v2", 0, "", 70), 32, opening=True)
    assert version is not None and len(version) == 2
    # a cursor's or a request's warm takes its line's place, rested or not
    again = with_span([rested, other], opening, 32)
    assert again is not None and [s.head for s in again] == ["", "b"]
