"""Simulated developers ("personas") that Heedful ships for `heedful eval` and `make demo`.

Each persona is one real preference a developer corrects an assistant for. It follows the evaluation
contract of DESIGN.md: a plain class with `name`, `correction` (what the developer types when they
correct a suggestion) and `review(prefix, completion) -> (accept, kept)`, deciding from the text alone.
`kept` is what the developer would have written instead where the persona can say so mechanically
(quotes swapped, a docstring added, `print` turned into a logging call); otherwise None, and the
developer rejects and types the correction.

This file imports nothing from Heedful on purpose: it is also the example to copy for your own
persona, loaded with `heedful eval --persona path/to/file.py:ClassName`.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize

_DEF_OPEN = re.compile(r"^[ \t]*(async[ \t]+)?def[ \t]+\w+[ \t]*\($")
_DEF_LINE = re.compile(r"^([ \t]*)(async[ \t]+)?def[ \t]+(\w+)[ \t]*\((.*)$")


def _last_line(text: str) -> str:
    return text.rsplit("\n", 1)[-1]


def _string_tokens(code: str) -> list[str]:
    """The string literals of a piece of code, as written; tolerant of code cut off anywhere."""
    found: list[str] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.STRING:
                found.append(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # the rest of a cut-off completion; what was read so far counts
    return found


def _annotated(signature: str) -> bool | None:
    """Whether a `def` line annotates every parameter and its return; None when it is not finished yet."""
    text = signature.strip()
    for end in [len(text), *sorted((m.end() for m in re.finditer(r":", text)), reverse=True)]:
        try:
            tree = ast.parse(text[:end] + "\n    pass\n")
        except SyntaxError:
            continue
        node = tree.body[0] if tree.body else None
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return None
        args = node.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs]
        params += [a for a in (args.vararg, args.kwarg) if a is not None]
        named = [a for i, a in enumerate(params) if not (i == 0 and a.arg in {"self", "cls"})]
        return node.returns is not None and all(a.annotation is not None for a in named)
    return None


def _code_lines(completion: str) -> list[str]:
    """The completion's lines without comments (a `# print(x)` comment is not a print)."""
    return [line.split("#", 1)[0] for line in completion.split("\n")]


class TypeHints:
    """Every function signature has parameter and return annotations."""

    name = "type-hints"
    correction = "Always add type hints to function signatures."

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        signatures: list[str] = []
        current = _last_line(prefix)
        if _DEF_OPEN.match(current):  # the cursor is inside a signature: the completion finishes it
            signatures.append(current + completion.split("\n", 1)[0])
        for line in completion.split("\n")[1 if signatures else 0 :]:
            if _DEF_LINE.match(line):
                signatures.append(line)
        for sig in signatures:
            verdict = _annotated(sig)
            if verdict is False:
                return False, None
        return True, None


class Docstrings:
    """Every function starts with a docstring."""

    name = "docstrings"
    correction = "Start every function with a docstring."

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        if not completion.strip():
            return True, None
        prefix_lines = prefix.split("\n")
        body_start = len(prefix_lines) >= 2 and not prefix_lines[-1].strip()
        previous = prefix_lines[-2].rstrip() if body_start else ""
        if body_start and _DEF_LINE.match(previous) and previous.endswith(":"):
            match = _DEF_LINE.match(previous)
            assert match is not None
            if not completion.lstrip().startswith(('"""', "'''", 'r"""')):
                indent = prefix_lines[-1]
                words = match.group(3).strip("_").replace("_", " ") or "this function"
                return False, f'"""{words[:1].upper()}{words[1:]}."""\n{indent}{completion.lstrip()}'
            return True, None
        # A function whose `def` line the completion finishes or writes: its first body line must be a docstring.
        lines = (_last_line(prefix) + completion).split("\n")
        for i, line in enumerate(lines[:-1]):
            if _DEF_LINE.match(line) and line.rstrip().endswith(":"):
                following = [ln for ln in lines[i + 1 :] if ln.strip()]
                if following and not following[0].strip().startswith(('"""', "'''", 'r"""')):
                    return False, None
        return True, None


class DoubleQuotes:
    """Strings use double quotes (the black style), not single quotes."""

    name = "double-quotes"
    correction = "Use double quotes for strings, not single quotes."

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        singles = [s for s in _string_tokens(completion) if re.match(r"^[rbuRBUfF]*'", s)]
        if not singles:
            return True, None
        kept = completion
        for s in singles:
            quote_at = len(s) - len(s.lstrip("rbuRBUfF"))
            body = s[quote_at:]
            if body.startswith("'''") or '"' in body:
                return False, None  # no mechanical rewrite: the developer says what they want
            kept = kept.replace(s, s[:quote_at] + '"' + body[1:-1] + '"', 1)
        return False, kept


class FStrings:
    """String formatting with f-strings, not `%` or `.format()`."""

    name = "f-strings"
    correction = "Use f-strings instead of % formatting or .format()."

    _PERCENT = re.compile(r"""(['"])[^'"\n]*%[sdrfixg0-9.\-]+[^'"\n]*\1\s*%""")

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        code = "\n".join(_code_lines(completion))
        if ".format(" in code or self._PERCENT.search(code):
            return False, None
        return True, None


class LoggingNotPrint:
    """Diagnostics go through `logging`, never `print`."""

    name = "logging-not-print"
    correction = "Use the logging module (log.info) instead of print."

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        code = _code_lines(completion)
        if not any(re.search(r"(?<![\w.])print\(", line) for line in code):
            return True, None
        kept = re.sub(r"(?<![\w.])print\(", "log.info(", completion)
        return False, kept


class PathlibNotOsPath:
    """Paths are `pathlib.Path` objects, not `os.path` string functions."""

    name = "pathlib"
    correction = "Use pathlib.Path instead of os.path."

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        if any("os.path." in line for line in _code_lines(completion)):
            return False, None
        return True, None


SHIPPED = (TypeHints, Docstrings, DoubleQuotes, FStrings, LoggingNotPrint, PathlibNotOsPath)
