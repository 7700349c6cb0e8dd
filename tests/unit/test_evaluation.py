"""Pure parts of `heedful eval`: loading personas, reading verdicts, rates, positions, its settings."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kernel.settings import Settings, resolve
from tools import evaluation
from tools.evaluation import (
    EvalError,
    EvalPlan,
    Turn,
    at_stake,
    crr,
    end_of,
    kept_characters,
    load_persona,
    pass_stats,
    review,
)

PERSONA_FILE = """
class Terse:
    name = "terse"
    correction = "Keep it short."

    def review(self, prefix, completion):
        return len(completion) < 10, completion[:9] if len(completion) >= 10 else None


class Verdict:
    name = "object-verdict"
    correction = "No."

    def review(self, prefix, completion):
        return type("V", (), {"accept": False, "kept": "x"})()


class Broken:
    name = ""
    correction = "?"
"""


def test_personas_load_from_a_file_or_by_shipped_name(tmp_path: Path) -> None:
    path = tmp_path / "mine.py"
    path.write_text(PERSONA_FILE)
    terse = load_persona(f"{path}:Terse")
    assert terse.name == "terse" and review(terse, "", "short") == (True, None)
    assert review(terse, "", "much too long") == (False, "much too ")
    assert review(load_persona(f"{path}:Verdict"), "", "y") == (False, "x")
    assert load_persona("type-hints").name == "type-hints"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{dir}/missing.py:Terse", "does not exist"),
        ("{dir}/mine.py:Nope", "has no 'Nope'"),
        ("{dir}/mine.py:Broken", "Broken.name must be a non-empty string"),
        ("no-such-persona", "shipped personas"),
    ],
)
def test_bad_personas_are_named_with_the_fix(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "mine.py").write_text(PERSONA_FILE)
    with pytest.raises(EvalError, match=message):
        load_persona(spec.format(dir=tmp_path))


def test_a_verdict_of_the_wrong_shape_is_an_error() -> None:
    persona = SimpleNamespace(name="odd", correction="c", review=lambda prefix, completion: "yes")
    with pytest.raises(EvalError, match="return \\(accept, kept\\)"):
        review(persona, "", "x")


def turn(text: str, accepted: bool) -> Turn:
    return Turn("before", "p", "c", text, accepted, bool(text) and not accepted, "shown", None, 1.0)


def test_rates_and_crr() -> None:
    stats = pass_stats([turn("a", True), turn("b", False), turn("", False), turn("c", False)])
    assert (stats.correction_rate, stats.accept_rate, stats.empty, stats.prompts) == (0.5, 0.25, 1, 4)
    assert crr(0.5, 0.125) == 0.75
    assert crr(0.4, 0.4) == 0.0
    assert crr(0.2, 0.3) == pytest.approx(-0.5)
    assert crr(0.0, 0.0) is None  # nothing to correct before: no reduction to speak of


def test_kept_characters_count_what_survives_of_the_suggestion() -> None:
    assert kept_characters("return x", True, None) == 8  # taken as it is
    assert kept_characters("return x", False, None) == 0  # turned down
    # rewritten: "def f(a):" -> "def f(a: int) -> int:" keeps d,e,f,space,f,(,a then ),: = 9 characters
    assert kept_characters("def f(a):", False, "def f(a: int) -> int:") == 9
    assert kept_characters("", False, "x") == 0


def test_kept_characters_per_shown_suggestion_leaves_empty_ones_out() -> None:
    turns = [turn("abcd", True), turn("xy", False), turn("", False)]
    turns[0].kept_chars, turns[1].kept_chars = 4, 1
    assert pass_stats(turns).kept_chars_per_shown == 2.5  # (4 + 1) / 2 shown


def test_silent_turns_are_the_empty_ones_held_back_while_they_waited() -> None:
    turns = [turn("", False), turn("", False), turn("x", True), turn("", False)]
    for i, t in enumerate(turns):
        t.uri, t.asked_at, t.answered_at = f"file:///{i % 2}.py", 10.0 * i, 10.0 * i + 2
    held_back = [
        ("file:///0.py", 1.0),  # turn 0's uri, while it waited: silent
        ("file:///1.py", 5.0),  # turn 1's uri, but after its answer: the server answered nothing else
        ("file:///0.py", 21.0),  # turn 2 showed a suggestion: not silent
        ("file:///0.py", 31.0),  # turn 3's time, another uri
    ]
    assert evaluation.mark_silent(turns, held_back) == 1
    assert [t.silent for t in turns] == [True, False, False, False]
    assert evaluation.mark_silent(turns, held_back) == 0  # marked once
    stats = pass_stats(turns)
    # 3 empty turns, 1 of them silent; 1 shown suggestion, accepted.
    assert (stats.empty, stats.silent, stats.accept_rate, stats.accept_rate_shown) == (3, 1, 0.25, 1.0)


def test_end_of_counts_utf16_units() -> None:
    assert end_of(3, 4, "abc") == (3, 7)
    assert end_of(3, 4, "a😀") == (3, 7)  # the emoji is two UTF-16 units
    assert end_of(3, 4, "x\n  yz") == (4, 4)


def test_the_eval_settings_are_valid_settings_with_the_overrides(tmp_path: Path) -> None:
    settings = Settings()
    plan = EvalPlan(
        personas=[], arms=["baseline"], rounds=1, train_per_round=1, held_out=1, seed=0,
        out_dir=tmp_path, settings=settings, steps_per_round=7,
    )  # fmt: skip
    config = tmp_path / "eval.toml"
    config.write_text(evaluation.eval_settings_toml(plan, "baseline"))
    s = resolve(config).settings
    assert s.experiment.arms == ["baseline"]
    assert s.completion.temperature == 0.0 and s.completion.group_sample_rate == 1.0
    assert s.training.steps_per_round == 7 and not s.training.in_server
    assert s.database.url == f"sqlite+aiosqlite:///{(tmp_path / 'heedful.db').resolve()}"
    assert Path(s.model.path).is_absolute()
    assert s.training.lora_target_modules == settings.training.lora_target_modules  # the rest is the user's
    assert s.completion.show_threshold == 0.0  # the correction rate measures what the model writes
    plan.show_policy = True
    config.write_text(evaluation.eval_settings_toml(plan, "baseline"))
    s = resolve(config).settings
    assert s.completion.show_threshold == settings.completion.show_threshold > 0
    assert s.completion.show_explore == 0.0  # measured turns are the policy's choice


def test_plans_are_checked() -> None:
    base = dict(personas=[("x", object())], arms=["rl"], rounds=1, train_per_round=1, held_out=1, seed=0,
                out_dir=Path("."), settings=Settings())  # fmt: skip
    with pytest.raises(EvalError, match="each arm must be one of"):
        evaluation.check_plan(EvalPlan(**{**base, "arms": ["rl", "bandit"]}))  # type: ignore[arg-type]
    with pytest.raises(EvalError, match="--rounds 0"):
        evaluation.check_plan(EvalPlan(**{**base, "rounds": 0}))  # type: ignore[arg-type]
    with pytest.raises(EvalError, match="--steps 0"):
        evaluation.check_plan(EvalPlan(**{**base, "steps_per_round": 0}))  # type: ignore[arg-type]


def test_prompt_context_comes_from_the_persona() -> None:
    assert evaluation.prompt_context(load_persona("pathlib")) == ("os.path",)
    assert evaluation.prompt_context(load_persona("type-hints")) == ()
    odd = SimpleNamespace(name="odd", correction="c", prompt_context="os.path")  # a string, not a tuple
    with pytest.raises(EvalError, match="prompt_context = 'os.path'"):
        evaluation.prompt_context(odd)


def test_prompt_calls_come_from_the_persona() -> None:
    assert evaluation.prompt_calls(load_persona("open-encoding")) == ("open",)
    assert evaluation.prompt_calls(load_persona("type-hints")) == ()
    needs = SimpleNamespace(name="needs", correction="c", prompt_kinds=("call",))  # call prompts, no functions
    with pytest.raises(EvalError, match="prompt_calls = None.*prompt kind 'call' needs them"):
        evaluation.prompt_calls(needs)
    odd = SimpleNamespace(name="odd", correction="c", prompt_kinds=("call",), prompt_calls="open")
    with pytest.raises(EvalError, match="prompt_calls = 'open'"):
        evaluation.prompt_calls(odd)


def test_prompt_kinds_come_from_the_persona() -> None:
    assert evaluation.prompt_kinds(load_persona("type-hints")) == ("signature",)
    assert evaluation.prompt_kinds(SimpleNamespace(name="any", correction="c")) == ("signature", "body", "statement")
    odd = SimpleNamespace(name="odd", correction="c", prompt_kinds=("lambda",))
    with pytest.raises(EvalError, match="prompt_kinds = \\('lambda',\\)"):
        evaluation.prompt_kinds(odd)


def test_a_persona_is_at_stake_from_the_threshold_on() -> None:
    assert at_stake(0.5, 0.5) and at_stake(1.0, 0.5) and not at_stake(0.46, 0.5)
    assert at_stake(0.0, None)  # no threshold: every arm runs
