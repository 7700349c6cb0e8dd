"""Checks on a LoRA adapter folder before any engine is asked to load it.

A corrupt or half-written adapter must be refused with a message naming the file, never served.
"""

from __future__ import annotations

import json
from pathlib import Path

from server.engine.base import AdapterError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def check_adapter_dir(path: Path, *, max_rank: int | None = None) -> dict[str, object]:
    """Return the adapter's peft config after checking the folder; raise `AdapterError` otherwise."""
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist")
    config_file = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{config_file} is missing: {path} is not a peft LoRA adapter folder") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{config_file} is not readable JSON ({exc}): the adapter is corrupt") from None
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise AdapterError(f"{config_file} does not describe a LoRA adapter (peft_type must be LORA)")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(f"{config_file} has rank r = {rank!r}: it must be a positive integer")
    if max_rank is not None and rank > max_rank:
        raise AdapterError(
            f"{path} has LoRA rank {rank}, above engine.max_lora_rank {max_rank}: raise the setting or retrain"
        )
    weights = [path / name for name in ADAPTER_WEIGHTS if (path / name).exists()]
    if not weights:
        raise AdapterError(f"{path} has no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    if weights[0].suffix == ".safetensors":
        _check_safetensors_header(weights[0])
    return config


def _check_safetensors_header(file: Path) -> None:
    """A truncated safetensors file is caught here: the header names every tensor's byte range."""
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ValueError("shorter than its 8-byte header length")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(fh.read(header_len))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{file} is corrupt ({exc}): the adapter cannot be served") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise AdapterError(
            f"{file} is truncated or padded ({size} bytes, header promises {8 + header_len + end}): "
            "the adapter cannot be served"
        )
