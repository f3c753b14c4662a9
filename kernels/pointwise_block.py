"""Triton kernels of HyperSeg's 1x1 level block, ``pyseg::pointwise_block_triton`` (forward and backward).

Layouts as ``torch.ops.pyseg.pointwise_block`` (csrc/pyseg.cpp): x (B, Cin, H, W) contiguous; weight
(B, Cout*Cin, gh, gw) contiguous (row-major over Cout, Cin per patch); scale/shift (Cout,).
y = ReLU(scale * (W_patch x) + shift).

Forward: one program per (sample, patch, chunk of BLOCK_P patch pixels), a (COUT_BLOCK x BLOCK_P)
accumulator updated one input channel at a time.
Backward: two kernels, the forward recomputed (nothing saved): per (sample, patch), z = W x with the
input channels streamed in chunks, and gz = dL/dz to a scratch buffer plus the affine partials; then
per (sample, patch, chunk of input channels) grad_W[:, chunk] = gz x^T and grad_x[chunk] = W[:,
chunk]^T gz. Tiles stay within 64 x 32. Weight gradients are per (sample, patch); affine partials
are summed in float64 in a fixed order by the launcher; grad_x pixels belong to exactly one patch,
so they are stored directly. Deterministic, no atomics. Backward GEMMs are tl.dot on the tensor
cores (``_index.mm``: float16/bfloat16 operands as loaded, float32 as 3xTF32, about float32
accuracy). float16, bfloat16 and float32 inputs compute in float32, float64 in float64; outputs are
stored in the input dtype.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ._index import block_range as _block_range
from ._index import mm as _mm
from ._index import patch_item as _patch_item
from ._launch import acc_dtype as _acc_dtype
from ._launch import affine_grads as _affine_grads
from ._launch import block_backward_inputs as _block_backward_inputs
from ._launch import dot_block as _blk
from ._launch import empty as _empty
from ._launch import launch as _launch
from .meta_block import _NUM_STAGES, _NUM_WARPS, _px_block

__all__ = ["forward", "backward"]


@triton.jit
def _pw_fwd_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, y_ptr, Cin, H, W, gh, gw, Cout,
                   COUT_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, ACC_F64: tl.constexpr):
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item, b, patch, G, r0, ph, c0, pw = _patch_item(gh, gw, H, W)  # b: int64 sample / channel-plane offsets
    p, pmask = _block_range(tl.program_id(1) * BLOCK_P, ph * pw, BLOCK_P)
    off = (r0 + p // pw) * W + (c0 + p % pw)
    o, omask = _block_range(0, Cout, COUT_BLOCK)
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


@triton.jit(do_not_specialize=["NEED_AFF"])
def _pw_bwd_gz_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, gy_ptr, gz_ptr, part_ptr, Cin, H, W, gh, gw, Cout, NP,
                      CIN_CHUNK: tl.constexpr, COUT_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, NEED_AFF,
                      ACC_F64: tl.constexpr):
    """Backward, step 1: one program per (sample, patch), looping over the patch's pixels:
    recompute z = W x (input channels streamed in chunks, tl.dot), gz = dL/dz = s * ReLU'(s z + t)
    * grad_y to the scratch gz_ptr (Cout x NP per work item), and the scale/shift partials."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item, b, patch, G, r0, ph, c0, pw = _patch_item(gh, gw, H, W)
    o, omask = _block_range(0, Cout, COUT_BLOCK)
    wbase = w_ptr + b * Cout * Cin * G + patch
    s = tl.load(sc_ptr + o, mask=omask, other=0.0).to(acc_dtype)
    t = tl.load(sh_ptr + o, mask=omask, other=0.0).to(acc_dtype)
    gyrows = gy_ptr + (b * Cout + o[:, None]) * H * W  # (COUT, 1)
    gzrows = gz_ptr + (item * Cout + o[:, None]).to(tl.int64) * NP
    acc_s = tl.zeros((COUT_BLOCK,), dtype=acc_dtype)
    acc_t = tl.zeros((COUT_BLOCK,), dtype=acc_dtype)
    for p0 in range(0, ph * pw, BLOCK_P):
        p, pmask = _block_range(p0, ph * pw, BLOCK_P)
        off = (r0 + p // pw) * W + (c0 + p % pw)
        z = tl.zeros((COUT_BLOCK, BLOCK_P), dtype=acc_dtype)
        for ci in range(0, Cin, CIN_CHUNK):
            c, cmask = _block_range(ci, Cin, CIN_CHUNK)
            wt = tl.load(wbase + (o[:, None] * Cin + c[None, :]) * G, mask=omask[:, None] & cmask[None, :], other=0.0)
            xt = tl.load(x_ptr + (b * Cin + c[:, None]) * H * W + off[None, :], mask=cmask[:, None] & pmask[None, :],
                         other=0.0)
            z = _mm(wt, xt, z, ACC_F64)
        gy = tl.load(gyrows + off[None, :], mask=omask[:, None] & pmask[None, :], other=0.0).to(acc_dtype)
        gu = tl.where(z * s[:, None] + t[:, None] > 0.0, gy, 0.0)
        acc_s += tl.sum(gu * z, axis=1)
        acc_t += tl.sum(gu, axis=1)
        tl.store(gzrows + p[None, :], gu * s[:, None], mask=omask[:, None] & pmask[None, :])
    if NEED_AFF:
        pbase = part_ptr + item.to(tl.int64) * 2 * Cout
        tl.store(pbase + o, acc_s, mask=omask)
        tl.store(pbase + Cout + o, acc_t, mask=omask)


@triton.jit(do_not_specialize=["NEED_X", "NEED_W"])
def _pw_bwd_grads_kernel(x_ptr, w_ptr, gz_ptr, gx_ptr, gw_ptr, Cin, H, W, gh, gw, Cout, NP,
                         CIN_CHUNK: tl.constexpr, COUT_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr,
                         NEED_X, NEED_W, ACC_F64: tl.constexpr, COUT_SUB: tl.constexpr):
    """Backward, step 2: one program per (sample, patch, chunk of CIN_CHUNK input channels),
    looping over the patch's pixels: grad_x[chunk] = W[:, chunk]^T gz, the reduction over the output
    channels in slices of COUT_SUB (at most 64: a whole 128-channel W^T chunk held across the loop
    spilled on sm_90), then grad_W[:, chunk] = gz x^T (tl.dot). grad_x pixels belong to exactly one
    patch (no halo), so they are stored directly."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item, b, patch, G, r0, ph, c0, pw = _patch_item(gh, gw, H, W)
    c, cmask = _block_range(tl.program_id(1) * CIN_CHUNK, Cin, CIN_CHUNK)
    o, omask = _block_range(0, Cout, COUT_BLOCK)
    N = Cout * Cin
    wbase = w_ptr + b * N * G + patch
    xrows = x_ptr + (b * Cin + c[:, None]) * H * W  # (CIN_CHUNK, 1)
    gzrows = gz_ptr + (item * Cout + o[:, None]).to(tl.int64) * NP
    if NEED_X:  # grad_x first, then grad_W: W^T and the grad_W accumulator are never live together
        for p0 in range(0, ph * pw, BLOCK_P):
            p, pmask = _block_range(p0, ph * pw, BLOCK_P)
            off = (r0 + p // pw) * W + (c0 + p % pw)
            gxv = tl.zeros((CIN_CHUNK, BLOCK_P), dtype=acc_dtype)
            for o0 in range(0, Cout, COUT_SUB):  # reduction over the output channels in slices
                s, smask = _block_range(o0, Cout, COUT_SUB)
                wtt = tl.load(wbase + (s[None, :] * Cin + c[:, None]) * G, mask=cmask[:, None] & smask[None, :],
                              other=0.0).to(acc_dtype)  # (CIN_CHUNK, COUT_SUB)
                gz = tl.load(gz_ptr + (item * Cout + s[:, None]).to(tl.int64) * NP + p[None, :],
                             mask=smask[:, None] & pmask[None, :], other=0.0)
                gxv = _mm(wtt, gz, gxv, ACC_F64)
            tl.store(gx_ptr + (b * Cin + c[:, None]) * H * W + off[None, :], gxv.to(gx_ptr.dtype.element_ty),
                     mask=cmask[:, None] & pmask[None, :])
    if NEED_W:
        acc_w = tl.zeros((COUT_BLOCK, CIN_CHUNK), dtype=acc_dtype)
        for p0 in range(0, ph * pw, BLOCK_P):
            p, pmask = _block_range(p0, ph * pw, BLOCK_P)
            off = (r0 + p // pw) * W + (c0 + p % pw)
            gz = tl.load(gzrows + p[None, :], mask=omask[:, None] & pmask[None, :], other=0.0)
            xt = tl.load(xrows + off[None, :], mask=cmask[:, None] & pmask[None, :], other=0.0).to(acc_dtype)
            acc_w = _mm(gz, tl.trans(xt), acc_w, ACC_F64)
        tl.store(gw_ptr + b * N * G + patch + (o[:, None] * Cin + c[None, :]) * G, acc_w.to(gw_ptr.dtype.element_ty),
                 mask=omask[:, None] & cmask[None, :])


def _block_p(max_pixels: int, rows: int) -> int:
    # keep the (rows x BLOCK_P) register tiles moderate
    cap = max(16, 8192 // triton.next_power_of_2(max(rows, 1)))
    return int(min(triton.next_power_of_2(max_pixels), cap, 256))


#: Input channels per streamed chunk of the backward (a tl.dot operand dimension).
_CIN_CHUNK = 32


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
    Cout = weight.shape[1] // x.shape[1]
    grad_out, x, weight, scale, shift, (need_x, need_w, need_aff), outs = _block_backward_inputs(
        grad_out, x, weight, scale, shift, Cout, output_mask)
    B, Cin, H, W = x.shape
    gh, gw = weight.shape[-2:]
    if not (need_x or need_w or need_aff):
        return tuple(outs)
    G = gh * gw
    if need_x:
        outs[0] = _empty(x.shape, x)
    if need_w:
        outs[1] = _empty(weight.shape, weight)
    NP = -(-H // gh) * -(-W // gw)
    gz = _empty((B * G, Cout, NP), x, _acc_dtype(x))
    part = _empty((B * G, 2, Cout), x, _acc_dtype(x)) if need_aff else gz
    ob = _blk(Cout)
    # (COUT_BLOCK x BLOCK_P) tiles of at most 64 x 32 per 4 warps: wider outputs get 8 warps
    meta = dict(CIN_CHUNK=_CIN_CHUNK, COUT_BLOCK=ob, BLOCK_P=_px_block(NP),
                ACC_F64=x.dtype == torch.float64, num_warps=_NUM_WARPS if ob <= 64 else 2 * _NUM_WARPS, num_stages=_NUM_STAGES)
    _launch(_pw_bwd_gz_kernel, (B * G,), x, weight, scale, shift, grad_out, gz, part, Cin, H, W, gh, gw, Cout, NP,
            NEED_AFF=int(need_aff), **meta)
    if need_x or need_w:
        _launch(_pw_bwd_grads_kernel, (B * G, triton.cdiv(Cin, _CIN_CHUNK)), x, weight, gz,
                outs[0] if need_x else x, outs[1] if need_w else weight, Cin, H, W, gh, gw, Cout, NP,
                NEED_X=int(need_x), NEED_W=int(need_w), COUT_SUB=min(ob, 64), **meta)
    if need_aff:
        _affine_grads(part, output_mask, scale, shift, outs)
    return tuple(outs)
