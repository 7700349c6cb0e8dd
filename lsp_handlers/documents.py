"""The open documents of one LSP connection, kept in sync with the editor.

Positions arrive in the client's encoding (UTF-16 code units unless the client negotiated UTF-8 or
UTF-32); Python strings index by code point, so every position is converted here, on the one line
it names. Each applied change is reported as an `Edit` in code-point offsets of the text *before*
that change, which is what the edit-after-accept tracker needs to follow an accepted range.

Positions past the end of a line or of the file are clamped (the LSP rule for line ends), never an
error. A change whose version is not newer than the document's is stale: it is refused with
`StaleVersion` and the document keeps its text, so one late message cannot corrupt it.

A didChange may carry thousands of edits (a multi-cursor replace, or a client that is not an editor),
and every connection shares one event loop, so an edit must cost about the size of the lines it
touches, not the size of the document: the text is held as lines in blocks of about `BLOCK_LINES`,
each block knowing its length, and the whole string is joined only when someone reads `text`.

This module holds text only: no engine, no store, no protocol objects beyond lsprotocol's types.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from lsprotocol import types

from server.logs import clip

_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")
BLOCK_LINES = 256  # lines per block of a document's text (see the module docstring)


class DocumentError(ValueError):
    """A document request that cannot be served; the message names the document and the fix."""


class StaleVersion(DocumentError):
    """A change older than the text the server holds."""


@dataclass(frozen=True, slots=True)
class Edit:
    """One applied change: `[start, end)` of the old text (code points) replaced by `text`."""

    start: int
    end: int
    text: str

    @property
    def delta(self) -> int:
        return len(self.text) - (self.end - self.start)


def _units(ch: str, encoding: str) -> int:
    cp = ord(ch)
    if encoding == types.PositionEncodingKind.Utf16:
        return 2 if cp > 0xFFFF else 1
    if encoding == types.PositionEncodingKind.Utf8:
        return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4
    return 1


def client_length(text: str, encoding: str) -> int:
    """Length of `text` in the client's position units."""
    if encoding == types.PositionEncodingKind.Utf32 or text.isascii():
        return len(text)
    if encoding == types.PositionEncodingKind.Utf16:
        return len(text.encode("utf-16-le", errors="surrogatepass")) // 2
    return len(text.encode("utf-8", errors="surrogatepass"))


def code_points_for_units(text: str, units: int, encoding: str) -> int:
    """How many leading code points of `text` make up `units` client units (clamped to the text).

    A position inside a surrogate pair (or a UTF-8 sequence) rounds up to the whole character. The
    count is done by the codecs (a position on a megabyte-long line costs one encode, not a Python
    loop per character); a line holding lone surrogates, which no codec takes, is counted by hand.
    """
    if units <= 0:
        return 0
    if encoding == types.PositionEncodingKind.Utf32 or text.isascii():
        return min(units, len(text))
    try:
        if encoding == types.PositionEncodingKind.Utf16:
            data = text.encode("utf-16-le")
            cut = min(2 * units, len(data))
            if cut < len(data) and 0xD800 <= int.from_bytes(data[cut - 2 : cut], "little") <= 0xDBFF:
                cut += 2  # inside a surrogate pair: the whole character
            return len(data[:cut].decode("utf-16-le"))
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        return _code_points_by_hand(text, units, encoding)
    cut = min(units, len(data))
    while cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut += 1  # inside a UTF-8 sequence: the whole character
    return len(data[:cut].decode("utf-8"))


def _code_points_by_hand(text: str, units: int, encoding: str) -> int:
    seen = 0
    for i, ch in enumerate(text):
        if seen >= units:
            return i
        seen += _units(ch, encoding)
    return len(text)


def file_name_of(uri: str) -> str:
    """The last two path components of a document URI, for the prompt header (`file:///w/app/x.py` -> `app/x.py`)."""
    path = unquote(urlparse(uri).path) or uri
    parts = [p for p in PurePosixPath(path).parts if p != "/"]
    return "/".join(parts[-2:]) if parts else uri


def split_lines(text: str) -> list[str]:
    """`text` as lines, each ending with its line break (\\r\\n, \\r or \\n); the last has none and may be empty."""
    parts = _LINE_BREAK.split(text)  # [line, break, line, break, ..., last line]
    return [*map(str.__add__, parts[0:-1:2], parts[1::2]), parts[-1]]


def _content(line: str) -> str:
    """A line without its line break (a line holds no other \\r or \\n)."""
    return line.rstrip("\r\n")


@dataclass(frozen=True, slots=True)
class _Place:
    """Where a position falls: line number, its block and index there, the line's start offset, the column."""

    line: int
    block: int
    index: int
    start: int
    column: int  # code points into the line's content

    @property
    def offset(self) -> int:
        return self.start + self.column


class TextDocument:
    """The text of one open document, its version and language, with position conversion."""

    def __init__(self, uri: str, text: str, version: int | None, language_id: str | None, encoding: str) -> None:
        self.uri = uri
        self.version = version
        self.language_id = language_id
        self.encoding = encoding
        self.joins = 0  # how often the whole text was joined from its lines: once per read after a change
        self._text: str | None = None  # the whole text, joined when read
        self._set_text(text)

    def _set_text(self, text: str) -> None:
        self._set_lines(split_lines(text))
        self._text = text

    def _set_lines(self, lines: list[str]) -> None:
        self._blocks = [lines[i : i + BLOCK_LINES] for i in range(0, len(lines), BLOCK_LINES)]
        self._block_chars = [sum(map(len, block)) for block in self._blocks]
        self._text = None

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(itertools.chain.from_iterable(self._blocks))
            self.joins += 1
        return self._text

    def __len__(self) -> int:
        """Length of the text in code points."""
        return sum(self._block_chars)

    def _line_place(self, line: int) -> tuple[int, int, int] | None:
        """(block, index in it, start offset) of line `line`; None past the last line."""
        start = 0
        for b, block in enumerate(self._blocks):
            if line < len(block):
                return b, line, start + sum(map(len, block[:line]))
            line -= len(block)
            start += self._block_chars[b]
        return None

    def _place(self, position: types.Position) -> _Place:
        """Where a client position falls; past the line end or the file end clamps."""
        if position.line < 0 or position.character < 0:
            raise DocumentError(
                f"{clip(self.uri)}: position line {position.line}, character {position.character} is negative; "
                "positions are zero-based and non-negative"
            )
        found = self._line_place(position.line)
        if found is None:  # past the last line: the end of the file
            b = len(self._blocks) - 1
            i = len(self._blocks[b]) - 1
            last = self._blocks[b][i]
            line_no = sum(map(len, self._blocks)) - 1
            return _Place(line_no, b, i, len(self) - len(last), len(_content(last)))
        b, i, start = found
        content = _content(self._blocks[b][i])
        return _Place(position.line, b, i, start, code_points_for_units(content, position.character, self.encoding))

    def _offset_place(self, offset: int) -> tuple[int, int, int, int]:
        """(line number, block, index in it, start offset) of the line holding code-point `offset`."""
        line_no = start = 0
        last_block = len(self._blocks) - 1
        for b, block in enumerate(self._blocks):
            if offset < start + self._block_chars[b] or b == last_block:
                for i, line in enumerate(block):
                    if offset < start + len(line) or i == len(block) - 1:
                        return line_no + i, b, i, start
                    start += len(line)
            line_no += len(block)
            start += self._block_chars[b]
        raise AssertionError("a document always has a line")

    def offset_at(self, position: types.Position) -> int:
        """Code-point offset of a client position; past the line end or the file end clamps."""
        return self._place(position).offset

    def position_at(self, offset: int) -> types.Position:
        """The client position of a code-point offset."""
        offset = max(0, min(offset, len(self)))
        line_no, b, i, start = self._offset_place(offset)
        content = _content(self._blocks[b][i])
        column = min(offset - start, len(content))
        return types.Position(line=line_no, character=client_length(content[:column], self.encoding))

    def line_at(self, offset: int) -> tuple[str, str]:
        """(text of the line before `offset`, text of the line after it), without the line break."""
        _, b, i, start = self._offset_place(offset)
        line = self._blocks[b][i]
        content = _content(line)
        column = offset - start
        return line[:column], content[column:] if column <= len(content) else ""

    def apply(self, changes: Iterable[types.TextDocumentContentChangeEvent], version: int | None) -> list[Edit]:
        """Apply one didChange; return the edits in order (each in offsets of the text before it)."""
        if version is not None and self.version is not None and version <= self.version:
            raise StaleVersion(
                f"{clip(self.uri)}: change to version {version} arrived after version {self.version}; it was "
                "ignored (versions must increase; the client should resend the document with didOpen)"
            )
        edits: list[Edit] = []
        for change in changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                edits.append(self._replace(change.range, change.text))
            else:
                edits.append(Edit(0, len(self), change.text))
                self._set_text(change.text)
        self.version = version
        return edits

    def _replace(self, where: types.Range, text: str) -> Edit:
        """Replace a range by `text`, touching only the lines it spans."""
        first, last = self._place(where.start), self._place(where.end)
        if last.offset < first.offset:
            first, last = last, first
        edit = Edit(first.offset, last.offset, text)
        head = self._blocks[first.block][first.index][: first.column]
        tail = self._blocks[last.block][last.index][last.column :]
        from_line = first.line
        if not head and first.line > 0 and (text or tail).startswith("\n"):
            above = self._line_place(first.line - 1)
            assert above is not None
            before = self._blocks[above[0]][above[1]]
            if before.endswith("\r"):  # "\r" + "\n" become one line break
                from_line, head = first.line - 1, before
        lines = split_lines(head + text + tail)
        if tail.endswith(("\r", "\n")):
            lines.pop()  # the lines after the range follow; the split's empty last line is not one
        self._splice(from_line, last.line, lines)
        self._text = None
        return edit

    def _splice(self, first: int, last: int, lines: list[str]) -> None:
        """Put `lines` in place of lines `first`..`last` (inclusive), keeping the blocks balanced."""
        a = self._line_place(first)
        z = self._line_place(last)
        assert a is not None and z is not None
        (ab, ai, _), (zb, zi, _) = a, z
        if ab == zb:
            self._blocks[ab][ai : zi + 1] = lines
        else:
            self._blocks[ab][ai:] = lines
            del self._blocks[zb][: zi + 1]
            del self._blocks[ab + 1 : zb]
            del self._block_chars[ab + 1 : zb]
        for b in (ab + 1, ab) if ab != zb else (ab,):
            self._block_chars[b] = sum(map(len, self._blocks[b]))
            if len(self._blocks[b]) > 2 * BLOCK_LINES or not self._blocks[b]:
                block = self._blocks[b]
                pieces = [block[i : i + BLOCK_LINES] for i in range(0, len(block), BLOCK_LINES)]
                self._blocks[b : b + 1] = pieces
                self._block_chars[b : b + 1] = [sum(map(len, p)) for p in pieces]
        lines_now = sum(map(len, self._blocks))
        if len(self._blocks) > 2 * (lines_now // BLOCK_LINES) + 8:
            # Deletions left many small blocks: regroup the lines (rare, and linear once).
            self._set_lines(list(itertools.chain.from_iterable(self._blocks)))


class DocumentStore:
    """The documents one connection has open, by URI."""

    def __init__(self, encoding: str = types.PositionEncodingKind.Utf16) -> None:
        self.encoding = encoding
        self._docs: dict[str, TextDocument] = {}

    def open(self, item: types.TextDocumentItem) -> TextDocument:
        doc = TextDocument(item.uri, item.text, item.version, item.language_id, self.encoding)
        self._docs[item.uri] = doc
        return doc

    def close(self, uri: str) -> TextDocument | None:
        return self._docs.pop(uri, None)

    def get(self, uri: str) -> TextDocument:
        doc = self._docs.get(uri)
        if doc is None:
            raise DocumentError(f"document {clip(uri)!r} is not open; send textDocument/didOpen before asking about it")
        return doc

    def find(self, uri: str) -> TextDocument | None:
        return self._docs.get(uri)

    def texts(self) -> list[tuple[str, str]]:
        """(uri, text) of every open document."""
        return [(uri, doc.text) for uri, doc in self._docs.items()]
