"""The shipped personas decide from the text alone, as a developer with that preference would."""

from __future__ import annotations

import pytest

from personalization.personas import (
    SHIPPED,
    Docstrings,
    DoubleQuotes,
    FStrings,
    LoggingNotPrint,
    NoComments,
    OpenEncoding,
    PathlibNotOsPath,
    RaiseFrom,
    SingleLine,
    SingleQuotes,
    TypeHints,
    WarningsStacklevel,
)

SIGNATURE = "import os\n\n\ndef total("
BODY = "import os\n\n\ndef total(items):\n    "


@pytest.mark.parametrize(
    ("prefix", "completion", "accept"),
    [
        (SIGNATURE, "items: list[int]) -> int:", True),
        (SIGNATURE, "items):", False),
        (SIGNATURE, "items: list[int]):", False),  # no return annotation
        (SIGNATURE, "self, items: dict[str, int] = {}) -> int:", True),  # self needs none; a comma in a subscript
        (SIGNATURE, "items, *args", True),  # the signature is not finished: nothing to judge yet
        (SIGNATURE, "*args: int, **kw: str) -> None:", True),
        (SIGNATURE, "*args, **kw: str) -> None:", False),
        (SIGNATURE, "items: list) -> int: return sum(items)", True),
        (SIGNATURE, "items) -> int: return sum(items)", False),
        (BODY, "return sum(items)\n\ndef mean(items):\n    return 0", False),  # a def the completion writes
        (BODY, "return sum(items)\n\ndef mean(items: list[int]) -> float:", True),
        (BODY, "return sum(items)", True),  # no signature at stake
    ],
)
def test_type_hints(prefix: str, completion: str, accept: bool) -> None:
    verdict, kept = TypeHints().review(prefix, completion)
    assert verdict == accept
    assert kept is None or not accept


def test_type_hints_kept_is_the_signature_annotated() -> None:
    persona = TypeHints()
    method = "class Paths:\n    def _path_isabs("
    assert persona.review(method, "path):\n        return os.path.isabs(path)") == (
        False,
        "path: str) -> Any:\n        return os.path.isabs(path)",
    )
    assert persona.review("def area(", "width, height=1, *args, name=None, **kw):") == (
        False,
        "width: int, height: int=1, *args: Any, name: str | None=None, **kw: Any) -> Any:",
    )
    assert persona.review("    def __repr__(", "self):") == (False, "self) -> str:")
    assert persona.review("    def is_open(", "self, flag):") == (False, "self, flag: bool) -> bool:")
    # Every signature the completion finishes or writes is annotated; cut-off ones and other lines stay.
    assert persona.review("def f(", "a):\n    pass\n\n    def g(self, b=2):\n        pass\n    def h(x") == (
        False,
        "a: Any) -> Any:\n    pass\n\n    def g(self, b: int=2) -> Any:\n        pass\n    def h(x",
    )
    assert persona.review("x = 1\n", "async def g(b):\n    pass") == (False, "async def g(b: Any) -> Any:\n    pass")
    # A signature split over lines is not judged line by line, and stays as it was.
    assert persona.review("def f(", "a):\n    pass\ndef g(b,\n      c):\n    pass") == (
        False,
        "a: Any) -> Any:\n    pass\ndef g(b,\n      c):\n    pass",
    )
    assert persona.review("def f(", "a) -> int:\n    pass\ndef g(b):\n    pass") == (
        False,
        "a: Any) -> int:\n    pass\ndef g(b: Any) -> Any:\n    pass",
    )


def test_docstrings_at_a_body_start_with_the_fix_as_kept() -> None:
    persona = Docstrings()
    assert persona.review(BODY, '"""Sum of the items."""\n    return sum(items)') == (True, None)
    accept, kept = persona.review(BODY, "return sum(items)")
    assert not accept and kept == '"""Total."""\n    return sum(items)'
    body = "class A:\n    def _get_value(self):\n        "
    assert persona.review(body, "return 1") == (False, '"""Get value."""\n        return 1')


def test_docstrings_where_the_completion_finishes_or_writes_a_def() -> None:
    persona = Docstrings()
    assert persona.review(SIGNATURE, "items):\n    return sum(items)") == (False, None)
    assert persona.review(SIGNATURE, 'items):\n    """Sum."""\n    return sum(items)') == (True, None)
    assert persona.review(SIGNATURE, "items):") == (True, None)  # no body yet
    assert persona.review("x = 1\n", "def f():\n    pass\n") == (False, None)
    assert persona.review("x = 1\n", "y = 2") == (True, None)


def test_double_quotes_rewrites_single_quoted_strings() -> None:
    persona = DoubleQuotes()
    assert persona.review(BODY, 'return "a" + f"{items}"') == (True, None)
    assert persona.review(BODY, "return 'a' + f'{items}' + \"it's\"") == (False, 'return "a" + f"{items}" + "it\'s"')
    assert persona.review(BODY, "return 'say \"hi\"'") == (False, None)  # no mechanical rewrite
    assert persona.review(BODY, "return 'unterminated") == (True, None)  # a cut-off string is not judged


def test_single_quotes() -> None:
    persona = SingleQuotes()
    assert persona.review(BODY, "return 'a' + f'{items}'") == (True, None)
    assert persona.review(BODY, '"""Total."""\n    return \'a\'') == (True, None)  # docstrings keep """
    assert persona.review(BODY, 'return "a" + f"{items}"') == (False, "return 'a' + f'{items}'")
    assert persona.review(BODY, "return f\"{d['k']}\"") == (False, None)  # no mechanical rewrite


def test_f_strings() -> None:
    persona = FStrings()
    assert persona.review(BODY, 'return f"{len(items)} items"') == (True, None)
    assert persona.review(BODY, 'return "%d items" % len(items)') == (False, 'return f"{len(items)} items"')
    assert persona.review(BODY, 'return "{} items".format(len(items))') == (False, 'return f"{len(items)} items"')
    assert persona.review(BODY, "return 10 % 3") == (True, None)
    assert persona.review(BODY, "return x  # was '%s' % x") == (True, None)  # comments do not count


def test_logging_not_print() -> None:
    persona = LoggingNotPrint()
    assert persona.review(BODY, "log.info('total %d', len(items))") == (True, None)
    assert persona.review(BODY, "print(items)\n    return 1") == (False, "log.info(items)\n    return 1")
    assert persona.review(BODY, "self.print(items)") == (True, None)
    assert persona.review(BODY, "# print(items)") == (True, None)


def test_pathlib() -> None:
    persona = PathlibNotOsPath()
    assert persona.review(BODY, "return Path(items).name") == (True, None)
    assert persona.review(BODY, "return os.path.basename(items)") == (False, "return Path(items).name")
    assert persona.review(BODY, "p = os.path.join(root, name, 'x.py')\n    if os.path.isdir(p):") == (
        False,
        "p = Path(root) / name / 'x.py'\n    if Path(p).is_dir():",
    )
    # No mechanical rewrite: the developer rejects and says what they want.
    assert persona.review(BODY, "return os.path.splitext(items)[0]") == (False, None)
    assert persona.review(BODY, "q = os.path.join(os.path.dirname(a), b)") == (False, None)
    assert persona.review(BODY, "s = os.path.sep") == (False, None)


@pytest.mark.parametrize(
    ("completion", "kept"),
    [
        ("x = '%s: %r (%5.2f%%)' % (name, value, ratio)", "x = f'{name}: {value!r} ({ratio:5.2f}%)'"),
        ('w = "%-10s|%3d" % (a, b)', 'w = f"{a:<10}|{b:3d}"'),
        ("u = 'a %s {b}' % c", "u = f'a {c} {{b}}'"),  # literal braces are escaped
        ('msg = "{0} and {1} {x}".format(a, b.c, x=f(y))', 'msg = f"{a} and {b.c} {f(y)}"'),
        ("t = '{} {{x}}'.format(a)", "t = f'{a} {{x}}'"),
        ("raise ValueError('bad %s' % (x,))  # '%s' % z", "raise ValueError(f'bad {x}')  # '%s' % z"),
        # What an f-string cannot hold before Python 3.12, or what the rewrite does not know: no kept text.
        ("s = 'n={}'.format(d['k'])", None),
        ("s = '%s %s' % (a,)", None),
        ("s = '{0.name}'.format(a)", None),
    ],
)
def test_f_strings_kept_rewrites_formatting(completion: str, kept: str | None) -> None:
    assert FStrings().review(BODY, completion) == (False, kept)


@pytest.mark.parametrize(
    ("completion", "accept", "kept"),
    [
        ("x = 1\n    return x", True, None),
        ("url = 'http://a#b'\n    return url", True, None),  # a # inside a string is no comment
        ("# add one\n    x = 1  # set x\n    return x", False, "x = 1\n    return x"),
        ("x = 1\n    # done\n    return x  # the answer", False, "x = 1\n    return x"),
        ("# TODO: implement", False, None),
        ("total = sum(  # all of them\n        items", False, "total = sum(\n        items"),  # cut off
    ],
)
def test_no_comments(completion: str, accept: bool, kept: str | None) -> None:
    assert NoComments().review("def f(items):\n    ", completion) == (accept, kept)


@pytest.mark.parametrize(
    ("completion", "accept", "kept"),
    [
        ("with open(path) as f:", False, 'with open(path, encoding="utf-8") as f:'),
        ("data = open(path, 'w').write(text)", False, "data = open(path, 'w', encoding=\"utf-8\").write(text)"),
        ("with open(path, 'rb') as f:", True, None),
        ("with open(path, mode='wb') as f:", True, None),
        ("with open(path, encoding='latin-1') as f:", True, None),
        ("fd = os.open(path, os.O_RDONLY)", True, None),
        ("f = io.open(path)", True, None),  # a method named open: not the builtin
        ("# open(path)\n    return None", True, None),  # in a comment
        ("with open(join(root, name)) as f:", False, 'with open(join(root, name), encoding="utf-8") as f:'),
        ("with open(path", True, None),  # cut off: nothing to judge yet
        ("f = open()", True, None),  # opens nothing
    ],
)
def test_open_encoding(completion: str, accept: bool, kept: str | None) -> None:
    assert OpenEncoding().review("def read(path):\n    ", completion) == (accept, kept)


def test_open_encoding_at_a_call_prompt_judges_the_call_the_cursor_is_in() -> None:
    prefix = "def read(path):\n    with open("
    assert OpenEncoding().review(prefix, "path) as f:\n        return f.read()") == (
        False,
        'path, encoding="utf-8") as f:\n        return f.read()',
    )
    assert OpenEncoding().review(prefix, "path, 'rb') as f:") == (True, None)
    # A call over several lines, with a trailing comma: the argument goes after it.
    assert OpenEncoding().review(prefix, "\n        path,\n        'w',\n    ) as f:") == (
        False,
        "\n        path,\n        'w', encoding=\"utf-8\",\n    ) as f:",
    )
    # An open() inside the call's arguments is rewritten too, the outer call first.
    assert OpenEncoding().review("    data = open(", "open(p).read().strip())") == (
        False,
        'open(p, encoding="utf-8").read().strip(), encoding="utf-8")',
    )


@pytest.mark.parametrize(
    ("completion", "accept", "kept"),
    [
        ('"old", DeprecationWarning)', False, '"old", DeprecationWarning, stacklevel=2)'),
        ('"old", DeprecationWarning, stacklevel=3)', True, None),
        ('"old", DeprecationWarning, 2)', True, None),  # the third positional argument is the stack level
        ('\n    "old",\n    DeprecationWarning,\n)', False, '\n    "old",\n    DeprecationWarning, stacklevel=2,\n)'),
        (
            'f"{warnings.warn(x)}")  # warnings.warn(y)',
            False,
            'f"{warnings.warn(x)}", stacklevel=2)  # warnings.warn(y)',
        ),
        ('"old"', True, None),  # not finished: nothing to judge yet
        (")", True, None),  # warns with nothing
    ],
)
def test_warnings_stacklevel(completion: str, accept: bool, kept: str | None) -> None:
    assert WarningsStacklevel().review("def old():\n    warnings.warn(", completion) == (accept, kept)


def test_single_line() -> None:
    assert SingleLine().review(BODY, "return sum(items)") == (True, None)
    assert SingleLine().review(BODY, "return sum(items)\n\n") == (True, None)  # trailing blank lines are nothing
    assert SingleLine().review(BODY, "total = 0\n    for i in items:\n        total += i") == (False, "total = 0")
    assert SingleLine().review(BODY, "\n    return 0") == (False, None)  # nothing on the cursor's line to keep


HANDLER = "def parse(x):\n    try:\n        return int(x)\n    except ValueError as exc:\n        raise "


@pytest.mark.parametrize(
    ("prefix", "completion", "accept", "kept"),
    [
        (HANDLER, 'TypeError("bad")  # why\n    return 0', False, 'TypeError("bad") from exc  # why\n    return 0'),
        (HANDLER, 'TypeError(\n            "bad")\n', False, 'TypeError(\n            "bad") from exc\n'),
        (HANDLER, 'TypeError("bad") from exc', True, None),
        (HANDLER, "TypeError('bad') from None", True, None),
        (HANDLER, "\n    return 0", True, None),  # a bare re-raise keeps the exception as it is
        (HANDLER, "exc\n", True, None),  # so does raising the caught exception again
        (HANDLER, 'TypeError("bad"', True, None),  # not finished: nothing to judge yet
        (HANDLER.replace(" as exc", ""), 'TypeError("bad")', False, 'TypeError("bad") from None'),  # nothing bound
        ("def f(x):\n    if x:\n        raise ", 'TypeError("bad")', True, None),  # not in an except block
        ("    except (OSError, ValueError) as err:  # both\n\n        raise ", "Bad()", False, "Bad() from err"),
    ],
)
def test_raise_from(prefix: str, completion: str, accept: bool, kept: str | None) -> None:
    assert RaiseFrom().review(prefix, completion) == (accept, kept)


def test_every_shipped_persona_follows_the_contract() -> None:
    names = set()
    for cls in SHIPPED:
        persona = cls()
        assert isinstance(persona.name, str) and isinstance(persona.correction, str) and persona.correction
        accept, kept = persona.review(BODY, "")
        assert accept is True and kept is None  # nothing suggested, nothing to correct
        names.add(persona.name)
    assert len(names) == len(SHIPPED) >= 5
