"""One completion, from cursor position to the text the editor shows, and its record in the store.

`CompletionService.complete` builds the prompt (context.py), asks the engine for the shown candidate,
post-processes it (postprocess.py) and returns at once. Everything after that is off the request
path: the completion record is queued on the store's writer, and for a sampled share of requests a
group of G-1 further candidates (pi_old samples for GRPO) is generated in the background and appended
to the record. A slow or failing engine answers None and says why in the log; it never raises into
the protocol.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from lsprotocol import types

from kernel.fim import file_separator_for, fim_template_for, unheal
from kernel.settings import ADAPTER_ARMS, BASELINE_ARMS, Settings
from lsp_handlers.budget import PrefillClock, warm_piece_tokens
from lsp_handlers.context import (
    Continuation,
    Prompt,
    build_prompt,
    comment_syntax,
    continue_prompt,
    heal,
    prompt_head,
    shared_start,
    suffix_share_of,
)
from lsp_handlers.crossfile import WINDOW_LINES, Neighbours, repository_context
from lsp_handlers.documents import TextDocument, file_name_of
from lsp_handlers.postprocess import is_single_line, postprocess
from lsp_handlers.show_policy import ShowPolicies, suggestion_features
from server.engine import Candidate, Engine, EngineError, Generation
from server.registry import BASE, Lease
from server.runtime import Services, arm_of
from storage.repositories import Scope
from storage.store import CandidateRecord, CompletionRecord, DocumentSeen, GroupRecord

log = logging.getLogger(__name__)

# Characters of document text around the cursor handed to the prompt builder: far more than any
# token budget needs (a token is at least one character), and it keeps a 5 MB file cheap.
_CHARS_PER_TOKEN_BOUND = 16
_STARTS_KEPT = 1024  # documents whose last prompt's start line is remembered (the least recently asked go)
_ANCHORS_KEPT = 64  # (developer, document) pairs whose last new prompt later keystrokes may extend
_TYPED_MAX_CHARS = 64  # most characters typed since a prompt that extending it takes (then a new prompt)
_SPANS_KEPT = 64  # (developer, document) pairs whose warm prompt starts are remembered (`completion.warm_context`)
_SPANS_PER_DOCUMENT = 32  # warm starts kept per (developer, document): the last ones used or warmed stay
_SPAN_SLACK_LINES = 16  # lines below a span's last line a request may be and still be tried from its start
# The first request on the line where the cursor last came to rest may read this many times the learned budget to
# get the whole prompt there: its warm is still reading it (in pieces, each a request: slower than one request
# reads the rest), and a prompt at the budget would leave the warm's work unused.
_RESTED_READ_FACTOR = 2
WARM_QUIET_S = 0.3  # how long no completion must have been asked for before a warm reads a piece


@dataclass(frozen=True, slots=True)
class Identity:
    developer_id: str
    session_id: str
    team_id: str | None


@dataclass(frozen=True, slots=True)
class Served:
    """What the editor gets: the completion's id, the text to insert at `offset`, and its position."""

    completion_id: str
    text: str
    offset: int
    position: types.Position
    line_prefix: str
    recorded: bool = True  # False: served while the developer had recording paused; nothing of it is stored


@dataclass(slots=True)
class WarmSpan:
    """Where a document's prompts at the full context budget start, and how much of such a prompt the engine's
    prefix cache holds (`completion.warm_context`): read in the background after a completion at the learned
    budget, then by every request that started there."""

    version: str | None  # the adapter version (`Lease.version_id`) whose prefix cache holds it
    first_line: int  # the document line the prompts start on
    head: str  # the prompt's text from its start that the engine has read (`prompt_head`)
    last_line: int  # the document line the head reaches (a request further down reads the lines between)
    used: float = field(default_factory=time.monotonic)  # when it was last warmed or used
    rested: bool = False  # read by a rested cursor's warm: the whole prompt at that cursor (`warm_cursor_soon`)


_K = TypeVar("_K")
_V = TypeVar("_V")


def _keep_recent(recent: OrderedDict[_K, _V], key: _K, value: _V, limit: int) -> None:
    """`recent[key] = value` as the most recently used entry; the least recently used go past `limit`."""
    recent[key] = value
    recent.move_to_end(key)
    if len(recent) > limit:
        recent.popitem(last=False)


def with_span(spans: Sequence[WarmSpan], span: WarmSpan, limit: int, *, opening: bool = False) -> list[WarmSpan] | None:
    """A document's warm starts (`spans`, by first line) with `span` in place of the one with its first line and
    adapter version, by first line; past `limit`, the least recently warmed or used goes. None, and nothing
    changes, where `span` is a warm on opening's (`opening`) and that one a rested cursor's (`WarmSpan.rested`):
    the engine holds the whole prompt at that cursor, of which the opening's span would know only its own pieces
    (the cursor's first request would find less of its prompt held and get a shorter one)."""
    place = (span.first_line, span.version)
    if opening and any(s.rested and (s.first_line, s.version) == place for s in spans):
        return None
    kept = [s for s in spans if (s.first_line, s.version) != place]
    kept.append(span)
    if len(kept) > limit:
        kept.remove(min(kept, key=lambda s: s.used))
    kept.sort(key=lambda s: s.first_line)
    return kept


def move_spans(
    spans: Sequence[WarmSpan], first: int, last: int, new_lines: int, *, last_starts_line: bool
) -> list[WarmSpan]:
    """The warm starts after an edit replaced the text from a place on line `first` to one on line `last` by
    text of `new_lines` line breaks (`last_starts_line`: after it, what was line `last` still begins a line,
    as when whole lines are inserted or deleted): those starting below the edit move by the lines it added or
    removed, those whose line's beginning it replaced go, and the last line of those starting above it, where
    it lies at or below the edit, moves too. Each start kept is changed in place."""
    delta = new_lines - (last - first)
    kept: list[WarmSpan] = []
    for span in spans:
        if span.first_line > last or (last_starts_line and span.first_line == last):
            span.first_line += delta
            span.last_line += delta
        elif span.first_line > first:
            continue
        elif span.last_line >= last:
            span.last_line += delta
        kept.append(span)
    return kept


@dataclass(frozen=True, slots=True)
class Built:
    """A request's prompt as built (`CompletionService._prompt`)."""

    text: str  # what the engine is sent
    healed: str  # the blanks healing took off its end
    mode: Literal["fim", "prefix"]
    before_tail: str  # the end of the text before the cursor it kept
    cold: bool = False  # kept to a learned budget below `completion.context_tokens` (a warm may follow)
    # At `completion.context_tokens` from a warm start (`_full_prompt`): the most tokens of it the engine was to
    # read (what its prefix cache did not hold); 0 for any other prompt.
    read_limit: int = 0


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """One completion request, as far as it is known before the engine is asked."""

    doc: TextDocument
    position: types.Position
    offset: int
    line_prefix: str  # the cursor's line up to the cursor
    line_suffix: str  # the rest of the cursor's line
    single: bool  # a single-line completion (`is_single_line`)
    identity: Identity
    settings: Settings
    document: DocumentSeen | None  # the store's record of the document, when it was recorded
    prompt_text: str  # what the engine is sent (healed: see `heal`)
    healed: str  # the blanks taken off its end, taken back off the front of what the model writes
    mode: Literal["fim", "prefix"]
    before_tail: str  # the end of the text before the cursor the prompt kept (for `postprocess`)
    arm: str
    lease: Lease  # the adapter that serves it (released by `complete`)
    started: float  # `time.perf_counter()` when the request arrived
    text: str = ""  # the document's text when the request arrived
    cold: bool = False  # the prompt kept to a learned budget below `completion.context_tokens`: warm after it
    read_limit: int = 0  # from a warm span's start: the most of the prompt the engine was to read (`Built`)


def _whole_lines_from(text: str, start: int, offset: int) -> int | None:
    """Where the first whole line at or after `start` begins, up to `offset` (None: no line starts there).
    `start` 0 is the text's start."""
    if start == 0:
        return 0
    newline = text.find("\n", start, offset)
    return newline + 1 if newline >= 0 else None


def _line_start(text: str, line: int) -> int:
    """The offset in `text` where its line `line` starts (the text's end past its last line)."""
    at = 0
    for _ in range(line):
        at = text.find("\n", at) + 1
        if at == 0:
            return len(text)
    return at


def fit_candidate(candidate: Candidate, shown: str, engine: Engine) -> CandidateRecord:
    """The shown candidate cut to the tokens that produce `shown` (post-processing may cut the end).

    When no token boundary falls exactly at the end of `shown`, the record keeps the covering tokens and
    is marked stale: the trainer re-tokenizes the text and recomputes its log-probs.
    """
    if candidate.text == shown:
        return CandidateRecord(shown, list(candidate.token_ids), list(candidate.logprobs), candidate.finish_reason)
    ids = candidate.token_ids
    for k in range(1, len(ids) + 1):
        decoded = engine.detokenize(ids[:k])
        if len(decoded) >= len(shown):
            exact = decoded == shown
            return CandidateRecord(
                shown, list(ids[:k]), list(candidate.logprobs[:k]), "stop" if exact else "trimmed", stale=not exact
            )
    return CandidateRecord(shown, list(ids), list(candidate.logprobs), candidate.finish_reason, stale=True)


# The calibration prompt: what the engine reads once it is up, before the first completion, so that the
# first completion's prompt is already sized to this machine (`PrefillClock`). A shorter piece of the same
# text, read just before and not timed, warms the engine up: its very first prompt also pays for setting up
# its kernels (512 tokens of int8 weights read in 932 ms cold and 680 ms warm on two AMD EPYC cores), which
# is not what the next prompts cost. It starts elsewhere in the text, so the prefix cache holds none of the
# timed prompt.
CALIBRATION_TOKENS = 512
WARMUP_TOKENS = 128
_CALIBRATION_TEXT = "".join(f"def step_{i}(value):\n    return value * {i} + {i % 7}\n\n" for i in range(400))
# A request that streams is cut at its deadline by the engine; this is how much longer the service waits
# for the cut answer before it gives up on it.
_DEADLINE_GRACE_S = 0.25


def _too_slow(req: CompletionRequest) -> None:
    log.warning(
        "no completion for %s: the engine took longer than %d ms", req.doc.uri, req.settings.completion.timeout_ms
    )


class CompletionService:
    """Serves completions for the connections of one process (they share the engine and the store)."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._background: set[asyncio.Task[None]] = set()
        self._random = random.Random()
        self.prefill = PrefillClock()
        self._calibration: asyncio.Task[None] | None = None
        self._budget_logged: int | None = None
        self._groups_pending = 0  # training groups being sampled now (`completion.group_max_pending`)
        self.policies = ShowPolicies()  # each developer's show policy (`completion.show_threshold`)
        # The document line each document's last prompt started on (`build_prompt`'s previous_start).
        self._starts: OrderedDict[str, int] = OrderedDict()
        # Each (developer, document)'s last new prompt, which keystrokes at its cursor extend (`continue_prompt`).
        self._anchors: OrderedDict[tuple[str, str], Continuation] = OrderedDict()
        # The document line of each (developer, document)'s last request: a warm-start prompt widens the text
        # after the cursor only at a new line (`_full_prompt`).
        self._lines: OrderedDict[tuple[str, str], int] = OrderedDict()
        # Each (developer, document)'s warm starts (`completion.warm_context`), by first line, and the one warm
        # running.
        self._spans: OrderedDict[tuple[str, str], list[WarmSpan]] = OrderedDict()
        self._warming: asyncio.Task[None] | None = None
        self._opening: asyncio.Task[None] | None = None  # the warm of the latest opened document (`warm_open_soon`)
        # The place the editor last said a cursor came to rest (developer, document, version, line): `warm_cursor_soon`.
        self._cursor_place: tuple[str, str, int | None, int] | None = None
        self._in_flight = 0  # completion requests waiting for the engine: a warm waits while any are
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_request = 0.0  # `time.perf_counter()` when the last completion request arrived or ended

    def context_budget(self, settings: Settings) -> int:
        """The prompt's token budget now: `completion.prefill_tokens` when set, else `completion.context_tokens`,
        less where this machine's engine would take longer than `completion.prefill_target_ms` to read it
        (`PrefillClock`)."""
        c = settings.completion
        if c.prefill_tokens > 0:
            return min(c.prefill_tokens, c.context_tokens)
        budget = self.prefill.budget(c.context_tokens, c.prefill_target_ms)
        if budget != self._budget_logged and self.prefill.samples:
            rate = self.prefill.seconds_per_token() or 0.0
            log.info(
                "context budget %d tokens: the engine reads %.0f prompt tokens a second here "
                "(completion.context_tokens %d, completion.prefill_target_ms %d)",
                budget,
                1 / rate if rate else 0.0,
                c.context_tokens,
                c.prefill_target_ms,
            )
            self._budget_logged = budget
        return budget

    def _warm_piece(self, settings: Settings) -> int:
        """The tokens a warm reads per engine request on this machine now (`warm_piece_tokens`)."""
        return warm_piece_tokens(self.prefill.seconds_per_token(), settings.engine.block_size)

    async def _calibrated(self, settings: Settings) -> None:
        """Wait for the engine to be timed (a fraction of a second, once after start-up; started here if it was
        not), so that a prompt built next is sized to this machine."""
        if self._calibration is None and settings.completion.prefill_target_ms > 0:
            self.calibrate_soon()
        if self._calibration is not None and not self._calibration.done():
            await asyncio.shield(self._calibration)

    def calibrate_soon(self) -> None:
        """Time the engine reading a prompt once (in the background), if nothing has been timed yet."""
        if self._calibration is None and not self.prefill.samples:
            self._calibration = asyncio.ensure_future(self._calibrate())

    async def _calibrate(self) -> None:
        engine = self.services.engine.ready()
        if engine is None:
            self._calibration = None  # not up yet: the next ready status or request tries again
            return
        ids = self.services.tokenizer.encode(_CALIBRATION_TEXT)
        try:
            warm = await engine.generate(
                ids[CALIBRATION_TOKENS : CALIBRATION_TOKENS + WARMUP_TOKENS], n=1, max_tokens=1, temperature=0.0
            )
            gen = await engine.generate(ids[:CALIBRATION_TOKENS], n=1, max_tokens=1, temperature=0.0)
        except Exception as exc:
            log.warning("the engine's prompt-reading speed was not measured: %s", exc)
            return
        log.info(
            "the engine read %d prompt tokens in %.0f ms (after %d untimed ones in %.0f ms, to warm it up)",
            len(gen.prompt_token_ids) - (gen.timing.cached_tokens or 0),
            (gen.timing.first_token_s or gen.timing.total_s) * 1000,
            len(warm.prompt_token_ids),
            (warm.timing.first_token_s or warm.timing.total_s) * 1000,
        )
        self._observe(gen)

    def _observe(self, gen: Generation) -> None:
        t = gen.timing
        if t.alone and t.first_token_s is not None and t.cached_tokens is not None:
            self.prefill.observe(len(gen.prompt_token_ids) - t.cached_tokens, t.first_token_s)

    def prompt_for(
        self,
        doc: TextDocument,
        offset: int,
        settings: Settings,
        notes: Sequence[str] = (),
        neighbours: Neighbours | None = None,
    ) -> Prompt:
        budget = self.context_budget(settings)
        window = budget * _CHARS_PER_TOKEN_BOUND
        text = doc.text
        start = max(0, offset - window)
        # Whole lines only: a line cut by the window would be a fragment of code to the model (and to
        # `scope_openers`, a line with no indentation).
        start = _whole_lines_from(text, start, offset) or start
        before = text[start:offset]
        first_line = text.count("\n", 0, start)
        repository = ""
        if neighbours is not None and settings.completion.crossfile_share > 0:
            # The lines above the cursor's line: the snippets stay the same while the developer types on a
            # line, so the engine's prefix cache keeps the prompt's start from keystroke to keystroke.
            query = "".join(before.splitlines(keepends=True)[-WINDOW_LINES - 1 : -1])
            repository = repository_context(
                neighbours.path,
                query,
                neighbours.sources,
                math.floor(budget * settings.completion.crossfile_share),
                self._count,
                separator=file_separator_for(self.services.vocabulary),
                comment=comment_syntax(file_name_of(doc.uri), doc.language_id),
            )
            log.debug(
                "cross-file context for %s: %d characters, from %s",
                doc.uri,
                len(repository),
                ", ".join(f"{s.path} ({s.kind})" for s in neighbours.sources),
            )
        previous = self._starts.get(doc.uri)  # where the last prompt on this document started
        prompt = self._build(
            text,
            start,
            offset,
            doc,
            settings,
            notes,
            budget,
            suffix_share_of(budget, settings.completion.suffix_share),
            first_line,
            anchor_lines=settings.completion.prefix_anchor_lines,
            previous_start=previous,
            repository=repository,
            window=window,
        )
        start_line = first_line + before.count("\n", 0, len(before) - len(prompt.prefix))
        _keep_recent(self._starts, doc.uri, start_line, _STARTS_KEPT)
        log.debug(
            "prompt for %s: %d tokens from line %d (the previous prompt's start: %s), %d scope lines above it",
            doc.uri,
            prompt.tokens,
            start_line,
            previous,
            prompt.outline.count("\n"),
        )
        return prompt

    async def complete(
        self,
        doc: TextDocument,
        position: types.Position,
        *,
        identity: Identity,
        settings: Settings,
        document: DocumentSeen | None,
        neighbours: Neighbours | None = None,
    ) -> Served | None:
        engine = self.services.engine.ready()
        if engine is None:
            status = self.services.engine.status
            log.info("no completion for %s: the engine is %s (%s)", doc.uri, status.state.value, status.message)
            return None
        started = time.perf_counter()
        await self._calibrated(settings)
        if settings.completion.show_threshold > 0:
            await self.policies.ready(identity.developer_id)  # the first request waits for the stored outcomes
        offset = doc.offset_at(position)
        arm = arm_of(identity.developer_id, settings.experiment.arms)
        notes: list[str] = []
        if arm in BASELINE_ARMS:
            notes = await self.services.corrections_of(identity.developer_id, settings.experiment.baseline_corrections)
        lease = BASE
        if arm in ADAPTER_ARMS:
            try:
                lease = await self.services.adapters.acquire(identity.developer_id, identity.team_id)
            except (EngineError, TimeoutError) as exc:
                log.warning(
                    "serving %s with the base model: their adapter could not be loaded: %s", identity.developer_id, exc
                )
        self.services.request_started()
        self._in_flight += 1
        self._idle.clear()
        self._last_request = time.perf_counter()
        try:
            built = self._prompt(doc, offset, identity, settings, notes, neighbours, lease)
            line_prefix, line_suffix = doc.line_at(offset)
            request = CompletionRequest(
                doc=doc,
                position=position,
                offset=offset,
                line_prefix=line_prefix,
                line_suffix=line_suffix,
                single=is_single_line(line_prefix, line_suffix),
                identity=identity,
                settings=settings,
                document=document,
                prompt_text=built.text,
                healed=built.healed,
                mode=built.mode,
                before_tail=built.before_tail,
                arm=arm,
                lease=lease,
                started=started,
                text=doc.text,
                cold=built.cold,
                read_limit=built.read_limit,
            )
            served = await self._complete(engine, request)
            if request.cold:
                self._warm_soon(engine, request)
            return served
        finally:
            lease.release()
            self.services.request_finished()
            self._in_flight -= 1
            self._last_request = time.perf_counter()
            if not self._in_flight:
                self._idle.set()

    def _prompt(
        self,
        doc: TextDocument,
        offset: int,
        identity: Identity,
        settings: Settings,
        notes: Sequence[str],
        neighbours: Neighbours | None,
        lease: Lease,
    ) -> Built:
        """The prompt to send: the developer's last prompt on the document extended by what they typed at its
        cursor since (`completion.extend_prompt`, `continue_prompt`); else the prompt at `completion.context_tokens`
        from the document's warm start when the engine's prefix cache holds all but the learned budget of it
        (`completion.warm_context`, `_full_prompt`); else a new prompt at the learned budget (`prompt_for`,
        healed), which a warm may follow. Later keystrokes at the cursor may extend either."""
        key = (identity.developer_id, doc.uri)
        anchor = self._anchors.get(key) if settings.completion.extend_prompt else None
        if anchor is not None:
            extended = continue_prompt(anchor, doc.text, offset, _TYPED_MAX_CHARS)
            if extended is not None:
                appended, healed, typed = extended
                tokens = anchor.tokens + len(self.services.tokenizer.encode(appended))
                # The prompt grows past the budget by the typed tokens (they are all the engine reads); with
                # the longest answer it stays within model.max_model_len, which settings are checked against.
                if tokens <= settings.model.max_model_len - settings.completion.max_tokens:
                    log.debug("prompt for %s: the last one and %d characters typed at its cursor", doc.uri, len(typed))
                    before_tail = (anchor.before_tail + typed)[-512:]
                    return Built(anchor.prompt + appended, healed, anchor.mode, before_tail)
        found = self._full_prompt(doc, offset, key, settings, notes, neighbours, lease)
        if found is not None:
            full, limit = found
            # Keystrokes at this cursor extend it like any prompt: a new prompt from the warm start would
            # put the text after the cursor after a changed token and have the engine read it again.
            prompt_text, healed = heal(full)
            self._anchor(key, doc, offset, full, prompt_text, healed, settings)
            return Built(prompt_text, healed, full.mode, full.prefix[-512:], read_limit=limit)
        prompt = self.prompt_for(doc, offset, settings, notes, neighbours)
        # Token healing (see `heal`): the blanks before the cursor are taken off the prompt and back off the
        # front of what the model writes.
        prompt_text, healed = heal(prompt)
        self._anchor(key, doc, offset, prompt, prompt_text, healed, settings)
        cold = self._warms(settings, neighbours) and self.context_budget(settings) < settings.completion.context_tokens
        return Built(prompt_text, healed, prompt.mode, prompt.prefix[-512:], cold=cold)

    def _anchor(
        self,
        key: tuple[str, str],
        doc: TextDocument,
        offset: int,
        prompt: Prompt,
        prompt_text: str,
        healed: str,
        settings: Settings,
    ) -> None:
        """Remember the prompt sent at `offset` for the keystrokes that follow there (`completion.extend_prompt`)."""
        if not settings.completion.extend_prompt:
            return
        anchor = Continuation(
            before=doc.text[:offset],
            after=doc.text[offset:],
            prompt=prompt_text,
            healed=healed,
            tokens=prompt.tokens,
            mode=prompt.mode,
            before_tail=prompt.prefix[-512:],
        )
        _keep_recent(self._anchors, key, anchor, _ANCHORS_KEPT)

    @staticmethod
    def _warms(settings: Settings, neighbours: Neighbours | None) -> bool:
        """Whether prompts may be warmed: `completion.warm_context`, and no snippets of other files (they follow
        the lines around the cursor, so the start of a prompt changes from line to line)."""
        c = settings.completion
        return c.warm_context and (neighbours is None or c.crossfile_share <= 0)

    def _count(self, text: str) -> int:
        return len(self.services.tokenizer.encode(text))

    def _build(
        self,
        doc_text: str,
        start: int,
        offset: int,
        doc: TextDocument,
        settings: Settings,
        notes: Sequence[str],
        budget: int,
        suffix_tokens: int,
        first_line: int,
        *,
        anchor_lines: int = 1,
        previous_start: int | None = None,
        repository: str = "",
        window: int | None = None,
    ) -> Prompt:
        """The prompt at `offset` of the document's text `doc_text` within `budget` tokens, its text before the
        cursor taken from `start` (document line `first_line`'s start) on; `build_prompt` says what
        `anchor_lines`, `previous_start` and `repository` do (by default nothing moves: a cold prompt's start).
        The text after the cursor is looked at up to `window` characters (by default what
        `completion.context_tokens` could hold)."""
        c = settings.completion
        if window is None:
            window = c.context_tokens * _CHARS_PER_TOKEN_BOUND
        return build_prompt(
            doc_text[start:offset],
            doc_text[offset : offset + window],
            file_name=file_name_of(doc.uri),
            language_id=doc.language_id,
            budget_tokens=budget,
            count_tokens=self._count,
            fim_template=fim_template_for(settings.model.fim_template, self.services.vocabulary),
            suffix_share=c.suffix_share,
            suffix_tokens=suffix_tokens,
            notes=notes,
            outline_lines=c.outline_lines,
            first_line=first_line,
            anchor_lines=anchor_lines,
            previous_start=previous_start,
            repository=repository,
        )

    def _full_prompt(
        self,
        doc: TextDocument,
        offset: int,
        key: tuple[str, str],
        settings: Settings,
        notes: Sequence[str],
        neighbours: Neighbours | None,
        lease: Lease,
    ) -> tuple[Prompt, int] | None:
        """The prompt at `completion.context_tokens` that starts on one of the document's warm start lines
        (`WarmSpan`, the farthest up first) and keeps the learned budget's share of text after the cursor, when
        all of its text before the cursor from there still fits and the engine has to read no more of it than
        the learned budget (the rest its prefix cache holds: a warm, or earlier requests from the same start).
        At the first request on the cursor's line, the text after the cursor also gets what the budget leaves
        unread. With the most tokens of it the engine is to read; None otherwise."""
        c = settings.completion
        if not self._warms(settings, neighbours):
            return None
        learned = self.context_budget(settings)
        if learned >= c.context_tokens:
            return None
        line = doc.text.count("\n", 0, offset)
        widen = self._lines.get(key) != line
        _keep_recent(self._lines, key, line, _ANCHORS_KEPT)
        spans = [
            span
            for span in self._spans.get(key, ())
            if span.version == lease.version_id and span.first_line <= line <= span.last_line + _SPAN_SLACK_LINES
        ]
        suffix_tokens = suffix_share_of(learned, c.suffix_share)
        wide = suffix_share_of(c.context_tokens, c.suffix_share)
        place = self._cursor_place
        rested = place is not None and (place[0], place[1], place[3]) == (*key, line)
        # At a new line, first a prompt with the whole share of text after the cursor that the engine already holds
        # (a rested cursor's warm read it: `warm_cursor_soon`), or most of it on the line where the cursor rests
        # (`_RESTED_READ_FACTOR`); else the first start whose prompt fits the budget.
        for whole in (True, False) if widen and wide > suffix_tokens else (False,):
            limit = learned * _RESTED_READ_FACTOR if whole and rested else learned
            for span in spans:
                prompt = self._span_prompt(
                    doc, offset, span, settings, notes, suffix_tokens, wide, learned, whole, widen, limit
                )
                if prompt is not None:
                    # The engine holds it once it has read this prompt (and still the longer text it read before).
                    head = prompt_head(prompt)
                    if span.head.startswith(head):
                        span.last_line = max(span.last_line, line)
                    else:
                        span.head, span.last_line = head, line
                    span.used = time.monotonic()
                    self._spans.move_to_end(key)
                    return prompt, limit
        return None

    def _span_prompt(
        self,
        doc: TextDocument,
        offset: int,
        span: WarmSpan,
        settings: Settings,
        notes: Sequence[str],
        suffix_tokens: int,
        wide: int,
        learned: int,
        whole: bool,
        widen: bool,
        limit: int,
    ) -> Prompt | None:
        """`_full_prompt`'s prompt from `span`'s start, or None: with `whole`, the one whose text after the cursor
        has the whole share of a prompt at `completion.context_tokens` (`wide` tokens), when the engine holds all
        but `limit` tokens of it; else the one with `suffix_tokens` after the cursor, when it holds all but
        `limit` (the learned budget, `learned`), widened at a new line (`widen`) by what the budget leaves
        unread."""
        c = settings.completion
        start = _line_start(doc.text, span.first_line)
        if start > offset:
            return None
        prompt = self._build(
            doc.text,
            start,
            offset,
            doc,
            settings,
            notes,
            c.context_tokens,
            wide if whole else suffix_tokens,
            span.first_line,
        )
        if len(prompt.prefix) != offset - start:
            return None  # the lines from this start no longer fit: a later start may
        prompt_text, _ = heal(prompt)
        read = self._count(prompt_text[shared_start(prompt_text, span.head) :])
        if read > limit:
            if not whole:
                log.debug(
                    "no prompt from the warm start on line %d for %s: %d tokens past its cached text, over the budget",
                    span.first_line,
                    doc.uri,
                    read,
                )
            return None
        # At a new line, what the budget leaves unread goes to the text after the cursor, up to the share a
        # prompt at `context_tokens` gives it, as long as the text before the cursor still fits from this
        # start. Not while the developer types on that line: the engine reads the text after the cursor
        # whole at every request (it follows the cursor), and each keystroke would read up to the budget.
        more = min(wide, suffix_tokens + min(learned - read, c.context_tokens - prompt.tokens))
        if not whole and widen and more > suffix_tokens:
            wider = self._build(doc.text, start, offset, doc, settings, notes, c.context_tokens, more, span.first_line)
            wider_text, _ = heal(wider)
            held = shared_start(wider_text, span.head)
            if len(wider.prefix) == offset - start and (wider_read := self._count(wider_text[held:])) <= learned:
                prompt, read = wider, wider_read
        log.debug(
            "prompt for %s: %d tokens from the warm start on line %d, about %d of them to read, %d characters "
            "after the cursor",
            doc.uri,
            prompt.tokens,
            span.first_line,
            read,
            len(prompt.suffix),
        )
        return prompt

    def _keep_span(self, key: tuple[str, str], span: WarmSpan, *, opening: bool = False) -> bool:
        """Remember `span` among the document's warm starts (`with_span`: one per first line and adapter version,
        up to `_SPANS_PER_DOCUMENT`); False, and nothing changes, for a warm on opening's `span` where a rested
        cursor's warm read from that line."""
        spans = with_span(self._spans.get(key, ()), span, _SPANS_PER_DOCUMENT, opening=opening)
        if spans is None:
            return False
        _keep_recent(self._spans, key, spans, _SPANS_KEPT)
        return True

    def _warm_soon(self, engine: Engine, req: CompletionRequest) -> None:
        """After a completion at the learned budget: warm its place in the background (`_warm`). One warm runs
        at a time: the latest place wins."""
        if req.arm in BASELINE_ARMS:
            return  # their notes change as corrections come: a warm prompt would not stay what they are sent
        if self._warming is not None:
            self._warming.cancel()
        lease = req.lease.share()
        task = asyncio.ensure_future(
            self._warm(engine, req.doc, req.text, req.offset, req.identity, req.settings, lease)
        )
        task.add_done_callback(lambda _: lease.release())
        self._warming = task

    def warm_cursor_soon(
        self, doc: TextDocument, position: types.Position, identity: Identity, settings: Settings
    ) -> None:
        """The editor says the developer's cursor came to rest at `position` (`heedful/didMoveCursor`): warm the
        text before it in the background (`_warm`), as after a cold request there, so that the first request
        there already gets a prompt from a warm start. The latest place wins over a warm still running; the
        place warmed last (same document version and line) is not warmed again."""
        c = settings.completion
        if not self._warms(settings, None) or c.crossfile_share > 0:
            return
        arm = arm_of(identity.developer_id, settings.experiment.arms)
        if arm in BASELINE_ARMS:
            return  # their notes change as corrections come: a warm prompt would not stay what they are sent
        offset = doc.offset_at(position)
        text = doc.text
        place = (identity.developer_id, doc.uri, doc.version, text.count("\n", 0, offset))
        if place == self._cursor_place:
            return
        self._cursor_place = place
        if self._warming is not None:
            self._warming.cancel()
        self._warming = asyncio.ensure_future(self._warm_cursor(doc, text, offset, identity, settings, arm))

    async def _warm_cursor(
        self, doc: TextDocument, text: str, offset: int, identity: Identity, settings: Settings, arm: str
    ) -> None:
        engine = self.services.engine.ready()
        if engine is None:
            return  # not up yet: the requests at the cursor warm it once it is
        await self._calibrated(settings)
        if self.context_budget(settings) >= settings.completion.context_tokens:
            return  # every prompt is read whole anyway
        await self._quiet()
        if doc.text != text:
            return  # edited since: the requests at its cursor warm what they need
        lease = await self._warm_lease(doc, identity, arm)
        if lease is None:
            return
        whole = fim_template_for(settings.model.fim_template, self.services.vocabulary) is not None
        try:
            await self._warm(engine, doc, text, offset, identity, settings, lease, whole=whole)
        finally:
            lease.release()

    async def _warm_lease(self, doc: TextDocument, identity: Identity, arm: str) -> Lease | None:
        """The weights a warm of `doc` reads with: the developer's adapter in an adapter arm (None when it could
        not be loaded: nothing is warmed), else the base."""
        if arm not in ADAPTER_ARMS:
            return BASE
        try:
            return await self.services.adapters.acquire(identity.developer_id, identity.team_id)
        except (EngineError, TimeoutError) as exc:
            log.debug("%s was not warmed: %s's adapter could not be loaded: %s", doc.uri, identity.developer_id, exc)
            return None

    async def _warm(
        self,
        engine: Engine,
        doc: TextDocument,
        text: str,
        offset: int,
        identity: Identity,
        settings: Settings,
        lease: Lease,
        *,
        whole: bool = False,
    ) -> None:
        """Have the engine read the text before the cursor at `offset` of `text` (`doc`'s) that a prompt at
        `completion.context_tokens` holds, so that the next requests in those lines can have it
        (`_full_prompt`); its start leaves the learned budget's worth of room to write on below the cursor
        before it has to move. A warm start of the document whose lines from there still fit is kept (what the
        engine holds from it is not read again), the farthest up first. The reading is `_read_head`'s.

        `whole` (a cursor at rest, a fill-in-the-middle template): the engine reads the whole prompt a request at
        that very cursor gets at `completion.context_tokens`, the text after the cursor included (its full
        share), from that prompt's own start; the first request there finds all of it held."""
        await self._quiet()  # while the developer types on, nothing is built either (the next request cancels it)
        c = settings.completion
        learned = self.context_budget(settings)
        suffix_tokens = suffix_share_of(learned, c.suffix_share)
        line = text.count("\n", 0, offset)
        if whole:
            budget, suffix_tokens = c.context_tokens, suffix_share_of(c.context_tokens, c.suffix_share)
        else:
            budget = c.context_tokens - learned + suffix_tokens
        key = (identity.developer_id, doc.uri)
        span: WarmSpan | None = None
        prompt: Prompt | None = None
        for kept in () if whole else self._spans.get(key, ()):
            start = _line_start(text, kept.first_line)
            if kept.version != lease.version_id or start > offset:
                continue
            prompt = self._build(text, start, offset, doc, settings, [], budget, suffix_tokens, kept.first_line)
            if len(prompt.prefix) == offset - start:
                span = kept
                break
        if span is None:
            lines_from = _whole_lines_from(text, max(0, offset - c.context_tokens * _CHARS_PER_TOKEN_BOUND), offset)
            start = offset if lines_from is None else lines_from
            first_line = text.count("\n", 0, start)
            prompt = self._build(text, start, offset, doc, settings, [], budget, suffix_tokens, first_line)
            dropped = offset - start - len(prompt.prefix)
            if prompt.tokens <= learned or (dropped > 0 and text[start + dropped - 1] != "\n"):
                return  # nothing more than the learned budget held, or a line too long to start on
            first = first_line + text.count("\n", start, start + dropped)
            span = WarmSpan(lease.version_id, first, "", line, rested=whole)
            start += dropped
            if prompt.outline:  # the very prompt `_full_prompt` builds from that start has no scope openers above
                prompt = self._build(text, start, offset, doc, settings, [], budget, suffix_tokens, span.first_line)
                if len(prompt.prefix) != offset - start:
                    return
        assert prompt is not None
        head = heal(prompt)[0] if whole else prompt_head(prompt)
        if not span.head:  # a new start: the engine holds what it shares with the text read from that line before
            place = (span.first_line, span.version)
            held = next((s.head for s in self._spans.get(key, ()) if (s.first_line, s.version) == place), "")
            span.head = held[: shared_start(held, head)]
        span.last_line = max(span.last_line, line)
        self._keep_span(key, span)
        await self._read_head(engine, span, head, lease, settings, doc.uri)

    async def _read_head(
        self,
        engine: Engine,
        span: WarmSpan,
        head: str,
        lease: Lease,
        settings: Settings,
        uri: str,
        *,
        second: bool = False,
    ) -> bool:
        """Have the engine read `head` (the text of a prompt from `span`'s start up to a cursor) in pieces of
        `warm_piece_tokens` (what the engine reads in about 150 ms, in KV-cache blocks), each piece a request of
        one new token sent once no completion was asked for a moment (`_quiet`: a completion that comes meanwhile
        waits for one piece at most); the span's `head` says how far it got. `second`: a warm on opening, whose
        pieces wait while a cursor's warm runs. False when the engine failed."""
        ids, ends = self.services.tokenizer.encode_with_ends(head)
        piece = self._warm_piece(settings)
        started = time.perf_counter()
        read: int | None = 0  # tokens the engine did not have cached (None: it does not say, a remote engine)
        request_id = ""
        try:
            for end in range(min(piece, len(ids)), len(ids) + piece, piece):
                end = min(end, len(ids))
                await self._quiet()
                while second and self._warming is not None and not self._warming.done():
                    await asyncio.wait({self._warming})
                    await self._quiet()
                request_id = f"warm-{uuid.uuid4().hex}"
                gen = await engine.generate(
                    ids[:end], n=1, max_tokens=1, temperature=0.0, adapter=lease.ref, request_id=request_id
                )
                request_id = ""
                cached = gen.timing.cached_tokens
                read = None if read is None or cached is None else read + end - cached
                warmed = head[: ends[end - 1]]
                if not span.head.startswith(warmed):  # the span's text is not already further on
                    span.head = warmed
                span.used = time.monotonic()
                if end == len(ids):
                    break
        except asyncio.CancelledError:
            if request_id:
                await self._abort(engine, request_id)
            raise
        except Exception as exc:  # a warm only saves time: the server serves on without it
            log.warning("the text before the cursor in %s was not warmed: %s", uri, exc)
            return False
        log.debug(
            "warmed %d tokens of %s from line %d in %.0f ms (%s of them read)",
            len(ids),
            uri,
            span.first_line,
            (time.perf_counter() - started) * 1000,
            "an unknown number" if read is None else read,
        )
        return True

    def warm_open_soon(self, doc: TextDocument, identity: Identity, settings: Settings) -> None:
        """A document was opened: read its top in the background (`_warm_open`, `completion.warm_open_tokens`).
        The latest opened document wins over one still being read."""
        c = settings.completion
        if not self._warms(settings, None) or c.warm_open_tokens <= 0 or c.crossfile_share > 0:
            return
        arm = arm_of(identity.developer_id, settings.experiment.arms)
        if arm in BASELINE_ARMS:
            return  # their notes change as corrections come: a warm prompt would not stay what they are sent
        if self._opening is not None:
            self._opening.cancel()
        self._opening = asyncio.ensure_future(self._warm_open(doc, identity, settings, arm))

    async def _warm_open(self, doc: TextDocument, identity: Identity, settings: Settings, arm: str) -> None:
        """Have the engine read the document from its top as prompts at `completion.context_tokens` (`_open_span`:
        each as long as such a prompt's text before the cursor can be, each starting about half of that below the
        last one's start), up to `completion.warm_open_tokens` tokens, once the engine is ready and its speed
        known; a cursor's first request then finds a warm start at most half a prompt above its reach
        (`_full_prompt`). Cursor warms go first (`_read_head`); an edit to the document ends it."""
        while (engine := self.services.engine.ready()) is None:
            await asyncio.sleep(0.5)
        c = settings.completion
        await self._calibrated(settings)
        learned = self.context_budget(settings)
        if learned >= c.context_tokens:
            return  # every prompt is read whole anyway
        lease = await self._warm_lease(doc, identity, arm)
        if lease is None:
            return
        try:
            text = doc.text
            key = (identity.developer_id, doc.uri)
            suffix_tokens = suffix_share_of(learned, c.suffix_share)
            left = c.warm_open_tokens
            start: int | None = 0
            spans = reached = 0  # the starts read, and the line the last one reached
            while start is not None and left > 0:
                await self._quiet()
                if doc.text != text:
                    return  # edited: the requests at its cursors warm what they need
                first_line = text.count("\n", 0, start)
                found = self._open_span(text, start, first_line, doc, settings, suffix_tokens)
                if found is None:
                    break
                prompt, end, start_next = found
                span = WarmSpan(lease.version_id, first_line, "", text.count("\n", 0, end))
                if self._keep_span(key, span, opening=True):
                    head = prompt_head(prompt)
                    if not await self._read_head(engine, span, head, lease, settings, doc.uri, second=True):
                        return
                    left -= prompt.tokens
                spans, reached = spans + 1, span.last_line
                start = start_next
            log.debug(
                "%s warmed on opening: %d starts, down to line %d of %d",
                doc.uri,
                spans,
                reached,
                text.count("\n"),
            )
        finally:
            lease.release()

    def _open_span(
        self, text: str, start: int, first_line: int, doc: TextDocument, settings: Settings, suffix_tokens: int
    ) -> tuple[Prompt, int, int | None] | None:
        """The prompt at `completion.context_tokens` from `start` (where `text`'s line `first_line` starts) whose
        cursor is the farthest line start its text before the cursor still reaches whole (the text's end when that
        fits), that cursor, and where the next span starts (the first line start past half of this one's tokens;
        None after the last). None when not even one line from `start` fits."""
        c = settings.completion
        window = text[start : start + c.context_tokens * _CHARS_PER_TOKEN_BOUND]
        ids, ends = self.services.tokenizer.encode_with_ends(window)
        if not ids:
            return None
        room = max(1, c.context_tokens - suffix_tokens - 32)  # less the template's and header's tokens, about
        if len(ids) <= room and start + len(window) == len(text):
            end = len(text)
        else:
            end = start + (window.rfind("\n", 0, ends[min(room, len(ids)) - 1]) + 1)
        for _ in range(4):
            if end <= start:
                return None
            prompt = self._build(text, start, end, doc, settings, [], c.context_tokens, suffix_tokens, first_line)
            dropped = (end - start) - len(prompt.prefix)
            if dropped == 0:
                break
            end = text.rfind("\n", start, end - dropped) + 1  # whole lines fewer by at least what was dropped
        else:
            return None
        if end >= len(text):
            return prompt, end, None
        half = ends[min(len(ids), max(1, prompt.tokens // 2)) - 1]
        following = _whole_lines_from(text, start + half, end)
        return prompt, end, following if following is not None and following > start else end

    async def _quiet(self) -> None:
        """Wait until no completion request is in flight and none came for `WARM_QUIET_S` (typing at the
        editor's pace leaves no such gap: a warm reads while the developer pauses)."""
        while True:
            await self._idle.wait()
            left = self._last_request + WARM_QUIET_S - time.perf_counter()
            if left <= 0 and self._idle.is_set():
                return
            await asyncio.sleep(max(left, 0.0))

    def edited(self, developer_id: str, uri: str, changes: Sequence[types.TextDocumentContentChangeEvent]) -> None:
        """One didChange of the developer's document: its warm starts below an edit move with the lines the
        edit added or removed, so that the text the engine's prefix cache holds from them is found again (a
        line added above them all, an import, would otherwise leave every start on the wrong line). A start
        whose line the edit replaced goes; one above the edit keeps its line (the read count of the next prompt
        from it says how much of its text the cache still holds). A whole new text drops them all."""
        key = (developer_id, uri)
        spans = self._spans.get(key)
        if not spans:
            return
        for change in changes:
            if not isinstance(change, types.TextDocumentContentChangePartial):
                del self._spans[key]
                return
            start, end, text = change.range.start, change.range.end, change.text
            if (end.line, end.character) < (start.line, start.character):
                start, end = end, start  # as the document applies it
            whole = end.character == 0 and (text.endswith("\n") or (not text and start.character == 0))
            spans = move_spans(spans, start.line, end.line, text.count("\n"), last_starts_line=whole)
        self._spans[key] = spans

    def _check_span(self, req: CompletionRequest, gen: Generation) -> None:
        """After a request from a warm start: when the engine read far more of it than it was to read
        (`CompletionRequest.read_limit`: its prefix cache lost the text: the weights changed, or the cache evicted
        it), the document's warm starts are forgotten, so that the next request is not sent a long prompt to read
        whole."""
        cached = gen.timing.cached_tokens
        if cached is None:
            return
        read = len(gen.prompt_token_ids) - cached
        log.debug(
            "the engine read %d tokens of the prompt from the warm start (%d of %d cached)",
            read,
            cached,
            len(gen.prompt_token_ids),
        )
        if read > req.read_limit + self._warm_piece(req.settings):
            key = (req.identity.developer_id, req.doc.uri)
            self._spans.pop(key, None)
            log.info(
                "the engine read %d tokens of a prompt from %s's warm start (%d cached): its warm starts are forgotten",
                read,
                req.doc.uri,
                cached,
            )

    async def _complete(self, engine: Engine, req: CompletionRequest) -> Served | None:
        prompt_text, healed = req.prompt_text, req.healed
        gen = await self._generate(engine, req, prompt_text)
        if gen is None or not gen.candidates:
            return None
        raw = gen.candidates[0]
        generated = raw.text
        if raw.finish_reason == "deadline":
            # Cut at the timeout: the lines it finished are worth showing, a line half-written is not.
            generated = generated[: generated.rfind("\n") + 1] if not req.single else ""
            if not generated.strip():
                _too_slow(req)
                return None
            log.info(
                "completion for %s cut at %d ms: %d finished lines shown",
                req.doc.uri,
                req.settings.completion.timeout_ms,
                generated.count("\n"),
            )
        consumed, text = unheal(generated, healed, blank_line=not req.line_prefix.strip())
        text_after = req.doc.text[req.offset : req.offset + 4096]
        shown = postprocess(
            text,
            line_prefix=req.line_prefix,
            line_suffix=req.line_suffix,
            after=text_after[len(req.line_suffix) :].lstrip("\r\n"),
            before_tail=req.before_tail,
            single_line=req.single,
        )
        latency_ms = (time.perf_counter() - req.started) * 1000
        if shown is None:
            log.debug("no completion for %s: nothing useful in %r", req.doc.uri, raw.text)
            return None
        identity = req.identity
        paused = self.services.learning.recording_paused(Scope.developer(identity.developer_id))
        completion_id = f"c-{uuid.uuid4().hex}"
        record = CompletionRecord(
            id=completion_id,
            session_id=identity.session_id,
            developer_id=identity.developer_id,
            team_id=identity.team_id,
            # The store keeps or drops the prompt (text and ids) by the session's own privacy settings.
            prompt=prompt_text,
            prompt_token_ids=list(gen.prompt_token_ids),
            # The candidate continues the stored prompt exactly: the healed whitespace, then what is shown.
            candidates=[fit_candidate(raw, consumed + shown, engine)],
            shown_index=0,
            mode=req.mode,
            uri=req.doc.uri,
            line=req.position.line,
            character=req.position.character,
            adapter_version=req.lease.version_id,
            arm=req.arm,
            latency_ms=latency_ms,
            document=req.document,
        )
        if self._holds_back(req, shown):
            # Silent: nothing shown, and the record says so (no candidate shown); the training collector keeps
            # it out of training ("nothing was shown"); `heedful eval --show-policy` counts it as a silent turn.
            record.shown_index = None
            self.services.metrics.count_silent(identity.team_id, req.arm)
            if not paused:
                self.services.store.record_completion(record)
            return None
        served = Served(completion_id, shown, req.offset, req.position, req.line_prefix, recorded=not paused)
        if paused:
            return served  # served, and nothing of it stored (nor a training group sampled)
        self.services.store.record_completion(record)
        c = req.settings.completion
        if c.group_size > 1 and self._random.random() < c.group_sample_rate:
            self._sample_group_soon(engine, prompt_text, served.completion_id, req)
        return served

    def _holds_back(self, req: CompletionRequest, shown: str) -> bool:
        """Whether the developer's show policy keeps `shown` back (`completion.show_threshold`): their estimate
        of keeping it is below the threshold, and this is not one of the `completion.show_explore` share of
        such suggestions shown anyway."""
        c = req.settings.completion
        policy = self.policies.of(req.identity.developer_id)
        p = policy.holds_back(suggestion_features(shown), c.show_threshold, c.show_min_outcomes)
        if p is None:
            return False
        if self._random.random() < c.show_explore:
            log.debug("completion for %s shown to explore: P(kept) %.2f < %.2f", req.doc.uri, p, c.show_threshold)
            return False
        log.debug(
            "no completion for %s: held back, P(kept) %.2f < completion.show_threshold %.2f (%d outcomes)",
            req.doc.uri,
            p,
            c.show_threshold,
            policy.outcomes,
        )
        return True

    def _sample_group_soon(self, engine: Engine, prompt_text: str, completion_id: str, req: CompletionRequest) -> None:
        """Sample the request's training group after it answers, unless `completion.group_max_pending` groups
        are still sampling: then none (logged), so that groups never pile up in the engine under load."""
        skip = self._groups_pending >= req.settings.completion.group_max_pending
        self.services.metrics.count_group(req.identity.team_id, sampled=not skip)
        if skip:
            log.debug(
                "no training group for completion %s: %d groups are still sampling (completion.group_max_pending)",
                completion_id,
                self._groups_pending,
            )
            return
        self._groups_pending += 1
        # The group is sampled from the same adapter, after this request answers: it holds its own lease.
        group_lease = req.lease.share()
        task = self._spawn(
            self._sample_group(engine, prompt_text, req.identity, completion_id, req.single, req.settings, group_lease)
        )

        def done(_: asyncio.Task[None]) -> None:  # the group's one release, however the task ended
            group_lease.release()
            self._groups_pending -= 1

        task.add_done_callback(done)

    async def _generate(self, engine: Engine, req: CompletionRequest, prompt_text: str) -> Generation | None:
        """The engine's answer to the request's prompt, or None (timed out, or the engine failed: logged,
        and reported to the engine's health). A cancelled request aborts its generation."""
        c = req.settings.completion
        request_id = f"cmpl-{uuid.uuid4().hex}"
        # The timeout counts from the request's arrival; an engine that streams answers at the deadline
        # with what it has (finish reason "deadline"), the others raise TimeoutError.
        left_s = max(0.0, c.timeout_ms / 1000 - (time.perf_counter() - req.started))
        try:
            gen = await asyncio.wait_for(
                engine.generate(
                    prompt_text,
                    n=1,
                    max_tokens=c.single_line_max_tokens if req.single else c.max_tokens,
                    temperature=c.temperature,
                    stop=["\n"] if req.single else list(c.stop),
                    adapter=req.lease.ref,
                    request_id=request_id,
                    deadline_s=left_s,
                ),
                timeout=left_s + _DEADLINE_GRACE_S,
            )
        except TimeoutError:
            _too_slow(req)
            await self._abort(engine, request_id)
            return None
        except asyncio.CancelledError:
            await self._abort(engine, request_id)
            raise
        except EngineError as exc:
            log.warning("no completion for %s: %s", req.doc.uri, exc)
            self.services.engine.report_failure(str(exc))
            if req.lease.ref is not None:
                self.services.adapters.forget(req.lease)
            return None
        except Exception as exc:  # whatever the engine raised, the server keeps serving
            log.exception("no completion for %s: the engine failed", req.doc.uri)
            self.services.engine.report_failure(f"the engine failed: {exc}")
            return None
        self.services.engine.report_success()
        self._observe(gen)
        if req.read_limit:
            self._check_span(req, gen)
        return gen

    async def _sample_group(
        self,
        engine: Engine,
        prompt: str,
        identity: Identity,
        completion_id: str,
        single: bool,
        settings: Settings,
        lease: Lease,
    ) -> None:
        """Sample and record the group on `lease`'s adapter; `_sample_group_soon` releases the lease when this
        task ends, however it ends (also when cancelled before it started)."""
        c = settings.completion
        try:
            gen = await engine.generate(
                prompt,
                n=c.group_size - 1,
                max_tokens=c.single_line_max_tokens if single else c.max_tokens,
                temperature=c.group_temperature,
                stop=["\n"] if single else list(c.stop),
                adapter=lease.ref,
            )
        except Exception as exc:
            log.warning("the training group of completion %s was not sampled: %s", completion_id, exc)
            return
        cands = [CandidateRecord(g.text, list(g.token_ids), list(g.logprobs), g.finish_reason) for g in gen.candidates]
        self.services.store.record_group(GroupRecord(completion_id, cands, identity.session_id))

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)  # type: ignore[call-overload]
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _abort(self, engine: Engine, request_id: str) -> None:
        try:
            await engine.abort(request_id)
        except Exception as exc:
            log.debug("abort of %s failed: %s", request_id, exc)

    async def drain(self) -> None:
        """Wait for background group sampling (at shutdown, so no record is left half-made); a warm stops."""
        for warm in (self._warming, self._opening):
            if warm is not None:
                warm.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
