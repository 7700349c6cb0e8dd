"""From raw model text to the shown completion: each rule of `postprocess` with a positive and a negative case."""

from __future__ import annotations

import pytest

from lsp_handlers.postprocess import is_single_line, postprocess


def run(
    raw: str,
    *,
    line_prefix: str = "",
    line_suffix: str = "",
    after: str | None = None,
    before_tail: str | None = None,
    single_line: bool = False,
) -> str | None:
    """postprocess with defaults: nothing below the cursor line, `before_tail` is just the cursor line's start."""
    return postprocess(
        raw,
        line_prefix=line_prefix,
        line_suffix=line_suffix,
        after="" if after is None else after,
        before_tail=line_prefix if before_tail is None else before_tail,
        single_line=single_line,
    )


# ---------------------------------------------------------------------------------------------- is_single_line


@pytest.mark.parametrize(
    ("line_prefix", "line_suffix", "expected"),
    [
        ("print(", ")", True),
        ("foo", " bar", True),
        ('d = {"', '"}', True),
        ("x = 1", "", False),
        ("x = 1", "   ", False),
        ("x = 1", "\n", False),
        ("x = 1", " \t\r\n", False),
        ("", "", False),
    ],
)
def test_is_single_line(line_prefix: str, line_suffix: str, expected: bool) -> None:
    assert is_single_line(line_prefix, line_suffix) is expected


# ------------------------------------------------------------------------------------------ rule 1: single line


def test_single_line_cuts_at_the_first_line_break() -> None:
    assert run("x + 1\n    return y", line_prefix="total = ", single_line=True) == "x + 1"
    assert run("x + 1\r\n    return y", line_prefix="total = ", single_line=True) == "x + 1"


def test_multi_line_keeps_every_line() -> None:
    assert run("x + 1\n    return y", line_prefix="total = ", single_line=False) == "x + 1\n    return y"


def test_single_line_completion_starting_with_a_line_break_is_none() -> None:
    assert run("\n    return y", line_prefix="f(", line_suffix=")", single_line=True) is None
    assert run("\r\n    return y", line_prefix="f(", line_suffix=")", single_line=True) is None
    assert run("   \n    return y", line_prefix="f(", line_suffix=")", single_line=True) is None


def test_multi_line_completion_starting_with_a_line_break_keeps_it_and_the_indentation() -> None:
    assert run("\n    return x", line_prefix="def f(x):") == "\n    return x"


# ------------------------------------------------------------------------------------ rule 2: suffix overlap


@pytest.mark.parametrize(
    ("line_prefix", "raw", "line_suffix", "expected"),
    [
        ("f(", "x, y)", ")", "x, y"),  # the closing paren is already there
        ("f(", "x, y) ", ")", "x, y"),  # trailing whitespace does not hide the overlap
        ("value = compute(", "x, y):", "):", "x, y"),  # the completion ends with the entire rest of the line
        ("value = compute(", "x, y):", ")  :  ", "x, y):"),  # T = ")  :" is not at the end: no overlap
        ('name = "', 'Ada"', '"', "Ada"),  # a closing quote the editor inserted
        ('print("', 'hello")', '")', "hello"),  # quote and paren together
        ('print("', 'hello"', '")', "hello"),  # only the start of the rest of the line: k = 1
        ("items = [", "1, 2]", "]", "1, 2"),
        ('d = {"name": ', "1}", "}", "1"),
        ("x = f(g(", "a))", "))", "a"),
        ("x = f(g(", "a))", ")", "a)"),  # longest k = 1 here: the completion's second ")" stays
    ],
)
def test_suffix_overlap_is_dropped(line_prefix: str, raw: str, line_suffix: str, expected: str) -> None:
    assert run(raw, line_prefix=line_prefix, line_suffix=line_suffix, single_line=True) == expected


@pytest.mark.parametrize(
    ("line_prefix", "raw", "line_suffix"),
    [
        ("print(", "foo(a)", ")"),  # the ")" closes the completion's own "foo(": not a duplicate
        ("x = [", "a[0]", "]"),  # same with brackets
        ('log("', 'say "hi"', '"'),  # the last quote closes a string the completion opened
        ("f(", "x, y", ")"),  # no overlap at all
        ('d = {"', 'name": 1}', '"}'),  # the rest of the line starts with '"', the completion ends with "}"
    ],
)
def test_suffix_overlap_is_kept_when_it_is_the_completions_own_text(
    line_prefix: str, raw: str, line_suffix: str
) -> None:
    assert run(raw, line_prefix=line_prefix, line_suffix=line_suffix, single_line=True) == raw


def test_completion_that_only_retypes_the_rest_of_the_line_is_none() -> None:
    assert run(")", line_prefix="print(x", line_suffix=")", single_line=True) is None
    assert run("):", line_prefix="def f(x", line_suffix="):", single_line=True) is None


def test_suffix_overlap_is_not_applied_to_multi_line_completions() -> None:
    # The rest of the line ends up after the completion's last line, not its first.
    raw = "a)\nb = g(c)"
    assert run(raw, line_prefix="x = f(", line_suffix=")", single_line=False) == raw


# ------------------------------------------------------------------------------ rule 3: re-generated following code


def test_multi_line_cut_before_the_code_that_follows_the_cursor() -> None:
    raw = "\n        total += x\n    return total\n\nprint(f([1]))"
    after = "\n    return total\n\nprint(f([1, 2]))\n"
    assert run(raw, line_prefix="    for x in xs:", after=after) == "\n        total += x"


def test_multi_line_kept_when_the_following_code_is_not_repeated() -> None:
    raw = "\n        total += x\n    log(total)\n"
    after = "\n    return total\n"
    assert run(raw, line_prefix="    for x in xs:", after=after) == "\n        total += x\n    log(total)"


def test_following_code_is_the_first_non_blank_line_below_the_cursor_line() -> None:
    # `after` is the text below the cursor line, with or without the blank lines that open it.
    raw = "a\npass\nbar()\nbaz()"
    assert run(raw, after="bar()\nbaz()\n") == "a\npass"
    assert run(raw, after="\n\n  \nbar()\n") == "a\npass"
    assert run(raw, after="\r\n\t\r\nbar()\r\n") == "a\npass"
    assert run(raw, after="baz()\nbar()\n") == "a\npass\nbar()"  # only the first non-blank line counts
    assert run(raw, after="\n \n") == raw  # nothing below: nothing to cut


def test_distinctive_following_line_matches_whatever_its_indentation() -> None:
    raw = "\n        total += x\n  return total"
    assert run(raw, line_prefix="    for x in xs:", after="\n    return total\n") == "\n        total += x"


def test_short_following_line_must_also_match_the_indentation() -> None:
    # The completion's nested "  }" is its own; the enclosing function's "}" is the code after the cursor.
    raw = "\n  if (x) {\n    y();\n  }\n  return 1;\n}\n\nfunction g() {"
    after = "\n}\n"
    assert run(raw, line_prefix="function f(x) {", after=after) == "\n  if (x) {\n    y();\n  }\n  return 1;"
    assert run("\n  if (x) {\n    y();\n  }", line_prefix="function f(x) {", after=after) == (
        "\n  if (x) {\n    y();\n  }"
    )


def test_following_code_rule_ignores_the_first_line_and_single_line_mode() -> None:
    after = "return total\n"
    assert run("return total\nprint(total)", line_prefix="", after=after) == "return total\nprint(total)"
    raw = "x\nreturn total"
    assert run(raw, line_prefix="y = ", line_suffix=" ", after=after, single_line=True) == "x"


# ------------------------------------------------------------------------------------ rule 4: trailing whitespace


def test_only_the_very_end_is_stripped() -> None:
    raw = "\n    a = 1  \n\n    b = 2\t\n\n  "
    assert run(raw, line_prefix="def f():") == "\n    a = 1  \n\n    b = 2"


def test_leading_whitespace_is_kept() -> None:
    assert run("    return x", line_prefix="", before_tail="def f(x):\n") == "    return x"
    assert run(" + 1", line_prefix="x = y", line_suffix=" # note", single_line=True) == " + 1"


# ------------------------------------------------------------------------------- rule 5: empty and prefix repeats


@pytest.mark.parametrize("raw", ["", " ", "\n", "\n\n  \t\n", "\r\n"])
def test_empty_or_whitespace_only_is_none(raw: str) -> None:
    assert run(raw, line_prefix="x = ") is None
    assert run(raw, line_prefix="f(", line_suffix=")", single_line=True) is None


def test_repeat_of_the_previous_line_is_none() -> None:
    before_tail = "def f():\n    total = 0\n    "
    assert run("total = 0", line_prefix="    ", before_tail=before_tail) is None
    assert run("total = 0\n", line_prefix="    ", before_tail=before_tail) is None


def test_repeat_of_the_last_lines_is_none() -> None:
    before_tail = "x = 0\na = 1\nb = 2\n\n"
    assert run("a = 1\n\nb = 2", line_prefix="", before_tail=before_tail) is None
    assert run("a = 1\nb = 3", line_prefix="", before_tail=before_tail) == "a = 1\nb = 3"


def test_repeat_of_the_text_already_on_the_cursor_line_is_none() -> None:
    assert run("\ndef f(x):", line_prefix="def f(x):", before_tail="\n\ndef f(x):") is None


def test_completing_the_line_into_a_copy_of_the_previous_one_is_none() -> None:
    before_tail = "    x = load()\n    x"
    assert run(" = load()", line_prefix="    x", before_tail=before_tail) is None
    assert run(" = load(2)", line_prefix="    x", before_tail=before_tail) == " = load(2)"


def test_similar_but_different_lines_are_kept() -> None:
    before_tail = "    total = 0\n    "
    assert run("total = 1", line_prefix="    ", before_tail=before_tail) == "total = 1"
    assert run("count = 0", line_prefix="    ", before_tail=before_tail) == "count = 0"


def test_short_closing_completions_are_never_repeats() -> None:
    # `)` after `print(x` survives, even when the line above is the very same.
    assert run(")", line_prefix="print(x", before_tail="print(x") == ")"
    assert run(")", line_prefix="print(x", before_tail="print(x)\nprint(x") == ")"
    assert run(")", line_prefix="", before_tail="f(\n    1,\n)\ng(\n    2,\n") == ")"
    assert run("}", line_prefix="  ", before_tail="    }\n  ") == "}"


# ------------------------------------------------------------------------------------------------ all together


def test_a_realistic_multi_line_completion() -> None:
    document = "def mean(xs):\n    total = 0\n    for x in xs:\n\n    return total / len(xs)\n"
    offset = document.index("xs:\n") + len("xs:")
    line_start = document.rfind("\n", 0, offset) + 1
    line_end = document.find("\n", offset)
    line_prefix, line_suffix = document[line_start:offset], document[offset:line_end]
    raw = "\n        total += x\n    return total / len(xs)\n\n\nprint(mean([1, 2]))\n"
    shown = postprocess(
        raw,
        line_prefix=line_prefix,
        line_suffix=line_suffix,
        after=document[line_end:].lstrip("\r\n"),  # the text below the cursor line
        before_tail=document[:offset][-512:],
        single_line=is_single_line(line_prefix, line_suffix),
    )
    assert shown == "\n        total += x"


def test_a_realistic_single_line_completion() -> None:
    document = 'config = {"debug": True}\nprint(load(config, )\n'
    offset = document.index(", )") + 2
    line_start = document.rfind("\n", 0, offset) + 1
    line_end = document.find("\n", offset)
    line_prefix, line_suffix = document[line_start:offset], document[offset:line_end]
    assert (line_prefix, line_suffix) == ("print(load(config, ", ")")
    single = is_single_line(line_prefix, line_suffix)
    assert single
    shown = postprocess(
        'strict=True))\nprint("done")',
        line_prefix=line_prefix,
        line_suffix=line_suffix,
        after=document[line_end:].lstrip("\r\n"),
        before_tail=document[:offset],
        single_line=single,
    )
    assert shown == "strict=True)"


def test_block_end_cuts_before_the_next_function() -> None:
    raw = " with open(path) as f:\n        return f.read()\n\ndef get_"
    out = postprocess(
        raw, line_prefix="    ", line_suffix="", after="", before_tail="def read(path):\n    ", single_line=False
    )
    assert out == " with open(path) as f:\n        return f.read()"


def test_block_end_keeps_a_closing_brace_line() -> None:
    raw = "if (x) {\n        y();\n    }\n}\nfunction next() {"
    out = postprocess(
        raw, line_prefix="    ", line_suffix="", after="", before_tail="function f() {\n    ", single_line=False
    )
    assert out == "if (x) {\n        y();\n    }\n}"


def test_block_end_needs_an_indented_cursor_line() -> None:
    raw = "\n    return 1\n\ndef g():"
    out = postprocess(raw, line_prefix="def f():", line_suffix="", after="", before_tail="def f():", single_line=False)
    assert out == raw
