"""What the developer does with a suggestion, followed through the document's edits.

Two pieces of bookkeeping, both pure (they see `Edit`s, return verdicts, and never write anything):

- `Suggestion`: a completion the editor was given and that is not resolved yet. Typing that matches
  it keeps it alive; any other edit at the cursor means the developer typed past it, which counts as
  an inferred reject.
- `AcceptedText`: the range an accepted (or partly accepted) suggestion occupies, moved along with
  every later edit, so that at each snapshot delay we can say how much of the accepted text survives
  (`survival_ratio`) and what the developer kept there (the "next state" the trainer learns from).
- `TypedInstead`: after a reject, the range where the developer writes their own code instead, followed
  the same way: what they wrote there is the rejected turn's next state.

Offsets are code points of the document's text, as `lsp_handlers.documents.Edit` reports them.

A snapshot runs on the event loop every connection shares, and a character diff costs about the product
of its two lengths, so it never compares against more than the accepted text and `KEPT_CONTEXT_CHARS`
either side of it: an edit that swallows the accepted range (a formatter or a reload that replaces the
whole file) makes the range span the file, and then the text around where the accepted text was is
compared, and kept, instead of megabytes.
"""

from __future__ import annotations

import difflib
import enum
from dataclasses import dataclass, field

from lsp_handlers.documents import Edit

KEPT_CONTEXT_CHARS = 2000  # of text either side of an accepted text whose range grew past it


def surviving_characters(accepted: str, current: str) -> int:
    """How many of `accepted`'s characters are still present, in order, in `current` (a character diff)."""
    matcher = difflib.SequenceMatcher(None, accepted, current, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks())


def survival_ratio(accepted: str, current: str) -> float:
    """Share of `accepted`'s characters still present, in order, in `current` (1.0 for an empty accept)."""
    if not accepted:
        return 1.0
    return min(1.0, surviving_characters(accepted, current) / len(accepted))


class Verdict(enum.Enum):
    UNTOUCHED = "untouched"  # the edit was elsewhere
    TYPED = "typed"  # the developer typed the suggestion's next characters
    COMPLETED = "completed"  # the whole suggestion is now in the document (an accept inserts it so)
    DIVERGED = "diverged"  # the developer typed or deleted something else at the cursor


@dataclass(slots=True)
class Suggestion:
    """A suggestion given to the editor at `anchor`, of which `typed` characters were typed since."""

    completion_id: str
    uri: str
    anchor: int
    text: str
    typed: int = 0

    @property
    def cursor(self) -> int:
        return self.anchor + self.typed

    def observe(self, edit: Edit) -> Verdict:
        if edit.end < self.anchor:
            self.anchor += edit.delta
            return Verdict.UNTOUCHED
        if edit.start > self.cursor:
            return Verdict.UNTOUCHED
        rest = self.text[self.typed :]
        if edit.start == edit.end == self.cursor and edit.text and rest.startswith(edit.text):
            self.typed += len(edit.text)
            return Verdict.COMPLETED if self.typed == len(self.text) else Verdict.TYPED
        return Verdict.DIVERGED


@dataclass(slots=True)
class AcceptedText:
    """The range `[start, end)` an accepted text occupies, and the snapshots still to take."""

    completion_id: str
    uri: str
    accepted: str
    start: int
    end: int
    awaiting_insert: bool = False  # the accept arrived before the edit that inserts the text
    pending_delays: list[float] = field(default_factory=list)
    origin: int | None = None  # where the range started when an edit first overlapped it (None: none has)

    def observe(self, edit: Edit) -> None:
        if self.awaiting_insert:
            if edit.start == edit.end == self.start and edit.text.startswith(self.accepted):
                self.end = self.start + len(self.accepted)
                self.awaiting_insert = False
                return
            if edit.end <= self.start and not (edit.start == edit.end == self.start):
                self.start += edit.delta
                self.end += edit.delta
            return
        if edit.end <= self.start:
            # Entirely before the range; an insertion exactly at its start is before it too.
            self.start += edit.delta
            self.end += edit.delta
            if self.origin is not None:
                self.origin += edit.delta
        elif edit.start >= self.end:
            return  # entirely after the range, typing right after it included
        else:
            # Overlaps the range: the range grows to cover what replaced the overlapped text.
            if self.origin is None:
                self.origin = self.start
            new_start = min(self.start, edit.start)
            self.end = max(new_start, max(self.end, edit.end) + edit.delta)
            self.start = new_start

    def snapshot(self, text: str) -> tuple[float, str]:
        """(survival ratio, kept text) against the document's current `text`.

        A range grown past `KEPT_CONTEXT_CHARS` either side of the accepted text is judged, and kept, by
        the window of that size around where the accepted text was (see the module docstring).
        """
        if self.awaiting_insert:
            return 0.0, ""
        if self.end - self.start > len(self.accepted) + 2 * KEPT_CONTEXT_CHARS:
            at = self.start if self.origin is None else min(max(self.origin, self.start), self.end)
            lo = max(self.start, at - KEPT_CONTEXT_CHARS)
            kept = text[lo : min(self.end, at + len(self.accepted) + KEPT_CONTEXT_CHARS)]
        else:
            kept = text[self.start : self.end]
        return survival_ratio(self.accepted, kept), kept


@dataclass(slots=True)
class TypedInstead:
    """What the developer writes where a suggestion they rejected (explicitly, or by typing past it) would
    have gone: the range `[start, end)` grows with every edit that touches it (insertions at either edge
    included) and moves with edits before it. At the snapshot delays it is recorded as the rejected turn's
    kept text, the next state the trainer learns from, as for an accepted suggestion that was rewritten.

    The developer goes on typing past the place the suggestion filled, so the kept text is cut to as many
    lines as the suggestion had (and `KEPT_CONTEXT_CHARS` characters)."""

    completion_id: str
    uri: str
    suggestion: str
    start: int
    end: int
    pending_delays: list[float] = field(default_factory=list)

    def observe(self, edit: Edit) -> None:
        if edit.end < self.start:
            self.start += edit.delta
            self.end += edit.delta
        elif edit.start <= self.end:
            new_start = min(self.start, edit.start)
            self.end = max(new_start, max(self.end, edit.end) + edit.delta)
            self.start = new_start

    def snapshot(self, text: str) -> tuple[float, str]:
        """(share of the rejected suggestion that is there anyway, what the developer wrote in its place)."""
        lines = max(1, self.suggestion.rstrip("\n").count("\n") + 1)
        written = text[self.start : min(self.end, self.start + KEPT_CONTEXT_CHARS)]
        kept = "".join(written.splitlines(keepends=True)[:lines])
        return survival_ratio(self.suggestion, kept), kept


Followed = AcceptedText | TypedInstead  # a range whose text is recorded at the snapshot delays


def locate(text: str, accepted: str, anchor: int, window: int = 2000) -> int | None:
    """Where `accepted` sits in `text`: at `anchor` if it is there, else the nearest match within `window`."""
    if not accepted:
        return anchor
    if text.startswith(accepted, anchor):
        return anchor
    lo = max(0, anchor - window)
    hi = min(len(text), anchor + len(accepted) + window)
    best: int | None = None
    pos = text.find(accepted, lo, hi)
    while pos != -1:
        if best is None or abs(pos - anchor) < abs(best - anchor):
            best = pos
        pos = text.find(accepted, pos + 1, hi)
    return best
