"""Host-side helpers shared by the Triton launchers, and the one place every kernel is launched.

``launch(kernel, grid, *args, **meta)`` runs ``kernel[grid](*args, **meta)`` under a
``torch.cuda.device`` guard for the device of the first CUDA tensor argument. Inside ``record()``
nothing runs: every launch is appended to the active recorder instead, with an autotuned kernel
expanded into every configuration its pruning keeps for these arguments (what the autotuner could
launch). ``kernels/_aot.py`` drives the launchers this way (on meta tensors) to list, from the
launchers themselves, every kernel variant the ops can launch, and compiles each for sm_90.

Autotuning: ``PYSEG_TRITON_AUTOTUNE=0`` makes every autotuned launch take the first configuration
its pruning keeps (fixed configurations, e.g. in tests on a GPU) instead of benchmarking.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, List, Optional

import torch
import triton

__all__ = ["launch", "record", "empty", "acc_dtype", "device_ctx", "dot_block", "pow2_bucket", "autotune_enabled",
           "weight_strides"]

_RECORDERS: List[list] = []


def empty(shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Allocation of every kernel output and scratch buffer (tests replace the launcher modules'
    ``_empty`` to poison them with NaN)."""
    return torch.empty(tuple(shape), device=like.device, dtype=dtype or like.dtype)


def weight_strides(weight: torch.Tensor):
    """A per-patch weight (B, N, gh, gw) as the kernels read it in place: ``(weight, WP, WS)``, value n of
    patch p (= i * gw + j) of sample b at ``b * N * gh * gw + p * WP + n * WS``. Contiguous (one plane per
    value): WP = 1, WS = gh * gw; patch-major (``torch.channels_last``: each patch's N values contiguous,
    what the weight mappers emit for the fused blocks): WP = N, WS = 1 -- a patch's values are then read
    as contiguous runs instead of one element per 32-byte sector. Any other layout is made contiguous."""
    B, N, gh, gw = weight.shape
    if weight.is_contiguous():
        return weight, 1, gh * gw
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight, N, 1
    return weight.contiguous(), 1, gh * gw


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the kernels: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def device_ctx(*tensors):
    """``torch.cuda.device`` of the first CUDA tensor (kernels launch on the current device)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_cuda:
            return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def dot_block(n: int) -> int:
    """Block for a channel dimension of a tl.dot operand: a power of two >= 16."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def pow2_bucket(n: int) -> int:
    """Autotune key bucket of a size: the next power of two (keys never follow exact pixel counts)."""
    return triton.next_power_of_2(max(int(n), 1))


def autotune_enabled() -> bool:
    return os.environ.get("PYSEG_TRITON_AUTOTUNE", "1") != "0"


def _pruned_configs(tuner, args, meta) -> list:
    named = dict(zip(tuner.arg_names, args))
    configs = list(tuner.configs)
    prune = getattr(tuner, "early_config_prune", None)
    if prune is not None:
        configs = list(prune(configs, named, **meta))
    return configs


def _config_meta(cfg) -> Dict[str, Any]:
    out = dict(cfg.kwargs)
    out.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


@contextlib.contextmanager
def record(all_configs: bool = True):
    """Record launches instead of running them; yields the list of records
    ``(jit_function, args, meta)``. An autotuned kernel is expanded into every configuration its
    pruning keeps (``all_configs``), or only the first (what ``PYSEG_TRITON_AUTOTUNE=0`` runs)."""
    rec: list = []
    _RECORDERS.append((rec, all_configs))
    try:
        yield rec
    finally:
        _RECORDERS.pop()


def launch(kernel, grid, *args, **meta):
    """``kernel[grid](*args, **meta)`` on the right device, or recorded inside ``record()``."""
    tuned = isinstance(kernel, triton.runtime.Autotuner)
    if _RECORDERS:
        rec, all_configs = _RECORDERS[-1]
        if tuned:
            cfgs = _pruned_configs(kernel, args, meta)
            for cfg in cfgs if all_configs else cfgs[:1]:
                rec.append((kernel.fn, args, {**meta, **_config_meta(cfg)}))
        else:
            rec.append((kernel, args, dict(meta)))
        return
    with device_ctx(*args):
        if tuned and not autotune_enabled():
            cfg = _pruned_configs(kernel, args, meta)[0]
            kernel = kernel.fn
            meta = {**meta, **_config_meta(cfg)}
            if callable(grid):
                grid = grid(dict(meta))
        kernel[grid](*args, **meta)


def block_backward_inputs(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                          shift: torch.Tensor, out_channels: int, output_mask, patch_major: bool = False):
    """Shared start of the meta_block / pointwise_block backward launchers: contiguous inputs (with
    ``patch_major``, a patch-major weight is kept as it is: see :func:`weight_strides`), grad_out checked
    against (B, out_channels, H, W), the gradient mask and the empty outputs.
    Returns ``(grad_out, x, weight, scale, shift, (need_x, need_w, need_aff), [gx, gw, gs, gt])``."""
    x, grad_out = x.contiguous(), grad_out.contiguous()
    weight = weight_strides(weight)[0] if patch_major else weight.contiguous()
    B, _, H, W = x.shape
    if tuple(grad_out.shape) != (B, out_channels, H, W):
        raise ValueError(f"grad_out must have shape {(B, out_channels, H, W)}, got {tuple(grad_out.shape)}")
    need = (bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2]) or bool(output_mask[3]))
    outs = [x.new_empty(0), weight.new_empty(0), scale.new_empty(0), shift.new_empty(0)]
    return grad_out, x, weight, scale.contiguous(), shift.contiguous(), need, outs


def affine_grads(part: torch.Tensor, output_mask, scale: torch.Tensor, shift: torch.Tensor, outs: list) -> None:
    """grad_scale / grad_shift (outs[2], outs[3], where output_mask asks) from the per-work-item
    partials ``part`` (items, 2, channels): summed in float64 over the items in a fixed order
    (deterministic), stored as new tensors (outputs must not alias)."""
    tot = part.double().sum(0)
    if output_mask[2]:
        outs[2] = tot[0].to(scale.dtype, copy=True)
    if output_mask[3]:
        outs[3] = tot[1].to(shift.dtype, copy=True)
