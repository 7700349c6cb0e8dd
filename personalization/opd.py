"""On-policy distillation (OPD) from explicit corrections.

When a developer says what was wrong ("use Flask, not Django", "add type hints"), the serving model can
be its own teacher: the same policy, given the correction as a hint in front of the prompt, scores the
tokens it actually showed. Tokens the hinted teacher finds more likely than the behaviour policy did get
a positive advantage, tokens it finds less likely a negative one:

    A_t = log pi_teacher(y_t | hint + context, y_<t) - log pi_old(y_t | context, y_<t)

These token-level advantages go into the same `grpo_tcr_loss` as the group advantages (ratio against
pi_old, clipping, KL to the reference). A correction without a usable hint (empty, only punctuation,
longer than `MAX_HINT_CHARS`) or whose teacher scores cannot be aligned with the shown tokens is
dropped and counted by reason.

Pure except for `build_opd_samples`, which calls the scorer it is given (the trainer's forward pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from personalization.samples import Sample

Tokenize = Callable[[str], list[int]]
TeacherScore = Callable[[Sample, list[int]], list[float]]  # (sample, hinted prompt ids) -> log-probs

# A hint is a sentence or two; anything longer is pasted code or a log, not an instruction.
MAX_HINT_CHARS = 500


@dataclass(slots=True)
class Correction:
    """A shown response and the developer's correction of it."""

    sample: Sample
    hint: str


@dataclass(slots=True)
class OPDSample:
    """A shown response scored by the teacher (the same model with the correction as a hint)."""

    sample: Sample
    teacher_logprobs: list[float]

    def advantages(self) -> list[float]:
        assert self.sample.old_logprobs is not None, "pi_old must be filled before OPD advantages"
        return token_advantages(self.teacher_logprobs, self.sample.old_logprobs)


@dataclass(slots=True)
class OPDStats:
    used: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())


def token_advantages(teacher_logprobs: Sequence[float], old_logprobs: Sequence[float]) -> list[float]:
    """A_t = log pi_teacher - log pi_old, token by token (the two must align)."""
    if len(teacher_logprobs) != len(old_logprobs):
        raise ValueError(
            f"teacher and pi_old log-probs must cover the same tokens, got {len(teacher_logprobs)} and "
            f"{len(old_logprobs)}"
        )
    return [float(t) - float(o) for t, o in zip(teacher_logprobs, old_logprobs, strict=True)]


def hint_problem(hint: str) -> str | None:
    """Why a correction text cannot serve as a hint, or None when it can."""
    text = hint.strip()
    if not text:
        return "empty hint"
    if not any(ch.isalnum() for ch in text):
        return "hint has no words"
    if len(text) > MAX_HINT_CHARS:
        return f"hint longer than {MAX_HINT_CHARS} characters"
    return None


def hint_prompt(hint: str, prompt_ids: list[int], tokenize: Tokenize) -> list[int]:
    """The teacher's context: the correction as a comment line, then the original prompt."""
    return tokenize(f"# The developer's instruction: {' '.join(hint.split())}\n") + prompt_ids


def build_opd_samples(
    corrections: Sequence[Correction],
    score: TeacherScore,
    tokenize: Tokenize,
    *,
    max_prompt_tokens: int,
) -> tuple[list[OPDSample], OPDStats]:
    """Teacher-score each correction's shown tokens; keep the usable ones and count the rest by reason.

    Each sample's `old_logprobs` must already be filled (the trainer does it under the starting policy
    when the store had none usable).
    """
    stats = OPDStats()
    out: list[OPDSample] = []
    for c in corrections:
        problem = hint_problem(c.hint)
        if problem is not None:
            stats.drop(problem)
            continue
        if c.sample.old_logprobs is None or len(c.sample.old_logprobs) != len(c.sample.response_ids):
            stats.drop("no behaviour log-probs")
            continue
        hinted = hint_prompt(c.hint, c.sample.prompt_ids[-max_prompt_tokens:], tokenize)
        teacher = score(c.sample, hinted)
        if len(teacher) != len(c.sample.response_ids):
            stats.drop("teacher scores do not align with the shown tokens")
            continue
        out.append(OPDSample(c.sample, teacher))
    stats.used = len(out)
    return out, stats
