"""Triton kernels of HyperSeg's 1x1 level block, ``pyseg::pointwise_block_triton`` (forward and backward).

Layouts as ``torch.ops.pyseg.pointwise_block`` (csrc/pyseg.cpp): x (B, Cin, H, W) contiguous; weight
(B, Cout*Cin, gh, gw) contiguous (row-major over Cout, Cin per patch); scale/shift (Cout,).
y = ReLU(scale * (W_patch x) + shift).

Forward: one program per (sample, patch, chunk of BLOCK_P patch pixels), a (COUT_BLOCK x BLOCK_P)
accumulator updated one input channel at a time.
Backward: one program per (sample, patch), looping over the patch's pixels; the forward is
recomputed. Weight gradients are per (sample, patch); affine gradients are per-work-item partials
summed in float64 in a fixed order by the launcher; grad_x pixels belong to exactly one patch, so
they are stored directly. Deterministic, no atomics. Per-patch GEMMs use tl.dot (input_precision
"ieee", no TF32). float16, bfloat16 and float32 inputs compute in float32, float64 in float64;
outputs are stored in the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._index import patch_rect as _patch_rect
from ._launch import acc_dtype as _acc_dtype
from ._launch import dot_block as _blk
from ._launch import empty as _empty
from ._launch import launch as _launch
from .meta_block import _block_p, _bwd_block_p, _warps

__all__ = ["forward", "backward"]


@triton.jit
def _pw_fwd_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, y_ptr, Cin, H, W, gh, gw, Cout,
                   COUT_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, ACC_F64: tl.constexpr):
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item = tl.program_id(0)
    chunk = tl.program_id(1)
    G = gh * gw
    patch = item % G
    b = item // G
    r0, ph, c0, pw = _patch_rect(patch, gh, gw, H, W)
    p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < ph * pw
    off = (r0 + p // pw) * W + (c0 + p % pw)
    o = tl.arange(0, COUT_BLOCK)
    omask = o < Cout
    wbase = w_ptr + b * Cout * Cin * G + patch
    acc = tl.zeros((COUT_BLOCK, BLOCK_P), dtype=acc_dtype)
    for c in range(0, Cin):
        xv = tl.load(x_ptr + (b * Cin + c) * H * W + off, mask=pmask, other=0.0).to(acc_dtype)
        wv = tl.load(wbase + (o * Cin + c) * G, mask=omask, other=0.0).to(acc_dtype)
        acc += wv[:, None] * xv[None, :]
    s = tl.load(sc_ptr + o, mask=omask, other=0.0).to(acc_dtype)
    t = tl.load(sh_ptr + o, mask=omask, other=0.0).to(acc_dtype)
    acc = tl.maximum(acc * s[:, None] + t[:, None], 0.0)
    ptrs = y_ptr + (b * Cout + o[:, None]) * H * W + off[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=omask[:, None] & pmask[None, :])


@triton.jit
def _pw_bwd_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, gy_ptr, gx_ptr, gw_ptr, part_ptr, Cin, H, W, gh, gw, Cout,
                   CIN_BLOCK: tl.constexpr, COUT_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                   NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_AFF: tl.constexpr,
                   ACC_F64: tl.constexpr):
    """pointwise_block backward: one program per (sample, patch), looping over the patch's pixels.
    grad_x pixels belong to exactly one patch (no halo), so they are stored directly."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item = tl.program_id(0)
    G = gh * gw
    patch = item % G
    b = (item // G).to(tl.int64)
    r0, ph, c0, pw = _patch_rect(patch, gh, gw, H, W)
    npx = ph * pw
    o = tl.arange(0, COUT_BLOCK)
    omask = o < Cout
    c = tl.arange(0, CIN_BLOCK)
    cmask = c < Cin
    N = Cout * Cin
    wbase = w_ptr + b * N * G + patch
    wt = tl.load(wbase + (o[:, None] * Cin + c[None, :]) * G, mask=omask[:, None] & cmask[None, :],
                 other=0.0).to(acc_dtype)  # (COUT, CIN)
    wtt = tl.load(wbase + (o[None, :] * Cin + c[:, None]) * G, mask=cmask[:, None] & omask[None, :],
                  other=0.0).to(acc_dtype)  # (CIN, COUT)
    s = tl.load(sc_ptr + o, mask=omask, other=0.0).to(acc_dtype)
    t = tl.load(sh_ptr + o, mask=omask, other=0.0).to(acc_dtype)
    xrows = x_ptr + (b * Cin + c[:, None]) * H * W  # (CIN, 1)
    gyrows = gy_ptr + (b * Cout + o[:, None]) * H * W  # (COUT, 1)
    acc_w = tl.zeros((COUT_BLOCK, CIN_BLOCK), dtype=acc_dtype)
    acc_s = tl.zeros((COUT_BLOCK,), dtype=acc_dtype)
    acc_t = tl.zeros((COUT_BLOCK,), dtype=acc_dtype)
    for p0 in range(0, npx, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
        pmask = p < npx
        off = (r0 + p // pw) * W + (c0 + p % pw)
        xt = tl.load(xrows + off[None, :], mask=cmask[:, None] & pmask[None, :], other=0.0).to(acc_dtype)
        z = tl.dot(wt, xt, input_precision="ieee")  # (COUT, P)
        gy = tl.load(gyrows + off[None, :], mask=omask[:, None] & pmask[None, :], other=0.0).to(acc_dtype)
        gu = tl.where(z * s[:, None] + t[:, None] > 0.0, gy, 0.0)
        acc_s += tl.sum(gu * z, axis=1)
        acc_t += tl.sum(gu, axis=1)
        gz = gu * s[:, None]
        if NEED_W:
            acc_w = tl.dot(gz, tl.trans(xt), acc_w, input_precision="ieee")
        if NEED_X:
            gxv = tl.dot(wtt, gz, input_precision="ieee")  # (CIN, P)
            tl.store(gx_ptr + (b * Cin + c[:, None]) * H * W + off[None, :], gxv.to(gx_ptr.dtype.element_ty),
                     mask=cmask[:, None] & pmask[None, :])
    if NEED_W:
        tl.store(gw_ptr + b * N * G + patch + (o[:, None] * Cin + c[None, :]) * G, acc_w.to(gw_ptr.dtype.element_ty),
                 mask=omask[:, None] & cmask[None, :])
    if NEED_AFF:
        pbase = part_ptr + item.to(tl.int64) * 2 * Cout
        tl.store(pbase + o, acc_s, mask=omask)
        tl.store(pbase + Cout + o, acc_t, mask=omask)


def forward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      shift: torch.Tensor) -> torch.Tensor:
    """Patch-wise 1x1 conv -> affine -> ReLU forward (inputs validated by pyseg.ops.pointwise_block)."""
    x, weight = x.contiguous(), weight.contiguous()
    B, Cin, H, W = x.shape
    gh, gw = weight.shape[-2:]
    Cout = weight.shape[1] // Cin
    y = _empty((B, Cout, H, W), x)
    max_pix = -(-H // gh) * -(-W // gw)
    cb = triton.next_power_of_2(Cout)
    bp = _block_p(max_pix, cb)
    grid = (B * gh * gw, triton.cdiv(max_pix, bp))
    _launch(_pw_fwd_kernel, grid, x, weight, scale.contiguous(), shift.contiguous(), y, Cin, H, W, gh, gw, Cout,
                         COUT_BLOCK=cb, BLOCK_P=bp, ACC_F64=x.dtype == torch.float64)
    return y


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       shift: torch.Tensor, output_mask: Sequence[bool]):
    """(grad_x, grad_weight, grad_scale, grad_shift) of pointwise_block; masked-out entries are
    empty. Deterministic: weight gradients per (sample, patch), affine partials per work item
    summed in float64 in a fixed order, grad_x stored directly (every pixel in one patch)."""
    x, weight, grad_out = x.contiguous(), weight.contiguous(), grad_out.contiguous()
    scale, shift = scale.contiguous(), shift.contiguous()
    B, Cin, H, W = x.shape
    gh, gw = weight.shape[-2:]
    Cout = weight.shape[1] // Cin
    if tuple(grad_out.shape) != (B, Cout, H, W):
        raise ValueError(f"grad_out must have shape {(B, Cout, H, W)}, got {tuple(grad_out.shape)}")
    need_x, need_w = bool(output_mask[0]), bool(output_mask[1])
    need_aff = bool(output_mask[2]) or bool(output_mask[3])
    gx, gwt = x.new_empty(0), weight.new_empty(0)
    gs, gt = scale.new_empty(0), shift.new_empty(0)
    if not (need_x or need_w or need_aff):
        return gx, gwt, gs, gt
    G = gh * gw
    if need_x:
        gx = _empty(x.shape, x)
    if need_w:
        gwt = _empty(weight.shape, weight)
    part = _empty((B * G, 2, Cout), x, _acc_dtype(x)) if need_aff else x
    cb, ob = _blk(Cin), _blk(Cout)
    rows = max(cb, ob)
    _launch(_pw_bwd_kernel, (B * G,),
            x, weight, scale, shift, grad_out, gx if need_x else x, gwt if need_w else weight, part,
            Cin, H, W, gh, gw, Cout, CIN_BLOCK=cb, COUT_BLOCK=ob,
            BLOCK_P=_bwd_block_p(-(-H // gh) * -(-W // gw), rows), NEED_X=need_x, NEED_W=need_w,
            NEED_AFF=need_aff, ACC_F64=x.dtype == torch.float64, num_warps=_warps(rows))
    if need_aff:
        tot = part.double().sum(0)
        if output_mask[2]:
            gs = tot[0].to(scale.dtype, copy=True)  # no views: outputs must not alias
        if output_mask[3]:
            gt = tot[1].to(shift.dtype, copy=True)
    return gx, gwt, gs, gt
