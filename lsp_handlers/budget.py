"""How many tokens of context a completion's prompt may have on this machine, learned from the engine.

Reading the prompt (prefill) is most of a cold completion's time on a CPU, and it grows with the prompt:
a 1,536-token prompt takes about 2 s on two AMD EPYC cores and well under 1 s where AMX units do the
work. `PrefillClock` keeps the engine's own recent figures (seconds per prompt token it had to read, from
requests that ran alone in the engine) and turns `completion.prefill_target_ms` into a token budget: the
most tokens the engine reads in that time, rounded down to `STEP_TOKENS` so that the prompt's start moves
rarely (the prefix cache keeps what a keystroke's prompt shares with the last one), never below
`FLOOR_TOKENS` nor above `completion.context_tokens`.

A budget grows only when the engine reads `UP_MARGIN` (5 %) more than the bigger budget needs, and shrinks
as soon as it reads less than the current one: an engine whose speed sits on a step's edge (600 ms reading
383 tokens one minute and 386 the next) keeps one budget instead of switching between 320 and 384, and a
prompt whose budget switches starts somewhere else, which the prefix cache cannot reuse.

The rate is the median over the last `WINDOW` samples: one request slowed by something else on the
machine moves nothing, a machine that stays busier (a training round beside the server) shrinks the
budget, and five quiet requests bring it back. Requests that read fewer than `MIN_SAMPLE_TOKENS`, or than half the
smallest budget given (a keystroke whose prompt the prefix cache mostly held, a prompt from a warm start), are not
samples: every request costs about one pass over the model's weights before its first token however few tokens it
reads (some 100 ms on these CPUs), which on a short read would look like a slow rate and shrink the budget that
the cold requests, which read all of it, are given.

The same rate sizes the pieces a warm reads the text before a cursor in (`warm_piece_tokens`): a completion that
arrives during a piece waits for it, so a piece is what the engine reads in about `WARM_PIECE_S`, in whole KV-cache
blocks, at most `WARM_PIECE_TOKENS`. A request costs some 35-100 ms beyond its reading on these CPUs, so smaller
pieces would make the warm itself much slower: 128 tokens take 290-370 ms on two AMD EPYC cores (64 there), about
the target where AMX units do the work.
"""

from __future__ import annotations

import statistics
from collections import deque

STEP_TOKENS = 64
FLOOR_TOKENS = 256
MIN_SAMPLE_TOKENS = 128
WINDOW = 9
UP_MARGIN = 0.05
WARM_PIECE_S = 0.15
WARM_PIECE_TOKENS = 128


def warm_piece_tokens(seconds_per_token: float | None, block_size: int) -> int:
    """The tokens a warm reads per engine request: what the engine reads in `WARM_PIECE_S` at `seconds_per_token`,
    rounded down to whole blocks of `block_size` tokens, at least one block and at most `WARM_PIECE_TOKENS` (or one
    block where a block is bigger); `WARM_PIECE_TOKENS` before the speed is known."""
    most = max(WARM_PIECE_TOKENS, block_size)
    if seconds_per_token is None or not seconds_per_token > 0:
        return most
    fits = int(WARM_PIECE_S / seconds_per_token) // block_size * block_size
    return min(most, max(block_size, fits))


class PrefillClock:
    """The engine's prompt-reading speed on this machine, and the context budget it allows."""

    def __init__(self, window: int = WINDOW) -> None:
        self._rates: deque[float] = deque(maxlen=window)
        self._given: dict[tuple[int, int], int] = {}  # (context_tokens, target_ms) -> the budget last given

    def observe(self, read_tokens: int, seconds: float) -> bool:
        """Record that the engine read `read_tokens` prompt tokens (those its prefix cache did not hold)
        in `seconds` (to the first new token). Returns whether it counted as a sample."""
        least = max(MIN_SAMPLE_TOKENS, min(self._given.values(), default=0) // 2)
        if read_tokens < least or not seconds > 0:
            return False
        self._rates.append(seconds / read_tokens)
        return True

    @property
    def samples(self) -> int:
        return len(self._rates)

    def seconds_per_token(self) -> float | None:
        """The median rate of the recent samples, or None before the first."""
        return statistics.median(self._rates) if self._rates else None

    def budget(self, context_tokens: int, target_ms: int) -> int:
        """The prompt's token budget: `context_tokens`, or less where reading it would take longer than
        `target_ms` (0: no target)."""
        rate = self.seconds_per_token()
        if target_ms <= 0 or rate is None:
            return context_tokens
        tokens = target_ms / 1000 / rate
        fits = int(tokens) // STEP_TOKENS * STEP_TOKENS
        key = (context_tokens, target_ms)
        last = self._given.get(key)
        if last is not None and fits > last:  # grow only by the steps the engine reads with the margin
            fits = max(last, int(tokens / (1 + UP_MARGIN)) // STEP_TOKENS * STEP_TOKENS)
        budget = min(context_tokens, max(FLOOR_TOKENS, fits))
        self._given[key] = budget
        return budget
