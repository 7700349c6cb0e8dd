"""The prompt corpus: real standard-library code, cut at function and statement starts, split by file."""

from __future__ import annotations

from pathlib import Path

import pytest

from personalization import corpus

SOURCE = '''"""A module."""

import os


def area(width, height):
    """Area."""
    print("computing")
    return width * height


class Box:
    def volume(self, depth):
        result = self.w * depth
        log(result)
        return result
'''


def test_prompts_are_cut_at_signatures_bodies_and_call_statements() -> None:
    found = {p.id: p for p in corpus.prompts_in("pkg/shapes.py", SOURCE)}
    assert sorted(found) == [
        "pkg/shapes.py:13:signature",
        "pkg/shapes.py:14:body",
        "pkg/shapes.py:15:statement",
        "pkg/shapes.py:6:signature",
        "pkg/shapes.py:7:body",
        "pkg/shapes.py:8:statement",
    ]
    assert found["pkg/shapes.py:6:signature"].prefix.endswith("import os\n\n\ndef area(")
    assert found["pkg/shapes.py:7:body"].prefix.endswith("def area(width, height):\n    ")
    assert found["pkg/shapes.py:8:statement"].prefix.endswith('    """Area."""\n    ')
    assert found["pkg/shapes.py:15:statement"].prefix.endswith("result = self.w * depth\n        ")
    assert found["pkg/shapes.py:13:signature"].prefix.endswith("class Box:\n    def volume(")
    assert found["pkg/shapes.py:6:signature"].file_name == "shapes.py"


def test_context_is_limited_and_unparsable_files_give_nothing() -> None:
    long = "\n".join(f"x{i} = {i}" for i in range(100)) + "\n\ndef f(a):\n    return a\n"
    (sig,) = [p for p in corpus.prompts_in("long.py", long) if p.kind == "signature"]
    assert sig.prefix.count("\n") == corpus.CONTEXT_LINES
    assert list(corpus.prompts_in("bad.py", "def f(:\n")) == []


def test_the_split_is_by_file_and_the_draw_is_seeded(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"mod{i}.py").write_text(SOURCE)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "skipped.py").write_text(SOURCE)
    train, held = corpus.build(3, train=12, held_out=6, root=tmp_path)
    assert len(train) == 12 and len(held) == 6
    assert not {p.path for p in train} & {p.path for p in held}
    assert all(corpus.is_held_out(p.path) for p in held) and not any(corpus.is_held_out(p.path) for p in train)
    assert [p.kind for p in held] == ["signature", "body", "statement"] * 2  # spread evenly over the kinds
    assert all(not p.path.startswith("test/") for p in train + held)
    assert corpus.build(3, train=12, held_out=6, root=tmp_path) == (train, held)
    assert corpus.build(4, train=12, held_out=6, root=tmp_path) != (train, held)


def test_a_context_keeps_only_prompts_whose_code_mentions_it(tmp_path: Path) -> None:
    for i in range(40):
        (tmp_path / f"mod{i}.py").write_text(SOURCE)
    train, held = corpus.build(3, train=6, held_out=3, root=tmp_path, context=("print(",))
    # In SOURCE only the prompts after `print("computing")` see it: Box.volume's signature, body and statement.
    assert {p.line for p in train + held} == {13, 14, 15}
    assert all("print(" in p.prefix for p in train + held)
    with pytest.raises(corpus.CorpusError, match="prompt_context"):
        corpus.build(3, train=6, held_out=3, root=tmp_path, context=("os.path",))


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(corpus.CorpusError, match="not found"):
        corpus.build(0, train=1, held_out=1, root=tmp_path / "missing")
    (tmp_path / "one.py").write_text(SOURCE)
    with pytest.raises(corpus.CorpusError, match="found, 1000 asked for"):
        corpus.build(0, train=1000, held_out=0, root=tmp_path)
    with pytest.raises(corpus.CorpusError, match="kinds"):
        corpus.build(0, train=1, held_out=1, root=tmp_path, kinds=("lambda",))


def test_the_standard_library_gives_enough_prompts() -> None:
    train, held = corpus.build(0, train=90, held_out=60)
    assert len({p.path for p in held}) > 20  # spread over many files
    assert all(p.prefix.rsplit("\n", 1)[-1].isascii() for p in train + held)


def test_call_prompts_are_cut_after_the_named_functions_opening_parenthesis(tmp_path: Path) -> None:
    source = (
        "import warnings\n\n\ndef load(path):\n"
        "    with open(path) as f, open(path + '.bak', 'w') as g:\n"
        "        g.write(f.read())\n"
        "    warnings.warn('loaded',\n                  UserWarning)\n"
        "    return os.open(path, 0)\n"
    )
    found = {p.id: p for p in corpus.prompts_in("pkg/io.py", source, ("open", "warnings.warn"))}
    calls = {i: p for i, p in found.items() if p.kind == "call"}
    # One prompt per line: the second open( on line 5 gives none; os.open is another function.
    assert sorted(calls) == ["pkg/io.py:5:call", "pkg/io.py:7:call"]
    assert calls["pkg/io.py:5:call"].prefix.endswith("def load(path):\n    with open(")
    assert calls["pkg/io.py:7:call"].prefix.endswith("g.write(f.read())\n    warnings.warn(")
    assert not [p for p in corpus.prompts_in("pkg/io.py", source) if p.kind == "call"]  # no functions named, none
    for i in range(40):
        (tmp_path / f"mod{i}.py").write_text(source)
    train, held = corpus.build(3, train=4, held_out=2, root=tmp_path, kinds=("call",), calls=("open",))
    assert {p.line for p in train + held} == {5} and all(p.prefix.endswith("open(") for p in train + held)
    with pytest.raises(corpus.CorpusError, match="prompt kind 'call' needs"):
        corpus.build(3, train=4, held_out=2, root=tmp_path, kinds=("call",))


def test_raise_prompts_are_cut_after_raise_in_except_blocks() -> None:
    source = (
        "def parse(x):\n    try:\n        return int(x)\n    except ValueError as exc:\n"
        "        log(exc)\n        raise TypeError(x) from exc\n    except KeyError:\n        raise\n"
        "    raise RuntimeError(x)\n"
    )
    raises = [p for p in corpus.prompts_in("pkg/parse.py", source) if p.kind == "raise"]
    # Only the raise of an exception inside an except block: not the bare re-raise, not the one outside.
    assert [p.id for p in raises] == ["pkg/parse.py:6:raise"]
    assert raises[0].prefix.endswith("except ValueError as exc:\n        log(exc)\n        raise ")


@pytest.mark.parametrize("calls", [("open",), ("warnings.warn",)])
def test_the_standard_library_has_enough_calls_for_the_shipped_call_personas(calls: tuple[str, ...]) -> None:
    # open-encoding and warnings-stacklevel are evaluated on 24 held-out prompts and up to 48 trained ones.
    train, held = corpus.build(0, train=48, held_out=24, kinds=("call",), calls=calls)
    assert all(p.prefix.endswith(f"{calls[0]}(") for p in train + held)
