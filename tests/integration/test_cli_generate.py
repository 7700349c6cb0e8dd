"""`heedful generate` as a user runs it: real engine, output on stdout, errors on stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine


def heedful(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ),
        timeout=600,
    )


def test_generate_json_from_stdin(tmp_path: Path, small_model: Path) -> None:
    # On the small model (the default model's engine start is tested where a developer meets it:
    # test_default_model.py, test_ability_gate.py): half a minute less of make test on 2 AMD EPYC cores.
    config = tmp_path / "heedful.toml"
    config.write_text(f'[model]\npath = "{small_model}"\n\n[engine]\nkv_cache_gib = 1\n')
    proc = heedful(
        "--config",
        str(config),
        "generate",
        "--json",
        "-n",
        "2",
        "--seed",
        "3",
        "--temperature",
        "1.0",
        "--max-tokens",
        "8",
        stdin="def greet(name):",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)  # stdout holds the result and nothing else
    assert out["prompt_tokens"] > 0
    assert len(out["candidates"]) == 2
    for cand in out["candidates"]:
        assert 0 < len(cand["token_ids"]) <= 8
        assert len(cand["logprobs"]) == len(cand["token_ids"])
        assert cand["finish_reason"] in ("stop", "length")


def test_generate_errors_are_one_line_with_the_fix(tmp_path: Path) -> None:
    proc = heedful("generate", str(tmp_path / "nope.py"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"heedful: prefix file {tmp_path / 'nope.py'} does not exist"
    empty = tmp_path / "empty.py"
    empty.write_text("   \n")
    proc = heedful("generate", str(empty))
    assert proc.returncode == 2
    assert "the prefix is empty" in proc.stderr
    assert proc.stdout == ""
