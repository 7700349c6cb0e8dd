"""Prompt building: file-name headers, FIM template choice, and fitting prefix/suffix to a token budget.

The core tests use counters whose values can be checked by hand: `words` (one token per whitespace-separated
word) and `chars` (one token per code point). The expected prompts are written out literally.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kernel.fim import KNOWN_FIM_TEMPLATES, fim_template_for, unheal
from lsp_handlers.context import (
    Continuation,
    Prompt,
    build_prompt,
    comment_header,
    continue_prompt,
    heal,
    prompt_head,
    scope_openers,
    shared_start,
)
from server.model_prep import DEFAULT_MODEL
from tests.conftest import SMALL_MODEL, prepared

STARCODER = "<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>"
SANTACODER = "<fim-prefix>{prefix}<fim-suffix>{suffix}<fim-middle>"
QWEN = "<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
CODELLAMA = "<PRE> {prefix} <SUF>{suffix} <MID>"
DEEPSEEK = "<\uff5cfim\u2581begin\uff5c>{prefix}<\uff5cfim\u2581hole\uff5c>{suffix}<\uff5cfim\u2581end\uff5c>"
SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "sample.py"


def words(text: str) -> int:
    return len(text.split())


def chars(text: str) -> int:
    return len(text)


def fill(template: str, prefix: str, suffix: str) -> str:
    """The template filled by hand: split at both placeholders, whichever comes first."""
    first, second = (
        ("{prefix}", "{suffix}")
        if template.index("{prefix}") < template.index("{suffix}")
        else ("{suffix}", "{prefix}")
    )
    head, rest = template.split(first)
    middle, tail = rest.split(second)
    values = {"{prefix}": prefix, "{suffix}": suffix}
    return head + values[first] + middle + values[second] + tail


def check_invariants(prompt: Prompt, before: str, after: str, budget: int, count: Callable[[str], int]) -> None:
    assert prompt.tokens == count(prompt.text)
    assert prompt.tokens <= budget
    assert before.endswith(prompt.prefix)
    assert after.startswith(prompt.suffix)


# ---------------------------------------------------------------------------------------------- comment_header


@pytest.mark.parametrize(
    ("file_name", "language_id", "expected"),
    [
        ("app/main.py", "python", "# file: app/main.py\n"),
        ("deploy.sh", "shellscript", "# file: deploy.sh\n"),
        ("config.yaml", "yaml", "# file: config.yaml\n"),
        ("pyproject.toml", "toml", "# file: pyproject.toml\n"),
        ("lib/user.rb", "ruby", "# file: lib/user.rb\n"),
        ("src/x.ts", "typescript", "// file: src/x.ts\n"),
        ("src/App.tsx", "typescriptreact", "// file: src/App.tsx\n"),
        ("main.go", "go", "// file: main.go\n"),
        ("src/lib.rs", "rust", "// file: src/lib.rs\n"),
        ("Main.java", "java", "// file: Main.java\n"),
        ("x.c", "c", "// file: x.c\n"),
        ("x.cpp", "cpp", "// file: x.cpp\n"),
        ("Program.cs", "csharp", "// file: Program.cs\n"),
        ("x.kt", "kotlin", "// file: x.kt\n"),
        ("x.swift", "swift", "// file: x.swift\n"),
        ("index.php", "php", "// file: index.php\n"),
        ("x.scala", "scala", "// file: x.scala\n"),
        ("x.lua", "lua", "-- file: x.lua\n"),
        ("q.sql", "sql", "-- file: q.sql\n"),
        ("Main.hs", "haskell", "-- file: Main.hs\n"),
        ("x.html", "html", "<!-- file: x.html -->\n"),
        ("pom.xml", "xml", "<!-- file: pom.xml -->\n"),
        ("README.md", "markdown", "<!-- file: README.md -->\n"),
        ("style.css", "css", "/* file: style.css */\n"),
        ("paper.tex", "latex", "% file: paper.tex\n"),
        ("core.clj", "clojure", "; file: core.clj\n"),
        ("run.bat", "bat", "REM file: run.bat\n"),
        ("Module1.vb", "vb", "' file: Module1.vb\n"),
        ("main.py", "py", "# file: main.py\n"),  # Neovim-style short id
        ("main.py", "Python", "# file: main.py\n"),
    ],
)
def test_comment_header_by_language_id(file_name: str, language_id: str, expected: str) -> None:
    assert comment_header(file_name, language_id) == expected


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("app/main.py", "# file: app/main.py\n"),
        ("web/app.JS", "// file: web/app.JS\n"),
        ("src/lib.rs", "// file: src/lib.rs\n"),
        ("init.lua", "-- file: init.lua\n"),
        ("docs/index.html", "<!-- file: docs/index.html -->\n"),
        ("Makefile", "# file: Makefile\n"),
        ("docker/Dockerfile", "# file: docker/Dockerfile\n"),
        ("C:\\work\\tool.go", "// file: C:\\work\\tool.go\n"),
        ("notes.unknownext", ""),
        ("LICENSE", ""),
        (".gitignore", ""),
        ("data.json", ""),  # JSON has no comments
    ],
)
def test_comment_header_guesses_the_language_from_the_file_name(file_name: str, expected: str) -> None:
    assert comment_header(file_name, None) == expected


def test_comment_header_without_file_name_or_with_unknown_language_is_empty() -> None:
    assert comment_header(None, "python") == ""
    assert comment_header("", "python") == ""
    assert comment_header("notes.txt", "plaintext") == ""
    assert comment_header("data.json", "json") == ""
    assert comment_header("x.py", "no-such-language") == ""  # an explicit id is not second-guessed


def test_comment_header_stays_one_line() -> None:
    assert comment_header("bad\nname.py", "python") == "# file: bad name.py\n"


# -------------------------------------------------------------------------------------------- fim_template_for


@pytest.mark.parametrize(
    ("vocabulary", "expected"),
    [
        ({"<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<|endoftext|>"}, STARCODER),
        ({"<fim-prefix>", "<fim-suffix>", "<fim-middle>", "<fim-pad>"}, SANTACODER),
        ({"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"}, QWEN),
        ({"\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>", "<s>"}, CODELLAMA),
        ({"<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"}, DEEPSEEK),
    ],
)
def test_auto_picks_the_family_whose_tokens_are_all_in_the_vocabulary(vocabulary: set[str], expected: str) -> None:
    assert fim_template_for("auto", vocabulary) == expected
    assert fim_template_for("auto", {token: 1 for token in vocabulary}) == expected  # get_vocab() is a dict
    assert expected in KNOWN_FIM_TEMPLATES


def test_auto_needs_every_token_of_a_family() -> None:
    assert fim_template_for("auto", {"<fim_prefix>", "<fim_suffix>"}) is None
    assert fim_template_for("auto", {"<|fim_prefix|>", "<|fim_middle|>", "hello"}) is None
    assert fim_template_for("auto", set()) is None


def test_auto_takes_the_first_known_family_when_several_match() -> None:
    vocabulary = {"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"}
    assert fim_template_for("auto", vocabulary) == STARCODER


def test_none_and_custom_templates() -> None:
    vocabulary = {"<fim_prefix>", "<fim_suffix>", "<fim_middle>"}
    assert fim_template_for("none", vocabulary) is None
    assert fim_template_for(" None ", vocabulary) is None
    assert fim_template_for("AUTO", vocabulary) == STARCODER
    custom = "[SUFFIX]{suffix}[PREFIX]{prefix}"
    assert fim_template_for(custom, vocabulary) == custom


@pytest.mark.parametrize("setting", ["", "fim", "starcoder", "{prefix} only", "<pre>{prefix}{suffix}{prefix}"])
def test_any_other_setting_is_rejected(setting: str) -> None:
    with pytest.raises(ValueError) as info:
        fim_template_for(setting, set())
    message = str(info.value)
    assert repr(setting) in message
    assert "{prefix}" in message
    assert "{suffix}" in message


def tokenizer_of(name: str) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(prepared(name)))


def test_smollm2_has_no_fim_tokens_so_auto_means_prefix_only() -> None:
    assert fim_template_for("auto", tokenizer_of(SMALL_MODEL).get_vocab()) is None


def test_the_default_code_model_gets_its_own_fim_template() -> None:
    template = fim_template_for("auto", tokenizer_of(DEFAULT_MODEL).get_vocab())
    assert template == QWEN


# ---------------------------------------------------------------------------------------- build_prompt: prefix


def test_prefix_mode_with_room_keeps_the_whole_text_after_the_header() -> None:
    before = "import os\n\ndef main():\n    print(os.getcwd("
    prompt = build_prompt(
        before,
        ")\n\nmain()\n",
        file_name="app/main.py",
        language_id="python",
        budget_tokens=100,
        count_tokens=words,
        fim_template=None,
    )
    assert prompt == Prompt(
        text="# file: app/main.py\nimport os\n\ndef main():\n    print(os.getcwd(",
        mode="prefix",
        prefix="import os\n\ndef main():\n    print(os.getcwd(",
        suffix="",
        header="# file: app/main.py\n",
        tokens=8,  # header 3 + "import os" 2 + "def main():" 2 + "print(os.getcwd(" 1
    )


def test_small_budget_keeps_the_nearest_whole_lines() -> None:
    # Pieces: "d = " 2 words, "c = 3\n" 3, "b = 2\n" 3: the cursor line and one line fit in 7.
    prompt = build_prompt(
        "a = 1\nb = 2\nc = 3\nd = ",
        "",
        file_name=None,
        language_id=None,
        budget_tokens=7,
        count_tokens=words,
        fim_template=None,
    )
    assert prompt.text == "c = 3\nd = "
    assert prompt.prefix == "c = 3\nd = "
    assert prompt.header == ""
    assert prompt.tokens == 5


def test_lines_are_kept_contiguously_from_the_cursor() -> None:
    # "z" 1 + "y = 1\n" 3 = 4; the 6-word line does not fit in the 2 left, so the 1-word "x\n" above it is not
    # taken either: the prefix never skips a line.
    prompt = build_prompt(
        "x\nlong line with many words here\ny = 1\nz",
        "",
        file_name=None,
        language_id=None,
        budget_tokens=6,
        count_tokens=words,
        fim_template=None,
    )
    assert prompt.text == "y = 1\nz"
    assert prompt.tokens == 4


def test_header_counts_against_the_budget() -> None:
    # header 3 words leaves 4: "    return a + b" (4) fits, "def add(a, b):\n" (3) does not.
    prompt = build_prompt(
        "def add(a, b):\n    return a + b",
        "",
        file_name="m.py",
        language_id="python",
        budget_tokens=7,
        count_tokens=words,
        fim_template=None,
    )
    assert prompt.text == "# file: m.py\n    return a + b"
    assert prompt.header == "# file: m.py\n"
    assert prompt.tokens == 7


def test_budget_smaller_than_the_header_drops_the_header() -> None:
    prompt = build_prompt(
        "a = 1\nb = 2",
        "",
        file_name="m.py",
        language_id="python",
        budget_tokens=3,  # the header alone is 3 words: it would leave nothing for the code
        count_tokens=words,
        fim_template=None,
    )
    assert prompt.header == ""
    assert prompt.text == "b = 2"
    assert prompt.tokens == 3


def test_cursor_line_alone_too_long_is_cut_from_its_left() -> None:
    before = "first line\nabcdefghij"
    prompt = build_prompt(
        before, "", file_name=None, language_id=None, budget_tokens=4, count_tokens=chars, fim_template=None
    )
    assert prompt.text == "ghij"
    assert prompt.prefix == "ghij"
    # With a header: "# file: x.py\n" is 13 characters, leaving 7 of 20 for the cursor line.
    prompt = build_prompt(
        before, "", file_name="x.py", language_id="python", budget_tokens=20, count_tokens=chars, fim_template=None
    )
    assert prompt.text == "# file: x.py\ndefghij"
    assert prompt.tokens == 20


def test_cursor_at_the_start_of_a_line_keeps_the_line_break_before_it() -> None:
    prompt = build_prompt(
        "a = 1\nb = 2\n",
        "c = 3\n",
        file_name=None,
        language_id=None,
        budget_tokens=3,
        count_tokens=words,
        fim_template=None,
    )
    assert prompt.text == "b = 2\n"
    assert prompt.prefix == "b = 2\n"


def test_empty_document() -> None:
    prompt = build_prompt(
        "", "", file_name="a.py", language_id="python", budget_tokens=10, count_tokens=words, fim_template=None
    )
    assert prompt == Prompt(
        text="# file: a.py\n", mode="prefix", prefix="", suffix="", header="# file: a.py\n", tokens=3
    )


def test_recount_drops_the_farthest_line_when_pieces_merge() -> None:
    # This counter charges one extra token for every "\n#", which only appears where two pieces are joined:
    # pieces "c" 1 + "# b\n" 4 + "# a\n" 4 = 9 fit the budget, but the joined "# a\n# b\nc" counts 10.
    def merging(text: str) -> int:
        return len(text) + text.count("\n#")

    prompt = build_prompt(
        "# a\n# b\nc", "", file_name=None, language_id=None, budget_tokens=9, count_tokens=merging, fim_template=None
    )
    assert prompt.text == "# b\nc"
    assert prompt.tokens == 5


@pytest.mark.parametrize("budget", [0, -5])
def test_budget_below_one_is_rejected(budget: int) -> None:
    with pytest.raises(ValueError, match="budget_tokens"):
        build_prompt(
            "x", "", file_name=None, language_id=None, budget_tokens=budget, count_tokens=words, fim_template=None
        )


def test_invalid_template_and_share_are_rejected() -> None:
    with pytest.raises(ValueError, match="template"):
        build_prompt(
            "x", "", file_name=None, language_id=None, budget_tokens=10, count_tokens=words, fim_template="auto"
        )
    with pytest.raises(ValueError, match="suffix_share"):
        build_prompt(
            "x",
            "",
            file_name=None,
            language_id=None,
            budget_tokens=10,
            count_tokens=words,
            fim_template=STARCODER,
            suffix_share=1.5,
        )


# ------------------------------------------------------------------------------------------- build_prompt: FIM


def test_fim_layout_with_suffix_share_and_unused_suffix_budget_going_to_the_prefix() -> None:
    # chars: the template is 36, leaving 44 of 80. Suffix share floor(80 * 0.25) = 20: " + b\n" 5 and "\n" 1
    # fit, "print(add(1, 2))\n" 17 does not (14 left). The prefix gets 44 - 6 = 38: "    return a" 12 and
    # "def add(a, b):\n" 15, the whole prefix. Without the 14 unused suffix tokens it would get 24 and lose
    # the "def" line.
    before = "def add(a, b):\n    return a"
    after = " + b\n\nprint(add(1, 2))\n"
    prompt = build_prompt(
        before, after, file_name=None, language_id=None, budget_tokens=80, count_tokens=chars, fim_template=STARCODER
    )
    assert prompt == Prompt(
        text="<fim_prefix>def add(a, b):\n    return a<fim_suffix> + b\n\n<fim_middle>",
        mode="fim",
        prefix="def add(a, b):\n    return a",
        suffix=" + b\n\n",
        header="",
        tokens=69,
        template=STARCODER,
    )


def test_fim_suffix_budget_is_a_share_of_the_budget() -> None:
    # chars, budget 60, template 36 -> 24 left; header "# file: a.py\n" 13 -> 11 left. Suffix share
    # floor(60 * 0.1) = 6: "abc\n" 4 fits, "defgh\n" 6 does not (2 left). Prefix 11 - 4 = 7: "x = " 4, then
    # "y\n" 2 fits, "zz\n" 3 does not (1 left).
    prompt = build_prompt(
        "zz\ny\nx = ",
        "abc\ndefgh\n",
        file_name="a.py",
        language_id="python",
        budget_tokens=60,
        count_tokens=chars,
        fim_template=STARCODER,
        suffix_share=0.1,
    )
    assert prompt.text == "<fim_prefix># file: a.py\ny\nx = <fim_suffix>abc\n<fim_middle>"
    assert prompt.prefix == "y\nx = "
    assert prompt.suffix == "abc\n"
    assert prompt.header == "# file: a.py\n"
    assert prompt.tokens == 36 + 13 + 6 + 4


def test_suffix_tokens_replaces_the_share() -> None:
    # chars, budget 80, template 36 -> 44 left. suffix_tokens 6 (the share would give 20): " + b\n" 5 fits,
    # "\n" 1 fits (6), "print..." does not. The prefix gets 44 - 6 = 38: all 27 characters of `before`.
    prompt = build_prompt(
        "def add(a, b):\n    return a",
        " + b\n\nprint(add(1, 2))\n",
        file_name=None,
        language_id=None,
        budget_tokens=80,
        count_tokens=chars,
        fim_template=STARCODER,
        suffix_tokens=6,
    )
    assert prompt.suffix == " + b\n\n"
    assert prompt.text == "<fim_prefix>def add(a, b):\n    return a<fim_suffix> + b\n\n<fim_middle>"
    # 0: no text after the cursor at all; negative: an error naming it.
    none = build_prompt(
        "x = ",
        "1\n",
        file_name=None,
        language_id=None,
        budget_tokens=80,
        count_tokens=chars,
        fim_template=STARCODER,
        suffix_tokens=0,
    )
    assert none.suffix == "" and none.text == "<fim_prefix>x = <fim_suffix><fim_middle>"
    with pytest.raises(ValueError, match="suffix_tokens = -1"):
        build_prompt(
            "x",
            "",
            file_name=None,
            language_id=None,
            budget_tokens=80,
            count_tokens=chars,
            fim_template=STARCODER,
            suffix_tokens=-1,
        )


def test_prompt_head_is_the_healed_prompt_up_to_the_cursor() -> None:
    # FIM with a header: the template's text before {prefix}, the header, the prefix without its blanks.
    prompt = build_prompt(
        "def f():\n    ",
        "\n    return 1\n",
        file_name="a.py",
        language_id="python",
        budget_tokens=200,
        count_tokens=chars,
        fim_template=QWEN,
    )
    head = prompt_head(prompt)
    assert head == "<|fim_prefix|># file: a.py\ndef f():\n"
    text, healed = heal(prompt)
    assert (
        healed == "    "
        and text.startswith(head)
        and text[len(head) :] == "<|fim_suffix|>\n    return 1\n<|fim_middle|>"
    )
    # Prefix mode: the header and the prefix.
    plain = build_prompt(
        "x = 1\ny = ", "", file_name=None, language_id=None, budget_tokens=200, count_tokens=chars, fim_template=None
    )
    assert prompt_head(plain) == "x = 1\ny =" == heal(plain)[0]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [("", "", 0), ("abc", "", 0), ("abc", "abc", 3), ("abc", "abd", 2), ("abcdef", "abc", 3), ("xbc", "abc", 0)],
)
def test_shared_start(a: str, b: str, expected: int) -> None:
    assert shared_start(a, b) == expected == shared_start(b, a)


def test_fim_cursor_line_remainder_too_long_is_cut_from_its_right() -> None:
    # chars, budget 56, template 36 -> 20; suffix floor(56 * 0.25) = 14 of the 17-character remainder
    # "abcdefghijklmnop\n"; the prefix gets the other 6, of which "x = " takes 4.
    prompt = build_prompt(
        "x = ",
        "abcdefghijklmnop\nnext\n",
        file_name=None,
        language_id=None,
        budget_tokens=56,
        count_tokens=chars,
        fim_template=STARCODER,
    )
    assert prompt.suffix == "abcdefghijklmn"
    assert prompt.text == "<fim_prefix>x = <fim_suffix>abcdefghijklmn<fim_middle>"
    assert prompt.tokens == 36 + 4 + 14


def test_custom_template_suffix_first() -> None:
    # chars: "[SUFFIX][PREFIX]" is 16 of 40 -> 24; suffix floor(40 * 0.25) = 10: "\n" 1 + "z = 3\n" 6 = 7;
    # prefix 24 - 7 = 17: "y = " 4 + "x = 1\n" 6.
    template = "[SUFFIX]{suffix}[PREFIX]{prefix}"
    prompt = build_prompt(
        "x = 1\ny = ",
        "\nz = 3\n",
        file_name=None,
        language_id=None,
        budget_tokens=40,
        count_tokens=chars,
        fim_template=template,
    )
    assert prompt.text == "[SUFFIX]\nz = 3\n[PREFIX]x = 1\ny = "
    assert prompt.mode == "fim"
    assert prompt.tokens == 33


def test_template_placeholders_inside_the_code_are_left_alone() -> None:
    before = 'fmt = "{suffix} and {prefix}"\nx = '
    prompt = build_prompt(
        before,
        "{prefix}",
        file_name=None,
        language_id=None,
        budget_tokens=500,
        count_tokens=chars,
        fim_template=QWEN,
    )
    assert prompt.text == f"<|fim_prefix|>{before}<|fim_suffix|>{{prefix}}<|fim_middle|>"


def test_template_larger_than_the_budget_falls_back_to_prefix_mode() -> None:
    prompt = build_prompt(
        "a\nbc", "d\n", file_name=None, language_id=None, budget_tokens=30, count_tokens=chars, fim_template=STARCODER
    )
    assert prompt == Prompt(text="a\nbc", mode="prefix", prefix="a\nbc", suffix="", header="", tokens=4)


def test_codellama_layout_with_words() -> None:
    # words: "<PRE>  <SUF> <MID>" is 3 words; header 3; suffix floor(20 * 0.25) = 5.
    prompt = build_prompt(
        "def f(x):\n    return",
        " x * 2\n\nprint(f(3))\n",
        file_name="f.py",
        language_id="python",
        budget_tokens=20,
        count_tokens=words,
        fim_template=CODELLAMA,
    )
    assert prompt.text == "<PRE> # file: f.py\ndef f(x):\n    return <SUF> x * 2\n\nprint(f(3))\n <MID>"
    check_invariants(prompt, "def f(x):\n    return", " x * 2\n\nprint(f(3))\n", 20, words)


# ----------------------------------------------------------------------------------- line endings and unicode


def test_crlf_documents_keep_their_line_endings() -> None:
    prompt = build_prompt(
        "a = 1\r\nb = 2\r\nc = ",
        "4\r\nd = 5\r\n",
        file_name=None,
        language_id=None,
        budget_tokens=5,
        count_tokens=words,
        fim_template=None,
    )
    assert prompt.text == "b = 2\r\nc = "
    # chars with FIM: template 36 of 60 -> 24; suffix 15: "4\r\n" 3 + "d = 5\r\n" 7; prefix 14: "c = " 4,
    # "b = 2\r\n" 7, then "a = 1\r\n" 7 does not fit in 3.
    prompt = build_prompt(
        "a = 1\r\nb = 2\r\nc = ",
        "4\r\nd = 5\r\n",
        file_name=None,
        language_id=None,
        budget_tokens=60,
        count_tokens=chars,
        fim_template=STARCODER,
    )
    assert prompt.text == "<fim_prefix>b = 2\r\nc = <fim_suffix>4\r\nd = 5\r\n<fim_middle>"
    assert prompt.tokens == 60 - 3


def test_non_ascii_and_emoji_are_cut_by_code_point() -> None:
    before = "s = 'héllo'\nt = '日本語🌍🚀"
    prompt = build_prompt(
        before, "'\n", file_name=None, language_id=None, budget_tokens=10, count_tokens=chars, fim_template=None
    )
    assert prompt.text == "t = '日本語🌍🚀"  # 10 code points exactly
    prompt = build_prompt(
        before, "'\n", file_name=None, language_id=None, budget_tokens=4, count_tokens=chars, fim_template=None
    )
    assert prompt.text == "本語🌍🚀"
    prompt = build_prompt(
        before, "'\n", file_name=None, language_id=None, budget_tokens=22, count_tokens=chars, fim_template=None
    )
    assert prompt.text == "s = 'héllo'\nt = '日本語🌍🚀"  # 12 + 10


# --------------------------------------------------------------------------------------------- large documents


class CountingCounter:
    """`chars` or `words` that also adds up how many characters it was asked to count."""

    def __init__(self, inner: Callable[[str], int]) -> None:
        self.inner = inner
        self.counted = 0

    def __call__(self, text: str) -> int:
        self.counted += len(text)
        return self.inner(text)


def test_five_megabytes_before_the_cursor() -> None:
    line = "total = compute(total, 1)\n"  # 26 characters, 4 words
    before = line * (5_000_000 // len(line)) + "result = "
    after = ")\n" + line * 1000
    assert len(before) > 4_900_000
    counter = CountingCounter(words)
    prompt = build_prompt(
        before,
        after,
        file_name="big.py",
        language_id="python",
        budget_tokens=1536,
        count_tokens=counter,
        fim_template=None,
    )
    assert prompt.text.startswith("# file: big.py\n")
    assert prompt.text.endswith("total = compute(total, 1)\nresult = ")
    assert prompt.prefix.endswith("result = ")
    assert before.endswith(prompt.prefix)
    # header 3 + "result = " 2 leaves 1531: 382 whole lines of 4 words.
    assert prompt.prefix == line * 382 + "result = "
    assert prompt.tokens == 3 + 2 + 382 * 4
    assert counter.counted < 100_000  # proportional to what is kept, not to the 5 MB


def test_five_megabyte_single_line_and_fim_suffix() -> None:
    before = "x = '" + "a" * 5_000_000
    after = "b" * 5_000_000 + "'\n"
    counter = CountingCounter(chars)
    prompt = build_prompt(
        before,
        after,
        file_name=None,
        language_id=None,
        budget_tokens=136,
        count_tokens=counter,
        fim_template=STARCODER,
    )
    # 136 - 36 = 100; suffix floor(136 * 0.25) = 34; prefix 66.
    assert prompt.text == "<fim_prefix>" + "a" * 66 + "<fim_suffix>" + "b" * 34 + "<fim_middle>"
    assert prompt.tokens == 136
    assert counter.counted < 50_000


# ------------------------------------------------------------------------------------- the budget is guaranteed


def superadditive(text: str) -> int:
    return len(text) + len(text) // 4


def merging_words(text: str) -> int:
    return len(text.split()) + text.count("\n#") + 2 * text.count(":\n ")


def random_document(rng: random.Random) -> str:
    pieces = ["def f(x):", "    return x", "# note: é🌍", "", "  ", "class A:", "    pass", "print(f(1))", "x = [1, 2]"]
    newline = rng.choice(["\n", "\r\n"])
    return newline.join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))


@pytest.mark.parametrize("counter", [chars, words, superadditive, merging_words])
def test_budget_holds_for_random_documents_cursors_and_budgets(counter: Callable[[str], int]) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        document = random_document(rng)
        cursor = rng.randint(0, len(document))
        before, after = document[:cursor], document[cursor:]
        budget = rng.choice([1, 2, 3, 5, 8, 13, 40, 100, 400])
        template = rng.choice([None, STARCODER, QWEN, CODELLAMA, "{suffix}|{prefix}"])
        share = rng.choice([0.0, 0.25, 0.5, 0.9])
        outline_lines = rng.choice([0, 1, 4])
        prompt = build_prompt(
            before,
            after,
            file_name=rng.choice([None, "m.py", "m.ts"]),
            language_id=None,
            budget_tokens=budget,
            count_tokens=counter,
            fim_template=template,
            suffix_share=share,
            outline_lines=outline_lines,
        )
        check_invariants(prompt, before, after, budget, counter)
        # The outline is whole lines of the text before the prefix, in document order.
        assert prompt.outline.count("\n") <= outline_lines
        assert before[: len(before) - len(prompt.prefix)].find(prompt.outline.split("\n")[0]) >= 0
        if prompt.mode == "prefix":
            assert prompt.text == prompt.header + prompt.outline + prompt.prefix
            assert prompt.suffix == ""
        else:
            assert template is not None
            assert prompt.text == fill(template, prompt.header + prompt.outline + prompt.prefix, prompt.suffix)


@pytest.mark.parametrize(("model", "fim"), [(SMALL_MODEL, STARCODER), (DEFAULT_MODEL, QWEN)])
def test_budget_holds_with_a_real_tokenizer_on_a_real_file(model: str, fim: str) -> None:
    tokenizer = tokenizer_of(model)

    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    source = SAMPLE.read_text(encoding="utf-8")
    cursors = sorted({0, len(source), *range(0, len(source), 37), source.index('"""Return the n-th')})
    for budget in (1, 4, 16, 64, 200, 1536):
        for cursor in cursors:
            before, after = source[:cursor], source[cursor:]
            for template in (None, fim):
                prompt = build_prompt(
                    before,
                    after,
                    file_name="examples/sample.py",
                    language_id="python",
                    budget_tokens=budget,
                    count_tokens=count,
                    fim_template=template,
                )
                check_invariants(prompt, before, after, budget, count)
    # With the default budget the whole file fits, header first.
    cursor = source.index("class Stack:")
    prompt = build_prompt(
        source[:cursor],
        source[cursor:],
        file_name="examples/sample.py",
        language_id="python",
        budget_tokens=1536,
        count_tokens=count,
        fim_template=None,
    )
    assert prompt.text == "# file: examples/sample.py\n" + source[:cursor]


# ------------------------------------------------------------------------------ build_prompt: anchored start

LINES = "".join(f"l{i}\n" for i in range(10))  # ten one-word lines, l0 to l9


def first_kept(prompt: Prompt) -> int:
    return int(prompt.prefix.split("\n", 1)[0][1:])


def test_an_anchored_prefix_starts_on_a_multiple_of_anchor_lines_and_stays_there_while_typing() -> None:
    # The cursor line "x = a a ..." counts 2 + n words, so 6 - n of the earlier lines fit a budget of 8:
    # the first line that fits is l4, l5, l6, l7 for n = 0..3. Typing, each prompt after the previous one:
    # the first (no previous prompt) keeps every line that fits, from l4; at l5 typing has pushed l4 out,
    # so the start moves to the next multiple of 4, l8, and stays there. Not anchored: l4, l5, l6, l7.
    def typing(anchor: int) -> list[int]:
        starts: list[int] = []
        previous: int | None = None
        for n in range(4):
            prompt = build_prompt(
                LINES + "x = " + "a " * n, "", file_name=None, language_id=None, budget_tokens=8,
                count_tokens=words, fim_template=None, anchor_lines=anchor, previous_start=previous,
            )  # fmt: skip
            previous = first_kept(prompt)
            starts.append(previous)
        return starts

    assert {anchor: typing(anchor) for anchor in (1, 4)} == {1: [4, 5, 6, 7], 4: [4, 8, 8, 8]}


@pytest.mark.parametrize(
    ("previous", "expected"),
    [
        (None, 5),  # no previous prompt: every line that fits
        (5, 5),  # the previous start still fits: kept
        (8, 8),  # ... up to anchor_lines - 1 lines below the first that fits
        (9, 5),  # farther down (the cursor moved up since): every line that fits
        (4, 8),  # pushed out by typing, less than anchor_lines lines ago: the next multiple of 4
        (2, 8),
        (1, 5),  # pushed out 4 lines or more ago (the cursor moved down): every line that fits
    ],
)
def test_a_prompt_keeps_the_previous_start_while_it_fits_else_anchors_only_after_typing(
    previous: int | None, expected: int
) -> None:
    prompt = build_prompt(
        LINES + "x = ", "", file_name=None, language_id=None, budget_tokens=7,
        count_tokens=words, fim_template=None, anchor_lines=4, previous_start=previous,
    )  # fmt: skip
    assert first_kept(prompt) == expected  # l5 to l9 fit (the cursor line is 2 words)


def test_the_anchor_counts_document_lines_from_where_the_text_before_the_cursor_starts() -> None:
    def start(anchor: int, first_line: int) -> int:
        # The previous prompt started one line above the first that fits now: typing pushed it out.
        prompt = build_prompt(
            LINES + "x = ", "", file_name=None, language_id=None, budget_tokens=5,
            count_tokens=words, fim_template=None, anchor_lines=anchor, first_line=first_line,
            previous_start=6 + first_line,
        )  # fmt: skip
        return first_kept(prompt)

    # l7, l8, l9 fit (the cursor line is 2 words): l7 is document line 7 + first_line.
    assert [start(1, 0), start(2, 0), start(3, 0), start(7, 0)] == [7, 8, 9, 7]
    # With first_line 1, l7 is document line 8: a multiple of 2 and 4 (kept), not of 3 (l8, line 9).
    assert [start(2, 1), start(3, 1), start(4, 1)] == [7, 8, 7]


def test_a_prefix_from_the_start_of_the_document_is_never_cut_by_the_anchor() -> None:
    prompt = build_prompt(
        LINES + "x = ", "", file_name=None, language_id=None, budget_tokens=100,
        count_tokens=words, fim_template=None, anchor_lines=8, previous_start=5,
    )  # fmt: skip
    assert prompt.prefix == LINES + "x = "


def test_anchor_lines_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="anchor_lines = 0"):
        build_prompt("x", "", file_name=None, language_id=None, budget_tokens=5, count_tokens=words,
                     fim_template=None, anchor_lines=0)  # fmt: skip


def test_healing_takes_the_blanks_before_the_cursor_off_the_prompt_in_both_modes() -> None:
    before, after = "def f(x):\n    ", "\n    return x\n"
    fim = build_prompt(
        before, after, file_name="", language_id="", budget_tokens=100, count_tokens=chars, fim_template=QWEN
    )
    assert fim.text == "<|fim_prefix|>def f(x):\n    <|fim_suffix|>\n    return x\n<|fim_middle|>"
    assert heal(fim) == ("<|fim_prefix|>def f(x):\n<|fim_suffix|>\n    return x\n<|fim_middle|>", "    ")
    plain = build_prompt(
        before, after, file_name="f.py", language_id="python", budget_tokens=100, count_tokens=chars, fim_template=None
    )
    assert plain.text == "# file: f.py\ndef f(x):\n    "
    assert heal(plain) == ("# file: f.py\ndef f(x):\n", "    ")
    mid = build_prompt(
        "y = \t", "", file_name="", language_id="", budget_tokens=100, count_tokens=chars, fim_template=QWEN
    )
    assert heal(mid) == ("<|fim_prefix|>y =<|fim_suffix|><|fim_middle|>", " \t")
    ends_in_code = build_prompt(
        "y = x", "", file_name="", language_id="", budget_tokens=100, count_tokens=chars, fim_template=QWEN
    )
    assert heal(ends_in_code) == (ends_in_code.text, "")
    assert fim.template == QWEN and plain.template is None  # what a prompt is refilled in when healed


@pytest.mark.parametrize(
    ("text", "healed", "blank_line", "expected"),
    [
        ("    return x", "    ", True, ("    ", "return x")),  # the model wrote the cursor's indentation
        ("        return x", "    ", True, ("    ", "    return x")),  # deeper: the rest is the model's own
        ("  return x", "    ", True, ("  ", "return x")),  # shallower: the code still goes at the cursor
        ("\n\n    return x", "    ", True, ("\n\n    ", "return x")),  # a leading blank line on a blank line
        ("\n    return x", "    ", False, ("", "\n    return x")),  # after code the line break is the model's
        (" x + 1", " ", False, (" ", "x + 1")),
        (" x + 1", "", False, ("", " x + 1")),  # nothing healed: nothing taken
        ("", "    ", True, ("", "")),
    ],
)
def test_unhealing_splits_what_stands_for_the_blanks_from_the_suggestion(
    text: str, healed: str, blank_line: bool, expected: tuple[str, str]
) -> None:
    assert unheal(text, healed, blank_line=blank_line) == expected
    assert "".join(expected) == text


# ------------------------------------------------------------------------------ build_prompt: other files


REPOSITORY = "<|file_sep|>billing/tax.py\ndef tax_rate(region):\n<|file_sep|>app/main.py\n"  # 4 words
PSM = "<PRE>{prefix}<SUF>{suffix}<MID>"


def test_the_other_files_go_before_the_template_and_their_tokens_come_off_the_budget() -> None:
    # Budget 12: template "<PRE>"/"<SUF>"/"<MID>" filled empty is 1 word ("<PRE><SUF><MID>"), the repository
    # 4, the header "# file: app/main.py" 3: 4 words are left for the text, "x = " (2) and "y = 1" would
    # need 3 more: only the cursor line fits before the cursor. The text: 4 + "<PRE>#", "file:",
    # "app/main.py", "x", "=", "<SUF><MID>" = 10 words.
    prompt = build_prompt(
        "y = 1\nx = ",
        "",
        file_name="app/main.py",
        language_id="python",
        budget_tokens=12,
        count_tokens=words,
        fim_template=PSM,
        repository=REPOSITORY,
    )
    assert prompt.repository == REPOSITORY
    assert prompt.text == REPOSITORY + "<PRE># file: app/main.py\nx = <SUF><MID>"
    assert prompt.tokens == 10
    # Token healing refills the template after the repository: the trailing blank goes, the rest stays.
    assert heal(prompt) == (REPOSITORY + "<PRE># file: app/main.py\nx =<SUF><MID>", " ")


def test_other_files_that_leave_no_room_for_text_are_left_out() -> None:
    prompt = build_prompt(
        "x = ",
        "",
        file_name=None,
        language_id=None,
        budget_tokens=4,
        count_tokens=words,
        fim_template=None,
        repository=REPOSITORY,  # 4 words: the whole budget
    )
    assert (prompt.repository, prompt.text) == ("", "x = ")


# ------------------------------------------------------------------------------ build_prompt: scope openers

NESTED = (
    "import os\n"  # 0
    "class Stack:\n"  # 10
    "    def push(self, item):\n"  # 23
    "        # keep it\n"  # 49
    "        for x in item:\n"  # 67
    "# a comment at the margin\n"  # 90
    "\n"  # 116
    "            if x:\n"  # 117
    "                y = (\n"  # 135
    "                    1\n"  # 157
    "                )\n"  # 179
    "                "  # 197: the cursor after the indentation of a blank line
)


def test_scope_openers_are_the_lines_indented_less_than_everything_below_them_nearest_first() -> None:
    # From the cursor's 16 blanks up: `)` closes a bracket (passed over), `1` is deeper, `y = (` is at 16,
    # `if x:` (12) opens, the blank and the comment at the margin are passed over, then `for` (8),
    # `def` (4), `class` (0), where the walk stops: `import os` is never reached.
    assert scope_openers(NESTED, 10, "#") == [
        (117, "            if x:\n"),
        (67, "        for x in item:\n"),
        (23, "    def push(self, item):\n"),
        (10, "class Stack:\n"),
    ]
    assert scope_openers(NESTED, 2, "#") == [(117, "            if x:\n"), (67, "        for x in item:\n")]
    # Without a comment syntax the comment at the margin is a line with no indentation: the last opener.
    assert scope_openers(NESTED, 10, None)[-1] == (90, "# a comment at the margin\n")


def test_a_cursor_at_the_start_of_an_empty_line_takes_its_indentation_from_the_line_above() -> None:
    before = "def f(x):\n    y = x\n\n"
    assert scope_openers(before, 4, "#") == [(0, "def f(x):\n")]
    assert scope_openers("x = 1\n", 4, "#") == []  # nothing is indented less than the margin
    assert scope_openers("", 4, "#") == []


def test_the_outline_shows_the_signature_the_budget_cut_off_between_header_and_prefix() -> None:
    # words: the header "# file: m.py\n" is 3 tokens; each body line 3 words. Budget 16: 13 left for the
    # prefix, a quarter of it (3) for openers: "def f(a, b):" (3 words) fits.
    body = "".join(f"    x{i} = {i}\n" for i in range(6))
    before = "def f(a, b):\n" + body + "    return"
    prompt = build_prompt(
        before, "", file_name="m.py", language_id="python", budget_tokens=16, count_tokens=words,
        fim_template=None, outline_lines=4,
    )  # fmt: skip
    # 13 - 3 = 10 tokens for the prefix: "return" (1) and three body lines (9).
    assert prompt.outline == "def f(a, b):\n"
    assert prompt.prefix == "    x3 = 3\n    x4 = 4\n    x5 = 5\n    return"
    assert prompt.text == "# file: m.py\ndef f(a, b):\n" + prompt.prefix
    assert prompt.tokens == 16
    # Without the outline the same budget keeps one more body line instead.
    plain = build_prompt(
        before, "", file_name="m.py", language_id="python", budget_tokens=16, count_tokens=words,
        fim_template=None,
    )  # fmt: skip
    assert (plain.outline, plain.prefix) == ("", "    x2 = 2\n" + prompt.prefix)
    # A prefix that reaches the signature needs no outline.
    whole = build_prompt(
        before, "", file_name="m.py", language_id="python", budget_tokens=100, count_tokens=words,
        fim_template=None, outline_lines=4,
    )  # fmt: skip
    assert (whole.outline, whole.prefix) == ("", before)


def test_openers_over_a_quarter_of_the_prefix_budget_are_left_out_outermost_first() -> None:
    before = "class A:\n    def m(self, a, b, c):\n" + "".join(f"        x{i} = {i}\n" for i in range(6)) + "        "
    prompt = build_prompt(
        before, "", file_name=None, language_id="python", budget_tokens=20, count_tokens=words,
        fim_template=None, outline_lines=4,
    )  # fmt: skip
    # A quarter of 20 is 5: "def m(self, a, b, c):" (5 words) fits, "class A:" (2 more) does not.
    assert prompt.outline == "    def m(self, a, b, c):\n"
    assert prompt.prefix.startswith("        x")


def test_healing_keeps_the_outline_in_both_modes() -> None:
    before = "def f(a, b):\n" + "".join(f"    x{i} = {i}\n" for i in range(6)) + "    "
    for template in (None, QWEN):
        prompt = build_prompt(
            before, "\n", file_name=None, language_id="python", budget_tokens=16, count_tokens=words,
            fim_template=template, outline_lines=4, suffix_share=0.0,
        )  # fmt: skip
        assert prompt.outline == "def f(a, b):\n"
        text, healed = heal(prompt)
        assert healed == "    "
        kept = prompt.prefix[: -len(healed)]
        assert text == ("def f(a, b):\n" + kept if template is None else fill(QWEN, "def f(a, b):\n" + kept, "\n"))


# ------------------------------------------------------------------------------ continue_prompt


def anchored(before: str, after: str) -> Continuation:
    prompt = build_prompt(
        before, after, file_name=None, language_id=None, budget_tokens=100, count_tokens=chars, fim_template=QWEN
    )
    text, healed = heal(prompt)
    return Continuation(before, after, text, healed, prompt.tokens, prompt.mode, prompt.prefix[-512:])


def test_typing_at_the_cursor_extends_the_last_prompt_after_its_middle_token() -> None:
    anchor = anchored("def f(x):\n    ", "\n    return x\n")
    assert (anchor.prompt, anchor.healed) == (
        "<|fim_prefix|>def f(x):\n<|fim_suffix|>\n    return x\n<|fim_middle|>",
        "    ",
    )
    text = "def f(x):\n    y = \n    return x\n"
    # The healed indentation comes back in front of what was typed; the new trailing blank is healed.
    assert continue_prompt(anchor, text, len("def f(x):\n    y = "), 64) == ("    y =", " ", "y = ")
    assert continue_prompt(anchor, text, len("def f(x):\n    y"), 64) is None  # the cursor is not after it
    assert continue_prompt(anchor, text, len("def f(x):\n    y = "), 3) is None  # more typed than allowed


def test_any_other_change_means_a_new_prompt() -> None:
    anchor = anchored("a = 1\nb = ", "\nc = 3\n")
    assert continue_prompt(anchor, "a = 1\nb = ", len("a = 1\nb = "), 64) is None  # the text after it went
    assert continue_prompt(anchor, "a = 2\nb = 7\nc = 3\n", len("a = 2\nb = 7"), 64) is None  # changed above
    assert continue_prompt(anchor, "a = 1\nb = 7\nc = 4\n", len("a = 1\nb = 7"), 64) is None  # changed below
    assert continue_prompt(anchor, "a = 1\nb = \nc = 3\n", len("a = 1\nb = "), 64) is None  # nothing typed
    # "b = " was healed of its space: it comes back in front of the 7.
    assert continue_prompt(anchor, "a = 1\nb = 7\nc = 3\n", len("a = 1\nb = 7"), 64) == (" 7", "", "7")
