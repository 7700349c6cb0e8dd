"""A scope's pending rollouts turned into what the trainer consumes: judged groups and OPD samples.

For each pending rollout: the completion's candidates become a group. The shown candidate carries the
outcome reward the collector recorded; every other member is judged in hindsight against what the
developer kept (and against the shown one's outcome when they changed it: `judge.hindsight_reward`), and
when that is undecided (or nothing was kept) by the judge given (the PRM), else 0.
Every reward is shaped by the overlong penalty. When no member earned a positive reward and the kept
text is known, the kept text joins the group as a demonstration with reward +1 (its pi_old is computed
by the trainer under the starting policy). A rollout with an explicit correction also yields an OPD
sample: the shown tokens, to be scored by the teacher with the correction as a hint.

It reads the store; it never writes it and never trains.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession

from kernel.settings import TrainingSettings
from personalization.grpo import overlong_penalty
from personalization.judge import MaybeVote, UnshownJudge
from personalization.opd import Correction
from personalization.samples import Group, Sample
from storage.models import Completion, Rollout
from storage.repositories import CompletionRepository, EventRepository, RolloutRepository, Scope

Tokenize = Callable[[str], list[int]]


@dataclass(slots=True)
class TrainingData:
    rollout_ids: list[int] = field(default_factory=list)
    groups: list[Group] = field(default_factory=list)
    corrections: list[Correction] = field(default_factory=list)
    demonstrations: int = 0
    judged: dict[str, int] = field(default_factory=dict)  # how unshown members were judged: hindsight/prm/none


async def load_training_data(
    session: AsyncSession,
    scope: Scope,
    settings: TrainingSettings,
    *,
    tokenize: Tokenize,
    prm: MaybeVote | None = None,
    limit: int = 2000,
    eos: int | None = None,
) -> TrainingData:
    """The pending rollouts of `scope` as training groups. `eos`, the tokenizer's end-of-text token, ends
    the kept text of a suggestion the developer cut short (see `kept_ends`), so that stopping is taught."""
    rollouts = await RolloutRepository(session).pending(scope, limit)
    ids = [r.completion_id for r in rollouts if r.completion_id]
    completions = await CompletionRepository(session).by_ids(ids)
    corrections = await EventRepository(session).corrections_on(ids)
    data = TrainingData()
    judge = UnshownJudge(prm)
    for r in rollouts:
        comp = completions.get(r.completion_id or "")
        if comp is None:
            continue
        data.rollout_ids.append(r.id)
        group = build_group(r, comp, settings, tokenize=tokenize, judge=judge, data=data, eos=eos)
        if group is not None:
            data.groups.append(group)
        hint = corrections.get(comp.id)
        prompt_ids = _prompt_ids(comp, tokenize)
        # No prompt (`privacy.store_prompts = false`): nothing to score the shown tokens after, as for groups.
        if hint and comp.shown_index is not None and prompt_ids:
            shown = comp.candidates[comp.shown_index]
            ids_ = list(shown.token_ids) if not shown.logprobs_stale else tokenize(shown.text)
            old = list(shown.logprobs) if not shown.logprobs_stale else None
            if ids_:
                data.corrections.append(Correction(Sample(prompt_ids, ids_, old), hint))
    data.judged = dict(judge.tally)
    return data


def _prompt_ids(comp: Completion, tokenize: Tokenize) -> list[int]:
    return list(comp.prompt_token_ids) if comp.prompt_token_ids else tokenize(comp.prompt)


def departing_tokens(response_ids: Sequence[int], kept_ids: Sequence[int]) -> list[bool] | None:
    """Which tokens of a response depart from the kept text, by a token diff of the two.

    A replaced or deleted response token departs; where the developer inserted text, the response token
    in front of which they inserted it departs (the model wrote it where the kept text goes on
    differently). An insertion after the last token marks nothing: that choice (to stop) has no token.
    None when no token departs (the response is the kept text, or all of it is kept and only extended).
    """
    if not response_ids or not kept_ids:
        return None
    departs = [False] * len(response_ids)
    matcher = difflib.SequenceMatcher(None, list(response_ids), list(kept_ids), autojunk=False)
    for op, i1, i2, _j1, _j2 in matcher.get_opcodes():
        if op in ("replace", "delete"):
            for i in range(i1, i2):
                departs[i] = True
        elif op == "insert" and i1 < len(departs):
            departs[i1] = True
    return departs if any(departs) else None


def _kept_ids(shown: str | None, kept: str, tokenize: Tokenize, *, end: int | None = None) -> list[int]:
    """The kept text as a response to the prompt: with the healed leading whitespace the prompt lacks
    (the shown suggestion's), so that it lines up with the candidates' tokens; `end` (an end-of-text
    token) after it when the response should stop there."""
    text = shown or ""
    lead = text[: len(text) - len(text.lstrip(" \t"))]
    ids = tokenize(lead + kept.lstrip(" \t") if not kept.startswith(lead) else kept)
    return [*ids, end] if end is not None and ids else ids


def kept_ends(shown: str | None, shown_ids: Sequence[int], kept: str, eos: int | None) -> bool:
    """Whether what the developer kept is a whole response, one the model should stop after: the shown
    suggestion ended with the end-of-text token `eos`, or the developer kept its start and deleted the rest
    (a partial accept, a suggestion of several lines cut to one). Otherwise the suggestion was cut by its
    length or its stop strings, and so is what was kept: it goes on, and no end is taught."""
    if eos is None or shown is None:
        return False
    if shown_ids and shown_ids[-1] == eos:
        return True
    whole, start = shown.strip(), kept.strip()
    return bool(start) and len(start) < len(whole) and whole.startswith(start)


def build_group(
    rollout: Rollout,
    comp: Completion,
    settings: TrainingSettings,
    *,
    tokenize: Tokenize,
    judge: UnshownJudge,
    data: TrainingData,
    eos: int | None = None,
) -> Group | None:
    prompt_ids = _prompt_ids(comp, tokenize)
    if not prompt_ids:
        return None
    kept = rollout.next_state
    samples: list[Sample] = []
    rewards: Sequence[int | None] = rollout.rewards or []
    shown_index = comp.shown_index if comp.shown_index is not None and comp.shown_index < len(comp.candidates) else None
    shown = comp.candidates[shown_index].text if shown_index is not None else None
    shown_reward = rewards[shown_index] if shown_index is not None and shown_index < len(rewards) else None
    shown_ids = list(comp.candidates[shown_index].token_ids) if shown_index is not None else []
    ends = kept is not None and kept_ends(shown, shown_ids, kept, eos)
    kept_ids = _kept_ids(shown, kept, tokenize, end=eos if ends else None) if kept else []
    for i, cand in enumerate(comp.candidates):
        ids = list(cand.token_ids) if not cand.logprobs_stale else tokenize(cand.text)
        if not ids:
            continue
        old = list(cand.logprobs) if not cand.logprobs_stale else None
        reward = rewards[i] if i < len(rewards) else None
        if reward is None:
            reward = judge(comp.prompt, cand.text, kept, shown=shown, shown_reward=shown_reward)
        shaped = reward + overlong_penalty(len(ids), settings.l_max, settings.l_cache)
        samples.append(Sample(prompt_ids, ids, old, float(shaped), departs=departing_tokens(ids, kept_ids)))
    if not samples:
        return None
    if kept and max(s.reward for s in samples) <= 0 and all(c.text.strip() != kept.strip() for c in comp.candidates):
        # The model never sampled what the developer wanted: show it what they kept.
        demo_ids = kept_ids
        if demo_ids:
            samples.append(Sample(prompt_ids, demo_ids, None, 1.0, demonstration=True))
            data.demonstrations += 1
    return Group(samples)
