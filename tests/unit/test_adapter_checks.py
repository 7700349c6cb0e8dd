"""Adapter folder checks: a corrupt or half-written adapter is refused before any engine sees it."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from server.engine import AdapterError, AdapterRef
from server.engine.adapters import check_adapter_dir


def write_adapter(path: Path, *, rank: int = 8, peft_type: str = "LORA", payload: int = 16) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, "r": rank}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [payload // 4], "data_offsets": [0, payload]}}).encode()
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * payload)
    return path


def test_valid_adapter_passes(tmp_path: Path) -> None:
    config = check_adapter_dir(write_adapter(tmp_path / "a"), max_rank=16)
    assert config["r"] == 8


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        check_adapter_dir(tmp_path / "none")


def test_missing_or_broken_config(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a")
    (a / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match="adapter_config.json is not readable JSON"):
        check_adapter_dir(a)
    (a / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        check_adapter_dir(a)


def test_not_lora_or_bad_rank(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="peft_type must be LORA"):
        check_adapter_dir(write_adapter(tmp_path / "a", peft_type="IA3"))
    with pytest.raises(AdapterError, match="rank r = 0"):
        check_adapter_dir(write_adapter(tmp_path / "b", rank=0))
    with pytest.raises(AdapterError, match="LoRA rank 32, above engine.max_lora_rank 16"):
        check_adapter_dir(write_adapter(tmp_path / "c", rank=32), max_rank=16)


def test_missing_truncated_or_garbage_weights(tmp_path: Path) -> None:
    a = write_adapter(tmp_path / "a")
    weights = a / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    with pytest.raises(AdapterError, match="is truncated or padded"):
        check_adapter_dir(a)
    weights.write_bytes(b"\x01\x02")
    with pytest.raises(AdapterError, match="shorter than its 8-byte header"):
        check_adapter_dir(a)
    weights.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(AdapterError, match="header length .* exceeds the file"):
        check_adapter_dir(a)
    weights.unlink()
    with pytest.raises(AdapterError, match="has no adapter weights"):
        check_adapter_dir(a)


@pytest.mark.parametrize(("name", "lora_id"), [("", 1), ("has space", 1), ("-leading", 1), ("ok", 0)])
def test_adapter_refs_are_validated(tmp_path: Path, name: str, lora_id: int) -> None:
    with pytest.raises(AdapterError):
        AdapterRef(name, lora_id, tmp_path)
