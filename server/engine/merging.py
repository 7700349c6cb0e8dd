"""Merged serving: one developer's LoRA adapter folded into the engine's own weights.

On a laptop the embedded engine serves one developer. Serving their adapter through vLLM's multi-LoRA
path costs 1.1-2.3x the base model's time on a CPU (bench.latency: every projection runs two extra small
matmuls). Folding the adapter into the weights,
W' = W + scaling * B @ A for each target projection, gives the same function at no cost per token.

This module has two halves:

* pure functions on tensors (`read_adapter`, `fused_delta`, `merged_weight`), unit-tested by hand;
* `MergeWorkerExtension`, which vLLM mixes into its worker (`worker_extension_cls`) so that the engine
  process can call `heedful_merge(path)` through `collective_rpc`. It rewrites the weights *in place*
  (including the CPU backend's copies: AMX-packed tensors and oneDNN handlers, see `_weight_writer`),
  keeping a pristine copy of every touched projection from the model folder so that unmerging is exact.
  `heedful_merge_check()` tells at start, before any request, whether every projection an adapter may
  target can be rewritten on this machine.

The engine (`server/engine/embedded.py`) decides when to merge and makes each switch atomic with respect
to requests: it drains the requests in flight, switches, clears the prefix cache, then admits new ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.engine.adapters import check_adapter_dir
from server.engine.base import AdapterError
from server.engine.quantize import quantized_from

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."
LORA_A = ".lora_A.weight"
LORA_B = ".lora_B.weight"


class MergeUnsupported(AdapterError):
    """This adapter or this engine build cannot be merged; the multi-LoRA path serves it instead."""


@dataclass(frozen=True, slots=True)
class LoraFactors:
    """One target module's adapter: its update is scaling * B @ A."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scaling: float

    def delta(self) -> torch.Tensor:
        """scaling * B @ A in float32, [out_features, in_features]."""
        return (self.b.float() @ self.a.float()) * self.scaling


def adapter_scaling(config: dict[str, Any], module: str) -> float:
    """peft's scaling for one module: alpha / r (alpha / sqrt(r) with rsLoRA), per-module patterns honoured."""
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    for pattern, value in (config.get("rank_pattern") or {}).items():
        if module.endswith(pattern):
            rank = int(value)
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if module.endswith(pattern):
            alpha = float(value)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def read_adapter(path: Path) -> dict[str, LoraFactors]:
    """The adapter's factors by module path as the base model names it (`model.layers.0.self_attn.q_proj`).

    Raises `MergeUnsupported` for adapters whose update is not W + s * B @ A on linear weights (DoRA,
    modules trained in full, embeddings), and `AdapterError` for a damaged folder.
    """
    from safetensors.torch import load_file

    config = check_adapter_dir(path)
    if config.get("use_dora"):
        raise MergeUnsupported(f"{path} is a DoRA adapter: its update is not a plain low-rank sum")
    if config.get("modules_to_save"):
        raise MergeUnsupported(f"{path} trains modules in full ({config['modules_to_save']}): not mergeable")
    weights = path / "adapter_model.safetensors"
    if not weights.exists():
        raise MergeUnsupported(f"{path} holds its weights as a pickle (adapter_model.bin): save it as safetensors")
    tensors = load_file(str(weights))
    factors: dict[str, LoraFactors] = {}
    for key, a in tensors.items():
        if not key.endswith(LORA_A):
            if not key.endswith(LORA_B):
                raise MergeUnsupported(f"{weights} holds {key}, which is not a LoRA factor: not mergeable")
            continue
        stem = key[: -len(LORA_A)]
        b = tensors.get(stem + LORA_B)
        if b is None:
            raise AdapterError(f"{weights} has {key} but no matching {stem + LORA_B}: the adapter is corrupt")
        module = stem.removeprefix(PEFT_PREFIX)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{weights}: {module} has factors {tuple(a.shape)} and {tuple(b.shape)}, which do not multiply"
            )
        factors[module] = LoraFactors(a, b, adapter_scaling(config, module))
    if not factors:
        raise AdapterError(f"{weights} holds no LoRA factors")
    return factors


def fused_delta(
    parts: list[str], out_sizes: list[int], in_features: int, factors: dict[str, LoraFactors]
) -> torch.Tensor | None:
    """The update for one engine projection that stacks `parts` (e.g. q, k, v into qkv) row-wise.

    `out_sizes[i]` is the output width of `parts[i]`; parts the adapter does not touch get zero rows.
    None when the adapter touches none of them.
    """
    import torch

    if not any(p in factors for p in parts):
        return None
    blocks = []
    for part, rows in zip(parts, out_sizes, strict=True):
        found = factors.get(part)
        if found is None:
            blocks.append(torch.zeros(rows, in_features))
            continue
        block = found.delta()
        if tuple(block.shape) != (rows, in_features):
            raise AdapterError(
                f"adapter update for {part} is {tuple(block.shape)} but the model's weight is "
                f"({rows}, {in_features}): the adapter was trained for another model"
            )
        blocks.append(block)
    return torch.cat(blocks, dim=0)


def merged_weight(base: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """base + delta, summed in float32 and rounded once to the base's dtype."""
    if delta is None:
        return base
    return (base.float() + delta).to(base.dtype)


# --- inside vLLM's worker process -------------------------------------------------------------------


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a Hugging Face model folder (sharded or not)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        mapping = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: model_dir / file for name, file in mapping.items()}
    single = model_dir / "model.safetensors"
    if not single.exists():
        raise MergeUnsupported(f"{model_dir} has no safetensors weights, so no pristine copy to merge onto")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as fh:
        return {name: single for name in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)


# vLLM's dispatch (`dispatch_cpu_unquantized_gemm`) builds its oneDNN handlers with a primitive cache of 32.
ONEDNN_PRIMITIVE_CACHE = 32


def _weight_writer(layer: Any, dtype: torch.dtype | None = None) -> Callable[[torch.Tensor], None]:
    """How to put a new weight into a vLLM linear layer in place. Raises `MergeUnsupported` before
    anything is written when the layer's kernel keeps its weight where it cannot be rewritten. `dtype`:
    the engine's activation type (what an int8 layer's kernel writes out).

    vLLM's CPU backend picks one kernel per layer (`dispatch_cpu_unquantized_gemm`) and may drop the
    layer's own weight, keeping only the kernel's copy:

    * AMX CPUs, small weights ("sgl"): a VNNI-packed tensor in the closure cell `packed_weight`,
      overwritten with the repacked new weight;
    * everywhere else with oneDNN (AMD EPYC with AVX-512, Intel without AMX, large weights on AMX): a
      oneDNN matmul handler in the cell `handler`, which holds its own reordered copy of the weight. The
      handler's address lives in a one-element tensor (`handler_tensor`); a new native handler is built
      from the new weight, its address written into that tensor, and the old native handler released;
    * the plain `torch.nn.functional.linear` fallback (and GPUs): the layer's weight parameter;
    * int8 layers (`engine.quantization = int8`): the new weight is quantized first (`_int8_writer`).

    In place matters: whatever holds the tensors (the kernel closure, a compiled graph) sees the new
    weight without being rebuilt. Kernels whose copy is opaque in any other way (zentorch's prepacked
    weight, another vLLM's layout) are refused here, so the adapter is served through multi-LoRA.
    """
    import torch

    scheme = getattr(layer, "scheme", None)
    if scheme is not None:  # a quantized layer (compressed-tensors): its kernel holds the weight
        return _int8_writer(layer, getattr(scheme, "kernel", None), dtype)
    gemm = getattr(layer, "cpu_linear", None)
    closure = getattr(gemm, "__closure__", None) or ()
    cells = dict(zip(getattr(getattr(gemm, "__code__", None), "co_freevars", ()), closure, strict=False))
    param = getattr(layer, "weight", None)
    if "packed_weight" in cells:  # beside it only the output width N
        packed = cells["packed_weight"].cell_contents

        def write_packed(weight: torch.Tensor) -> None:
            fresh = torch.ops._C.convert_weight_packed(weight)
            if fresh.shape != packed.shape or fresh.dtype != packed.dtype:
                raise MergeUnsupported("the CPU backend packed this weight differently than before: cannot merge")
            packed.copy_(fresh)

        return write_packed
    if "handler" in cells:
        return _onednn_writer(layer, cells["handler"].cell_contents)
    if cells:
        raise MergeUnsupported(
            f"vLLM serves {type(layer).__name__} through a CPU kernel whose weights Heedful cannot rewrite "
            f"(its kernel holds {', '.join(sorted(cells))}); adapters are served through multi-LoRA"
        )
    if param is None or param.numel() == 0:
        raise MergeUnsupported(f"no writable weight found in {type(layer).__name__}: cannot merge")

    def write_param(weight: torch.Tensor) -> None:
        param.data.copy_(weight.view_as(param))

    return write_param


def _onednn_writer(layer: Any, handler: Any) -> Callable[[torch.Tensor], None]:
    """The writer for a layer served by a vLLM oneDNN matmul handler (see `_weight_writer`)."""
    import torch

    slot = getattr(handler, "handler_tensor", None)
    shape = (getattr(handler, "n", None), getattr(handler, "k", None))
    ops = torch.ops._C
    if (
        not isinstance(slot, torch.Tensor)
        or slot.numel() != 1
        or slot.dtype != torch.int64
        or not all(isinstance(d, int) and d > 0 for d in shape)
        or not hasattr(ops, "create_onednn_mm_handler")
        or not hasattr(ops, "release_dnnl_matmul_handler")
    ):
        raise MergeUnsupported(
            f"vLLM serves {type(layer).__name__} through a oneDNN handler of a layout Heedful does not know "
            f"({type(handler).__name__}); adapters are served through multi-LoRA"
        )

    def write_onednn(weight: torch.Tensor) -> None:
        if tuple(weight.shape) != shape:
            raise MergeUnsupported(f"the oneDNN handler is for a {shape} weight, not {tuple(weight.shape)}")
        # The handler reorders the weight into memory of its own: `weight` may be freed afterwards.
        fresh = int(ops.create_onednn_mm_handler(weight.t(), ONEDNN_PRIMITIVE_CACHE))
        old = int(slot.item())
        slot.fill_(fresh)
        ops.release_dnnl_matmul_handler(old)

    return write_onednn


def _int8_writer(layer: Any, kernel: Any, dtype: torch.dtype | None) -> Callable[[torch.Tensor], None]:
    """The writer for a W8A8 int8 layer served by vLLM's CPU int8 kernel (`CPUInt8ScaledMMLinearKernel`).

    The new float weight is quantized with `quantize.quantize_rows`, the function that made the int8
    folder, so writing the pristine float weight back gives exactly the loaded int8 weight and scales.

    * oneDNN (CPUs without AMX): the kernel's `dnnl_handler` holds a reordered copy of the int8 weight and
      a pointer to the scales tensor; a new handler is built from the new weight and scales (the scales
      tensor kept alive on the layer), its address written into the handler's slot and the old released;
    * AMX ("sgl"): the packed int8 weight and the scales are layer parameters, overwritten in place.

    Any other kernel (zentorch's, another vLLM's layout, asymmetric or static activation scales) is refused.
    """
    import torch

    from server.engine.quantize import quantize_rows

    kind = type(kernel).__name__
    method = getattr(getattr(kernel, "linear_method", None), "__name__", "")
    config = getattr(kernel, "config", None)
    ops = torch.ops._C
    refused = MergeUnsupported(
        f"vLLM serves {type(layer).__name__} through {kind} ({method or 'no method'}), whose int8 weights "
        "Heedful cannot rewrite; adapters are served through multi-LoRA"
    )
    if (
        kind != "CPUInt8ScaledMMLinearKernel"
        or not getattr(config, "input_symmetric", False)
        or getattr(config, "is_static_input_scheme", True)
    ):
        raise refused
    if method == "_apply_weights_sgl":
        packed, scales = getattr(layer, "weight", None), getattr(layer, "weight_scale", None)
        if not isinstance(packed, torch.Tensor) or not isinstance(scales, torch.Tensor):
            raise refused

        def write_sgl(weight: torch.Tensor) -> None:
            q, scale = quantize_rows(weight)
            fresh = ops.convert_weight_packed(q)
            if fresh.shape != packed.shape or fresh.dtype != packed.dtype:
                raise MergeUnsupported("the CPU backend packed this int8 weight differently than before: cannot merge")
            packed.data.copy_(fresh)
            scales.data.copy_(scale.view_as(scales))

        return write_sgl
    handler = getattr(kernel, "dnnl_handler", None)
    slot = getattr(handler, "handler_tensor", None)
    shape = (getattr(handler, "n", None), getattr(handler, "k", None))
    if (
        method != "_apply_weights_onednn"
        or dtype is None
        or not isinstance(slot, torch.Tensor)
        or slot.numel() != 1
        or not all(isinstance(d, int) and d > 0 for d in shape)
        or not hasattr(ops, "create_onednn_scaled_mm_handler")
        or not hasattr(ops, "release_dnnl_matmul_handler")
    ):
        raise refused
    dynamic = getattr(layer, "input_scale", None) is None

    def write_onednn(weight: torch.Tensor) -> None:
        if tuple(weight.shape) != shape:
            raise MergeUnsupported(f"the oneDNN handler is for a {shape} weight, not {tuple(weight.shape)}")
        q, scale = quantize_rows(weight)
        # The handler reorders the weight into memory of its own but reads the scales where they are.
        fresh = int(ops.create_onednn_scaled_mm_handler(q.t(), scale, dtype, dynamic, False, ONEDNN_PRIMITIVE_CACHE))
        old = int(slot.item())
        slot.fill_(fresh)
        ops.release_dnnl_matmul_handler(old)
        layer._heedful_weight_scale = scale
        adj = getattr(layer, "azp_adj", None)
        if isinstance(adj, torch.Tensor):
            adj.data.copy_((q.t().sum(dim=0, keepdim=True, dtype=torch.float32) * scale.squeeze()).view_as(adj))

    return write_onednn


class MergeWorkerExtension:
    """Mixed into vLLM's worker class; methods run in the worker process via `collective_rpc`."""

    _heedful_pristine: dict[str, tuple[torch.Tensor, list[int]]]  # stacked base weight, rows per part
    _heedful_merged: set[str]
    _heedful_files: dict[str, Path]  # tensor name -> safetensors file of the served model

    def _heedful_layers(self) -> dict[str, tuple[Any, list[str]]]:
        """Engine projection name -> (its base linear layer, the model's module names it stacks)."""
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        packed: dict[str, list[str]] = dict(getattr(model, "packed_modules_mapping", {}) or {})
        layers: dict[str, tuple[Any, list[str]]] = {}
        for name, module in model.named_modules():
            if name.endswith(".base_layer"):
                continue
            layer = getattr(module, "base_layer", module)
            if not hasattr(layer, "cpu_linear") and not hasattr(layer, "weight"):
                continue
            parent, _, leaf = name.rpartition(".")
            subs = packed.get(leaf, [leaf])
            layers[name] = (layer, [f"{parent}.{s}" if parent else s for s in subs])
        return layers

    def _heedful_base(self, name: str, parts: list[str]) -> tuple[torch.Tensor, list[int]]:
        """The pristine (as loaded from the model folder) stacked weight of one projection, cached."""
        import torch
        from safetensors import safe_open

        cached = self._heedful_pristine.get(name)
        if cached is not None:
            return cached
        model_dir = Path(self.model_config.model)  # type: ignore[attr-defined]
        # An int8 folder's float weights are in the folder it was made from; they stay float32 until the
        # int8 writer quantizes base + delta (`_int8_writer`).
        source = quantized_from(model_dir)
        dtype = torch.float32 if source else self.model_config.dtype  # type: ignore[attr-defined]
        model_dir = source or model_dir
        if not hasattr(self, "_heedful_files"):
            self._heedful_files = _weight_files(model_dir)  # once: every projection looks its parts up here
        files = self._heedful_files
        blocks = []
        for part in parts:
            key = f"{part}.weight"
            if key not in files:
                raise MergeUnsupported(f"{model_dir} has no tensor {key}: cannot merge onto it")
            with safe_open(str(files[key]), framework="pt") as fh:
                blocks.append(fh.get_tensor(key).to(dtype))
        cached = (torch.cat(blocks, dim=0), [int(b.shape[0]) for b in blocks])
        self._heedful_pristine[name] = cached
        return cached

    def heedful_merge_check(self) -> str | None:
        """None when every projection vLLM serves with LoRA can be rewritten here, else why not.

        Nothing is written: it builds the writers `heedful_merge` would use for every LoRA-capable layer.
        """
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        refused: dict[str, list[str]] = {}
        checked = 0
        for name, module in model.named_modules():
            layer = getattr(module, "base_layer", None)
            if layer is None or not (hasattr(layer, "cpu_linear") or hasattr(layer, "weight")):
                continue
            checked += 1
            try:
                _weight_writer(layer, self.model_config.dtype)  # type: ignore[attr-defined]
            except MergeUnsupported as exc:
                refused.setdefault(str(exc), []).append(name)
        if not checked:
            return "the engine serves no LoRA-capable layer that Heedful recognises"
        if not refused:
            return None
        reason, names = next(iter(refused.items()))
        return f"{len(names)} of {checked} projections cannot be rewritten (e.g. {names[0]}): {reason}"

    def heedful_merge(self, adapter_path: str | None) -> dict[str, Any]:
        """Serve `adapter_path` merged into the weights (None: the base weights again). Returns a summary."""
        if not hasattr(self, "_heedful_pristine"):
            self._heedful_pristine = {}
            self._heedful_merged = set()
        layers = self._heedful_layers()
        factors = read_adapter(Path(adapter_path)) if adapter_path else {}
        known = {part for _, parts in layers.values() for part in parts}
        unknown = sorted(set(factors) - known)
        if unknown:
            raise MergeUnsupported(f"adapter {adapter_path} targets modules the engine cannot merge: {unknown}")
        touched = {n for n, (_, parts) in layers.items() if any(p in factors for p in parts)}
        # Compute every new weight and check every layer before writing any: a bad adapter, or a layer
        # that cannot be rewritten, leaves the engine as it was.
        updates = []
        for name in sorted(touched | self._heedful_merged):
            layer, parts = layers[name]
            base, sizes = self._heedful_base(name, parts)
            delta = fused_delta(parts, sizes, int(base.shape[1]), factors) if name in touched else None
            updates.append((_weight_writer(layer, self.model_config.dtype), merged_weight(base, delta)))  # type: ignore[attr-defined]
        for write, weight in updates:
            write(weight)
        self._heedful_merged = touched
        return {"adapter": adapter_path, "modules": len(touched)}
