"""Document sync: UTF-16/UTF-8 positions, incremental and full changes, stale versions, clamping."""

from __future__ import annotations

import random
import re

import pytest
from lsprotocol import types

from lsp_handlers.documents import (
    BLOCK_LINES,
    Edit,
    StaleVersion,
    TextDocument,
    client_length,
    code_points_for_units,
    file_name_of,
)

U16 = types.PositionEncodingKind.Utf16
U8 = types.PositionEncodingKind.Utf8
U32 = types.PositionEncodingKind.Utf32


def pos(line: int, character: int) -> types.Position:
    return types.Position(line=line, character=character)


def partial(sl: int, sc: int, el: int, ec: int, text: str) -> types.TextDocumentContentChangePartial:
    return types.TextDocumentContentChangePartial(range=types.Range(start=pos(sl, sc), end=pos(el, ec)), text=text)


def test_units_per_encoding() -> None:
    # "a" 1 unit everywhere; "é" U+00E9: 1 UTF-16, 2 UTF-8; "🎉" U+1F389: 2 UTF-16 (a surrogate pair), 4 UTF-8.
    assert client_length("aé🎉", U16) == 1 + 1 + 2
    assert client_length("aé🎉", U8) == 1 + 2 + 4
    assert client_length("aé🎉", U32) == 3
    assert code_points_for_units("aé🎉b", 4, U16) == 3  # after the emoji
    assert code_points_for_units("aé🎉b", 3, U16) == 3  # inside the pair rounds up to the whole character
    assert code_points_for_units("aé🎉b", 7, U8) == 3
    assert code_points_for_units("aé🎉b", 99, U16) == 4  # past the end clamps


def test_offsets_and_positions_with_surrogate_pairs() -> None:
    doc = TextDocument("file:///a.py", 's = "🎉🎉"\nt = 1\n', 1, "python", U16)
    # Line 0: s␠=␠"🎉🎉" -> the closing quote is code point 7, UTF-16 unit 9.
    assert doc.offset_at(pos(0, 9)) == 7
    assert doc.position_at(7) == pos(0, 9)
    assert doc.offset_at(pos(1, 4)) == 13  # 't = 1': line 1 starts at code point 9 (8 chars + newline)
    assert doc.line_at(13) == ("t = ", "1")


def test_positions_past_the_line_or_file_clamp() -> None:
    doc = TextDocument("file:///a.py", "ab\ncd", 1, "python", U16)
    assert doc.offset_at(pos(0, 50)) == 2  # the end of line 0, before its line break
    assert doc.offset_at(pos(7, 3)) == 5  # past the last line: the end of the file


def test_incremental_changes_report_edits_in_old_offsets() -> None:
    doc = TextDocument("file:///a.py", "hello\nworld\n", 1, "python", U16)
    edits = doc.apply([partial(0, 5, 0, 5, "!"), partial(1, 0, 1, 5, "there")], 2)
    assert doc.text == "hello!\nthere\n"
    # The second change's offsets are in the text after the first one: line 1 now starts at 7.
    assert edits == [Edit(5, 5, "!"), Edit(7, 12, "there")]
    assert edits[1].delta == 0


def test_crlf_lines_and_full_change() -> None:
    doc = TextDocument("file:///a.py", "a\r\nbc\r\n", 1, "python", U16)
    assert doc.offset_at(pos(1, 2)) == 5
    assert doc.offset_at(pos(0, 9)) == 1  # clamps before the \r\n
    edits = doc.apply([types.TextDocumentContentChangeWholeDocument(text="new")], 2)
    assert doc.text == "new" and edits == [Edit(0, 7, "new")]


def test_utf8_client_positions() -> None:
    doc = TextDocument("file:///a.py", "é = 1\n", 1, "python", U8)
    assert doc.offset_at(pos(0, 2)) == 1  # 'é' is two UTF-8 bytes
    doc.apply([partial(0, 2, 0, 2, "x")], 2)
    assert doc.text == "éx = 1\n"


def test_stale_versions_are_refused_and_keep_the_text() -> None:
    doc = TextDocument("file:///a.py", "abc", 5, "python", U16)
    with pytest.raises(StaleVersion, match="version 5 arrived after version 5"):
        doc.apply([partial(0, 0, 0, 0, "zzz")], 5)
    with pytest.raises(StaleVersion):
        doc.apply([partial(0, 0, 0, 0, "zzz")], 3)
    assert doc.text == "abc" and doc.version == 5


def test_file_name_of_uris() -> None:
    assert file_name_of("file:///work/app/main.py") == "app/main.py"
    assert file_name_of("file:///main.py") == "main.py"
    assert file_name_of("untitled:Untitled-1") == "Untitled-1"
    assert file_name_of("file:///w/caf%C3%A9/x.py") == "café/x.py"


def _reference_apply(text: str, start: tuple[int, int], end: tuple[int, int], new: str, encoding: str) -> str:
    """One change applied the plain way: the whole text cut at the two offsets (what `apply` must equal)."""
    starts = [0, *(m.end() for m in re.finditer(r"\r\n|\r|\n", text))]

    def offset(line: int, character: int) -> int:
        if line >= len(starts):
            return len(text)
        begin = starts[line]
        stop = starts[line + 1] if line + 1 < len(starts) else len(text)
        content = text[begin:stop].rstrip("\r\n")
        return begin + code_points_for_units(content, character, encoding)

    a, b = sorted((offset(*start), offset(*end)))
    return text[:a] + new + text[b:]


@pytest.mark.parametrize("encoding", [U16, U8, U32])
def test_incremental_changes_equal_cutting_the_whole_text(encoding: str) -> None:
    # Seeded random edits over a text of many blocks, with every kind of line break and characters of
    # 1-4 UTF-8 bytes: line breaks that join ("\r" then "\n"), ranges across blocks, clamped positions.
    rng = random.Random(20)
    pieces = ["a", "é", "🎉", "\n", "\r\n", "\r", " ", "xyz"]
    text = "".join(rng.choice(pieces) for _ in range(3 * BLOCK_LINES * 4))
    doc = TextDocument("file:///r.py", text, 1, "python", encoding)
    for version in range(2, 400):
        lines = text.count("\n") + text.count("\r") - text.count("\r\n") + 1
        start = (rng.randrange(lines + 2), rng.randrange(12))
        span = rng.choice([0, 0, 1, 3, BLOCK_LINES + 5])
        end = (start[0] + rng.randrange(span + 1), rng.randrange(12))
        if rng.random() < 0.5:
            start, end = end, start  # a reversed range is taken in order
        new = "".join(rng.choice(pieces) for _ in range(rng.choice([0, 1, 2, 5, BLOCK_LINES * 3])))
        expected = _reference_apply(text, start, end, new, encoding)
        edits = doc.apply([partial(*start, *end, new)], version)
        assert doc.text == expected, version
        assert edits[0].start <= edits[0].end
        assert expected == text[: edits[0].start] + new + text[edits[0].end :]
        text = expected
        probe = rng.randrange(len(text) + 1)
        assert doc.offset_at(doc.position_at(probe)) <= probe


def test_thousands_of_edits_on_a_megabyte_never_join_the_whole_text() -> None:
    # A didChange of 2,000 edits on a 1 MB file: each edit costs the lines it touches, and the whole
    # text is joined once, when it is read, not once per edit (which stalled the event loop for seconds).
    line = "    value = compute(alpha, beta)  # a line of a large generated module\n"
    count = 1_000_000 // len(line)
    doc = TextDocument("file:///big.py", line * count, 1, "python", U16)
    changes = [partial(i * 7, 20, i * 7, 25, "gamma") for i in range(2000)]  # 'alpha' -> 'gamma' on every 7th line
    doc.apply(changes, 2)
    assert doc.joins == 0
    expected = [line.replace("alpha", "gamma") if i % 7 == 0 and i < 14000 else line for i in range(count)]
    assert doc.text == "".join(expected)
    assert doc.joins == 1
    assert doc.offset_at(pos(13993, 20)) == 13993 * len(line) + 20


def test_long_line_positions_by_codec_equal_counting_by_hand() -> None:
    line = "a" * 5000 + "é🎉" * 3000 + "z"
    for encoding in (U16, U8):
        for units in (0, 1, 4999, 5000, 5001, 5002, 5003, 5004, 9000, 10**6):
            by_hand = 0
            seen = 0
            for ch in line:
                if seen >= units:
                    break
                seen += {U16: 2 if ord(ch) > 0xFFFF else 1, U8: len(ch.encode())}[encoding]
                by_hand += 1
            assert code_points_for_units(line, units, encoding) == by_hand, (encoding, units)
    assert client_length(line, U16) == 5000 + 3000 * 3 + 1
    assert code_points_for_units("a\ud800b", 2, U16) == 2  # a lone surrogate: no codec takes it; counted by hand
