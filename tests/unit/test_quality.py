"""bench.quality's pure parts: the scores, and the cases it builds from HumanEval and the standard library."""

from __future__ import annotations

import ast
import random
import sysconfig
from pathlib import Path

import pytest

from bench.lsp import parse_overrides
from bench.quality import (
    UTF16,
    blank,
    edit_similarity,
    humaneval_cases,
    levenshtein,
    package_imports,
    parse_args,
    passes,
    repo_cases,
    stdlib_cases,
)
from lsp_handlers.documents import client_length
from personalization.humaneval import first_line


def test_levenshtein_counts_single_character_edits() -> None:
    assert levenshtein("", "") == 0
    assert levenshtein("abc", "") == 3
    assert levenshtein("kitten", "sitting") == 3  # k->s, e->i, +g
    assert levenshtein("return x", "return  x") == 1
    assert levenshtein("flaw", "lawn") == 2


def test_edit_similarity_is_one_minus_distance_over_the_longer_line() -> None:
    assert edit_similarity("  return x\n", "return x") == 1.0
    assert edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert edit_similarity("", "return x") == 0.0
    assert edit_similarity("", "") == 1.0


def test_first_line_drops_the_rest_and_trailing_blanks() -> None:
    assert first_line("x = 1  \r\ny = 2") == "x = 1"
    assert first_line("return x") == "return x"
    assert first_line("") == ""


def test_blank_splits_around_a_line_and_keeps_its_indentation() -> None:
    lines = ["def f():\n", "    x = 1\n", "    return x\n"]
    assert blank(lines, 1) == ("def f():\n", "    ", "x = 1", "    return x\n")


def test_humaneval_cases_blank_one_solution_line_each() -> None:
    cases = humaneval_cases(1000, random.Random(0))
    assert len(cases) > 900  # every non-blank line of 164 solutions
    for case in cases[:50]:
        line = case.text.splitlines()[case.line]
        assert line.strip() == "" and len(line) == case.character
        assert case.infill is not None and case.text.startswith(case.infill.before) and case.expected


def test_the_canonical_line_passes_the_tests_and_a_wrong_one_fails() -> None:
    (case,) = [c for c in humaneval_cases(2000, random.Random(0)) if c.name == "HumanEval/0:0"]
    assert case.expected == "for idx, elem in enumerate(numbers):"
    assert passes(case, case.expected + "\n        pass")
    assert not passes(case, "for idx, elem in enumerate([]):")
    assert not passes(case, "")


def test_stdlib_cases_are_one_line_statements_inside_function_bodies() -> None:
    cases = stdlib_cases(40, random.Random(1))
    assert len(cases) == 40
    for case in cases:
        line = case.text.splitlines()[case.line]
        assert line.strip() == "" and len(line) == case.character
        assert not case.expected.startswith(("#", '"""', "def ", "class "))


def test_package_imports_are_the_names_bound_from_other_modules_of_the_same_package() -> None:
    source = (
        "import os\n"
        "import shop.db\n"
        "from . import tax\n"
        "from .lines import Line as L, total\n"
        "from ..util import slug\n"  # two levels up from shop.billing.invoice: shop.util
        "from shop.billing.invoice import itself\n"  # the module itself: not another module
        "from requests import get\n"
    )
    got = package_imports(ast.parse(source), "shop", "shop.billing.invoice")
    assert got == {"shop", "tax", "L", "total", "slug"}


def test_repository_lines_use_a_name_imported_from_the_package_and_not_defined_in_the_file(tmp_path: Path) -> None:
    site = Path(sysconfig.get_paths()["purelib"])
    packaging_dir = site / "packaging"
    if not packaging_dir.is_dir():
        pytest.skip("packaging is not installed")
    cases = repo_cases(10**6, random.Random(0), tmp_path, packages=["packaging"])
    assert cases and all(c.kind == "repo" and c.path is not None for c in cases)
    for case in cases[:50]:
        assert case.path is not None and case.path.is_relative_to(tmp_path / "packaging")
        original = case.path.read_text(encoding="utf-8").splitlines()
        assert original[case.line].strip() == case.expected  # the copy on disk keeps the line
        assert case.text.splitlines()[case.line].strip() == ""  # the opened document has it blanked
        tree = ast.parse(case.path.read_text(encoding="utf-8"))
        module = ".".join(case.path.relative_to(tmp_path).with_suffix("").parts).removesuffix(".__init__")
        used = {n.id for n in ast.walk(ast.parse(case.expected)) if isinstance(n, ast.Name)}
        assert used & package_imports(tree, "packaging", module)


def test_set_groups_become_settings_sections_with_toml_values() -> None:
    assert parse_overrides("") == {}
    assert parse_overrides('completion.suffix_share=0.1, completion.type_through=false,model.fim_template="none"') == {
        "completion": {"suffix_share": 0.1, "type_through": False},
        "model": {"fim_template": "none"},
    }
    with pytest.raises(ValueError, match=r"--set part 'suffix_share=0.1' is not section.key=value"):
        parse_overrides("suffix_share=0.1")
    with pytest.raises(ValueError, match=r"'none' is not a TOML value .*quote text"):
        parse_overrides("model.fim_template=none")


def test_typed_characters_are_counted_and_positioned_in_utf16_units() -> None:
    args = parse_args(["--typed", "3", "--set", "", "--set", "completion.suffix_share=0.4"])
    assert (args.typed, args.set) == (3, ["", "completion.suffix_share=0.4"])
    with pytest.raises(SystemExit):
        parse_args(["--typed", "-1"])
    assert parse_args(["--typed", "3", "--pause-ms", "3000"]).pause_ms == 3000
    for bad in (["--pause-ms", "3000"], ["--typed", "3", "--pause-ms", "-1"]):  # a pause needs typing after it
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert (parse_args([]).open_pause_ms, parse_args(["--open-pause-ms", "5000"]).open_pause_ms) == (0, 5000)
    with pytest.raises(SystemExit):
        parse_args(["--open-pause-ms", "-1"])
    assert [client_length(t, UTF16) for t in ("", "x = 1", "é", "🎉")] == [0, 5, 1, 2]
