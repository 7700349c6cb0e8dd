"""From the raw text a model generated to the completion the editor shows (or None: show nothing).

Small models often keep going past what belongs at the cursor: they finish the line and then re-type the
closing bracket that is already there, re-generate the code that follows the cursor, or repeat the line
above. `postprocess` trims those with a few precise, documented rules; `is_single_line` decides whether the
completion must end at the line end.

Pure string functions: no I/O, no engine or tokenizer calls, no logging, no settings lookup. Inputs are
expected to be small (one completion, one line, a few hundred characters of context) except `after`, which
may be the rest of a large file and is only scanned up to its first non-blank line.
"""

from __future__ import annotations

__all__ = ["is_single_line", "postprocess"]

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {")": "(", "]": "[", "}": "{"}
_QUOTES = frozenset("\"'`")
_OVERLAP_MAX_CHARS = 200  # longest line_suffix head compared in rule 2
_DISTINCTIVE_CHARS = 8  # a stripped line this long with a letter or digit in it is "distinctive" (rule 3)


def is_single_line(line_prefix: str, line_suffix: str) -> bool:
    """True when the cursor is in the middle of a line: the rest of its line has non-whitespace text.

    `line_suffix` is the text from the cursor to the end of its line (a trailing line ending is ignored).
    `line_prefix` (the line's text before the cursor) does not change the answer; it is part of the signature
    so that callers pass both halves of the line.
    """
    del line_prefix
    return bool(line_suffix.strip())


def _first_line(text: str) -> str:
    """`text` up to its first line break ("\\n" or "\\r\\n")."""
    newline = text.find("\n")
    if newline < 0:
        return text
    return text[: newline - 1] if newline > 0 and text[newline - 1] == "\r" else text[:newline]


def _unmatched_closers(line: str) -> list[bool]:
    """For each character of `line`: True if it is a closing bracket with no matching opener before it in `line`."""
    stack: list[str] = []
    unmatched = [False] * len(line)
    for i, ch in enumerate(line):
        if ch in _OPENERS:
            stack.append(ch)
        elif ch in _CLOSERS:
            if stack and stack[-1] == _CLOSERS[ch]:
                stack.pop()
            else:
                unmatched[i] = True
    return unmatched


def _is_duplicate_tail(line: str, k: int) -> bool:
    """Whether the last k characters of `line` can be the editor's closing text rather than the model's own.

    No closing bracket in the tail may close an opener from earlier in `line` (in `foo(a)` the ")" closes
    "foo(", so it is the model's own), and no quote in the tail may close a string the line opened (the line
    before the tail holds an odd number of that quote).
    """
    unmatched = _unmatched_closers(line)
    head = line[:-k]
    stack_depth_inside_tail = 0
    for i in range(len(line) - k, len(line)):
        ch = line[i]
        if ch in _OPENERS:
            stack_depth_inside_tail += 1
        elif ch in _CLOSERS:
            if stack_depth_inside_tail > 0:
                stack_depth_inside_tail -= 1  # closes an opener inside the tail: the tail is self-contained
            elif not unmatched[i]:
                return False
        elif ch in _QUOTES and head.count(ch) % 2 == 1:
            return False
    return True


def _drop_suffix_overlap(line: str, line_suffix: str) -> str:
    """Rule 2 on a one-line completion: drop its tail that the rest of the cursor line already starts with."""
    target = line_suffix.strip()[:_OVERLAP_MAX_CHARS]
    if not target:
        return line
    trimmed = line.rstrip()
    for k in range(min(len(trimmed), len(target)), 0, -1):
        if trimmed.endswith(target[:k]) and _is_duplicate_tail(trimmed, k):
            return trimmed[:-k]
    return line


def _first_nonblank_line(after: str) -> str | None:
    """The first non-blank line of `after` (without its line ending), or None; scans no further."""
    start = 0
    while True:
        newline = after.find("\n", start)
        line = after[start:] if newline < 0 else after[start:newline]
        if line.strip():
            return line.rstrip("\r")
        if newline < 0:
            return None
        start = newline + 1


def _indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _same_line(candidate: str, existing: str) -> bool:
    """Rule 3's test: equal when stripped; short or punctuation-only lines must also match the indentation."""
    stripped = existing.strip()
    if not stripped or candidate.strip() != stripped:
        return False
    distinctive = len(stripped) >= _DISTINCTIVE_CHARS and any(ch.isalnum() for ch in stripped)
    return distinctive or _indentation(candidate) == _indentation(existing)


def _cut_before_following_code(text: str, after: str) -> str:
    """Rule 3: cut `text` just before its first line (after the first) that is the code after the cursor."""
    existing = _first_nonblank_line(after)
    if existing is None:
        return text
    lines = text.split("\n")
    position = len(lines[0]) + 1
    for line in lines[1:]:
        if _same_line(line, existing):
            return text[:position]
        position += len(line) + 1
    return text


def _cut_at_block_end(text: str, line_prefix: str) -> str:
    """Rule 3b: cut before the first later line that leaves the cursor's block (indented less than the cursor
    line), keeping it when it only closes brackets (`}`, `)`, `]`, optionally followed by `;` or `,`)."""
    ref = len(_indentation(line_prefix))
    if ref == 0:
        return text
    lines = text.split("\n")
    for i in range(1, len(lines)):
        line = lines[i]
        if not line.strip() or len(_indentation(line)) >= ref:
            continue
        if line.strip().rstrip(";,") and all(ch in ")]}" for ch in line.strip().rstrip(";,")):
            return "\n".join(lines[: i + 1])
        return "\n".join(lines[:i])
    return text


def _last_nonblank_lines(text: str, count: int) -> list[str]:
    """The last `count` non-blank lines of `text`, stripped, in document order (fewer if it has fewer)."""
    found: list[str] = []
    end = len(text)
    while end >= 0 and len(found) < count:
        start = text.rfind("\n", 0, end) + 1
        line = text[start:end].strip()
        if line:
            found.append(line)
        end = start - 1
    found.reverse()
    return found


def _repeats_before(text: str, line_prefix: str, before_tail: str) -> bool:
    """Rule 5's repeat test (see `postprocess`)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not any(ch.isalnum() for line in lines for ch in line):
        return False
    if _last_nonblank_lines(before_tail, len(lines)) == lines:
        return True
    if len(lines) == 1 and "\n" not in text and line_prefix.strip():
        cursor_line_start = before_tail.rfind("\n") + 1
        previous = _last_nonblank_lines(before_tail[: max(cursor_line_start - 1, 0)], 1)
        return previous == [(line_prefix + text).strip()]
    return False


def postprocess(
    raw: str,
    *,
    line_prefix: str,
    line_suffix: str,
    after: str,
    before_tail: str,
    single_line: bool,
) -> str | None:
    """The completion to show for the model's `raw` text, or None when nothing is worth showing.

    Arguments: `line_prefix` / `line_suffix` are the cursor line's text before / after the cursor (without the
    line ending); `after` is the document text after the cursor's line, from the start of the next line
    (leading blank lines may be there or stripped; only its first non-blank line is read); `before_tail` is
    the last few hundred characters before the cursor (it ends with `line_prefix`); `single_line` says the
    completion must end at the line end (see `is_single_line`).

    Rules, applied in this order:

    1. Single line: with `single_line`, cut at the first line break ("\\r\\n" or "\\n"). A completion that
       starts with a line break is thereby empty, hence None (rule 5).
    2. Suffix overlap on the cursor line (only when the completion is one line, because only then does
       `line_suffix` end up right after it; a multi-line completion pushes it behind its last line): let
       T = `line_suffix.strip()` and L = the completion with trailing whitespace removed. Take the largest
       k >= 1 such that L ends with T[:k] (k = len(T): L ends with the entire rest of the line) and the last k
       characters of L are a duplicate of the editor's text, not the model's own: no closing bracket among
       them closes an opener earlier in L, and no quote among them closes a string L opened (L before them
       holds an odd number of that quote). If there is one, the completion is L without those k characters.
       So `x, y)` before `)` becomes `x, y`, but `foo(a)` before `)` is kept.
    3. Multi-line (not `single_line`): let E be the first non-blank line of `after` (the code below the
       cursor line).
       The completion is cut just before its first line (the first line excepted) that equals E when both are
       stripped; a short or punctuation-only E (fewer than 8 characters, or no letter or digit, e.g. `}`,
       `end`, `return`) must also have the same indentation, so that a nested block's own `}` is not taken
       for the enclosing block's.
       3b. Then the completion is cut before its first later line that is indented less than the cursor
       line (it left the cursor's block: the model went on to write the next function), except that a line
       of closing brackets only (`}`, `)`, `]`, with `;` or `,`) is kept as the block's end and the cut made
       after it. A cursor line without indentation never cuts.
    4. Trailing whitespace and line breaks at the very end of the completion are removed; indentation and
       whitespace inside it are kept exactly, and so is its leading whitespace.
    5. None when what is left is empty or whitespace-only, or when it repeats the text before the cursor.
       Only a completion with a letter or digit in it can be a repeat (so `)`, `}` or `];` never are), and it
       is one when (a) its non-blank lines, stripped, equal the last as many non-blank lines of
       `before_tail`, stripped (the cursor line's text before the cursor counts as a line when non-blank), or
       (b) it is one line, the cursor line's text before the cursor is non-blank, and that text plus the
       completion, stripped, equals the last non-blank line above the cursor line, stripped (the model
       re-typed the previous line).
    """
    text = raw
    if single_line:
        text = _first_line(text)
    if "\n" not in text:
        text = _drop_suffix_overlap(text, line_suffix)
    elif not single_line:
        text = _cut_before_following_code(text, after)
        text = _cut_at_block_end(text, line_prefix)
    text = text.rstrip()
    if not text.strip():
        return None
    if _repeats_before(text, line_prefix, before_tail):
        return None
    return text
