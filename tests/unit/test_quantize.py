"""Int8 weights (`server/engine/quantize.py`): the row quantizer against hand-computed values, and the
checks on what can be quantized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.engine.quantize import is_projection, quantize_model, quantize_rows
from server.model_prep import ModelError


def test_rows_are_rounded_to_their_largest_magnitude_over_127() -> None:
    w = torch.tensor([[1.0, -0.6, 0.25], [0.0, 0.0, 0.0], [-2.54, 1.26, 0.06]])
    q, scale = quantize_rows(w)
    # row 0: scale 1/127, -0.6 * 127 = -76.2, 0.25 * 127 = 31.75; row 1: all zero, scale 1;
    # row 2: scale 2.54 / 127 = 0.02, 1.26 / 0.02 = 63, 0.06 / 0.02 = 3
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.tolist() == [[127, -76, 32], [0, 0, 0], [-127, 63, 3]]
    assert scale.shape == (3, 1)
    assert scale[:, 0].tolist() == pytest.approx([1 / 127, 1.0, 0.02])


def test_only_decoder_projections_are_quantized() -> None:
    assert is_projection("model.layers.0.self_attn.q_proj.weight")
    assert is_projection("model.layers.23.mlp.down_proj.weight")
    assert not is_projection("model.layers.0.self_attn.q_proj.bias")
    assert not is_projection("model.layers.0.input_layernorm.weight")
    assert not is_projection("lm_head.weight")
    assert not is_projection("model.embed_tokens.weight")


def test_a_model_of_another_kind_is_refused_with_the_fix(tmp_path: Path) -> None:
    source = tmp_path / "gpt2"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    with pytest.raises(ModelError, match="'gpt2' model: set engine.quantization = none"):
        quantize_model(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_auto_is_int8_for_a_float_llama_or_qwen2_model_on_a_cpu(tmp_path: Path) -> None:
    from server.engine.quantize import chosen_quantization

    def folder(name: str, config: dict[str, object]) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
        return path

    qwen = folder("qwen", {"model_type": "qwen2"})
    gpt2 = folder("gpt2", {"model_type": "gpt2"})
    awq = folder("awq", {"model_type": "llama", "quantization_config": {"quant_method": "awq"}})
    assert chosen_quantization("auto", qwen, gpu=False) == "int8"
    assert chosen_quantization("auto", qwen, gpu=True) == "none"
    assert chosen_quantization("auto", gpt2, gpu=False) == "none"
    assert chosen_quantization("auto", awq, gpu=False) == "none"
    assert chosen_quantization("auto", tmp_path / "missing", gpu=False) == "none"
    assert chosen_quantization("none", qwen, gpu=False) == "none"
    assert chosen_quantization("int8", gpt2, gpu=True) == "int8"  # asked for: the engine says why it cannot
