"""What one session does with the completions it was served, followed up: the suggestion shown in each
document (typed through, or diverged from: an inferred reject), the texts followed after an accept and
after a reject (what was written instead), and their edit snapshots when their delays come.

The LSP handlers (`lsp_handlers.server`) hand every served completion, feedback notification and document
edit to one `Followup` per connection; it decides what is recorded and hands each event to its `Sink`
(which stores it, or not while recording is paused). It knows nothing of LSP messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pygls.exceptions import JsonRpcInvalidParams

from lsp_handlers.completion import Served
from lsp_handlers.documents import Edit, TextDocument
from lsp_handlers.feedback import AcceptedText, Followed, Suggestion, TypedInstead, Verdict, locate
from storage.models import DECISION_KINDS, EventKind

log = logging.getLogger(__name__)

MAX_SERVED = 10000  # a long session forgets its oldest completions (their events still reach the store)


@dataclass(slots=True)
class CompletionState:
    """A served completion this session may still hear about."""

    served: Served
    uri: str
    outcomes: set[EventKind] = field(default_factory=set)  # event kinds already recorded for it

    @property
    def resolved(self) -> bool:
        return bool(self.outcomes & DECISION_KINDS)


class Sink(Protocol):
    """Where the follow-up's events go, and the documents it reads."""

    def record_event(self, kind: EventKind, completion_id: str | None, **fields: Any) -> asyncio.Future[Any]: ...

    def accepted_outcome(self, completion_id: str, chars: int, ratio: float) -> None:
        """An accepted text's last snapshot: `chars` of it (a share `ratio`) kept for good."""
        ...

    def document(self, uri: str) -> TextDocument | None: ...

    @property
    def snapshot_delays(self) -> Sequence[float]:
        """When, after an accept or a reject, what the developer kept there is recorded (seconds)."""
        ...


def nothing_recorded() -> asyncio.Future[Any]:
    """The acknowledgement of a write that is not made: done, with no event id."""
    done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    return done


class Followup:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.served: dict[str, CompletionState] = {}
        self.latest_completion: str | None = None
        self.suggestions: dict[str, Suggestion] = {}  # uri -> the suggestion given last, unresolved
        self.followed: list[Followed] = []  # accepted texts, and what was written instead of rejected ones
        self.timers: set[asyncio.TimerHandle] = set()

    # -- what was served ------------------------------------------------------------------------------

    def serve(self, doc: TextDocument, served: Served) -> None:
        """Remember a served completion; the one it replaces in this document is no longer followed."""
        self.served[served.completion_id] = CompletionState(served, doc.uri)
        self.latest_completion = served.completion_id
        self.suggestions[doc.uri] = Suggestion(served.completion_id, doc.uri, served.offset, served.text)
        if len(self.served) > MAX_SERVED:
            for cid in list(self.served)[: MAX_SERVED // 10]:
                del self.served[cid]

    def state_of(self, completion_id: str) -> CompletionState:
        state = self.served.get(completion_id)
        if state is None:
            raise JsonRpcInvalidParams(
                f"completion {completion_id!r} was not served in this session; use the completionId of an item "
                "this server returned"
            )
        return state

    def known(self, completion_id: str, method: str) -> CompletionState | None:
        """The served completion a notification names; an unknown id is logged and ignored."""
        state = self.served.get(completion_id)
        if state is None:
            log.warning("%s for completion %r, which this session did not serve; ignored", method, completion_id)
        return state

    def typed_through(self, doc: TextDocument, offset: int) -> Served | None:
        """The rest of the suggestion the developer has been typing through, when `offset` is where its typed
        part ends: served again under its own id without asking the engine (None when there is no such rest).

        What the developer typed matches the suggestion character for character (`Suggestion.observe`), so
        the rest is what the model wrote after those characters; the request that asks at that cursor would
        spend a model call (and its latency) on a question already answered. Feedback names the one id: an
        accept inserts the rest where the typed part ends, a partial accept counts from the item sent back.
        """
        sugg = self.suggestions.get(doc.uri)
        if sugg is None or offset != sugg.cursor or not 0 < sugg.typed < len(sugg.text):
            return None
        state = self.served.get(sugg.completion_id)
        if state is None or state.outcomes & {EventKind.ACCEPTED, EventKind.REJECTED}:
            return None
        line_prefix, _ = doc.line_at(offset)
        self.latest_completion = sugg.completion_id
        return Served(
            sugg.completion_id,
            sugg.text[sugg.typed :],
            offset,
            doc.position_at(offset),
            line_prefix,
            recorded=state.served.recorded,
        )

    # -- what the developer did -----------------------------------------------------------------------

    def observe(self, uri: str, edits: Sequence[Edit]) -> None:
        """The document's edits: followed texts move with them; a suggestion typed past is rejected (inferred)
        and what is written in its place is followed from that edit on."""
        sugg = self.suggestions.get(uri)
        tracked = [t for t in self.followed if t.uri == uri]
        for edit in edits:
            for t in tracked:
                t.observe(edit)
            if sugg is None:
                continue
            if sugg.observe(edit) is Verdict.DIVERGED:
                self.suggestions.pop(uri, None)
                state = self.served.get(sugg.completion_id)
                if state is not None and not state.resolved:
                    self.sink.record_event(EventKind.REJECTED, sugg.completion_id, inferred=True)
                    instead = self.track_rejected(state, sugg)
                    if instead is not None:  # the edit that typed past the suggestion is the first of it
                        instead.observe(edit)
                        tracked.append(instead)
                sugg = None

    def rejected(self, state: CompletionState) -> None:
        """An explicit reject (already recorded): the suggestion is gone; what is written there is followed."""
        sugg = self.suggestions.get(state.uri)
        if sugg is not None and sugg.completion_id == state.served.completion_id:
            self.suggestions.pop(state.uri, None)
        self.track_rejected(state, sugg)

    def closed(self, uri: str) -> None:
        self.suggestions.pop(uri, None)

    def track_accept(self, state: CompletionState, accepted: str) -> None:
        """Follow `accepted` (inserted at the suggestion's anchor) and schedule its snapshots."""
        doc = self.sink.document(state.uri)
        anchor = state.served.offset
        sugg = self.suggestions.get(state.uri)
        if sugg is not None and sugg.completion_id == state.served.completion_id:
            anchor = sugg.anchor  # moved along with the edits since the completion was served
            del self.suggestions[state.uri]
        pending = sorted(self.sink.snapshot_delays)
        tracked = AcceptedText(state.served.completion_id, state.uri, accepted, anchor, anchor, pending_delays=pending)
        where = locate(doc.text, accepted, anchor) if doc is not None else None
        if where is None:
            tracked.awaiting_insert = True
        else:
            tracked.start, tracked.end = where, where + len(accepted)
        self._follow(tracked, doc)

    def track_rejected(self, state: CompletionState, sugg: Suggestion | None) -> TypedInstead | None:
        """Follow what the developer writes where a rejected suggestion would have gone (from its anchor,
        with what of it they had typed), and schedule its snapshots; None when the document is not open."""
        doc = self.sink.document(state.uri)
        if doc is None:
            return None
        mine = sugg is not None and sugg.completion_id == state.served.completion_id
        start, end = (sugg.anchor, sugg.cursor) if sugg is not None and mine else (state.served.offset,) * 2
        delays = sorted(self.sink.snapshot_delays)
        tracked = TypedInstead(state.served.completion_id, state.uri, state.served.text, start, end, delays)
        self._follow(tracked, doc)
        return tracked

    # -- snapshots ------------------------------------------------------------------------------------

    def _follow(self, tracked: Followed, doc: TextDocument | None) -> None:
        self.followed.append(tracked)
        loop = asyncio.get_running_loop()
        for delay in tracked.pending_delays:
            handle = loop.call_later(delay, self._on_snapshot_timer, tracked, doc, delay)
            self.timers.add(handle)

    def _on_snapshot_timer(self, tracked: Followed, doc: TextDocument | None, delay: float) -> None:
        if delay in tracked.pending_delays:
            self._snapshot(tracked, delay=delay, doc=doc)

    def finish(self) -> list[asyncio.Future[Any]]:
        """At the session's end: no more timers; every pending snapshot is taken now (their futures)."""
        for handle in list(self.timers):
            handle.cancel()
        self.timers.clear()
        futures = [self._snapshot(tracked, final=True) for tracked in self.followed if tracked.pending_delays]
        self.followed.clear()
        return futures

    def _snapshot(
        self,
        tracked: Followed,
        *,
        delay: float | None = None,
        doc: TextDocument | None = None,
        final: bool = False,
    ) -> asyncio.Future[Any]:
        """Record one snapshot: the configured `delay`, or at session end all pending ones at once.

        Where nothing was written in place of a rejected suggestion, nothing is recorded: the reject says it all.
        """
        if doc is None:
            doc = self.sink.document(tracked.uri)
        text = doc.text if doc is not None else ""
        ratio, kept = tracked.snapshot(text)
        if isinstance(tracked, TypedInstead) and not kept.strip():
            if final:  # the session's end clears what it follows
                tracked.pending_delays = []
            else:
                assert delay is not None
                tracked.pending_delays.remove(delay)
                if not tracked.pending_delays:
                    self.followed.remove(tracked)
            return nothing_recorded()
        if isinstance(tracked, AcceptedText) and (final or tracked.pending_delays == [delay]):
            # Its last snapshot: what is there now is kept for good.
            self.sink.accepted_outcome(tracked.completion_id, round(ratio * len(tracked.accepted)), ratio)
        if final:
            # The session ends before the delay: record what is there now, with the delays it stood for.
            delays, tracked.pending_delays = tracked.pending_delays, []
            last: asyncio.Future[Any] | None = None
            for d in delays:
                last = self.sink.record_event(
                    EventKind.EDIT_SNAPSHOT, tracked.completion_id, delay_s=d, survival_ratio=ratio, kept_text=kept
                )
            assert last is not None
            return last
        assert delay is not None
        tracked.pending_delays.remove(delay)
        if not tracked.pending_delays:
            self.followed.remove(tracked)
        return self.sink.record_event(
            EventKind.EDIT_SNAPSHOT, tracked.completion_id, delay_s=delay, survival_ratio=ratio, kept_text=kept
        )
