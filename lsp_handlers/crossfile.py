"""Context from the rest of the workspace: snippets of other files, ranked by how much they look like the
code around the cursor, fitted to a share of the prompt's token budget.

Peers put more than the current file in the prompt: Cody ranks windows of open files by the Jaccard
similarity of their identifiers with the lines around the cursor, Tabby and Continue add the files the
current one imports and recently edited ones. This module does the part that needs no I/O:

- `imported_files`: which workspace files a Python source imports (absolute and relative imports,
  `pkg/mod.py` or `pkg/mod/__init__.py`, only among the files it is told exist);
- `rank`: every window of `WINDOW_LINES` lines (every `STRIDE` lines) of the candidate files, scored by
  the Jaccard similarity of its identifiers with the query's; ties go to the source the developer is
  nearest to (open, then recently edited, then imported), then to the path and line;
- `select`: the best windows that fit a token budget, never two overlapping windows of one file;
- `render_file_sep` / `render_comments`: the snippets in the model's repository format
  (`<|file_sep|>path` pieces for Qwen2.5-Coder and StarCoder2-style vocabularies) or as comment lines.

Token counting is a function the caller passes in (as in `lsp_handlers.context`), so tests can count by
hand. Reading files (only inside the workspace folders the editor named) is the caller's job.
"""

from __future__ import annotations

import ast
import keyword
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

CountTokens = Callable[[str], int]
SourceKind = Literal["open", "recent", "import"]
KIND_ORDER: dict[str, int] = {"open": 0, "recent": 1, "import": 2}  # ties go to what the developer is nearest
WINDOW_LINES = 20
STRIDE = 10
MIN_IDENTIFIER = 2  # identifiers shorter than this (i, x, _) say nothing about what code is about

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Words every Python file is full of: they make any two windows look alike.
_COMMON = frozenset(keyword.kwlist) | {"self", "cls", "None", "True", "False", "print", "len", "str", "int"}


@dataclass(frozen=True, slots=True)
class Source:
    """A file the snippets may come from: its workspace-relative path, its text, why it is a candidate."""

    path: str
    text: str
    kind: SourceKind


@dataclass(frozen=True, slots=True)
class Neighbours:
    """Where a completion is (`path`, relative to its workspace folder) and the files it may draw on."""

    path: str
    sources: tuple[Source, ...]


@dataclass(frozen=True, slots=True)
class Snippet:
    path: str
    start_line: int  # 0-based line of the window's first line in its file
    end_line: int  # exclusive
    text: str
    score: float
    kind: SourceKind


def identifiers(text: str) -> frozenset[str]:
    """The distinct identifiers of `text` that say what it is about (no keywords or very common names)."""
    return frozenset(w for w in _IDENTIFIER.findall(text) if len(w) >= MIN_IDENTIFIER and w not in _COMMON)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a or not b:
        return 0.0
    return len(a & b) / len(a | b)


def windows(text: str, size: int = WINDOW_LINES, stride: int = STRIDE) -> Iterator[tuple[int, int, str]]:
    """(first line, end line, text) of every window of `size` lines, one every `stride` lines; a file
    shorter than `size` is one window; the last window ends at the file's end."""
    if size < 1 or stride < 1:
        raise ValueError(f"window size {size} and stride {stride} must be at least 1")
    lines = text.splitlines(keepends=True)
    if not lines:
        return
    start = 0
    while True:
        end = min(start + size, len(lines))
        yield start, end, "".join(lines[start:end])
        if end == len(lines):
            return
        start += stride


def rank(query: str, sources: Sequence[Source], *, size: int = WINDOW_LINES, stride: int = STRIDE) -> list[Snippet]:
    """Every window of every source with at least one identifier in common with `query`, best first."""
    wanted = identifiers(query)
    found: list[Snippet] = []
    for source in sources:
        for start, end, text in windows(source.text, size, stride):
            score = jaccard(wanted, identifiers(text))
            if score > 0:
                found.append(Snippet(source.path, start, end, text, score, source.kind))
    found.sort(key=lambda s: (-s.score, KIND_ORDER[s.kind], s.path, s.start_line))
    return found


def select(ranked: Sequence[Snippet], budget_tokens: int, count_tokens: CountTokens) -> list[Snippet]:
    """The best snippets whose rendered pieces fit `budget_tokens` together (each counted with its path
    line), in rank order, skipping any that overlaps a chosen window of the same file."""
    chosen: list[Snippet] = []
    left = budget_tokens
    for snippet in ranked:
        if any(
            c.path == snippet.path and c.start_line < snippet.end_line and snippet.start_line < c.end_line
            for c in chosen
        ):
            continue
        cost = count_tokens(_piece(snippet.path, snippet.text))
        if cost <= left:
            chosen.append(snippet)
            left -= cost
    return chosen


def _piece(path: str, text: str) -> str:
    return f"{path}\n{text}" if text.endswith("\n") else f"{path}\n{text}\n"


def render_file_sep(snippets: Sequence[Snippet], separator: str = "<|file_sep|>") -> str:
    """The snippets as repository pieces, `separator` + path + newline + code, best last (nearest the
    cursor's file, which the caller appends as the last piece)."""
    return "".join(separator + _piece(s.path, s.text) for s in reversed(snippets))


def render_comments(snippets: Sequence[Snippet], comment: tuple[str, str]) -> str:
    """The snippets as comment lines (`comment` is the language's (start, end) of a one-line comment), each
    under a line naming its file, best last: a model that has no repository format reads them as notes,
    not as code of the current file."""
    start, end = comment
    out: list[str] = []
    for s in reversed(snippets):
        out.append(f"{start}Compare this snippet from {s.path}:{end}\n")
        out.extend(f"{start}{line}{end}\n" for line in s.text.splitlines())
    return "".join(out)


def repository_context(
    path: str,
    query: str,
    sources: Sequence[Source],
    budget_tokens: int,
    count_tokens: CountTokens,
    *,
    separator: str | None,
    comment: tuple[str, str] | None,
) -> str:
    """What a prompt carries of the other files: the windows of `sources` most like `query` (the code around
    the cursor) that fit `budget_tokens` with what frames them, in the model's repository format when it
    has a file separator (`separator` + path + code for each, best last, then `separator` + `path`, the
    current file, on the last line: the prompt's template follows), else as comment lines in the
    language's `comment` syntax; "" when nothing is alike, nothing fits, or neither format applies."""
    if budget_tokens <= 0 or not sources or (separator is None and comment is None):
        return ""
    ranked = rank(query, sources)
    if separator is not None:
        tail = f"{separator}{path}\n"
        sep = separator
        chosen = select(ranked, budget_tokens - count_tokens(tail), lambda piece: count_tokens(sep + piece))
        return render_file_sep(chosen, separator) + tail if chosen else ""
    assert comment is not None
    # Each comment line costs its markers: count the pieces as rendered.
    chosen = []
    left = budget_tokens
    for snippet in select(ranked, budget_tokens, count_tokens):
        cost = count_tokens(render_comments([snippet], comment))
        if cost <= left:
            chosen.append(snippet)
            left -= cost
    return render_comments(chosen, comment)


def imported_files(source: str, path: str, files: Collection[str]) -> list[str]:
    """The files among `files` (workspace-relative, `/`-separated) that the Python `source` at `path`
    imports, in the order of its imports, each once. `from pkg import name` is `pkg/name.py` when that
    exists, else `pkg` itself (where `name` is defined). An absolute import is looked for from the
    workspace's top, then from each folder above `path` (`src/pkg/mod.py` for `import pkg.mod` in
    `src/pkg/app.py`). Unparsable source (the developer is typing) imports what its complete `import`
    lines name."""
    package = path.rsplit("/", 1)[0].split("/") if "/" in path else []
    roots = ["", *("/".join(package[:i]) + "/" for i in range(1, len(package) + 1))]
    out: list[str] = []
    for alternatives in _imports(source, package):
        for module in alternatives:
            as_path = module.replace(".", "/")
            found = next(
                (f for root in roots for f in (root + as_path + ".py", root + as_path + "/__init__.py") if f in files),
                None,
            )
            if found is not None:
                if found != path and found not in out:
                    out.append(found)
                break
    return out


def _imports(source: str, package: list[str]) -> Iterator[tuple[str, ...]]:
    """For each imported name, the modules it may be, most specific first."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        tree = ast.parse("\n".join(line.strip() for line in source.splitlines() if _parses(line)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield (alias.name,)
        elif isinstance(node, ast.ImportFrom):
            module = node.module.split(".") if node.module else []
            if node.level:
                if node.level - 1 > len(package):
                    continue
                base = [*package[: len(package) - (node.level - 1)], *module]
            else:
                base = module
            for alias in node.names:
                if alias.name == "*":
                    yield (".".join(base),)
                else:
                    yield (".".join([*base, alias.name]), ".".join(base)) if base else (alias.name,)


def _parses(line: str) -> bool:
    stripped = line.strip()
    if not stripped.startswith(("import ", "from ")):
        return False
    try:
        ast.parse(stripped)
    except SyntaxError:
        return False
    return True
