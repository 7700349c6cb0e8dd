"""Experiment arms and the prompt-injection baseline: pure functions against hand-made values."""

from __future__ import annotations

from collections import Counter

import pytest

from kernel.settings import ARMS
from lsp_handlers.context import build_prompt, notes_header
from server.runtime import arm_of


def test_a_developer_keeps_their_arm_and_arms_get_about_equal_shares() -> None:
    assert arm_of("alice", ["rl"]) == "rl"
    assert arm_of("alice", list(ARMS)) == arm_of("alice", list(ARMS))
    shares = Counter(arm_of(f"dev-{i}", list(ARMS)) for i in range(4000))
    assert set(shares) == set(ARMS)
    assert all(900 <= n <= 1100 for n in shares.values()), shares


def test_no_arms_is_an_error_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"experiment.arms is empty"):
        arm_of("alice", [])


def test_notes_become_comment_lines_in_the_files_language() -> None:
    notes = ["use pathlib, not os.path", "add\ntype hints", "  "]
    assert notes_header(notes, "app/files.py", "python") == (
        "# The developer's corrections to earlier suggestions:\n# - use pathlib, not os.path\n# - add type hints\n"
    )
    assert notes_header(notes, "web/app.js", "javascript").startswith("// The developer's corrections")
    assert notes_header(notes, "data.json", "json") == ""  # no comment syntax: nothing injected
    assert notes_header([], "app/files.py", "python") == ""


def test_the_notes_follow_the_file_header_in_the_prompt() -> None:
    prompt = build_prompt(
        "import os\n\ndef read(path):\n    ",
        "",
        file_name="app/files.py",
        language_id="python",
        budget_tokens=200,
        count_tokens=len,
        fim_template=None,
        notes=["use pathlib"],
    )
    assert prompt.text == (
        "# file: app/files.py\n"
        "# The developer's corrections to earlier suggestions:\n"
        "# - use pathlib\n"
        "import os\n\ndef read(path):\n    "
    )


def test_the_evaluation_runs_the_arms_cheapest_first() -> None:
    from tools.evaluation import ARMS as RUN_ORDER

    assert RUN_ORDER == ("none", "baseline", "rl", "rl+baseline")  # no training or prompt notes first
