"""Adapter folder checks: a corrupt or half-written adapter is refused before any engine sees it."""

from __future__ import annotations

import json
import re
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


def write_weights(path: Path, header: bytes, payload: bytes = b"\0" * 16) -> Path:
    """An adapter folder whose safetensors file has exactly this header (raw bytes) and payload."""
    write_adapter(path)
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + payload)
    return path


def tensor(**fields: object) -> dict[str, object]:
    return {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **fields}


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"{not json", "header is not valid JSON"),
        (b"\xff\xfe{}", "header is not valid JSON"),
        (b"[" * 100_000, "header is not valid JSON"),
        (json.dumps([1, 2]).encode(), "header is a list, not a JSON object"),
        (json.dumps({"w": [0, 16]}).encode(), "tensor 'w' is described by a list, not an object"),
        (json.dumps({"w": {"dtype": "F32", "shape": [4]}}).encode(), "tensor 'w' has no data_offsets"),
        (json.dumps({"w": tensor(data_offsets=[0])}).encode(), "tensor 'w' has data_offsets [0]"),
        (json.dumps({"w": tensor(data_offsets=["0", 16])}).encode(), "tensor 'w' has data_offsets"),
        (json.dumps({"w": tensor(data_offsets=[16, 0])}).encode(), "tensor 'w' has data_offsets [16, 0]"),
        (json.dumps({"w": tensor(dtype="F33")}).encode(), "tensor 'w' has dtype 'F33'"),
        (json.dumps({"w": tensor(shape=[4, -1])}).encode(), "tensor 'w' has shape [4, -1]"),
        (json.dumps({"w": tensor(shape="4")}).encode(), "tensor 'w' has shape '4'"),
        (json.dumps({"w": tensor(shape=[5])}).encode(), "tensor 'w' spans 16 bytes, but F32 [5] needs 20"),
        (
            json.dumps({"a": tensor(data_offsets=[0, 16]), "b": tensor(data_offsets=[8, 24])}).encode(),
            "tensors 'a' and 'b' overlap or leave a gap",
        ),
        (json.dumps({"__metadata__": [1], "w": tensor()}).encode(), "__metadata__ is a list, not an object"),
    ],
)
def test_a_malformed_safetensors_header_is_an_adapter_error_naming_the_problem(
    tmp_path: Path, header: bytes, message: str
) -> None:
    """Whatever the header holds, the check raises the engine's own error (the serving path catches it)
    with the file, the problem and the fix; never a KeyError or TypeError that escapes the handlers."""
    a = write_weights(tmp_path / "a", header, b"\0" * 24)
    with pytest.raises(AdapterError, match=re.escape(message)) as caught:
        check_adapter_dir(a)
    text = str(caught.value)
    assert str(a / "adapter_model.safetensors") in text and "cannot be served" in text


def test_a_well_formed_header_with_metadata_and_two_tensors_passes(tmp_path: Path) -> None:
    header = {
        "__metadata__": {"format": "pt"},
        "b": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [16, 24]},
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
    }
    a = write_weights(tmp_path / "a", json.dumps(header).encode(), b"\0" * 24)
    assert check_adapter_dir(a)["r"] == 8
