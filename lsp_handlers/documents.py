"""The open documents of one LSP connection, kept in sync with the editor.

Positions arrive in the client's encoding (UTF-16 code units unless the client negotiated UTF-8 or
UTF-32); Python strings index by code point, so every position is converted here, on the one line
it names. Each applied change is reported as an `Edit` in code-point offsets of the text *before*
that change, which is what the edit-after-accept tracker needs to follow an accepted range.

Positions past the end of a line or of the file are clamped (the LSP rule for line ends), never an
error. A change whose version is not newer than the document's is stale: it is refused with
`StaleVersion` and the document keeps its text, so one late message cannot corrupt it.

This module holds text only: no engine, no store, no protocol objects beyond lsprotocol's types.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

from lsprotocol import types

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


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
    if encoding == types.PositionEncodingKind.Utf32:
        return len(text)
    if encoding == types.PositionEncodingKind.Utf16:
        return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)
    return len(text.encode("utf-8", errors="surrogatepass"))


def code_points_for_units(text: str, units: int, encoding: str) -> int:
    """How many leading code points of `text` make up `units` client units (clamped to the text).

    A position inside a surrogate pair (or a UTF-8 sequence) rounds up to the whole character.
    """
    if units <= 0:
        return 0
    if encoding == types.PositionEncodingKind.Utf32:
        return min(units, len(text))
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


class TextDocument:
    """The text of one open document, its version and language, with position conversion."""

    def __init__(self, uri: str, text: str, version: int | None, language_id: str | None, encoding: str) -> None:
        self.uri = uri
        self.version = version
        self.language_id = language_id
        self.encoding = encoding
        self._text = text
        self._line_starts: list[int] | None = None

    @property
    def text(self) -> str:
        return self._text

    def _starts(self) -> list[int]:
        # Built lazily: a burst of keystrokes costs one scan, and a 5 MB file scans in milliseconds.
        if self._line_starts is None:
            self._line_starts = [0, *(m.end() for m in _LINE_BREAK.finditer(self._text))]
        return self._line_starts

    def _line_span(self, line: int) -> tuple[int, int]:
        """[start, end) of line `line` without its line break."""
        starts = self._starts()
        start = starts[line]
        end = starts[line + 1] if line + 1 < len(starts) else len(self._text)
        while end > start and self._text[end - 1] in "\r\n":
            end -= 1
        return start, end

    def offset_at(self, position: types.Position) -> int:
        """Code-point offset of a client position; past the line end or the file end clamps."""
        if position.line < 0 or position.character < 0:
            raise DocumentError(
                f"{self.uri}: position line {position.line}, character {position.character} is negative; "
                "positions are zero-based and non-negative"
            )
        starts = self._starts()
        if position.line >= len(starts):
            return len(self._text)
        start, end = self._line_span(position.line)
        line = self._text[start:end]
        return start + code_points_for_units(line, position.character, self.encoding)

    def position_at(self, offset: int) -> types.Position:
        """The client position of a code-point offset."""
        offset = max(0, min(offset, len(self._text)))
        starts = self._starts()
        line = bisect.bisect_right(starts, offset) - 1
        start, end = self._line_span(line)
        offset = min(offset, end)
        return types.Position(line=line, character=client_length(self._text[start:offset], self.encoding))

    def line_at(self, offset: int) -> tuple[str, str]:
        """(text of the line before `offset`, text of the line after it), without the line break."""
        starts = self._starts()
        line = bisect.bisect_right(starts, offset) - 1
        start, end = self._line_span(line)
        return self._text[start:offset], self._text[offset:end] if offset <= end else ""

    def apply(self, changes: Iterable[types.TextDocumentContentChangeEvent], version: int | None) -> list[Edit]:
        """Apply one didChange; return the edits in order (each in offsets of the text before it)."""
        if version is not None and self.version is not None and version <= self.version:
            raise StaleVersion(
                f"{self.uri}: change to version {version} arrived after version {self.version}; it was ignored "
                "(versions must increase; the client should resend the document with didOpen)"
            )
        edits: list[Edit] = []
        text = self._text
        for change in changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                start = self.offset_at(change.range.start)
                end = self.offset_at(change.range.end)
                if end < start:
                    start, end = end, start
                edit = Edit(start, end, change.text)
                text = text[:start] + change.text + text[end:]
            else:
                edit = Edit(0, len(text), change.text)
                text = change.text
            self._text = text
            self._line_starts = None
            edits.append(edit)
        self.version = version
        return edits


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
            raise DocumentError(f"document {uri!r} is not open; send textDocument/didOpen before asking about it")
        return doc

    def find(self, uri: str) -> TextDocument | None:
        return self._docs.get(uri)
