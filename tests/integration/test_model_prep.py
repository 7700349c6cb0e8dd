"""Default model preparation: the converted folder reproduces the GGUF model, verification catches every
kind of damage with a message that names the file and the fix, and a prepared model is not redone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server import paths
from server.model_prep import GGUF_NAME, MANIFEST, ModelError, prepare_default_model, verify_model


def test_prepared_model_verifies_with_checksums(default_model: Path) -> None:
    info = verify_model(default_model)
    assert info["manifest"] is True
    manifest = json.loads((default_model / MANIFEST).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["source"]["gguf"] == GGUF_NAME


def test_prepare_skips_a_verified_model(default_model: Path) -> None:
    before = (default_model / "model.safetensors").stat().st_mtime_ns
    result = prepare_default_model(default_model)
    assert result.prepared is False
    assert (default_model / "model.safetensors").stat().st_mtime_ns == before
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "model", "prepare"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "already prepared and verified" in proc.stdout


def test_converted_weights_reproduce_the_gguf_model(default_model: Path, hf_model: Any) -> None:
    """Logits of the safetensors folder equal those of transformers' own GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = paths.cache_dir() / "gguf" / GGUF_NAME
    assert gguf.exists(), "make setup keeps the extracted GGUF in the cache dir"
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(default_model))
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        diff = (hf_model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.fixture
def model_copy(default_model: Path, tmp_path: Path) -> Path:
    """A copy of the prepared model whose big weights file is a hard link (or symlink), not a copy."""
    copy = tmp_path / "model"
    copy.mkdir()
    for f in default_model.iterdir():
        if f.name == "model.safetensors":
            try:
                os.link(f, copy / f.name)
            except OSError:
                (copy / f.name).symlink_to(f)
        else:
            shutil.copy2(f, copy / f.name)
    return copy


def test_changed_file_fails_the_checksum(model_copy: Path) -> None:
    cfg = model_copy / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace("<|im_end|>", "<|im_END|>"))
    with pytest.raises(ModelError, match=r"tokenizer_config.json does not match its sha256 checksum"):
        verify_model(model_copy)


def test_truncated_weights_are_caught_by_size(model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    weights.unlink()
    weights.write_bytes(b"\0" * 1000)
    with pytest.raises(ModelError, match=r"model.safetensors has 1000 bytes, the manifest says"):
        verify_model(model_copy)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: shutil.rmtree(d), "does not exist"),
        (lambda d: (d / "config.json").unlink(), "config.json is missing"),
        (lambda d: (d / "config.json").write_text("{"), "config.json is not readable JSON"),
        (lambda d: (d / "config.json").write_text("{}"), "has no model_type"),
        (lambda d: (d / "tokenizer.json").unlink() or (d / "tokenizer_config.json").unlink(), "has no tokenizer"),
        (lambda d: (d / "model.safetensors").unlink(), "has no \\*.safetensors weights"),
        (lambda d: (d / MANIFEST).write_text("[]"), "heedful-model.json is corrupt"),
    ],
)
def test_damage_is_reported_with_the_file(model_copy: Path, damage: Any, message: str) -> None:
    damage(model_copy)
    with pytest.raises(ModelError, match=message):
        verify_model(model_copy)


def test_message_for_the_default_model_says_how_to_prepare_again(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HEEDFUL_DATA_DIR", str(tmp_path))
    with pytest.raises(ModelError) as info:
        verify_model(paths.default_model_dir())
    assert "run `heedful model prepare --force`" in str(info.value)
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "model", "verify"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, HEEDFUL_DATA_DIR=str(tmp_path)),
    )
    assert proc.returncode == 1
    assert "heedful model prepare --force" in proc.stderr


def test_admin_model_folder_without_manifest_is_accepted(model_copy: Path) -> None:
    (model_copy / MANIFEST).unlink()
    assert verify_model(model_copy)["manifest"] is False


def test_prepare_with_a_missing_gguf_names_it(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="--gguf .*missing.gguf does not exist"):
        prepare_default_model(tmp_path / "out", gguf=tmp_path / "missing.gguf")
