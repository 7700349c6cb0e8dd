"""Edit-after-accept and inferred rejects, on hand-made edit sequences."""

from __future__ import annotations

import pytest

from lsp_handlers.documents import Edit
from lsp_handlers.feedback import (
    KEPT_CONTEXT_CHARS,
    AcceptedText,
    Suggestion,
    TypedInstead,
    Verdict,
    locate,
    survival_ratio,
)


def test_survival_ratio_counts_characters_kept_in_order() -> None:
    assert survival_ratio("return x", "return x") == 1.0
    # "return x" (8) vs "return y": 7 characters match in order.
    assert survival_ratio("return x", "return y") == pytest.approx(7 / 8)
    assert survival_ratio("abcd", "") == 0.0
    assert survival_ratio("", "anything") == 1.0
    assert survival_ratio("ab", "xxaxxbxx") == 1.0


def test_typing_the_suggestion_keeps_it_alive_and_divergence_rejects() -> None:
    s = Suggestion("c1", "u", anchor=10, text="foo()")
    assert s.observe(Edit(10, 10, "fo")) is Verdict.TYPED
    assert s.observe(Edit(12, 12, "o(")) is Verdict.TYPED
    assert s.observe(Edit(2, 2, "##")) is Verdict.UNTOUCHED  # an edit above moves the anchor
    assert (s.anchor, s.typed) == (12, 4)
    assert s.observe(Edit(30, 31, "")) is Verdict.UNTOUCHED  # after the cursor
    assert s.observe(Edit(16, 16, "x")) is Verdict.DIVERGED  # 'x' where ')' was suggested


def test_whole_insert_completes_and_backspace_diverges() -> None:
    s = Suggestion("c1", "u", anchor=5, text="abc")
    assert s.observe(Edit(5, 5, "abc")) is Verdict.COMPLETED
    t = Suggestion("c2", "u", anchor=5, text="abc")
    assert t.observe(Edit(4, 5, "")) is Verdict.DIVERGED


def test_accepted_range_follows_edits() -> None:
    a = AcceptedText("c1", "u", "return x", start=10, end=18)
    a.observe(Edit(0, 0, "# hi\n"))  # above: shifts by 5
    assert (a.start, a.end) == (15, 23)
    a.observe(Edit(23, 23, "  # tail"))  # typing right after it: outside
    assert (a.start, a.end) == (15, 23)
    a.observe(Edit(15, 15, ">>"))  # insertion at its start: before it
    assert (a.start, a.end) == (17, 25)
    a.observe(Edit(24, 25, "y + 1"))  # replaces 'x' inside: the range grows by 4
    assert (a.start, a.end) == (17, 29)
    text = "# hi\n" + " " * 10 + ">>" + "return y + 1" + "  # tail"
    ratio, kept = a.snapshot(text)
    assert kept == "return y + 1" and ratio == pytest.approx(7 / 8)


def test_overlapping_deletion_and_retype() -> None:
    a = AcceptedText("c1", "u", "abcdef", start=10, end=16)
    a.observe(Edit(8, 13, "Z"))  # deletes 2 chars before it and 'abc': the range covers 'Z' + 'def'
    assert (a.start, a.end) == (8, 12)
    a.observe(Edit(8, 12, ""))  # everything deleted
    assert (a.start, a.end) == (8, 8)
    assert a.snapshot("x" * 20) == (0.0, "")


def test_accept_before_insert_waits_for_the_insert() -> None:
    a = AcceptedText("c1", "u", "abc", start=5, end=5, awaiting_insert=True)
    a.observe(Edit(0, 0, "__"))
    assert (a.start, a.awaiting_insert) == (7, True)
    a.observe(Edit(7, 7, "abc"))
    assert (a.start, a.end, a.awaiting_insert) == (7, 10, False)


def test_locate_prefers_the_anchor_then_the_nearest_match() -> None:
    text = "abc....abc..abc"
    assert locate(text, "abc", 7) == 7
    assert locate(text, "abc", 10) == 12  # 12 is nearer to 10 than 7 is
    assert locate(text, "zzz", 3) is None


def test_a_file_replaced_whole_is_judged_around_where_the_accepted_text_was() -> None:
    # The accepted "return x" sits at 100..108 of a 1 MB file; the editor then replaces the whole file
    # (a formatter, a reload) with one where "return y" stands there. The range now spans the file, but
    # the snapshot compares and keeps only KEPT_CONTEXT_CHARS either side of offset 100.
    filler = "# filler\n" * 11  # 99 characters, none of them an 'x'
    old = filler + " return x\n" + "# more\n" * 150_000
    a = AcceptedText("c1", "u", "return x", start=100, end=108)
    new = filler + " return y\n" + "# MORE\n" * 150_000
    a.observe(Edit(0, len(old), new))
    assert (a.start, a.end, a.origin) == (0, len(new), 100)
    ratio, kept = a.snapshot(new)
    assert kept == new[0 : 100 + 8 + KEPT_CONTEXT_CHARS]  # from the file's start (100 - 2000 < 0) to 2108
    assert ratio == pytest.approx(7 / 8)  # "return " kept, no 'x' anywhere in the window
    # An edit above moves the window with it.
    a.observe(Edit(0, 0, "#!" * 3000))
    assert (a.start, a.origin) == (6000, 6100)
    ratio, kept = a.snapshot("#!" * 3000 + new)
    assert kept == new[0:2108] and ratio == pytest.approx(7 / 8)


def test_what_is_written_in_place_of_a_rejected_suggestion_is_followed() -> None:
    # "x = compute(" was suggested at offset 10; the developer typed "x = " of it, then "load(":
    # the range starts at the anchor with what they had typed, and the diverging edit is its first.
    t = TypedInstead("c1", "u", "x = compute()", start=10, end=14)
    t.observe(Edit(14, 14, "l"))  # at its end: grows
    t.observe(Edit(15, 15, "oad("))
    assert (t.start, t.end) == (10, 19)
    t.observe(Edit(0, 0, "#\n"))  # above: moves
    assert (t.start, t.end) == (12, 21)
    t.observe(Edit(11, 12, ""))  # the character just before it, deleted: touches it, the range takes the place
    assert (t.start, t.end) == (11, 20)
    t.observe(Edit(25, 25, "zzz"))  # further on: outside
    assert (t.start, t.end) == (11, 20)
    text = "#\n" + " " * 9 + "x = load(path)\nnext_line()\n"
    t.end = len(text)  # the developer typed on, past the line the suggestion filled
    ratio, kept = t.snapshot(text)
    # One line suggested: one line kept. Of "x = compute()" (13), "x = " and then "o", "p", "t", ")" appear in
    # order in "x = load(path)\n": 8 characters.
    assert kept == "x = load(path)\n" and ratio == pytest.approx(8 / 13)


def test_a_multi_line_suggestion_keeps_as_many_lines_of_what_was_written() -> None:
    t = TypedInstead("c1", "u", "a = 1\nb = 2\n", start=0, end=0)
    t.observe(Edit(0, 0, "a = 10\nb = 20\nc = 30\n"))
    assert t.snapshot("a = 10\nb = 20\nc = 30\n")[1] == "a = 10\nb = 20\n"
