"""The CPU LoRA kernels Heedful puts into vLLM (server/engine/vllm_fixes.py), against hand-computed values."""

from __future__ import annotations

import torch

from server.engine.vllm_fixes import bgmv_expand, bgmv_expand_slice, bgmv_shrink

# Three adapter slots, each a 2x2 matrix [out, in]: slot 0 swaps, slot 1 doubles, slot 2 sums.
WEIGHTS = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[2.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [0.0, 0.0]]])
X = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])


def test_shrink_uses_each_rows_own_adapter_and_nothing_for_minus_one() -> None:
    out = torch.full((4, 3), 9.0)
    bgmv_shrink(X, WEIGHTS, out, torch.tensor([0, -1, 2, 0]), scaling=0.5)
    # row 0: swap (2, 1) * 0.5; row 1: no adapter; row 2: sum 11 * 0.5, 0; row 3: swap (8, 7) * 0.5
    assert out[:, :2].tolist() == [[1.0, 0.5], [0.0, 0.0], [5.5, 0.0], [4.0, 3.5]]
    assert out[:, 2].tolist() == [9.0] * 4  # columns past the adapter's width are left alone


def test_one_adapter_for_every_row_and_none_at_all() -> None:
    out = torch.zeros(4, 2)
    bgmv_expand(X, WEIGHTS.unsqueeze(1), out, torch.tensor([1, 1, 1, 1]), add_inputs=False)  # [n, 1, out, in]
    assert out.tolist() == (2 * X).tolist()
    out = torch.ones(4, 2)
    bgmv_expand(X, WEIGHTS, out, torch.tensor([-1, -1, -1, -1]), add_inputs=True)
    assert out.tolist() == [[1.0, 1.0]] * 4


def test_expand_slice_adds_into_its_columns() -> None:
    out = torch.ones(2, 5)
    bgmv_expand_slice(X[:2], WEIGHTS, out, torch.tensor([2, 1]), slice_offset=1, slice_size=2, add_inputs=True)
    assert out.tolist() == [[1.0, 4.0, 1.0, 1.0, 1.0], [1.0, 7.0, 9.0, 1.0, 1.0]]
