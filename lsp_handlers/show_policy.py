"""The show policy: each developer's own estimate of whether they keep a suggestion, and when to stay silent.

A suggestion a developer does not keep costs them: they read it, turn it down or rewrite it. Scoring a
kept suggestion +0.75, one that is not -0.25 and silence 0, showing pays when P(kept) >= 0.25
(`completion.show_threshold`). A suggestion partly kept counts as that share kept: P(kept) is the expected
share of the suggestion the developer keeps. `ShowPolicy` estimates it for one developer with an online
logistic regression over features of the suggestion's text (`suggestion_features`: the kind of its first
line, its length, its words), trained on that developer's own outcomes: an accept counts the share of the
suggestion still there at its last edit snapshot (a partial accept only the part it took; a suggestion
rewritten into something else keeps little), a reject (explicit, or typing past the suggestion) counts 0.
A developer who rejects every comment line stops being shown them; one who keeps them goes on seeing them.

The policy stays quiet until it has `completion.show_min_outcomes` outcomes, and shows a share
`completion.show_explore` of what it would hold back anyway, so that it follows a developer whose habits
change. `ShowPolicies` keeps one policy per developer for a server process; a developer's policy starts
from their stored outcomes (`CompletionRepository.keep_outcomes`), so a restart forgets nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from storage.repositories import CompletionRepository
from storage.store import RolloutStore

log = logging.getLogger(__name__)

# What a shown suggestion is worth: +0.75 kept, -0.25 not kept (read, then turned down); silence is worth 0.
KEPT_REWARD = 0.75
NOT_KEPT_REWARD = -0.25
LEARNING_RATE = 0.5
L2 = 1e-3
MAX_WORDS = 48  # words of a suggestion that become features (the first ones)
STORED_OUTCOMES = 500  # outcomes a developer's policy starts from
LOAD_WAIT_S = 2.0  # how long a request waits for them

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMENT_STARTS = ("#", "//", "/*", "--", ";", "* ", "<!--")
_DOCSTRING_STARTS = ('"""', "'''", 'r"""', "r'''")
_STUBS = ("pass", "...", "raise NotImplementedError", "raise NotImplementedError()")
_CALL = re.compile(r"^[A-Za-z_][\w.]*\s*\(")
_ASSIGN = re.compile(r"^[A-Za-z_][\w.\[\]'\", ]*\s*(?:[-+*/%&|^@]|//|\*\*|<<|>>)?=(?!=)")
# Words a line's kind is named after (Python's statements, and print and a few of JavaScript's).
_KEYWORDS = frozenset(
    "return raise import from def class if elif else for while with try except finally yield assert del "  # noqa: SIM905
    "global nonlocal lambda async await break continue print const let var function".split()
)


def break_even(kept: float = KEPT_REWARD, not_kept: float = NOT_KEPT_REWARD) -> float:
    """The P(kept) above which showing a suggestion pays: p * kept + (1 - p) * not_kept = 0 (silence)."""
    if kept <= 0 or not_kept >= 0:
        raise ValueError(f"a kept suggestion must score above 0 and one not kept below 0, got {kept} and {not_kept}")
    return -not_kept / (kept - not_kept)


def first_line_kind(line: str) -> str:
    """What a suggestion's first non-blank line is: comment, docstring, stub, keyword:<word>, call, assign or
    code."""
    s = line.strip()
    if s.startswith(_COMMENT_STARTS):
        return "comment"
    if s.startswith(_DOCSTRING_STARTS):
        return "docstring"
    if s in _STUBS or "TODO" in s:
        return "stub"
    word = _WORD.match(s)
    if word is not None and word.group(0) in _KEYWORDS:
        return f"keyword:{word.group(0)}"
    if _CALL.match(s):
        return "call"
    if _ASSIGN.match(s):
        return "assign"
    return "code"


def _bucket(n: int, edges: Sequence[int]) -> str:
    for edge in edges:
        if n < edge:
            return f"<{edge}"
    return f">={edges[-1]}"


def suggestion_features(text: str) -> dict[str, float]:
    """The features of a suggestion's text the policy weighs: a bias, the kind of its first non-blank line,
    its lines and characters (bucketed), and its first `MAX_WORDS` distinct words, which share a weight of
    one between them (a long suggestion's words do not outvote its kind)."""
    lines = [line for line in text.split("\n") if line.strip()]
    features: dict[str, float] = {"bias": 1.0}
    features["kind:" + (first_line_kind(lines[0]) if lines else "blank")] = 1.0
    features["lines:" + _bucket(len(lines), (2, 4))] = 1.0
    features["chars:" + _bucket(len(text.strip()), (8, 24, 64, 160))] = 1.0
    words = list(dict.fromkeys(_WORD.findall(text)))[:MAX_WORDS]
    for word in words:
        features["word:" + word] = 1.0 / math.sqrt(len(words))
    return features


@dataclass(slots=True)
class ShowPolicy:
    """One developer's online logistic regression of P(kept) over `suggestion_features`."""

    weights: dict[str, float] = field(default_factory=dict)
    outcomes: int = 0
    kept: float = 0.0  # the shares kept, summed

    def p_kept(self, features: Mapping[str, float]) -> float:
        z = sum(self.weights.get(name, 0.0) * value for name, value in features.items())
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def observe(self, features: Mapping[str, float], kept: float) -> None:
        """One stochastic gradient step of the log-loss (with a small L2 pull toward 0) on one outcome: the
        share of the suggestion kept, 0 to 1."""
        if not 0.0 <= kept <= 1.0:
            raise ValueError(f"the share of a suggestion kept must be between 0 and 1, got {kept}")
        error = kept - self.p_kept(features)
        for name, value in features.items():
            w = self.weights.get(name, 0.0)
            self.weights[name] = w + LEARNING_RATE * (error * value - L2 * w)
        self.outcomes += 1
        self.kept += kept

    def holds_back(self, features: Mapping[str, float], threshold: float, min_outcomes: int) -> float | None:
        """P(kept) when the policy would hold the suggestion back (it has `min_outcomes` outcomes and the
        estimate is below `threshold`), else None."""
        if threshold <= 0 or self.outcomes < min_outcomes:
            return None
        p = self.p_kept(features)
        return p if p < threshold else None


class ShowPolicies:
    """The show policies of one server process, one per developer, each started from the developer's stored
    outcomes the first time a session of theirs starts (`load`)."""

    def __init__(self) -> None:
        self._policies: dict[str, ShowPolicy] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        # Outcomes observed while a developer's stored ones are read: learned again after them.
        self._pending: dict[str, list[tuple[dict[str, float], float]]] = {}

    def of(self, developer_id: str) -> ShowPolicy:
        policy = self._policies.get(developer_id)
        if policy is None:
            policy = self._policies[developer_id] = ShowPolicy()
        return policy

    async def ready(self, developer_id: str) -> None:
        """Wait for the developer's stored outcomes to be read, if they are being read now (one query), for at
        most `LOAD_WAIT_S`: a slow store makes the first requests go by what this process has seen alone."""
        task = self._loading.get(developer_id)
        if task is not None and not task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), LOAD_WAIT_S)

    def observe(self, developer_id: str, text: str, kept: float) -> None:
        """One outcome of a suggestion shown to the developer: the share of it they kept."""
        features = suggestion_features(text)
        self.of(developer_id).observe(features, kept)
        pending = self._pending.get(developer_id)
        if pending is not None:
            pending.append((features, kept))

    def load(self, store: RolloutStore, developer_id: str) -> asyncio.Task[None]:
        """Start the developer's policy from their stored outcomes (once per process; in the background)."""
        task = self._loading.get(developer_id)
        if task is None:
            self._pending[developer_id] = []
            task = self._loading[developer_id] = asyncio.ensure_future(self._load(store, developer_id))
        return task

    async def _load(self, store: RolloutStore, developer_id: str) -> None:
        try:
            async with store.unit() as s:
                stored = await CompletionRepository(s).keep_outcomes(developer_id, STORED_OUTCOMES)
        except Exception as exc:  # the policy learns from this process's outcomes alone
            log.warning("the show policy of %r did not read their stored outcomes: %s", developer_id, exc)
            self._pending.pop(developer_id, None)
            return
        policy = ShowPolicy()
        for text, kept in stored:
            policy.observe(suggestion_features(text), kept)
        for features, kept in self._pending.pop(developer_id, []):
            policy.observe(features, kept)
        self._policies[developer_id] = policy
        log.info(
            "show policy of %r: started from %d stored outcomes (on average %.0f %% of a suggestion kept)",
            developer_id,
            len(stored),
            100 * sum(k for _, k in stored) / max(len(stored), 1),
        )
