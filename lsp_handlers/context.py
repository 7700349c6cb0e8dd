"""The prompt for one cursor position: prefix, suffix, file-name header, fitted to a token budget.

This module turns the text around the cursor into the string sent to the engine (the first step of serving
a completion request). It picks the model's fill-in-the-middle template when the tokenizer has one
(`kernel.fim.fim_template_for`), writes a one-line comment naming the file (`comment_header`), and keeps the lines
nearest to the cursor that fit the budget (`build_prompt`).

It is pure: no I/O, no engine or tokenizer loading, no settings lookup, no logging. Token counting is a
function the caller passes in, so tests can use a counter whose values are computed by hand.

Cost: `before` and `after` can be whole files of megabytes. Nothing here splits them into lines; the
builder walks outward from the cursor with `rfind`/`find` and counts only the pieces it considers, so the
work is proportional to what is kept (plus the one piece that did not fit, whose counting is capped too).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from kernel.fim import check_template, fill_template, split_blanks

__all__ = [
    "Continuation",
    "CountTokens",
    "Prompt",
    "build_prompt",
    "comment_header",
    "continue_prompt",
    "heal",
    "notes_header",
    "prompt_head",
    "scope_openers",
    "shared_start",
    "suffix_share_of",
]

CountTokens = Callable[[str], int]
"""Number of tokens of a text on its own (no BOS/EOS added); must be 0 for ""."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """The prompt for one cursor position, and the pieces of the document it kept."""

    text: str  # what is sent to the engine
    mode: Literal["fim", "prefix"]
    prefix: str  # the kept text before the cursor (a suffix of `before`: ends exactly at the cursor)
    suffix: str  # the kept text after the cursor (a prefix of `after`; "" in prefix mode)
    header: str  # the file-name header line put before the prefix ("" when none)
    tokens: int  # count_tokens(text) of the final prompt
    template: str | None = None  # the FIM template `text` was filled in (None in prefix mode)
    repository: str = ""  # the other files' snippets put before everything else ("" when none)
    outline: str = ""  # the lines opening the scopes around the cursor that the prefix did not reach


def heal(prompt: Prompt) -> tuple[str, str]:
    """Token healing: (the text to send the engine, the spaces and tabs taken off the end of the prefix).

    A prefix that ends in blanks (the indentation of an empty line, `x = `) splits the tokenizer's usual
    whitespace tokens: BPE tokenizers of the GPT-2 family join a run of blanks with the word after it, minus
    its last space (`"       " + " self"`), so a prompt ending in eight spaces is a token the model has seen
    before a line break, not before code, and it writes another indentation or `" with"` after it. The
    prompt goes without them, in prefix and in fill-in-the-middle mode alike (refilled in the template it
    was built with), and the caller takes them back off the front of what the model writes (`unheal`). A
    prompt whose prefix does not end in blanks is sent as it is.
    """
    kept, healed = split_blanks(prompt.prefix)
    if not healed:
        return prompt.text, ""
    return _assemble(prompt.template, prompt.repository, prompt.header + prompt.outline + kept, prompt.suffix), healed


def prompt_head(prompt: Prompt) -> str:
    """The start of `heal(prompt)`'s text up to the cursor: the other files' snippets, the template's text before
    its prefix, the header, the scope openers and the prefix without the blanks healing takes off. What
    precedes the cursor is all a later prompt at a cursor further on in the same lines may share with this
    one (the suffix comes after it)."""
    kept, _ = split_blanks(prompt.prefix)
    opening = prompt.template[: prompt.template.index("{prefix}")] if prompt.template is not None else ""
    return prompt.repository + opening + prompt.header + prompt.outline + kept


def suffix_share_of(budget_tokens: int, suffix_share: float) -> int:
    """The tokens a budget gives the text after the cursor: floor(budget_tokens * suffix_share)."""
    return math.floor(budget_tokens * suffix_share + 1e-9)


def shared_start(a: str, b: str) -> int:
    """How many characters `a` and `b` have in common from their start."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _assemble(template: str | None, repository: str, before: str, suffix: str) -> str:
    """A prompt's text: the other files' snippets, then `before` (header, scope openers, prefix) alone in
    prefix mode or filled in the template with `suffix`."""
    if template is None:
        return repository + before
    return repository + fill_template(template, before, suffix)


@dataclass(frozen=True, slots=True)
class Continuation:
    """A prompt sent for a cursor, which later keystrokes at that cursor extend (`continue_prompt`)."""

    before: str  # the document's text before the cursor when it was sent
    after: str  # ... and after it
    prompt: str  # the prompt sent (healed)
    healed: str  # the blanks `heal` took off its end
    tokens: int  # its token count (at most)
    mode: Literal["fim", "prefix"]
    before_tail: str  # the end of the kept text before the cursor (for the answer's post-processing)


def continue_prompt(anchor: Continuation, text: str, offset: int, max_chars: int) -> tuple[str, str, str] | None:
    """The prompt for the cursor at `offset` in `text` when the developer has only typed at the anchor's
    cursor since it was sent: (what to append to the anchor's prompt, the blanks taken off its end, what
    was typed). None when anything else changed, the cursor is not at the end of what was typed, or more
    than `max_chars` characters were typed.

    What was typed, after the blanks the anchor's healing took off, goes at the end of the anchor's prompt:
    in a fill-in-the-middle prompt that is after the middle token (the start of the middle the model
    writes), in a prefix prompt after the prefix. The engine's prefix cache holds the anchor's whole prompt,
    text after the cursor included, so it reads only the typed tokens; a new prompt with the typed text in
    its prefix would put the text after the cursor after a changed token and have it read again. The
    result is healed like any prompt: its own trailing blanks come off.
    """
    typed = len(text) - len(anchor.before) - len(anchor.after)
    if not 0 < typed <= max_chars or offset != len(anchor.before) + typed:
        return None
    if not (text.startswith(anchor.before) and text.endswith(anchor.after)):
        return None
    written = text[len(anchor.before) : offset]
    kept, healed = split_blanks(anchor.healed + written)
    return kept, healed, written


_HASH = ("# ", "")
_SLASH = ("// ", "")
_DASH = ("-- ", "")
_PERCENT = ("% ", "")
_SEMI = ("; ", "")
_MARKUP = ("<!-- ", " -->")
_COMMENT_SYNTAX: dict[str, tuple[str, str]] = {
    **dict.fromkeys(
        (
            "python",
            "shellscript",
            "sh",
            "bash",
            "zsh",
            "fish",
            "ruby",
            "yaml",
            "toml",
            "perl",
            "perl6",
            "raku",
            "r",
            "dockerfile",
            "makefile",
            "cmake",
            "elixir",
            "powershell",
            "coffeescript",
            "julia",
            "nim",
            "crystal",
            "graphql",
            "terraform",
            "hcl",
            "nix",
            "tcl",
            "gdscript",
            "properties",
            "dotenv",
            "starlark",
            "git-commit",
            "git-rebase",
        ),
        _HASH,
    ),
    **dict.fromkeys(
        (
            "javascript",
            "javascriptreact",
            "typescript",
            "typescriptreact",
            "go",
            "rust",
            "java",
            "c",
            "cpp",
            "csharp",
            "kotlin",
            "swift",
            "php",
            "scala",
            "dart",
            "groovy",
            "objective-c",
            "objective-cpp",
            "fsharp",
            "less",
            "scss",
            "sass",
            "jade",
            "pug",
            "zig",
            "proto",
            "solidity",
            "jsonc",
            "glsl",
            "hlsl",
            "shaderlab",
            "verilog",
            "systemverilog",
            "d",
            "odin",
            "cuda",
            "cuda-cpp",
        ),
        _SLASH,
    ),
    **dict.fromkeys(("lua", "sql", "haskell", "elm", "ada", "vhdl", "purescript"), _DASH),
    **dict.fromkeys(("latex", "tex", "bibtex", "erlang", "matlab", "prolog"), _PERCENT),
    **dict.fromkeys(("clojure", "lisp", "commonlisp", "scheme", "racket", "ini"), _SEMI),
    **dict.fromkeys(("html", "xml", "xsl", "markdown", "vue", "svelte"), _MARKUP),
    "css": ("/* ", " */"),
    "ocaml": ("(* ", " *)"),
    "handlebars": ("{{!-- ", " --}}"),
    "razor": ("@* ", " *@"),
    "vb": ("' ", ""),
    "bat": ("REM ", ""),
    "vim": ('" ', ""),
}

# Short ids some editors send (Neovim sends its filetype) -> the LSP languageId.
_LANGUAGE_ALIASES: dict[str, str] = {
    "py": "python",
    "js": "javascript",
    "jsx": "javascriptreact",
    "ts": "typescript",
    "tsx": "typescriptreact",
    "rs": "rust",
    "rb": "ruby",
    "cs": "csharp",
    "kt": "kotlin",
    "yml": "yaml",
    "md": "markdown",
    "objc": "objective-c",
    "objcpp": "objective-cpp",
    "make": "makefile",
    "ps1": "powershell",
}

# File extension (lower case, no dot) -> LSP languageId, for when the editor sent no languageId.
_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys(("py", "pyi", "pyw"), "python"),
    **dict.fromkeys(("sh", "bash", "zsh", "ksh"), "shellscript"),
    "fish": "fish",
    **dict.fromkeys(("rb", "rake", "gemspec"), "ruby"),
    **dict.fromkeys(("yml", "yaml"), "yaml"),
    "toml": "toml",
    **dict.fromkeys(("js", "mjs", "cjs"), "javascript"),
    "jsx": "javascriptreact",
    **dict.fromkeys(("ts", "mts", "cts"), "typescript"),
    "tsx": "typescriptreact",
    "go": "go",
    "rs": "rust",
    "java": "java",
    **dict.fromkeys(("c", "h"), "c"),
    **dict.fromkeys(("cc", "cpp", "cxx", "c++", "hpp", "hh", "hxx", "h++", "ipp"), "cpp"),
    "cs": "csharp",
    **dict.fromkeys(("kt", "kts"), "kotlin"),
    "swift": "swift",
    "php": "php",
    **dict.fromkeys(("scala", "sc"), "scala"),
    "dart": "dart",
    **dict.fromkeys(("groovy", "gradle"), "groovy"),
    "m": "objective-c",
    "mm": "objective-cpp",
    **dict.fromkeys(("fs", "fsi", "fsx"), "fsharp"),
    "less": "less",
    "scss": "scss",
    "sass": "sass",
    "pug": "pug",
    "jade": "jade",
    "zig": "zig",
    "proto": "proto",
    "sol": "solidity",
    "jsonc": "jsonc",
    **dict.fromkeys(("glsl", "vert", "frag"), "glsl"),
    "hlsl": "hlsl",
    **dict.fromkeys(("v", "sv", "svh"), "verilog"),
    "d": "d",
    "cu": "cuda-cpp",
    "lua": "lua",
    "sql": "sql",
    **dict.fromkeys(("hs", "lhs"), "haskell"),
    "elm": "elm",
    **dict.fromkeys(("adb", "ads"), "ada"),
    **dict.fromkeys(("vhd", "vhdl"), "vhdl"),
    "purs": "purescript",
    **dict.fromkeys(("tex", "sty", "cls"), "latex"),
    "bib": "bibtex",
    **dict.fromkeys(("erl", "hrl"), "erlang"),
    **dict.fromkeys(("clj", "cljs", "cljc", "edn"), "clojure"),
    **dict.fromkeys(("lisp", "cl", "el"), "lisp"),
    **dict.fromkeys(("scm", "ss"), "scheme"),
    "rkt": "racket",
    **dict.fromkeys(("ini", "cfg"), "ini"),
    **dict.fromkeys(("html", "htm", "xhtml"), "html"),
    **dict.fromkeys(("xml", "svg", "xsd", "plist"), "xml"),
    **dict.fromkeys(("xsl", "xslt"), "xsl"),
    **dict.fromkeys(("md", "markdown", "mdx"), "markdown"),
    "vue": "vue",
    "svelte": "svelte",
    "css": "css",
    **dict.fromkeys(("ml", "mli"), "ocaml"),
    **dict.fromkeys(("hbs", "handlebars"), "handlebars"),
    **dict.fromkeys(("cshtml", "razor"), "razor"),
    **dict.fromkeys(("vb", "vbs"), "vb"),
    **dict.fromkeys(("bat", "cmd"), "bat"),
    "vim": "vim",
    "r": "r",
    **dict.fromkeys(("pl", "pm"), "perl"),
    **dict.fromkeys(("raku", "rakumod", "p6"), "raku"),
    **dict.fromkeys(("ps1", "psm1", "psd1"), "powershell"),
    "coffee": "coffeescript",
    "jl": "julia",
    "nim": "nim",
    "cr": "crystal",
    **dict.fromkeys(("graphql", "gql"), "graphql"),
    **dict.fromkeys(("tf", "tfvars"), "terraform"),
    "hcl": "hcl",
    "nix": "nix",
    "tcl": "tcl",
    "gd": "gdscript",
    "properties": "properties",
    **dict.fromkeys(("ex", "exs"), "elixir"),
    "cmake": "cmake",
    "mk": "makefile",
    "dockerfile": "dockerfile",
    **dict.fromkeys(("bzl", "star"), "starlark"),
}

# Whole file names (lower case) that say the language without an extension.
_FILE_NAMES: dict[str, str] = {
    "makefile": "makefile",
    "gnumakefile": "makefile",
    "dockerfile": "dockerfile",
    "containerfile": "dockerfile",
    "cmakelists.txt": "cmake",
    "rakefile": "ruby",
    "gemfile": "ruby",
    "build": "starlark",
    "workspace": "starlark",
    ".bashrc": "shellscript",
    ".zshrc": "shellscript",
    ".profile": "shellscript",
    ".env": "dotenv",
}


def _language_from_file_name(file_name: str) -> str | None:
    base = file_name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    if base in _FILE_NAMES:
        return _FILE_NAMES[base]
    if base.startswith("dockerfile.") or base.endswith(".dockerfile"):
        return "dockerfile"
    stem, dot, extension = base.rpartition(".")
    if not dot or not stem:
        return None
    return _EXTENSIONS.get(extension)


def comment_syntax(file_name: str | None, language_id: str | None) -> tuple[str, str] | None:
    if language_id is None:
        language = _language_from_file_name(file_name) if file_name else None
    else:
        key = language_id.strip().lower()
        language = _LANGUAGE_ALIASES.get(key, key)
    return _COMMENT_SYNTAX.get(language) if language else None


def _one_line(text: str) -> str:
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


def comment_header(file_name: str | None, language_id: str | None) -> str:
    """One line naming the file in the language's comment syntax, e.g. "# file: app/main.py\\n".

    `language_id` is the LSP languageId of the document (a few common short forms such as "py" or "sh" are
    accepted too); when it is None the language is guessed from the file name's extension. No file name, or a
    language without a known comment syntax (e.g. "json", "plaintext"), gives "". Line breaks inside the
    name are replaced with spaces so the header stays one line.
    """
    if not file_name:
        return ""
    syntax = comment_syntax(file_name, language_id)
    if syntax is None:
        return ""
    opener, closer = syntax
    return f"{opener}file: {_one_line(file_name)}{closer}\n"


def notes_header(notes: Sequence[str], file_name: str | None, language_id: str | None) -> str:
    """The developer's past corrections as comment lines (the prompt-injection baseline), or "".

    One line introduces them, then one line per note, newest last, each made one line; "" when there are
    no notes or the language has no known comment syntax.
    """
    syntax = comment_syntax(file_name, language_id)
    kept = [_one_line(n).strip() for n in notes if n.strip()]
    if syntax is None or not kept:
        return ""
    opener, closer = syntax
    lines = ["The developer's corrections to earlier suggestions:", *(f"- {n}" for n in kept)]
    return "".join(f"{opener}{line}{closer}\n" for line in lines)


# ----------------------------------------------------------------------------------------------------------
# Fitting text to a budget

_PROBE_CHARS = 256  # a piece longer than this is first counted through growing windows (see _count_within)
_FIRST_WINDOW = 64  # first window width when cutting a piece down by characters


def _count_within(piece: str, limit: int, count: CountTokens, *, from_end: bool) -> int | None:
    """count(piece) if it is <= limit, else None, without counting all of a huge piece that cannot fit.

    A long piece is first counted through windows of growing width taken from the side nearest the cursor;
    once a window alone is over the limit the piece is taken not to fit. So the cost is about the size of the
    text that fits, not the size of the piece (a 5 MB minified line costs a few small counts).
    """
    if len(piece) > _PROBE_CHARS:
        width = _PROBE_CHARS
        while width < len(piece):
            window = piece[-width:] if from_end else piece[:width]
            if count(window) > limit:
                return None
            width *= 4
    n = count(piece)
    return n if n <= limit else None


def _longest_fitting(piece: str, limit: int, count: CountTokens, *, keep_end: bool) -> tuple[str, int]:
    """The longest end (keep_end) or start of `piece`, cut by characters, whose count is <= limit.

    Galloping then binary search on the width; only widths whose count was checked are returned, so the result
    always fits even for a counter that is not monotone in the width. Assumes count("") == 0.
    """

    def part(width: int) -> str:
        if width <= 0:
            return ""
        return piece[-width:] if keep_end else piece[:width]

    fits, fits_count = 0, 0
    width = _FIRST_WINDOW
    while True:
        if width >= len(piece):
            n = count(piece)
            if n <= limit:
                return piece, n
            too_big = len(piece)
            break
        n = count(part(width))
        if n > limit:
            too_big = width
            break
        fits, fits_count = width, n
        width *= 2
    while too_big - fits > 1:
        mid = (fits + too_big) // 2
        n = count(part(mid))
        if n <= limit:
            fits, fits_count = mid, n
        else:
            too_big = mid
    return part(fits), fits_count


@dataclass(slots=True)
class _Parts:
    """The kept pieces of one prompt, nearest to the cursor first, with their individual token counts."""

    template: str | None
    repository: str = ""
    header: str = ""
    header_tokens: int = 0
    outline: str = ""  # scope openers above the prefix, in document order
    head: str = ""  # the cursor line's text before the cursor (maybe cut from its left)
    head_tokens: int = 0
    earlier: list[str] = field(default_factory=list)  # whole lines before the cursor line, nearest first
    earlier_tokens: list[int] = field(default_factory=list)
    tail: str = ""  # the cursor line's text after the cursor, with its line ending (maybe cut from its right)
    tail_tokens: int = 0
    later: list[str] = field(default_factory=list)  # whole lines after the cursor line, nearest first
    later_tokens: list[int] = field(default_factory=list)

    def prefix(self) -> str:
        return "".join(reversed(self.earlier)) + self.head

    def suffix(self) -> str:
        return self.tail + "".join(self.later)

    def text(self) -> str:
        return _assemble(self.template, self.repository, self.header + self.outline + self.prefix(), self.suffix())

    def drop_farthest_line(self) -> int:
        """Drop the whole line farthest from the cursor (a suffix line on a tie); its token count, or -1."""
        if self.later and len(self.later) >= len(self.earlier):
            self.later.pop()
            return self.later_tokens.pop()
        if self.earlier:
            self.earlier.pop()
            return self.earlier_tokens.pop()
        return -1


def _take_before(
    parts: _Parts,
    before: str,
    limit: int,
    count: CountTokens,
    *,
    anchor_lines: int = 1,
    first_line: int = 0,
    previous_start: int | None = None,
) -> None:
    """Fill parts.head and parts.earlier from `before` within `limit` tokens, nearest lines first.

    Unless the prefix reaches the document's start (`before` starts at its line `first_line`), its first
    line may then move down (`anchor_drop`, see build_prompt).
    """
    start = before.rfind("\n") + 1
    head = before[start:]
    n = _count_within(head, limit, count, from_end=True)
    if n is None:
        parts.head, parts.head_tokens = _longest_fitting(head, limit, count, keep_end=True)
        return
    parts.head, parts.head_tokens = head, n
    remaining = limit - n
    end = start  # before[end - 1] is the "\n" that ends the line above
    while end > 0:
        line_start = before.rfind("\n", 0, end - 1) + 1
        line = before[line_start:end]
        n = _count_within(line, remaining, count, from_end=True)
        if n is None:
            break
        parts.earlier.append(line)
        parts.earlier_tokens.append(n)
        remaining -= n
        end = line_start
    if end > 0 or first_line > 0:
        first = first_line + before.count("\n", 0, end)  # the first document line that fits
        drop = min(anchor_drop(first, anchor_lines, previous_start), len(parts.earlier))
        for _ in range(drop):
            parts.earlier.pop()
            parts.earlier_tokens.pop()


def anchor_drop(first: int, anchor_lines: int, previous_start: int | None) -> int:
    """How many lines the prompt's start moves down from `first`, the first document line that fits.

    The start stays where the previous prompt on the document started (`previous_start`) while that still
    fits less than `anchor_lines` lines below `first`; when typing has just pushed it out (it is less than
    `anchor_lines` lines above `first`), the start moves to the next line whose number is a multiple of
    `anchor_lines`; otherwise (no previous prompt, or one far from here: a cold request) nothing moves and
    every line that fits is kept.
    """
    if anchor_lines <= 1 or previous_start is None:
        return 0
    if first <= previous_start < first + anchor_lines:
        return previous_start - first
    if first - anchor_lines < previous_start < first:
        return -first % anchor_lines
    return 0


_CLOSERS = (")", "]", "}")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def scope_openers(before: str, limit: int, comment: str | None = None) -> list[tuple[int, str]]:
    """The lines opening the scopes around a cursor with `before` before it: (offset in `before`, line), nearest
    first, at most `limit`.

    Walking up from the cursor's line, a line is an opener when it is indented less than every non-blank
    line between it and the cursor (a `def`, a `class`, a loop, `function f() {`). The cursor's own line
    counts when it has text or blanks before the cursor; else the nearest non-blank line above sets the
    indentation the openers must be under. Blank lines, comment lines (`comment`, e.g. "#") and lines that
    start by closing a bracket (`) -> int:`, `} else {`: the line that opened it comes higher up) are passed
    over. Stops at an opener with no indentation. Indentation is counted in characters, a tab as one.
    """
    start = before.rfind("\n") + 1
    head = before[start:]
    under: int | None = _indent(head) if head else None
    openers: list[tuple[int, str]] = []
    end = start
    while end > 0 and under != 0 and len(openers) < limit:
        line_start = before.rfind("\n", 0, end - 1) + 1
        line = before[line_start:end]
        end = line_start
        body = line.strip()
        if not body or (comment and body.startswith(comment)):
            continue
        width = _indent(line)
        if under is None:
            under = width
        elif width < under and not body.startswith(_CLOSERS):
            openers.append((line_start, line))
            under = width
    return openers


def _take_after(parts: _Parts, after: str, limit: int, count: CountTokens) -> int:
    """Fill parts.tail and parts.later from `after` within `limit` tokens; the tokens used."""
    newline = after.find("\n")
    end = len(after) if newline < 0 else newline + 1
    n = _count_within(after[:end], limit, count, from_end=False)
    if n is None:
        parts.tail, parts.tail_tokens = _longest_fitting(after[:end], limit, count, keep_end=False)
        return parts.tail_tokens
    parts.tail, parts.tail_tokens = after[:end], n
    used = n
    while end < len(after):
        newline = after.find("\n", end)
        line_end = len(after) if newline < 0 else newline + 1
        n = _count_within(after[end:line_end], limit - used, count, from_end=False)
        if n is None:
            break
        parts.later.append(after[end:line_end])
        parts.later_tokens.append(n)
        used += n
        end = line_end
    return used


def _fit(parts: _Parts, budget: int, count: CountTokens) -> tuple[str, int]:
    """Shrink `parts` until count(text) <= budget; the final text and its count.

    Per-piece counts need not add up to the count of the joined text (a tokenizer can merge across piece
    boundaries), so the joined text is counted and, while it is over, pieces are dropped in this order: whole
    lines farthest from the cursor (enough of them to cover the excess by their own counts, then recount),
    then the other files' snippets, then the scope openers, then the header, then characters of the cursor
    line's remainder (from its right), then characters of the cursor line's text before the cursor (from its
    left). Every round removes text, so this ends.
    """
    text = parts.text()
    n = count(text)
    while n > budget:
        excess = n - budget
        dropped = 0
        while dropped < excess:
            freed = parts.drop_farthest_line()
            if freed < 0:
                break
            dropped += max(freed, 1)
        if dropped == 0:
            if parts.repository:
                parts.repository = ""
            elif parts.outline:
                parts.outline = ""
            elif parts.header:
                parts.header, parts.header_tokens = "", 0
            elif parts.tail:
                cut, cut_n = _longest_fitting(parts.tail, max(parts.tail_tokens - excess, 0), count, keep_end=False)
                if len(cut) >= len(parts.tail):
                    cut = parts.tail[:-1]
                    cut_n = count(cut)
                parts.tail, parts.tail_tokens = cut, cut_n
            elif parts.head:
                cut, cut_n = _longest_fitting(parts.head, max(parts.head_tokens - excess, 0), count, keep_end=True)
                if len(cut) >= len(parts.head):
                    cut = parts.head[1:]
                    cut_n = count(cut)
                parts.head, parts.head_tokens = cut, cut_n
            else:
                raise ValueError(
                    f"cannot fit a prompt into {budget} tokens: the counter gives {n} for the empty prompt "
                    f"{text!r} (count_tokens must not add BOS/EOS tokens)"
                )
        text = parts.text()
        n = count(text)
    return text, n


def build_prompt(
    before: str,
    after: str,
    *,
    file_name: str | None,
    language_id: str | None,
    budget_tokens: int,
    count_tokens: CountTokens,
    fim_template: str | None,
    suffix_share: float = 0.25,
    notes: Sequence[str] = (),
    anchor_lines: int = 1,
    first_line: int = 0,
    previous_start: int | None = None,
    repository: str = "",
    outline_lines: int = 0,
    suffix_tokens: int | None = None,
) -> Prompt:
    """The prompt for a cursor with `before` (all text before it) and `after` (all text after it).

    Prefix mode (`fim_template` None): text = header + prefix. The budget minus the header's tokens goes to
    the prefix: first the cursor line's text before the cursor (always; cut by characters from its left if it
    alone is over), then whole earlier lines, nearest first, while each fits; the first that does not fit
    ends the prefix (the prefix is always one contiguous piece ending at the cursor).

    FIM mode (`fim_template` with {prefix} and {suffix}): text = the template filled with header + prefix
    and suffix. The template's own tokens (its count filled with empty strings) come off the budget first,
    then the header's. The suffix gets floor(budget_tokens * suffix_share) tokens (at most what is left): the
    rest of the cursor line first (cut from its right if alone over), then whole later lines, nearest first,
    while each fits. The prefix gets all the rest, including what the suffix did not use. When the template
    alone takes the whole budget, the prompt falls back to prefix mode. `suffix_tokens`, when given, is the
    suffix's budget instead of the share: a long prompt whose text before the cursor the engine's prefix
    cache holds keeps the suffix of a short one, which is what the engine reads of it.

    `anchor_lines` and `previous_start`: when the text before the cursor does not all fit, the prompt keeps
    starting on the document line the previous prompt on this document started on (`previous_start`;
    `before` starts on the document's line `first_line`) while that line still fits and is less than
    `anchor_lines` lines below the first line that fits; once typing has pushed it out by less than
    `anchor_lines` lines, the start moves down to the next line whose number is a multiple of
    `anchor_lines` (`anchor_drop`). As the developer types, the nearest lines that fit change with every
    few keystrokes, and a prompt whose start moves is computed anew by the engine; anchored, its start
    stays put until the prefix has grown by about `anchor_lines` lines, so the engine's prefix cache reuses
    everything before the cursor line, at the cost of at most `anchor_lines - 1` of the farthest lines. A
    prompt with no previous one nearby (`previous_start` None or far away: the first at a cursor) keeps
    every line that fits, as does `anchor_lines` 1.

    `repository`: snippets of the developer's other files, already chosen and rendered for this model
    (`crossfile.repository_context`), put before everything else (before the template in FIM mode: the
    repository format of Qwen2.5-Coder and StarCoder2 ends in the current file's path, then the template).
    Its tokens come off the budget after the template's and before the header's; it is left out when it
    leaves no room for text.

    `outline_lines`: when the prefix does not reach them, up to this many of the lines that open the scopes
    around the cursor (`scope_openers`: the `def` whose body the cursor is in, its `class`) are put between
    the header and the prefix, in document order, so that a short budget still shows the model the
    signature it completes a body of. They take at most a quarter of the budget left for the prefix,
    nearest first, and come off it before the prefix is taken again without them in its reach. 0: none.

    `notes` (the developer's past corrections, for the prompt-injection baseline) join the header as
    comment lines after the file name (`notes_header`). The header (`comment_header`, plus the notes) is
    dropped when its tokens leave no room for text (header tokens >= the
    budget left after the template). Pieces are counted one by one; the assembled text is then recounted
    and shrunk (see `_fit`) so that `count_tokens(text) <= budget_tokens` always holds.

    Line endings ("\\n", "\\r\\n") are kept as they are, and nothing is added or removed at the cursor:
    `prefix` is a suffix of `before` and `suffix` a prefix of `after`. Raises ValueError for a budget < 1,
    a suffix_share outside [0, 1], or a template without {prefix} and {suffix} exactly once each.
    """
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens = {budget_tokens} is not valid: it must be at least 1")
    if not 0.0 <= suffix_share <= 1.0:
        raise ValueError(f"suffix_share = {suffix_share} is not valid: it must be between 0 and 1")
    if suffix_tokens is not None and suffix_tokens < 0:
        raise ValueError(f"suffix_tokens = {suffix_tokens} is not valid: it must be at least 0")
    if anchor_lines < 1 or first_line < 0:
        raise ValueError(f"anchor_lines = {anchor_lines}, first_line = {first_line}: need >= 1 and >= 0")
    available = budget_tokens
    if fim_template is not None:
        check_template(fim_template)
        template_tokens = count_tokens(fill_template(fim_template, "", ""))
        if template_tokens < budget_tokens:
            available -= template_tokens
        else:
            fim_template = None

    parts = _Parts(template=fim_template)
    if repository:
        repository_tokens = count_tokens(repository)
        if repository_tokens < available:
            parts.repository = repository
            available -= repository_tokens
    header = comment_header(file_name, language_id) + notes_header(notes, file_name, language_id)
    header_tokens = count_tokens(header) if header else 0
    if header and header_tokens < available:
        parts.header, parts.header_tokens = header, header_tokens
        available -= header_tokens

    if fim_template is not None:
        share = suffix_share_of(budget_tokens, suffix_share) if suffix_tokens is None else suffix_tokens
        suffix_budget = min(share, available)
        available -= _take_after(parts, after, suffix_budget, count_tokens)

    def take_before(limit: int) -> None:
        _take_before(
            parts,
            before,
            limit,
            count_tokens,
            anchor_lines=anchor_lines,
            first_line=first_line,
            previous_start=previous_start,
        )

    take_before(available)
    if outline_lines > 0 and len(parts.prefix()) < len(before):
        syntax = comment_syntax(file_name, language_id)
        openers = scope_openers(before, outline_lines, syntax[0].strip() if syntax else None)
        outline, outline_tokens = _outline(openers, len(before) - len(parts.prefix()), available // 4, count_tokens)
        if outline:
            parts.head, parts.head_tokens, parts.earlier, parts.earlier_tokens = "", 0, [], []
            take_before(available - outline_tokens)
            # The prefix, taken again in less room, may have lost more openers: the outline shows them too
            # (`_fit` then sheds the farthest lines if that is over the budget).
            parts.outline, _ = _outline(openers, len(before) - len(parts.prefix()), available // 4, count_tokens)

    text, tokens = _fit(parts, budget_tokens, count_tokens)
    return Prompt(
        text=text,
        mode="prefix" if fim_template is None else "fim",
        prefix=parts.prefix(),
        suffix=parts.suffix(),
        header=parts.header,
        tokens=tokens,
        template=fim_template,
        repository=parts.repository,
        outline=parts.outline,
    )


def _outline(openers: list[tuple[int, str]], kept_from: int, limit: int, count: CountTokens) -> tuple[str, int]:
    """The openers above `kept_from` (where the kept prefix starts), nearest first while their tokens stay within
    `limit`, joined in document order; and their token count."""
    lines: list[str] = []
    used = 0
    for offset, line in openers:
        if offset >= kept_from:
            continue
        n = count(line)
        if used + n > limit:
            break
        lines.append(line)
        used += n
    return "".join(reversed(lines)), used
