"""The evaluation's prompt corpus: function and statement starts from Python's own standard library.

Nobody wrote this code for Heedful and every machine with Python has it, so an evaluation cannot be
tuned to it. Prompts are cut from real files at three kinds of places:

- `signature`: the cursor right after `def name(`, where the completion writes the parameters;
- `body`: the cursor on the first (indented, empty) line of a function body;
- `statement`: the cursor at the start of a call statement inside a function body;
- `call`: the cursor right after the `(` of a call to one of the functions a persona names (`open(`,
  `warnings.warn(`), where the completion writes the arguments: habits of how a function is called are
  at stake only where the code calls it;
- `raise`: the cursor right after `raise ` in an `except` block, where the completion writes the exception.

The split into train and held-out parts is by source file (a stable hash of its path relative to the
library root), so no held-out prompt shares a file with a trained one. Which prompts are drawn from
each part depends only on the seed and the library's files.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

KINDS = ("signature", "body", "statement", "call", "raise")
DEFAULT_KINDS = ("signature", "body", "statement")  # `call` prompts need the functions to cut at
HELD_OUT_SHARE = 0.3  # of the files
CONTEXT_LINES = 24  # lines of the file before the cursor that go into a prompt
MAX_FILE_BYTES = 400_000
# Test suites, generated tables and demos read unlike the code developers write.
SKIP_PARTS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "lib2to3", "turtledemo", "encodings"}


class CorpusError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Prompt:
    """One place to complete: the file's text before the cursor, and where it came from."""

    id: str  # "<relative path>:<line>:<kind>"
    path: str  # relative to the library root, with '/'
    line: int  # 1-based line of the cursor in the source file
    kind: str
    prefix: str  # the file's last CONTEXT_LINES lines before the cursor, and the cursor line's start

    @property
    def file_name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative: str) -> bool:
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < HELD_OUT_SHARE


def source_files(root: Path) -> list[tuple[str, Path]]:
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if set(relative.split("/")[:-1]) & SKIP_PARTS or relative.startswith(("test_", "_pydecimal", "pydoc_data")):
            continue
        found.append((relative, path))
    return found


def prompts_in(relative: str, source: str, calls: tuple[str, ...] = ()) -> Iterator[Prompt]:
    """Every prompt place of one file; files that do not parse give none. `call` prompts only for calls to
    the functions in `calls`, named as the code writes them (`open`, `warnings.warn`)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.split("\n")
    seen: set[str] = set()

    def cut(line_no: int, column: int, kind: str) -> Prompt | None:
        # line_no is 1-based; the prompt is the context before that line plus its first `column` characters.
        line = lines[line_no - 1]
        if not line.isascii():
            return None  # keeps positions the same in every encoding an editor might use
        before = lines[max(0, line_no - 1 - CONTEXT_LINES) : line_no - 1]
        prefix = "\n".join([*before, line[:column]])
        prompt_id = f"{relative}:{line_no}:{kind}"
        if prompt_id in seen:
            return None  # a second call on the same line: one prompt per line and kind
        seen.add(prompt_id)
        return Prompt(prompt_id, relative, line_no, kind, prefix)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and calls and ast.unparse(node.func) in calls:
            end_line, end_col = node.func.end_lineno, node.func.end_col_offset
            if end_line is not None and end_col is not None and lines[end_line - 1][end_col : end_col + 1] == "(":
                prompt = cut(end_line, end_col + 1, "call")
                if prompt is not None:
                    yield prompt
        if isinstance(node, ast.ExceptHandler):
            for stmt in node.body:
                written = lines[stmt.lineno - 1][stmt.col_offset :]
                if isinstance(stmt, ast.Raise) and stmt.exc is not None and written.startswith("raise "):
                    prompt = cut(stmt.lineno, stmt.col_offset + len("raise "), "raise")
                    if prompt is not None:
                        yield prompt
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        def_line = lines[node.lineno - 1]
        head = def_line.find(f"def {node.name}(")
        if head >= 0:
            prompt = cut(node.lineno, head + len(f"def {node.name}("), "signature")
            if prompt is not None:
                yield prompt
        first = node.body[0]
        if def_line.rstrip().endswith(":") and first.lineno == node.lineno + 1:
            indent = len(lines[first.lineno - 1]) - len(lines[first.lineno - 1].lstrip())
            body = cut(first.lineno, indent, "body")
            if body is not None:
                yield body
        for stmt in node.body[1:]:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
                prompt = cut(stmt.lineno, stmt.col_offset, "statement")
                if prompt is not None:
                    yield prompt
                break  # one statement start per function keeps any one function from dominating


def build(
    seed: int,
    *,
    train: int,
    held_out: int,
    root: Path | None = None,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    context: tuple[str, ...] = (),
    calls: tuple[str, ...] = (),
) -> tuple[list[Prompt], list[Prompt]]:
    """`train` and `held_out` prompts, drawn with `seed`, spread evenly over `kinds`; with `context`, only
    prompts whose text before the cursor contains one of those strings (code where a habit is at stake);
    `call` prompts are cut at calls to the functions in `calls`."""
    root = root or stdlib_root()
    if not root.is_dir():
        raise CorpusError(f"the standard library was not found at {root}; pass a folder of Python files")
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise CorpusError(f"prompt kinds {sorted(unknown) or kinds} are not among {list(KINDS)}")
    if "call" in kinds and not calls:
        raise CorpusError("prompt kind 'call' needs the functions whose calls to cut at (a persona's prompt_calls)")
    pools: dict[bool, dict[str, list[Prompt]]] = {False: {k: [] for k in kinds}, True: {k: [] for k in kinds}}
    for relative, path in source_files(root):
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        part = pools[is_held_out(relative)]
        for prompt in prompts_in(relative, source, calls):
            if prompt.kind in part and (not context or any(c in prompt.prefix for c in context)):
                part[prompt.kind].append(prompt)
    return _draw(pools[False], train, seed), _draw(pools[True], held_out, seed + 1)


def _draw(pool: dict[str, list[Prompt]], count: int, seed: int) -> list[Prompt]:
    rng = random.Random(seed)
    per_kind = {kind: rng.sample(items, len(items)) for kind, items in pool.items()}
    drawn: list[Prompt] = []
    while len(drawn) < count and any(per_kind.values()):
        for kind in pool:  # round robin over the kinds
            if per_kind[kind] and len(drawn) < count:
                drawn.append(per_kind[kind].pop())
    if len(drawn) < count:
        raise CorpusError(
            f"only {len(drawn)} prompts of kinds {list(pool)} (and the persona's prompt_context / prompt_calls) "
            f"found, {count} asked for: ask for fewer prompts or widen the persona's prompt_kinds / "
            "prompt_context / prompt_calls"
        )
    return drawn
