"""Simulated developers ("personas") that Heedful ships for `heedful eval` and `make demo`.

Each persona is one real preference a developer corrects an assistant for. It follows the evaluation
contract `heedful eval` relies on: a plain class with `name`, `correction` (what the developer types
when they correct a suggestion) and `review(prefix, completion) -> (accept, kept)`, deciding from the
text alone. `kept` is what the developer would have written instead where the persona can say so
mechanically (quotes swapped, a docstring added, `print` turned into a logging call); otherwise None, and
the developer rejects and types the correction.

An optional `prompt_kinds` names the prompts where the preference shows (`signature`, `body`,
`statement`, `call`: see personalization/corpus.py), an optional `prompt_context` strings of which the code
before the cursor must contain one (where the habit is at stake: `os.path` for a pathlib developer), and
`prompt_calls` the functions at whose calls `call` prompts are cut (`open` for an open-encoding
developer); the evaluation draws only such prompts for the persona.

This file imports nothing from Heedful on purpose: it is also the example to copy for your own
persona, loaded with `heedful eval --persona path/to/file.py:ClassName`.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Callable
from typing import Any

_DEF_OPEN = re.compile(r"^[ \t]*(async[ \t]+)?def[ \t]+\w+[ \t]*\($")
_DEF_LINE = re.compile(r"^([ \t]*)(async[ \t]+)?def[ \t]+(\w+)[ \t]*\((.*)$")


def _last_line(text: str) -> str:
    return text.rsplit("\n", 1)[-1]


def _tokens(code: str, kind: int | None = None) -> list[tokenize.TokenInfo]:
    """The tokens of one kind (tokenize.STRING, COMMENT, ...; every kind with None) in a piece of code;
    tolerant of code cut off anywhere: what was read before the tokenizer gave up counts."""
    found: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if kind is None or tok.type == kind:
                found.append(tok)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return found


def _string_tokens(code: str) -> list[str]:
    """The string literals of a piece of code, as written."""
    return [tok.string for tok in _tokens(code, tokenize.STRING)]


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


_STR_NAMES = {
    "path", "name", "text", "s", "prefix", "suffix", "line", "string", "msg", "message", "filename", "key",
    "mode", "encoding", "sep", "url", "data", "value", "fmt", "title", "label", "word", "tag",
}  # fmt: skip
_INT_NAMES = {
    "n", "i", "j", "k", "count", "size", "index", "length", "level", "width", "height", "pos", "offset", "num",
    "start", "end", "stop", "step", "depth", "limit", "timeout", "lineno", "indent", "base",
}  # fmt: skip


def _guess_type(arg: ast.arg, default: ast.expr | None) -> str:
    """What this developer writes for an unannotated parameter: from its default, else its name, else Any."""
    if isinstance(default, ast.Constant) and default.value is not None:
        return type(default.value).__name__
    name = arg.arg.lower()
    guess = "Any"
    if name in _STR_NAMES or name.endswith(("_name", "_path", "_text", "_str")):
        guess = "str"
    elif name in _INT_NAMES or name.endswith(("_count", "_size", "_index", "_len")):
        guess = "int"
    elif name.startswith(("is_", "has_", "use_", "allow_")) or name in {"flag", "strict", "verbose", "force"}:
        guess = "bool"
    return f"{guess} | None" if isinstance(default, ast.Constant) and default.value is None else guess


def _guess_return(name: str) -> str:
    if name == "__init__" or name.startswith(("set_", "_set_", "add_", "write", "close", "reset", "clear")):
        return "None"
    if name.startswith(("is_", "has_", "_is_", "_has_")) or name in {"__bool__", "__eq__", "__contains__"}:
        return "bool"
    if name in {"__repr__", "__str__"} or name.endswith(("_name", "_path", "_text")):
        return "str"
    if name in {"__len__", "__hash__"} or name.endswith(("_count", "_size")):
        return "int"
    return "Any"


def _with_hints(def_line: str) -> str | None:
    """`def_line` (a complete one-line signature) with every parameter and the return annotated."""
    text = def_line.strip()
    if not text.endswith(":"):
        return None
    try:
        node = ast.parse(text + "\n    pass\n").body[0]
    except SyntaxError:
        return None
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return None
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        if arg.annotation is None and not (i == 0 and arg.arg in {"self", "cls"}):
            arg.annotation = ast.Name(_guess_type(arg, default))
    for arg, kw_default in zip(args.kwonlyargs, args.kw_defaults, strict=True):
        if arg.annotation is None:
            arg.annotation = ast.Name(_guess_type(arg, kw_default))
    for star in (args.vararg, args.kwarg):
        if star is not None and star.annotation is None:
            star.annotation = ast.Name("Any")
    if node.returns is None:
        node.returns = ast.Name(_guess_return(node.name))
    node.body = []
    return ast.unparse(node).split("\n", 1)[0]


class TypeHints:
    """Every function signature has parameter and return annotations."""

    name = "type-hints"
    correction = "Always add type hints to function signatures."
    prompt_kinds = ("signature",)

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        signatures: list[str] = []
        current = _last_line(prefix)
        if _DEF_OPEN.match(current):  # the cursor is inside a signature: the completion finishes it
            signatures.append(current + completion.split("\n", 1)[0])
        for line in completion.split("\n")[1 if signatures else 0 :]:
            if _DEF_LINE.match(line):
                signatures.append(line)
        if all(_annotated(sig) is not False for sig in signatures):
            return True, None
        return False, self._kept(current, completion)

    @staticmethod
    def _kept(current: str, completion: str) -> str | None:
        """The completion with every signature it finishes or writes annotated (other lines as they were);
        None when one of them cannot be annotated mechanically (a signature split over lines)."""
        opened = _DEF_LINE.match(current) if _DEF_OPEN.match(current) else None  # the cursor is in a signature
        lines = ((current if opened else "") + completion).split("\n")
        for i, line in enumerate(lines):
            match = _DEF_LINE.match(line)
            if match is None or _annotated(line) is not False:
                continue
            hinted = _with_hints(line)
            if hinted is None:
                return None
            lines[i] = match.group(1) + hinted
        kept = "\n".join(lines)
        if opened is not None:
            opening = f"def {opened.group(3)}("
            head = kept.split("\n", 1)[0]
            if opening not in head:
                return None
            kept = kept[head.index(opening) + len(opening) :]
        return kept


class Docstrings:
    """Every function starts with a docstring."""

    name = "docstrings"
    correction = "Start every function with a docstring."
    prompt_kinds = ("body",)

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


class _QuoteStyle:
    """Strings use `quote`; a string in the other quote is rewritten where that is mechanical."""

    quote = '"'

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        other = "'" if self.quote == '"' else '"'
        wrong = []
        for s in _string_tokens(completion):
            body = s.lstrip("rbuRBUfF")
            if body.startswith('"""'):
                continue  # docstrings keep PEP 257's triple double quotes in either style
            if body.startswith(other):
                wrong.append(s)
        if not wrong:
            return True, None
        kept = completion
        for s in wrong:
            quote_at = len(s) - len(s.lstrip("rbuRBUfF"))
            body = s[quote_at:]
            if body.startswith(other * 3) or self.quote in body:
                return False, None  # no mechanical rewrite: the developer says what they want
            kept = kept.replace(s, s[:quote_at] + self.quote + body[1:-1] + self.quote, 1)
        return False, kept


class DoubleQuotes(_QuoteStyle):
    """Strings use double quotes (the black style), not single quotes."""

    name = "double-quotes"
    correction = "Use double quotes for strings, not single quotes."
    quote = '"'

    prompt_kinds = ("body", "statement")


class SingleQuotes(_QuoteStyle):
    """Strings use single quotes (docstrings keep triple double quotes), not double quotes."""

    name = "single-quotes"
    correction = "Use single quotes for strings, not double quotes."
    quote = "'"

    prompt_kinds = ("body", "statement")


_STRING = r"""(?<![\w.'"])(['"])((?:\\.|(?!\1)[^\\\n])*)\1"""  # a one-line, unprefixed literal
_FORMAT_CALL = re.compile(_STRING + r"\.format\(([^()\n]*(?:\([^()\n]*\)[^()\n]*)*)\)")
_PERCENT_EXPR = re.compile(_STRING + r"\s*%\s*(\((?:[^()\n]|\([^()\n]*\))*\)|[\w.]+(?:\([^()\n]*\)|\[[^\[\]\n]*\])?)")
_FORMAT_FIELD = re.compile(r"\{([^{}!:]*)(![rsa])?(:[^{}]*)?\}")
_PERCENT_SPEC = re.compile(r"%(-?)(\d*)(\.\d+)?([sdifr%])")


def _call_args(text: str) -> tuple[list[str], dict[str, str]] | None:
    """The source of each argument of a call written `f(<text>)`; None when it is not plain."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(call, ast.Call) or any(isinstance(a, ast.Starred) for a in call.args):
        return None
    if any(k.arg is None for k in call.keywords):
        return None
    return [ast.unparse(a) for a in call.args], {str(k.arg): ast.unparse(k.value) for k in call.keywords}


def _fits_fstring(quote: str, *sources: str) -> bool:
    """Whether these expressions can sit in an f-string delimited by `quote` (before Python 3.12)."""
    return all(quote not in src and "\\" not in src and "{" not in src and "}" not in src for src in sources)


def _format_to_f(match: re.Match[str]) -> str | None:
    quote, template, arg_text = match.group(1), match.group(2), match.group(3)
    args = _call_args(arg_text)
    if args is None:
        return None
    positional, named = args
    if not _fits_fstring(quote, *positional, *named.values()):
        return None
    auto = iter(range(len(positional)))
    out: list[str] = []
    pos = 0
    for field in _FORMAT_FIELD.finditer(template):
        if template[field.start() - 1 : field.start()] == "{":
            continue  # an escaped brace; f-strings keep `{{` as it is
        key, conversion, spec = field.group(1).strip(), field.group(2) or "", field.group(3) or ""
        if key == "":
            index = next(auto, None)
            if index is None:
                return None
            expr = positional[index]
        elif key.isdigit():
            if int(key) >= len(positional):
                return None
            expr = positional[int(key)]
        elif key in named:
            expr = named[key]
        else:
            return None  # attribute or item access on an argument: left to the developer
        out.append(template[pos : field.start()] + "{" + expr + conversion + spec + "}")
        pos = field.end()
    return "f" + quote + "".join(out) + template[pos:] + quote


def _percent_to_f(match: re.Match[str]) -> str | None:
    quote, template, operand = match.group(1), match.group(2), match.group(3)
    if "%(" in template:
        return None  # mapping keys: left to the developer
    if operand.startswith("("):
        args = _call_args(operand[1:-1])
        if args is None or args[1]:
            return None
        values = args[0]
    else:
        values = [operand]
    if not _fits_fstring(quote, *values):
        return None
    values_left = iter(values)
    out: list[str] = []
    pos = 0
    for spec in _PERCENT_SPEC.finditer(template):
        literal = template[pos : spec.start()].replace("{", "{{").replace("}", "}}")
        flag, width, precision, kind = spec.groups()
        pos = spec.end()
        if kind == "%":
            out.append(literal + "%")
            continue
        value = next(values_left, None)
        if value is None:
            return None
        if kind == "r":
            if width or precision:
                return None
            field = "!r"
        elif kind == "s":
            field = f":{'<' if flag else '>'}{width}" if width else ""
            if precision:
                return None
        else:  # d, i, f
            align = "<" if flag else ""
            fmt = {"i": "d"}.get(kind, kind)
            field = f":{align}{width}{precision or ''}{fmt}" if (width or precision or kind == "f") else ""
        out.append(literal + "{" + value + field + "}")
    if next(values_left, None) is not None:
        return None
    return "f" + quote + "".join(out) + template[pos:].replace("{", "{{").replace("}", "}}") + quote


def _rewrite_code(completion: str, rewrites: list[tuple[re.Pattern[str], Any]]) -> str | None:
    """`completion` with each pattern's matches in code (not comments) rewritten; None if one cannot be."""
    lines = completion.split("\n")
    for i, line in enumerate(lines):
        code, hash_, comment = line.partition("#")
        for pattern, rewrite in rewrites:
            parts: list[str] = []
            pos = 0
            for match in pattern.finditer(code):
                replacement = rewrite(match)
                if replacement is None:
                    return None
                parts.append(code[pos : match.start()] + replacement)
                pos = match.end()
            code = "".join(parts) + code[pos:]
        lines[i] = code + hash_ + comment
    return "\n".join(lines)


class FStrings:
    """String formatting with f-strings, not `%` or `.format()`."""

    name = "f-strings"
    correction = "Use f-strings instead of % formatting or .format()."

    _PERCENT = re.compile(r"""(['"])[^'"\n]*%[sdrfixg0-9.\-]+[^'"\n]*\1\s*%""")

    prompt_kinds = ("body", "statement")
    prompt_context = (".format(", "%s", "%d", "%r")

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        code = "\n".join(_code_lines(completion))
        if ".format(" in code or self._PERCENT.search(code):
            kept = _rewrite_code(completion, [(_FORMAT_CALL, _format_to_f), (_PERCENT_EXPR, _percent_to_f)])
            if kept is not None and (".format(" in kept or self._PERCENT.search("\n".join(_code_lines(kept)))):
                kept = None  # a form the rewrite does not know: the developer says what they want
            return False, kept
        return True, None


class LoggingNotPrint:
    """Diagnostics go through `logging`, never `print`."""

    name = "logging-not-print"
    correction = "Use the logging module (log.info) instead of print."

    prompt_kinds = ("body", "statement")
    prompt_context = ("print(",)

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        code = _code_lines(completion)
        if not any(re.search(r"(?<![\w.])print\(", line) for line in code):
            return True, None
        kept = re.sub(r"(?<![\w.])print\(", "log.info(", completion)
        return False, kept


_OS_PATH_CALL = re.compile(r"(?<![\w.])os\.path\.(\w+)\(((?:[^()\n]|\([^()\n]*\))*)\)")
_PATH_METHODS = {
    "exists": ".exists()", "isfile": ".is_file()", "isdir": ".is_dir()", "basename": ".name",
    "dirname": ".parent", "abspath": ".absolute()", "realpath": ".resolve()", "expanduser": ".expanduser()",
    "getsize": ".stat().st_size", "getmtime": ".stat().st_mtime", "isabs": ".is_absolute()", "islink": ".is_symlink()",
}  # fmt: skip


def _os_path_to_pathlib(match: re.Match[str]) -> str | None:
    func, arg_text = match.group(1), match.group(2)
    args = _call_args(arg_text)
    if args is None or args[1] or not args[0]:
        return None
    first, *rest = args[0]
    if func == "join":
        return " / ".join([f"Path({first})", *rest])
    if func in _PATH_METHODS and not rest:
        return f"Path({first}){_PATH_METHODS[func]}"
    return None  # splitext, relpath, commonpath, ...: left to the developer


class PathlibNotOsPath:
    """Paths are `pathlib.Path` objects, not `os.path` string functions."""

    name = "pathlib"
    correction = "Use pathlib.Path instead of os.path."

    prompt_kinds = ("body", "statement")
    prompt_context = ("os.path",)

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        if any("os.path." in line for line in _code_lines(completion)):
            kept = _rewrite_code(completion, [(_OS_PATH_CALL, _os_path_to_pathlib)])
            if kept is not None and any("os.path." in line for line in _code_lines(kept)):
                kept = None  # e.g. os.path.sep, or a call inside a call: the developer says what they want
            return False, kept
        return True, None


def _offsets(code: str) -> Callable[[tuple[int, int]], int]:
    """The character offset in `code` of a tokenizer position (1-based row, column)."""
    starts = [0]
    for line in code.split("\n"):
        starts.append(starts[-1] + len(line) + 1)
    return lambda position: starts[position[0] - 1] + position[1]


def _call_spans(code: str, function: str) -> list[tuple[int, int]]:
    """(offset of the `(`, offset of its `)`) of every call to `function` (dotted as written: `open`,
    `warnings.warn`) in `code` that closes there; calls may span lines, comments and strings do not count."""
    tokens = _tokens(code)
    offset = _offsets(code)
    parts = function.split(".")
    width = 2 * len(parts) - 1  # the names and the dots between them
    spans: list[tuple[int, int]] = []
    for i in range(len(tokens) - width):
        name = [t.string for t in tokens[i : i + width]]
        if name[::2] != parts or any(dot != "." for dot in name[1::2]) or tokens[i + width].string != "(":
            continue
        if i > 0 and tokens[i - 1].string == ".":
            continue  # `x.open(` is not `open(`
        depth = 0
        for tok in tokens[i + width :]:
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
                if depth == 0:
                    spans.append((offset(tokens[i + width].start), offset(tok.start)))
                    break
    return spans


class _CallKeyword:
    """Calls to `function` pass `keyword=value` where `lacks` says they should; kept: the argument added.

    The prompts are cut right after `function(` (kind `call`), so the call a suggestion finishes is judged
    together with the start of its line, which is before the cursor."""

    function = ""
    keyword = ""
    value = ""
    prompt_kinds: tuple[str, ...] = ("call",)

    @property
    def prompt_calls(self) -> tuple[str, ...]:
        return (self.function,)

    def lacks(self, positional: list[str], named: dict[str, str]) -> bool:
        return self.keyword not in named

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        head = _last_line(prefix)
        text = head + completion
        wrong = []
        for opening, closing in _call_spans(text, self.function):
            args = _call_args(text[opening + 1 : closing])
            if args is not None and self.lacks(*args):
                wrong.append((opening, closing))
        if not wrong:
            return True, None
        kept = text
        for opening, closing in sorted(wrong, key=lambda span: span[1], reverse=True):  # outer calls first
            inside = kept[opening + 1 : closing]
            written = inside.rstrip()
            added = f"{self.keyword}={self.value}"
            added = f" {added}," if written.endswith(",") else f", {added}"
            kept = kept[: opening + 1] + written + added + inside[len(written) :] + kept[closing:]
        return False, kept[len(head) :] if kept.startswith(head) else None


class OpenEncoding(_CallKeyword):
    """Text files are opened with an explicit encoding (what the platform's default is must not matter)."""

    name = "open-encoding"
    correction = 'Always pass encoding="utf-8" to open() for text files.'

    function = "open"
    keyword = "encoding"
    value = '"utf-8"'

    def lacks(self, positional: list[str], named: dict[str, str]) -> bool:
        """A file opened in text mode without its encoding (the 4th positional argument)."""
        if not positional and "file" not in named:
            return False  # `open()` opens nothing
        mode = named.get("mode", positional[1] if len(positional) > 1 else "'r'")
        return "encoding" not in named and "b" not in mode and len(positional) < 4


class WarningsStacklevel(_CallKeyword):
    """Warnings name the caller's line (`stacklevel=2`), not the line of `warnings.warn` itself."""

    name = "warnings-stacklevel"
    correction = "Pass stacklevel=2 to warnings.warn so the warning points at the caller."

    function = "warnings.warn"
    keyword = "stacklevel"
    value = "2"

    def lacks(self, positional: list[str], named: dict[str, str]) -> bool:
        """A warning without its stack level (the 3rd positional argument)."""
        return bool(positional or "message" in named) and "stacklevel" not in named and len(positional) < 3


_EXCEPT_LINE = re.compile(r"^([ \t]*)except\b[^#\n]*?(?:\bas[ \t]+(\w+))?[ \t]*:")


def _caught(prefix: str) -> str | None:
    """The name the `except` block the cursor is in binds (`from None` when it binds none); None outside one."""
    lines = prefix.split("\n")
    cursor = lines[-1]
    depth = len(cursor) - len(cursor.lstrip())
    for line in reversed(lines[:-1]):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if indent < depth:
            match = _EXCEPT_LINE.match(line)
            if match is None:
                return None  # the block the cursor is in is not an except block
            return match.group(2) or "None"
    return None


class RaiseFrom:
    """An exception raised while handling another says where it came from (`raise ... from err`), as
    linters ask (flake8-bugbear B904): the traceback then reads as a cause, not as a bug in the handler."""

    name = "raise-from"
    correction = "Inside an except block, raise the new exception from the caught one: raise ... from err."
    prompt_kinds = ("raise",)

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        head = _last_line(prefix)
        caught = _caught(prefix)
        if caught is None or not re.match(r"[ \t]*raise[ \t]", head):
            return True, None  # judged where the cursor is in a raise statement of an except block
        text = head + completion
        statement: list[tokenize.TokenInfo] = []  # the code tokens of the statement at the cursor
        finished = False
        for tok in _tokens(text):
            if tok.type == tokenize.NEWLINE:
                finished = True
                break
            if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.INDENT, tokenize.DEDENT):
                statement.append(tok)
        words = [tok.string for tok in statement]
        if not finished or "from" in words or words in (["raise"], ["raise", caught]):
            return True, None  # not finished, already chained, or the caught exception raised again
        at = _offsets(text)(statement[-1].end)
        return False, (text[:at] + f" from {caught}" + text[at:])[len(head) :]


class SingleLine:
    """One line at a time: a suggestion of several lines is cut to its first before it is kept."""

    name = "single-line"
    correction = "Suggest one line at a time, not whole blocks."
    prompt_kinds = ("body",)  # at a body's start the model writes the whole body; inside one, often a line

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        lines = completion.rstrip().split("\n")
        if len(lines) == 1:
            return True, None
        return False, lines[0] if lines[0].strip() else None  # nothing on the first line: the developer says so


def _comments(code: str) -> list[tuple[int, int]]:
    """(line index, column) of each comment in `code`."""
    return [(tok.start[0] - 1, tok.start[1]) for tok in _tokens(code, tokenize.COMMENT)]


def _without_comments(completion: str) -> str:
    """The completion with its comment lines dropped and trailing comments cut. Its first line starts at
    the cursor, after the indentation, so when that line goes, the next one starts there instead."""
    lines = completion.split("\n")
    dropped: set[int] = set()
    for row, col in _comments(completion):
        code = lines[row][:col].rstrip()
        if code.strip():
            lines[row] = code
        else:
            dropped.add(row)
    kept = [line for i, line in enumerate(lines) if i not in dropped]
    if 0 in dropped and kept:
        kept[0] = kept[0].lstrip()
    return "\n".join(kept)


class NoComments:
    """Code, not comments: the assistant's comments are deleted (the code says what it does)."""

    name = "no-comments"
    correction = "No comments: write the code only."

    prompt_kinds = ("body", "statement")

    def review(self, prefix: str, completion: str) -> tuple[bool, str | None]:
        if not _comments(completion):
            return True, None
        kept = _without_comments(completion)
        return False, kept if kept.strip() else None  # only a comment: nothing to keep, the developer says so


SHIPPED = (
    TypeHints,
    Docstrings,
    DoubleQuotes,
    SingleQuotes,
    FStrings,
    LoggingNotPrint,
    PathlibNotOsPath,
    NoComments,
    OpenEncoding,
    WarningsStacklevel,
    SingleLine,
    RaiseFrom,
)
