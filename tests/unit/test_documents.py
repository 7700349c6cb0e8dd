"""Document sync: UTF-16/UTF-8 positions, incremental and full changes, stale versions, clamping."""

from __future__ import annotations

import pytest
from lsprotocol import types

from lsp_handlers.documents import (
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
