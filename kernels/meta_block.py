"""Triton kernels of the fused HyperSeg meta block, ``pyseg::meta_block_triton`` (forward and backward).
The 1x1 level block (pointwise_block) has its own file, kernels/pointwise_block.py.

Layouts as ``torch.ops.pyseg.meta_block`` (csrc/pyseg.cpp): x (B, Cin, H, W) contiguous; weight
(B, hid*Cin + 9*hid + Cout*hid, gh, gw), per patch [W1 (hid, Cin) | W2 (hid, 3, 3) | W3 (Cout, hid)],
read in place either contiguous or patch-major (``torch.channels_last``: each patch's values
contiguous, so a chunk of W1/W3 is a run of consecutive values rather than one value per 32-byte
sector; ``_launch.weight_strides``); the weight gradient has the weight's layout; scale/shift
(2*hid + Cout,) = [stage 1 | stage 2 | stage 3].

Forward: one program per (sample, patch, chunk of BLOCK_P patch pixels). Triton tiles live in
registers and cannot be shifted, so the depthwise 3x3 is evaluated tap by tap: for each of the 9
taps the program recomputes pw1 -> affine -> ReLU6 of the neighbour pixel (with the current patch's
weights, reflect at the image borders), which is exactly the per-patch halo semantics; the hidden
map never touches memory. Hidden channels are streamed in chunks of HID_CHUNK (16 or 32, ``_hid_chunk``): per chunk
the 9 pw1 products are tl.dot (W1 chunk x the tap's input tile), and the chunk's h2 is folded into
the output accumulator at once (y += W3[:, chunk] h2, tl.dot), so only (<= 64) x (<= 32) tiles are
ever live and the weights are read chunk by chunk rather than held. The price is 9x the pw1
arithmetic; the CUDA kernel keeps the haloed hidden map in shared memory instead.

Backward (meta_block): four kernels; the forward intermediates are recomputed, nothing is saved.
  1. stage 3 (``_meta_bwd_stage3_kernel``, per (sample, patch)): recompute z3 = W3 h2 (chunks
     streamed as in the forward); g3 = dL/dz3 = s3 * grad_y to a scratch buffer; scale3/shift3.
  2. stage 2 (``_meta_bwd_stage2_kernel``, per (sample, patch, hidden chunk)): recompute z2, h2 of
     the chunk; gradients of W3[:, chunk], scale2/shift2; g2 = dL/dz2 of the chunk to a scratch.
  3. stage 1 (``_meta_bwd_stage1_kernel``, per (sample, patch, hidden chunk)): per haloed position
     q of the patch, recompute z1 = W1 x(q), gather dL/dh1(q) = sum_d W2[:, d] g2(q - d) over the 9
     taps (a gather, so no shifted register tiles and no scatter), then the gradients of W2, W1,
     scale1/shift1 of the chunk; g1 = dL/dz1 to a scratch.
  4. grad_x (``_meta_bwd_gradx_kernel``, per (sample, patch)): the haloed grad_x W1^T g1 (chunks
     streamed), written to a per-patch haloed buffer.
Scratch buffers are float32 (float64 for float64 inputs). Weight gradients are per (sample, patch):
no races. Affine gradients are per-work-item partials summed in float64 in a fixed order by the
launcher, and grad_x sums, per input pixel and in a fixed order, the haloed-buffer positions that
read it (``_halo_gather_index``; reflect included). Deterministic, no atomics. Every GEMM is tl.dot
on the tensor cores (``_index.mm``): float16/bfloat16 operands as loaded, float32 operands as 3xTF32
(about float32 accuracy), float64 in float64; accumulation in float32 (float64). Outputs are stored
in the input dtype. The gradient-mask flags (NEED_*) are runtime arguments (not specialised), so one
compiled variant serves every mask. Element offsets of samples and channel planes are int64.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ._index import block_range as _block_range
from ._index import mm as _mm
from ._index import patch_item as _patch_item
from ._index import reflect as _reflect
from ._index import relu6 as _relu6
from ._launch import acc_dtype as _acc_dtype
from ._launch import affine_grads as _affine_grads
from ._launch import block_backward_inputs as _block_backward_inputs
from ._launch import dot_block as _blk
from ._launch import empty as _empty
from ._launch import launch as _launch
from ._launch import weight_strides as _weight_strides

__all__ = ["forward", "backward"]


@triton.jit
def _tap_rows_cols(r, c, H, W):
    """Row offsets (times W) and columns of the 3x3 neighbourhood of pixels (r, c), reflected at the
    image borders: tap d of pixel (r, c) is at row offset [ro0, ro1, ro2][d // 3] plus column
    [co0, co1, co2][d % 3] (_tap_offset). Shared by the forward and backward kernels."""
    return _reflect(r - 1, H) * W, r * W, _reflect(r + 1, H) * W, _reflect(c - 1, W), c, _reflect(c + 1, W)


@triton.jit
def _patch_pixels(start, r0, ph, c0, pw, H, W, BLOCK_P: tl.constexpr):
    """BLOCK_P pixels of a patch from flat index start: (indices, mask, image rows, image columns,
    and the 3x3 neighbourhood of _tap_rows_cols)."""
    p, pmask = _block_range(start, ph * pw, BLOCK_P)
    r = r0 + p // pw
    q = c0 + p % pw
    ro0, ro1, ro2, co0, co1, co2 = _tap_rows_cols(r, q, H, W)
    return p, pmask, r, q, ro0, ro1, ro2, co0, co1, co2


@triton.jit
def _tap_offset(ro0, ro1, ro2, co0, co1, co2, d):
    """Offset of depthwise tap d (row d // 3 - 1, column d % 3 - 1) from _tap_rows_cols' values
    (d may be a runtime loop index)."""
    r = d // 3
    q = d % 3
    return tl.where(r == 0, ro0, tl.where(r == 1, ro1, ro2)) + tl.where(q == 0, co0, tl.where(q == 1, co1, co2))


@triton.jit
def _z2_chunk(xrows, cmask, pmask, ro0, ro1, ro2, co0, co1, co2, w1, s1, t1, w2ptr, WS, kmask,
              HID_CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, ACC_F64: tl.constexpr):
    """Depthwise 3x3 output z2 (before its affine) of one chunk of hidden channels at BLOCK_P
    pixels: for each tap, pw1 of the neighbour pixel (the current patch's W1 chunk, one tl.dot),
    affine, ReLU6, times the tap's W2 column."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    z2 = tl.zeros((HID_CHUNK, BLOCK_P), dtype=acc_dtype)
    for d in range(9):  # not unrolled: one tl.dot (and its operand buffers) live at a time
        off = _tap_offset(ro0, ro1, ro2, co0, co1, co2, d)
        xt = tl.load(xrows + off[None, :], mask=cmask[:, None] & pmask[None, :], other=0.0)
        z1 = _mm(w1, xt, tl.zeros((HID_CHUNK, BLOCK_P), dtype=acc_dtype), ACC_F64)
        h1 = _relu6(z1 * s1[:, None] + t1[:, None])
        w2 = tl.load(w2ptr + d * WS, mask=kmask, other=0.0).to(acc_dtype)
        z2 += w2[:, None] * h1
    return z2


@triton.jit
def _affine(sc_ptr, sh_ptr, k, kmask, ACC_F64: tl.constexpr):
    """Scale and shift of the channels k (zero where masked), in the accumulation dtype."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    return (tl.load(sc_ptr + k, mask=kmask, other=0.0).to(acc_dtype),
            tl.load(sh_ptr + k, mask=kmask, other=0.0).to(acc_dtype))


@triton.jit
def _w1_chunk(wbase, k, kmask, c, cmask, Cin, WS):
    """W1[k, c] of the patch whose weights start at wbase (value n at wbase + n * WS), as stored."""
    return tl.load(wbase + (k[:, None] * Cin + c[None, :]) * WS, mask=kmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def _z3_tile(xrows, c, cmask, pmask, ro0, ro1, ro2, co0, co1, co2, wbase, sc_ptr, sh_ptr, o, omask, Cin, hid, WS,
             HID_CHUNK: tl.constexpr, COUT_BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, ACC_F64: tl.constexpr):
    """z3 = W3 h2 (stage 3 before its affine) at BLOCK_P pixels. Hidden channels are streamed in
    chunks of HID_CHUNK: pw1 (tl.dot per tap) -> affine -> ReLU6 -> depthwise tap sum -> affine ->
    ReLU6, then z3 += W3[:, chunk] h2 (tl.dot); only the (COUT_BLOCK x BLOCK_P) accumulator lives
    across chunks."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    w3off = hid * Cin + 9 * hid
    z3 = tl.zeros((COUT_BLOCK, BLOCK_P), dtype=acc_dtype)
    for k0 in range(0, hid, HID_CHUNK):
        k, kmask = _block_range(k0, hid, HID_CHUNK)
        w1 = _w1_chunk(wbase, k, kmask, c, cmask, Cin, WS)
        s1, t1 = _affine(sc_ptr, sh_ptr, k, kmask, ACC_F64)
        z2 = _z2_chunk(xrows, cmask, pmask, ro0, ro1, ro2, co0, co1, co2, w1, s1, t1,
                       wbase + (hid * Cin + k * 9) * WS, WS, kmask, HID_CHUNK, BLOCK_P, ACC_F64)
        s2, t2 = _affine(sc_ptr + hid, sh_ptr + hid, k, kmask, ACC_F64)
        h2 = tl.where(kmask[:, None], _relu6(z2 * s2[:, None] + t2[:, None]), 0.0)
        w3 = tl.load(wbase + (w3off + o[:, None] * hid + k[None, :]) * WS, mask=omask[:, None] & kmask[None, :],
                     other=0.0).to(acc_dtype)  # (COUT, HID_CHUNK)
        z3 = _mm(w3, h2, z3, ACC_F64)
    return z3


@triton.jit
def _meta_fwd_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, y_ptr,
                     Cin, H, W, gh, gw, hid, Cout, N, WP, WS,
                     CIN_BLOCK: tl.constexpr, HID_CHUNK: tl.constexpr, COUT_BLOCK: tl.constexpr,
                     BLOCK_P: tl.constexpr, ACC_F64: tl.constexpr):
    """One program per (sample, patch, chunk of BLOCK_P pixels): y = s3 * z3 + t3 (_z3_tile)."""
    item, b, patch, G, r0, ph, c0, pw = _patch_item(gh, gw, H, W)
    p, pmask, r, q, ro0, ro1, ro2, co0, co1, co2 = _patch_pixels(tl.program_id(1) * BLOCK_P, r0, ph, c0, pw, H, W,
                                                                 BLOCK_P)
    c, cmask = _block_range(0, Cin, CIN_BLOCK)
    o, omask = _block_range(0, Cout, COUT_BLOCK)
    wbase = w_ptr + b * N * G + patch * WP  # value n of this patch's weights: wbase + n * WS (_weight_strides)
    xrows = x_ptr + (b * Cin + c[:, None]) * H * W  # (CIN, 1) channel planes of this sample (int64)
    y = _z3_tile(xrows, c, cmask, pmask, ro0, ro1, ro2, co0, co1, co2, wbase, sc_ptr, sh_ptr, o, omask, Cin, hid, WS,
                 HID_CHUNK, COUT_BLOCK, BLOCK_P, ACC_F64)
    s3, t3 = _affine(sc_ptr + 2 * hid, sh_ptr + 2 * hid, o, omask, ACC_F64)
    y = y * s3[:, None] + t3[:, None]
    out_off = r * W + q
    tl.store(y_ptr + (b * Cout + o[:, None]) * H * W + out_off[None, :], y.to(y_ptr.dtype.element_ty),
             mask=omask[:, None] & pmask[None, :])


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["NEED_AFF"])
def _meta_bwd_stage3_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, gy_ptr, g3_ptr, part_ptr,
                            Cin, H, W, gh, gw, hid, Cout, N, WP, WS, A, NP,
                            CIN_BLOCK: tl.constexpr, HID_CHUNK: tl.constexpr, COUT_BLOCK: tl.constexpr,
                            BLOCK_P: tl.constexpr, NEED_AFF, ACC_F64: tl.constexpr):
    """One program per (sample, patch), looping over its pixel chunks: recompute z3 = W3 h2 (hidden
    chunks streamed as in the forward), then g3 = dL/dz3 = s3 * grad_y to the scratch g3_ptr
    (Cout x NP per work item) and the scale3/shift3 partials."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item, b, patch, G, r0, ph, c0, pw = _patch_item(gh, gw, H, W)
    c, cmask = _block_range(0, Cin, CIN_BLOCK)
    o, omask = _block_range(0, Cout, COUT_BLOCK)
    wbase = w_ptr + b * N * G + patch * WP
    xrows = x_ptr + (b * Cin + c[:, None]) * H * W
    gyrows = gy_ptr + (b * Cout + o[:, None]) * H * W
    g3rows = g3_ptr + (item * Cout + o[:, None]).to(tl.int64) * NP
    s3 = tl.load(sc_ptr + 2 * hid + o, mask=omask, other=0.0).to(acc_dtype)
    acc_s3 = tl.zeros((COUT_BLOCK,), dtype=acc_dtype)
    acc_t3 = tl.zeros((COUT_BLOCK,), dtype=acc_dtype)
    for p0 in range(0, ph * pw, BLOCK_P):
        p, pmask, r, q, ro0, ro1, ro2, co0, co1, co2 = _patch_pixels(p0, r0, ph, c0, pw, H, W, BLOCK_P)
        z3 = _z3_tile(xrows, c, cmask, pmask, ro0, ro1, ro2, co0, co1, co2, wbase, sc_ptr, sh_ptr, o, omask, Cin,
                      hid, WS, HID_CHUNK, COUT_BLOCK, BLOCK_P, ACC_F64)
        out_off = r * W + q
        gy = tl.load(gyrows + out_off[None, :], mask=omask[:, None] & pmask[None, :], other=0.0).to(acc_dtype)
        acc_s3 += tl.sum(gy * z3, axis=1)
        acc_t3 += tl.sum(gy, axis=1)
        tl.store(g3rows + p[None, :], gy * s3[:, None], mask=omask[:, None] & pmask[None, :])
    if NEED_AFF:
        pbase = part_ptr + item.to(tl.int64) * 2 * A  # [scale partials (A) | shift partials (A)]
        tl.store(pbase + 2 * hid + o, acc_s3, mask=omask)
        tl.store(pbase + A + 2 * hid + o, acc_t3, mask=omask)


@triton.jit(do_not_specialize=["NEED_W", "NEED_AFF"])
def _meta_bwd_stage2_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, g3_ptr, g2_ptr, gw_ptr, part_ptr,
                            Cin, H, W, gh, gw, hid, Cout, N, WP, WS, A, NP,
                            CIN_BLOCK: tl.constexpr, HID_CHUNK: tl.constexpr, COUT_BLOCK: tl.constexpr,
                            BLOCK_P: tl.constexpr, NEED_W, NEED_AFF,
                            ACC_F64: tl.constexpr):
    """One program per (sample, patch, chunk of HID_CHUNK hidden channels), looping over the
    patch's pixel chunks: recompute z2 and h2 of the chunk, read g3; gradients of W3[:, chunk],
    scale2/shift2 of the chunk; g2 = dL/dz2 of the chunk to the scratch g2_ptr (hid x NP per work
    item) for stage 1."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item, b, patch, G, r0, ph, c0, pw = _patch_item(gh, gw, H, W)
    k, kmask = _block_range(tl.program_id(1) * HID_CHUNK, hid, HID_CHUNK)
    c, cmask = _block_range(0, Cin, CIN_BLOCK)
    o, omask = _block_range(0, Cout, COUT_BLOCK)
    wbase = w_ptr + b * N * G + patch * WP
    xrows = x_ptr + (b * Cin + c[:, None]) * H * W
    g3rows = g3_ptr + (item * Cout + o[:, None]).to(tl.int64) * NP
    g2rows = g2_ptr + (item * hid + k[:, None]).to(tl.int64) * NP
    w3off = hid * Cin + 9 * hid
    w1 = _w1_chunk(wbase, k, kmask, c, cmask, Cin, WS)
    w3t = tl.load(wbase + (w3off + o[None, :] * hid + k[:, None]) * WS, mask=kmask[:, None] & omask[None, :],
                  other=0.0).to(acc_dtype)  # (HID_CHUNK, COUT)
    s1, t1 = _affine(sc_ptr, sh_ptr, k, kmask, ACC_F64)
    s2, t2 = _affine(sc_ptr + hid, sh_ptr + hid, k, kmask, ACC_F64)
    acc_w3 = tl.zeros((COUT_BLOCK, HID_CHUNK), dtype=acc_dtype)
    acc_s2 = tl.zeros((HID_CHUNK,), dtype=acc_dtype)
    acc_t2 = tl.zeros((HID_CHUNK,), dtype=acc_dtype)
    for p0 in range(0, ph * pw, BLOCK_P):
        p, pmask, r, q, ro0, ro1, ro2, co0, co1, co2 = _patch_pixels(p0, r0, ph, c0, pw, H, W, BLOCK_P)
        z2 = _z2_chunk(xrows, cmask, pmask, ro0, ro1, ro2, co0, co1, co2, w1, s1, t1,
                       wbase + (hid * Cin + k * 9) * WS, WS, kmask, HID_CHUNK, BLOCK_P, ACC_F64)
        u2 = z2 * s2[:, None] + t2[:, None]
        h2 = tl.where(kmask[:, None], _relu6(u2), 0.0)
        g3 = tl.load(g3rows + p[None, :], mask=omask[:, None] & pmask[None, :], other=0.0)
        if NEED_W:
            acc_w3 = _mm(g3, tl.trans(h2), acc_w3, ACC_F64)
        gh2 = _mm(w3t, g3, tl.zeros((HID_CHUNK, BLOCK_P), dtype=acc_dtype), ACC_F64)
        gu2 = tl.where((u2 >= 0.0) & (u2 <= 6.0), gh2, 0.0)
        acc_s2 += tl.sum(gu2 * z2, axis=1)
        acc_t2 += tl.sum(gu2, axis=1)
        tl.store(g2rows + p[None, :], gu2 * s2[:, None], mask=kmask[:, None] & pmask[None, :])
    if NEED_W:
        gwbase = gw_ptr + b * N * G + patch * WP
        tl.store(gwbase + (w3off + o[:, None] * hid + k[None, :]) * WS, acc_w3.to(gw_ptr.dtype.element_ty),
                 mask=omask[:, None] & kmask[None, :])
    if NEED_AFF:
        pbase = part_ptr + item.to(tl.int64) * 2 * A
        tl.store(pbase + hid + k, acc_s2, mask=kmask)
        tl.store(pbase + A + hid + k, acc_t2, mask=kmask)


@triton.jit(do_not_specialize=["NEED_X", "NEED_W", "NEED_AFF"])
def _meta_bwd_stage1_kernel(x_ptr, w_ptr, sc_ptr, sh_ptr, g2_ptr, g1_ptr, gw_ptr, part_ptr,
                            Cin, H, W, gh, gw, hid, N, WP, WS, A, NP, NQ,
                            CIN_BLOCK: tl.constexpr, HID_CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr,
                            NEED_X, NEED_W, NEED_AFF,
                            ACC_F64: tl.constexpr):
    """One program per (sample, patch, chunk of HID_CHUNK hidden channels), looping over chunks of
    the haloed patch's (ph+2)*(pw+2) positions q: recompute z1 = W1 x at q (reflect at image
    borders), gather dL/dh1 at q from the 9 depthwise taps of g2 (stage 2), then the gradients of
    W2, W1, scale1, shift1 of the chunk; g1 = dL/dz1 goes to the scratch g1_ptr (hid x NQ per work
    item) for the grad_x kernel."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item, b, patch, G, r0, ph, c0, pw = _patch_item(gh, gw, H, W)
    hw = pw + 2
    nq = (ph + 2) * hw
    k, kmask = _block_range(tl.program_id(1) * HID_CHUNK, hid, HID_CHUNK)
    c, cmask = _block_range(0, Cin, CIN_BLOCK)
    dcol = tl.arange(0, 16)
    wbase = w_ptr + b * N * G + patch * WP
    w2ptr = wbase + (hid * Cin + k * 9) * WS
    xrows = x_ptr + (b * Cin + c[:, None]) * H * W
    w1 = _w1_chunk(wbase, k, kmask, c, cmask, Cin, WS)
    s1, t1 = _affine(sc_ptr, sh_ptr, k, kmask, ACC_F64)
    g2rows = g2_ptr + (item * hid + k[:, None]).to(tl.int64) * NP
    g1rows = g1_ptr + (item * hid + k[:, None]).to(tl.int64) * NQ
    acc_w1 = tl.zeros((HID_CHUNK, CIN_BLOCK), dtype=acc_dtype)
    acc_w2 = tl.zeros((HID_CHUNK, 16), dtype=acc_dtype)
    acc_s1 = tl.zeros((HID_CHUNK,), dtype=acc_dtype)
    acc_t1 = tl.zeros((HID_CHUNK,), dtype=acc_dtype)
    for q0 in range(0, nq, BLOCK_Q):
        q, qmask = _block_range(q0, nq, BLOCK_Q)
        a = q // hw
        bb = q % hw
        off = _reflect(r0 - 1 + a, H) * W + _reflect(c0 - 1 + bb, W)
        xt = tl.load(xrows + off[None, :], mask=cmask[:, None] & qmask[None, :], other=0.0)
        z1 = _mm(w1, xt, tl.zeros((HID_CHUNK, BLOCK_Q), dtype=acc_dtype), ACC_F64)
        u1 = z1 * s1[:, None] + t1[:, None]
        h1 = _relu6(u1)
        # dL/dh1 at q = sum over taps d of W2[:, d] * g2 at the patch pixel q - d (if inside the patch)
        gh1 = tl.zeros((HID_CHUNK, BLOCK_Q), dtype=acc_dtype)
        for d in range(9):
            pi = a - d // 3
            pj = bb - d % 3
            valid = qmask & (pi >= 0) & (pi < ph) & (pj >= 0) & (pj < pw)
            g2 = tl.load(g2rows + (pi * pw + pj)[None, :], mask=kmask[:, None] & valid[None, :], other=0.0)
            w2 = tl.load(w2ptr + d * WS, mask=kmask, other=0.0).to(acc_dtype)
            gh1 += w2[:, None] * g2
            if NEED_W:
                acc_w2 += tl.where(dcol[None, :] == d, tl.sum(h1 * g2, axis=1)[:, None], 0.0)
        gu1 = tl.where((u1 >= 0.0) & (u1 <= 6.0), gh1, 0.0)
        acc_s1 += tl.sum(gu1 * z1, axis=1)
        acc_t1 += tl.sum(gu1, axis=1)
        g1 = gu1 * s1[:, None]
        if NEED_W:
            acc_w1 = _mm(g1, tl.trans(xt.to(acc_dtype)), acc_w1, ACC_F64)
        if NEED_X:
            tl.store(g1rows + q[None, :], g1, mask=kmask[:, None] & qmask[None, :])
    if NEED_W:
        gwbase = gw_ptr + b * N * G + patch * WP
        tl.store(gwbase + (k[:, None] * Cin + c[None, :]) * WS, acc_w1.to(gw_ptr.dtype.element_ty),
                 mask=kmask[:, None] & cmask[None, :])
        tl.store(gwbase + (hid * Cin + k[:, None] * 9 + dcol[None, :]) * WS, acc_w2.to(gw_ptr.dtype.element_ty),
                 mask=kmask[:, None] & (dcol[None, :] < 9))
    if NEED_AFF:
        pbase = part_ptr + item.to(tl.int64) * 2 * A
        tl.store(pbase + k, acc_s1, mask=kmask)
        tl.store(pbase + A + k, acc_t1, mask=kmask)


@triton.jit
def _meta_bwd_gradx_kernel(w_ptr, g1_ptr, gxh_ptr, Cin, H, W, gh, gw, hid, N, WP, WS, NQ, PHH, PWH, HB, WB,
                           CIN_BLOCK: tl.constexpr, HID_CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr,
                           ACC_F64: tl.constexpr):
    """One program per (sample, patch), looping over chunks of the haloed positions q: the patch's
    haloed grad_x W1^T g1 (hidden chunks streamed), stored at rows gi*PHH + a, columns gj*PWH + b
    of the (B, Cin, HB, WB) buffer gxh (every position written exactly once; the launcher sums
    the positions that read the same pixel)."""
    acc_dtype: tl.constexpr = tl.float64 if ACC_F64 else tl.float32
    item, b, patch, G, r0, ph, c0, pw = _patch_item(gh, gw, H, W)
    gi = patch // gw
    gj = patch % gw
    hw = pw + 2
    nq = (ph + 2) * hw
    c, cmask = _block_range(0, Cin, CIN_BLOCK)
    wbase = w_ptr + b * N * G + patch * WP
    gxh_rows = gxh_ptr + (b * Cin + c[:, None]) * HB * WB  # (CIN, 1)
    for q0 in range(0, nq, BLOCK_Q):
        q, qmask = _block_range(q0, nq, BLOCK_Q)
        gx = tl.zeros((CIN_BLOCK, BLOCK_Q), dtype=acc_dtype)
        for k0 in range(0, hid, HID_CHUNK):
            k, kmask = _block_range(k0, hid, HID_CHUNK)
            w1t = tl.load(wbase + (k[None, :] * Cin + c[:, None]) * WS, mask=cmask[:, None] & kmask[None, :],
                          other=0.0).to(acc_dtype)  # (CIN, HID_CHUNK)
            g1 = tl.load(g1_ptr + (item * hid + k[:, None]).to(tl.int64) * NQ + q[None, :],
                         mask=kmask[:, None] & qmask[None, :], other=0.0)
            gx = _mm(w1t, g1, gx, ACC_F64)
        hoff = (gi * PHH + q // hw) * WB + gj * PWH + q % hw
        tl.store(gxh_rows + hoff[None, :], gx, mask=cmask[:, None] & qmask[None, :])


def _hid_chunk(hid: int, cin_block: int) -> int:
    """Hidden channels per streamed chunk (a tl.dot operand dimension: 16 or 32). 16 when the input
    block is 64 channels or more: the W1 chunk (HID_CHUNK x CIN_BLOCK, plus its 3xTF32 hi/lo split in
    float32) and the nine tap tiles then stay within 255 registers per thread at 4 warps on sm_90
    (HyperSeg-M's 64-channel levels spilled 124-570 B per thread with chunks of 32); the chunk loop
    runs twice as often, each tl.dot still K = CIN_BLOCK deep."""
    return 16 if hid <= 16 or cin_block >= 64 else 32


def _px_block(pixels: int) -> int:
    """Pixels per tile: the patch (or haloed patch) size rounded up to a power of two, 16..32
    (tl.dot needs >= 16; 32 keeps every (rows x pixels) tile, 3xTF32 operand splits included,
    within the register file without spills)."""
    return int(min(max(16, triton.next_power_of_2(max(int(pixels), 1))), 32))


#: Warps and software-pipelining stages of the meta-block programs (tiles are at most 64 x 32;
#: pipelining the hidden-chunk loops would multiply the shared-memory buffers of its nine tl.dot
#: per chunk and the live registers). _NUM_WARPS is also the pointwise_block kernels' default.
_NUM_WARPS = 4
_NUM_STAGES = 1
#: Stage 1 of the backward holds the most per program (z1, u1, dL/dh1 and dL/dz1 tiles of
#: HID_CHUNK x BLOCK_Q, the W1 chunk and the W1/W2 gradient accumulators): at 4 warps (HID_CHUNK,
#: CIN_BLOCK, BLOCK_Q) = (32, 32, 32) needs ~40 B/thread of spill on sm_90; 8 warps halve every
#: tile's share per thread (no spills, <= 255 registers x 256 threads: one program per SM half).
_NUM_WARPS_STAGE1 = 8


def _num_warps(cin_block: int, cout_block: int = 0) -> int:
    """Warps of the forward, stage 2/3 and grad_x programs, from ptxas -v on sm_90 at every registry
    model's blocks: (CIN_BLOCK, COUT_BLOCK) = (32, 32) tiles (HyperSeg-S) need 255 registers plus
    28-36 B/thread of spill at 4 warps, and 16-channel inputs spill 4-28 B at 96-128 registers; both
    compile clean at 8 warps (half of every tile per thread). Everything else (HyperSeg-M's levels,
    64-channel inputs with hidden chunks of 16) is clean at 4 warps, where twice as many programs
    fit an SM."""
    return 8 if cin_block <= 16 or (cin_block <= 32 and cout_block >= 32) else _NUM_WARPS


def _values_per_patch(x: torch.Tensor, weight: torch.Tensor, hid: int, cout: int) -> int:
    """N, the weight values per patch (hid*Cin + 9*hid + Cout*hid, checked)."""
    N, Cin = weight.shape[1], x.shape[1]
    if N != hid * Cin + 9 * hid + cout * hid:
        raise ValueError(f"weight has {N} values per patch; expected hid*Cin + 9*hid + Cout*hid for "
                         f"Cin={Cin}, hid={hid}, Cout={cout}")
    return N


def forward(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, hidden: int,
            out_channels: int) -> torch.Tensor:
    """Fused meta block forward (inputs already validated by pyseg.ops.meta_block)."""
    x = x.contiguous()
    weight, WP, WS = _weight_strides(weight)
    B, Cin, H, W = x.shape
    gh, gw = weight.shape[-2:]
    N = _values_per_patch(x, weight, hidden, out_channels)
    y = _empty((B, out_channels, H, W), x)
    max_pix = -(-H // gh) * -(-W // gw)
    bp = _px_block(max_pix)
    grid = (B * gh * gw, triton.cdiv(max_pix, bp))
    _launch(_meta_fwd_kernel, grid, x, weight, scale.contiguous(), shift.contiguous(), y, Cin, H, W, gh, gw,
            hidden, out_channels, N, WP, WS, CIN_BLOCK=_blk(Cin), HID_CHUNK=_hid_chunk(hidden, _blk(Cin)),
            COUT_BLOCK=_blk(out_channels), BLOCK_P=bp, ACC_F64=x.dtype == torch.float64,
            num_warps=_num_warps(_blk(Cin), _blk(out_channels)), num_stages=_NUM_STAGES)
    return y


def _reflect_host(i: int, n: int) -> int:
    return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)


@functools.lru_cache(maxsize=128)
def _halo_gather_index_cpu(n: int, grid: int) -> torch.Tensor:
    """(n, R) int64: for every image coordinate r along an axis of n pixels cut into ``grid`` cells,
    the coordinates g*(P+2) + a (P = ceil(n/grid)) of the haloed positions a of cell g that read r
    (reflect at the image borders), in increasing order, padded with grid*(P+2), the buffer's zero
    slot. Same set as halo_readers in csrc/common/meta_block.h."""
    pitch = -(-n // grid) + 2
    readers = [[] for _ in range(n)]
    for g in range(grid):
        beg, end = -(-g * n // grid), -(-(g + 1) * n // grid)
        for a in range(end - beg + 2):
            readers[_reflect_host(beg - 1 + a, n)].append(g * pitch + a)
    width = max(len(r) for r in readers)
    return torch.tensor([r + [grid * pitch] * (width - len(r)) for r in readers], dtype=torch.int64)


def _halo_gather_index(n: int, grid: int, device: torch.device) -> torch.Tensor:
    return _halo_gather_index_cpu(n, grid).to(device)


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
             shift: torch.Tensor, hidden: int, out_channels: int, output_mask: Sequence[bool]):
    """(grad_x, grad_weight, grad_scale, grad_shift) of the fused meta block; entries whose
    output_mask is false are empty tensors. Deterministic (no atomics): four kernels (stage 3,
    stage 2, stage 1, grad_x; see the module docstring), affine partials per work item summed in
    float64 in a fixed order, grad_x gathered from per-patch haloed buffers."""
    hid, Cout = int(hidden), int(out_channels)
    grad_out, x, weight, scale, shift, (need_x, need_w, need_aff), outs = _block_backward_inputs(
        grad_out, x, weight, scale, shift, Cout, output_mask, patch_major=True)
    weight, WP, WS = _weight_strides(weight)
    B, Cin, H, W = x.shape
    gh, gw = weight.shape[-2:]
    N = _values_per_patch(x, weight, hid, Cout)
    if not (need_x or need_w or need_aff):
        return tuple(outs)
    G = gh * gw
    PH, PW = -(-H // gh), -(-W // gw)
    NP, A = PH * PW, 2 * hid + Cout
    PHH, PWH = PH + 2, PW + 2
    NQ = PHH * PWH
    HB, WB = gh * PHH + 1, gw * PWH + 1  # haloed grad_x buffer + one zero row/column (gather padding)
    f32 = _acc_dtype(x)
    g3 = _empty((B * G, Cout, NP), x, f32)
    g2 = _empty((B * G, hid, NP), x, f32)
    part = _empty((B * G, 2, A), x, f32) if need_aff else g2
    if need_w:  # in the weight's layout (the kernels write it with the weight's strides)
        outs[1] = (_empty(weight.shape, weight) if WP == 1 else
                   _empty((B, gh, gw, N), weight).permute(0, 3, 1, 2))
    g1 = _empty((B * G, hid, NQ), x, f32) if need_x else g2
    cb, ob = _blk(Cin), _blk(Cout)
    hc = _hid_chunk(hid, cb)
    nhc = triton.cdiv(hid, hc)
    f64 = x.dtype == torch.float64
    bp, bq = _px_block(NP), _px_block(NQ)
    gw_arg = outs[1] if need_w else weight
    _launch(_meta_bwd_stage3_kernel, (B * G,), x, weight, scale, shift, grad_out, g3, part,
            Cin, H, W, gh, gw, hid, Cout, N, WP, WS, A, NP, CIN_BLOCK=cb, HID_CHUNK=hc, COUT_BLOCK=ob, BLOCK_P=bp,
            NEED_AFF=int(need_aff), ACC_F64=f64, num_warps=_num_warps(cb, ob), num_stages=_NUM_STAGES)
    _launch(_meta_bwd_stage2_kernel, (B * G, nhc), x, weight, scale, shift, g3, g2, gw_arg, part,
            Cin, H, W, gh, gw, hid, Cout, N, WP, WS, A, NP, CIN_BLOCK=cb, HID_CHUNK=hc, COUT_BLOCK=ob, BLOCK_P=bp,
            NEED_W=int(need_w), NEED_AFF=int(need_aff), ACC_F64=f64, num_warps=_num_warps(cb, ob),
            num_stages=_NUM_STAGES)
    _launch(_meta_bwd_stage1_kernel, (B * G, nhc), x, weight, scale, shift, g2, g1, gw_arg, part,
            Cin, H, W, gh, gw, hid, N, WP, WS, A, NP, NQ, CIN_BLOCK=cb, HID_CHUNK=hc, BLOCK_Q=bq,
            NEED_X=int(need_x), NEED_W=int(need_w), NEED_AFF=int(need_aff), ACC_F64=f64, num_warps=_NUM_WARPS_STAGE1,
            num_stages=_NUM_STAGES)
    if need_x:
        gxh = _empty((B, Cin, HB, WB), x, f32)
        gxh[:, :, HB - 1, :] = 0
        gxh[:, :, :, WB - 1] = 0
        _launch(_meta_bwd_gradx_kernel, (B * G,), weight, g1, gxh, Cin, H, W, gh, gw, hid, N, WP, WS, NQ, PHH, PWH, HB, WB,
                CIN_BLOCK=cb, HID_CHUNK=hc, BLOCK_Q=bq, ACC_F64=f64, num_warps=_num_warps(cb), num_stages=_NUM_STAGES)
    if need_aff:
        _affine_grads(part, output_mask, scale, shift, outs)  # fixed-order reduction over the work items
    if need_x:
        ridx = _halo_gather_index(H, gh, x.device)
        cidx = _halo_gather_index(W, gw, x.device)
        rows_sum = gxh.index_select(2, ridx.reshape(-1)).view(B, Cin, H, ridx.shape[1], WB).sum(3)
        outs[0] = rows_sum.index_select(3, cidx.reshape(-1)).view(B, Cin, H, W, cidx.shape[1]).sum(4).to(x.dtype)
    return tuple(outs)
