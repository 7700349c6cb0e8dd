"""Checks on a LoRA adapter folder before any engine is asked to load it.

A corrupt or half-written adapter must be refused with a message naming the file, never served.
"""

from __future__ import annotations

import json
import math
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


# Bytes per element of every safetensors dtype a LoRA adapter can hold (the format's own names).
_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2": 1,
    "F8_E5M2FNUZ": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
    "C64": 8,
}


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_safetensors_header(file: Path) -> None:
    """Check the header of a safetensors file against the file, so that a truncated, padded or hand-made
    file is refused here with `AdapterError` (which every serving path handles) instead of failing inside
    vLLM or peft, or escaping as a `KeyError`: the header must be a JSON object naming, for every tensor,
    a known dtype, a shape and the byte range it occupies; the ranges must tile the data without gaps or
    overlaps (as the format requires) and end where the file ends."""
    fix = "the adapter cannot be served; publish it again from the trained folder, or roll back"
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise AdapterError(f"{file} is corrupt (shorter than its 8-byte header length): {fix}")
            header_len = int.from_bytes(raw_len, "little")
            if header_len > size - 8:
                raise AdapterError(f"{file} is corrupt (header length {header_len} exceeds the file): {fix}")
            raw = fh.read(header_len)
    except OSError as exc:
        raise AdapterError(f"{file} cannot be read ({exc.strerror or exc}): {fix}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 and bad JSON are ValueErrors; deep nesting recurses
        reason = str(exc) if isinstance(exc, ValueError) else "nested too deeply"
        raise AdapterError(f"{file} is corrupt: its header is not valid JSON ({reason}): {fix}") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{file} is corrupt: its header is a {type(header).__name__}, not a JSON object: {fix}")
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise AdapterError(
                    f"{file} is corrupt: its __metadata__ is a {type(entry).__name__}, not an object: {fix}"
                )
            continue
        spans.append(_tensor_span(file, name, entry, fix))
    spans.sort()
    end = 0
    for (start, stop, name), previous in zip(spans, [None, *spans[:-1]], strict=True):
        if start != end:
            after = f"tensors {previous[2]!r} and {name!r}" if previous else f"tensor {name!r}"
            raise AdapterError(
                f"{file} is corrupt: {after} overlap or leave a gap (data_offsets start at {start}, expected {end}): "
                f"{fix}"
            )
        end = stop
    if 8 + header_len + end != size:
        raise AdapterError(
            f"{file} is truncated or padded ({size} bytes, header promises {8 + header_len + end}): {fix}"
        )


def _tensor_span(file: Path, name: str, entry: object, fix: str) -> tuple[int, int, str]:
    """(start, end, name) of one tensor of a safetensors header, after checking its description."""
    where = f"{file} is corrupt: tensor {name!r}"
    if not isinstance(entry, dict):
        raise AdapterError(f"{where} is described by a {type(entry).__name__}, not an object: {fix}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if offsets is None:
        raise AdapterError(f"{where} has no data_offsets: {fix}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))) or (
        offsets[0] > offsets[1]
    ):
        raise AdapterError(f"{where} has data_offsets {offsets!r}: expected [start, end] with 0 <= start <= end: {fix}")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise AdapterError(f"{where} has dtype {dtype!r}, which is not a safetensors dtype: {fix}")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise AdapterError(f"{where} has shape {shape!r}: expected a list of sizes >= 0: {fix}")
    needed = math.prod(shape) * _DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != needed:
        raise AdapterError(f"{where} spans {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs {needed}: {fix}")
    return offsets[0], offsets[1], name
