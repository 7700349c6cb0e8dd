"""What the trainer learns from: one response to a prompt (`Sample`) and the group of responses to one
prompt whose advantages are relative to each other (`Group`). Plain data, shared by the training data
builder (`dataset`), on-policy distillation (`opd`) and the trainer."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Sample:
    """One response to a prompt, as the loss sees it."""

    prompt_ids: list[int]
    response_ids: list[int]
    old_logprobs: list[float] | None  # pi_old per response token; None: the policy of the step that next uses it
    reward: float = 0.0
    demonstration: bool = False
    # Per response token: does it depart from what the developer kept there (None: not known, or nothing
    # departs)? With `training.credit = "edit"` a negative advantage lands on the departing tokens only.
    departs: list[bool] | None = None


@dataclass(slots=True)
class Group:
    """The G samples of one prompt; their advantages are relative to each other."""

    samples: list[Sample]
    advantages: list[float] = field(default_factory=list)

    @property
    def masked(self) -> bool:
        return not any(abs(a) > 0 for a in self.advantages)
