"""Rewriting a projection's weight inside the kernel vLLM's CPU backend chose for it, on this machine.

vLLM picks the kernel per layer and CPU (`dispatch_cpu_unquantized_gemm`): an AMX-packed tensor on CPUs
with AMX for small weights, a oneDNN handler for the rest and on CPUs without AMX (AMD EPYC). These
tests hand real layers to that real dispatch, so they exercise whichever kernels this CPU gets, and
check what merged serving relies on: after a write the layer computes with the new weight, and writing
the pristine weight back gives the original outputs bit for bit.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from server.engine.merging import MergeUnsupported, _weight_writer

vllm_utils = pytest.importorskip("vllm.model_executor.layers.utils", reason="vLLM is installed by `make setup`")

# (out_features, in_features): under 1 MiB in bfloat16 (AMX-packed where AMX exists), and over it
# (oneDNN unless the embedded engine packs everything up to 16 MiB for AMX): 4864 x 896 is
# Qwen2.5-Coder-0.5B's gate/up projection.
SHAPES = [(64, 64), (896, 896), (4864, 896)]


def dispatched(out_features: int, in_features: int, seed: int) -> tuple[torch.nn.Linear, torch.Tensor]:
    """A bfloat16 linear layer after vLLM's CPU dispatch (which drops the layer's own weight), and its weight."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    weight = layer.weight.detach().clone()
    vllm_utils.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)
    return layer, weight


def run(layer: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = layer.cpu_linear(x, layer.weight, None)
    return out


def kernel_state(layer: Any) -> set[str]:
    return set(layer.cpu_linear.__code__.co_freevars)


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
def test_a_written_weight_is_what_the_kernel_computes_with_and_the_pristine_one_restores_it(
    out_features: int, in_features: int
) -> None:
    layer, pristine = dispatched(out_features, in_features, seed=out_features)
    state = kernel_state(layer)
    amx_packed = vllm_utils.check_cpu_sgl_kernel(out_features, in_features, torch.bfloat16)
    assert ("packed_weight" in state) if amx_packed else ("handler" in state), state
    x = torch.randn(5, in_features, dtype=torch.bfloat16)
    before = run(layer, x)
    write = _weight_writer(layer)
    merged = (pristine.float() + 0.05 * torch.randn(out_features, in_features)).to(torch.bfloat16)
    write(merged)
    after = run(layer, x)
    # The kernel and torch's reference both accumulate in float32 and round the output to bfloat16 once:
    # they may differ by a rounding step of the output (2**-8 relative) and a float32 summation order.
    torch.testing.assert_close(after, torch.nn.functional.linear(x, merged), rtol=2**-7, atol=1e-2)
    assert not torch.equal(after, before)
    write(pristine)
    assert torch.equal(run(layer, x), before)  # exact unmerge


def test_the_plain_torch_fallback_is_written_through_the_layer_weight() -> None:
    layer = torch.nn.Linear(8, 4, bias=False)
    # no kernel state, as vLLM's plain torch fallback
    setattr(layer, "cpu_linear", lambda x, weight, bias: torch.nn.functional.linear(x, weight, bias))  # noqa: B010
    new = torch.arange(32, dtype=torch.float32).reshape(4, 8)
    _weight_writer(layer)(new)
    assert torch.equal(layer.weight.detach(), new)


def test_a_kernel_holding_its_weight_some_other_way_is_refused_before_anything_is_written() -> None:
    # zentorch's prepacked path keeps its weight in a cell named zen_weight: Heedful cannot rewrite it.
    zen_weight = torch.ones(4, 8)

    def zen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return x @ zen_weight.t()

    layer = torch.nn.Linear(8, 4, bias=False)
    setattr(layer, "cpu_linear", zen_linear)  # noqa: B010
    with pytest.raises(MergeUnsupported, match=r"holds zen_weight\); adapters are served through multi-LoRA"):
        _weight_writer(layer)
    assert torch.equal(zen_weight, torch.ones(4, 8))


def test_a_onednn_handler_of_an_unknown_layout_is_refused() -> None:
    handler = object()  # no handler_tensor, n or k

    layer = torch.nn.Linear(8, 4, bias=False)
    setattr(layer, "cpu_linear", lambda x, weight, bias: (handler, x)[1])  # noqa: B010
    with pytest.raises(MergeUnsupported, match="oneDNN handler of a layout Heedful does not know"):
        _weight_writer(layer)


def test_a_weight_of_another_shape_is_refused_by_the_onednn_writer() -> None:
    # 18 MiB: oneDNN on every CPU, even where the embedded engine raised the AMX bound to 16 MiB
    layer, _ = dispatched(9216, 1024, seed=3)
    assert "handler" in kernel_state(layer)
    with pytest.raises(MergeUnsupported, match=r"for a \(9216, 1024\) weight, not \(4, 1024\)"):
        _weight_writer(layer)(torch.zeros(4, 1024, dtype=torch.bfloat16))
