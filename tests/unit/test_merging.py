"""Merged adapter serving, the pure part: peft factors read from a folder, the scaling peft uses, the
stacked update for engine projections that fuse several modules, and the rounding of the merged weight."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from server.engine.base import AdapterError
from server.engine.merging import (
    LoraFactors,
    MergeUnsupported,
    adapter_scaling,
    fused_delta,
    merged_weight,
    read_adapter,
)

Q = "model.layers.0.self_attn.q_proj"
K = "model.layers.0.self_attn.k_proj"
V = "model.layers.0.self_attn.v_proj"


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config: object) -> Path:
    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj", "v_proj"]} | config
    (folder / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )
    return folder


def test_scaling_is_alpha_over_rank_with_rslora_and_patterns() -> None:
    assert adapter_scaling({"r": 8, "lora_alpha": 16}, Q) == 2.0
    assert adapter_scaling({"r": 8, "lora_alpha": 16, "use_rslora": True}, Q) == pytest.approx(16 / math.sqrt(8))
    assert adapter_scaling({"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}}, Q) == 4.0
    assert adapter_scaling({"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}}, V) == 2.0
    assert adapter_scaling({"r": 8, "lora_alpha": 16, "alpha_pattern": {"v_proj": 8}}, V) == 1.0


def test_fused_delta_stacks_parts_with_zero_rows_for_untouched_ones() -> None:
    factors = {
        # q: 0.5 * [[1], [2]] @ [[1, 0]] = [[0.5, 0], [1, 0]]
        Q: LoraFactors(a=torch.tensor([[1.0, 0.0]]), b=torch.tensor([[1.0], [2.0]]), scaling=0.5),
        # v: 1.0 * [[3]] @ [[0, 1]] = [[0, 3]]
        V: LoraFactors(a=torch.tensor([[0.0, 1.0]]), b=torch.tensor([[3.0]]), scaling=1.0),
    }
    delta = fused_delta([Q, K, V], [2, 1, 1], 2, factors)
    assert delta is not None
    assert delta.tolist() == [[0.5, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 3.0]]
    assert fused_delta(["model.layers.0.mlp.gate_proj"], [4], 2, factors) is None


def test_fused_delta_refuses_an_adapter_for_another_model() -> None:
    factors = {Q: LoraFactors(a=torch.ones(1, 3), b=torch.ones(2, 1), scaling=1.0)}
    with pytest.raises(AdapterError, match=r"q_proj is \(2, 3\) but the model's weight is \(2, 2\)"):
        fused_delta([Q, K, V], [2, 1, 1], 2, factors)


def test_merged_weight_sums_in_float32_and_rounds_once() -> None:
    base = torch.tensor([1.0], dtype=torch.bfloat16)
    # bfloat16 steps by 2**-7 near 1: adding 0.005 in two bf16 halves would round away both times.
    merged = merged_weight(base, torch.tensor([0.005]))
    assert merged.dtype == torch.bfloat16
    assert merged.item() == 1.0078125
    assert merged_weight(base, None) is base


def test_read_adapter_gives_factors_by_model_module_name(tmp_path: Path) -> None:
    folder = write_adapter(
        tmp_path / "ok",
        {
            f"{Q}.lora_A.weight": torch.ones(1, 4),
            f"{Q}.lora_B.weight": torch.full((4, 1), 2.0),
            f"{V}.lora_A.weight": torch.ones(1, 4),
            f"{V}.lora_B.weight": torch.ones(2, 1),
        },
    )
    factors = read_adapter(folder)
    assert sorted(factors) == [Q, V]
    assert factors[Q].scaling == 2.0
    assert factors[Q].delta().tolist() == [[4.0] * 4] * 4


def test_read_adapter_refuses_what_cannot_be_merged(tmp_path: Path) -> None:
    lora = {f"{Q}.lora_A.weight": torch.ones(1, 4), f"{Q}.lora_B.weight": torch.ones(4, 1)}
    with pytest.raises(MergeUnsupported, match="DoRA"):
        read_adapter(write_adapter(tmp_path / "dora", lora, use_dora=True))
    with pytest.raises(MergeUnsupported, match="trains modules in full"):
        read_adapter(write_adapter(tmp_path / "saved", lora, modules_to_save=["lm_head"]))
    with pytest.raises(MergeUnsupported, match="embed_tokens.weight, which is not a LoRA factor"):
        read_adapter(write_adapter(tmp_path / "extra", lora | {"model.embed_tokens.weight": torch.ones(2, 2)}))
    with pytest.raises(AdapterError, match="no matching .*q_proj.lora_B.weight"):
        read_adapter(write_adapter(tmp_path / "half", {f"{Q}.lora_A.weight": torch.ones(1, 4)}))
    with pytest.raises(AdapterError, match="do not multiply"):
        read_adapter(
            write_adapter(
                tmp_path / "bad", {f"{Q}.lora_A.weight": torch.ones(2, 4), f"{Q}.lora_B.weight": torch.ones(4, 1)}
            )
        )
