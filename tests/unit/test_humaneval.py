"""HumanEval's single-line infilling cases and their sandboxed execution, on the wheel's real problems."""

from __future__ import annotations

import random

from personalization.humaneval import infill_pool, passes, problems, run_isolated, sample_cases


def test_the_wheel_ships_164_problems_and_every_solution_line_is_a_case() -> None:
    assert len(problems()) == 164
    pool = infill_pool()
    expected = sum(1 for p in problems() for line in p["canonical_solution"].splitlines() if line.strip())
    assert len(pool) == expected
    first = pool[0]
    assert first.name == "HumanEval/0:0"
    assert first.expected == "for idx, elem in enumerate(numbers):"
    assert first.indent == "    " and first.prefix.endswith("\n    ")
    assert first.suffix.startswith("\n        for idx2, elem2 in enumerate(numbers):")


def test_sampling_is_seeded_and_without_replacement() -> None:
    a = [c.name for c in sample_cases(40, random.Random(3))]
    b = [c.name for c in sample_cases(40, random.Random(3))]
    assert a == b and len(set(a)) == 40


def test_the_canonical_line_passes_and_a_wrong_one_fails() -> None:
    case = infill_pool()[0]
    assert passes(case, case.expected)
    assert passes(case, case.expected + "\n        pass")  # only the first line counts
    assert not passes(case, "for idx, elem in enumerate([]):")
    assert not passes(case, "")


def test_a_program_that_hangs_or_raises_fails() -> None:
    assert run_isolated("print('ok')\n")
    assert not run_isolated("raise SystemExit(3)\n")
    assert not run_isolated("while True:\n    pass\n", timeout_s=1.0)
